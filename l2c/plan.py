"""What a policy decides: for every sampling step, block and branch, compute, reuse, partial or forecast."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Action(IntEnum):
    COMPUTE = 0  # run the branch, store its output
    REUSE = 1  # return the output stored at the last step that computed this branch
    PARTIAL = 2  # recompute a share of the tokens, reuse the rest
    FORECAST = 3  # predict the output from the branch's last computed outputs (the policy's `forecaster`)


@dataclass
class Plan:
    """Dense decision table: `actions[step, block, branch]`, `token_ratio` for PARTIAL slots.

    `present` [blocks, branches] marks the slots some module executes (`ModelSpec.present()`, set by
    `CachePolicy.plan_for`): a block lacking a branch (a Flux single block's `ff_context`) has a column it never runs,
    which is no work and no saving. None: every slot is real.
    """

    actions: torch.Tensor  # int8 [steps, blocks, branches]
    token_ratio: torch.Tensor  # float32 [steps, blocks, branches], in (0, 1] where PARTIAL
    present: torch.Tensor | None = None  # bool [blocks, branches]

    @classmethod
    def full(cls, num_steps: int, num_blocks: int, num_branches: int) -> Plan:
        shape = (num_steps, num_blocks, num_branches)
        return cls(torch.zeros(shape, dtype=torch.int8), torch.ones(shape, dtype=torch.float32))

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    def validate(self, num_steps: int, num_blocks: int, num_branches: int, source: str = "plan") -> None:
        """Raise ValueError naming the field at fault; a plan that passes can always be executed."""
        expected = (num_steps, num_blocks, num_branches)
        for name, tensor in (("actions", self.actions), ("token_ratio", self.token_ratio)):
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{source}: field '{name}' has shape {tuple(tensor.shape)}, expected "
                    f"(steps, blocks, branches) = {expected}"
                )
        if self.actions.dtype not in INTEGER_DTYPES:
            raise ValueError(f"{source}: field 'actions' must hold integers, got {self.actions.dtype}")
        if self.token_ratio.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{source}: field 'token_ratio' must hold floats, got {self.token_ratio.dtype}")
        if self.present is not None and tuple(self.present.shape) != expected[1:]:
            raise ValueError(
                f"{source}: field 'present' has shape {tuple(self.present.shape)}, expected (blocks, branches) = "
                f"{expected[1:]}"
            )
        valid = {int(a) for a in Action}
        found = set(torch.unique(self.actions).tolist())
        if not found <= valid:
            raise ValueError(f"{source}: field 'actions' holds {sorted(found - valid)}, expected codes {sorted(valid)}")
        if num_steps and bool((self.actions[0] != Action.COMPUTE).any()):
            raise ValueError(f"{source}: field 'actions' must compute every branch at step 0 (nothing is cached yet)")
        partial = self.actions == Action.PARTIAL
        ratios = self.token_ratio[partial]
        if not torch.isfinite(self.token_ratio).all() or bool(((ratios <= 0) | (ratios > 1)).any()):
            raise ValueError(f"{source}: field 'token_ratio' must be finite and in (0, 1] on partial slots")

    def compute_fraction(self) -> float:
        """Share of the executed branch slots whose work is done (partial counts its token ratio; reuse and forecast
        none); slots no module executes (`present`) count neither way."""
        work = (self.actions == Action.COMPUTE).float() + (self.actions == Action.PARTIAL).float() * self.token_ratio
        if self.present is not None:
            work = work[:, self.present]
        return float(work.mean()) if work.numel() else 1.0
