"""What every caching policy shares: a plan builder, the model it was made for, apply and save."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

import torch

from ..adapters import ModelSpec
from ..extension import (
    BlockInput,
    BranchCall,
    Decision,
    StepOutput,
    TokenPruning,
    TokenSelector,
    TrajectoryState,
    check_extensions,
    stalest_tokens,
)
from ..plan import Plan
from ..runtime import CacheRuntime
from .knobs import Range, check_knobs

if TYPE_CHECKING:
    from torch import nn

# How a run's steps are matched to the plan's: "timestep" (default) refuses a run whose timestep table differs from
# the one the policy was made for (e.g. Flux at another resolution: its dynamic shift moves every timestep);
# "index": the user asks explicitly to run the plan's step i at the run's step i (the step count must still match).
StepMatch = Literal["timestep", "index"]
STEP_MATCHES: tuple[str, ...] = get_args(StepMatch)
HINT = "sample with the resolution, scheduler and step count the policy was made for, or pass step_match='index'"


@dataclass(frozen=True)
class PolicyTarget:
    """The model, scheduler and exact timesteps a saved policy was made for."""

    model: ModelSpec
    scheduler: str | None
    timesteps: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "scheduler": {"class": self.scheduler, "num_steps": len(self.timesteps), "timesteps": list(self.timesteps)},
        }


@dataclass
class CachePolicy:
    """Base of every policy: subclasses are dataclasses of their knobs and implement `build_plan`.

    Dynamic policies also override the runtime's extension points below (no-ops here; `check_extensions` refuses, at
    apply, an override the runtime could not call and a near-miss name such as `observe_ouput`).
    """

    kind: ClassVar[str]
    knob_ranges: ClassVar[Mapping[str, Range]] = {}  # field → what it accepts, checked at construction
    # A `PartialKeys`: what partial self-attention's queries attend to; a subclass may make it a field (it is left
    # unannotated here so that such a field keeps its place among the subclass's own, in `params()` and `describe()`).
    partial_keys = "fresh"
    # A `Forecaster` (`l2c.extension`): how the plan's FORECAST slots predict a branch from its last `history`
    # computed outputs (only branches whose plan forecasts keep them); None: `l2c.forecast.DEFAULT_FORECASTER`
    # (TaylorSeer's rule of order 2, K = 3). Unannotated like `partial_keys`, so a subclass may make it a field or
    # set it from its own knobs.
    forecaster = None
    target: PolicyTarget | None = field(default=None, kw_only=True, repr=False)
    provenance: dict = field(default_factory=dict, kw_only=True, repr=False)
    step_match: StepMatch = field(default="timestep", kw_only=True, repr=False)  # not saved: a choice per use

    def __post_init__(self) -> None:
        """Refuse a knob outside its declared range (subclasses that check more call this first)."""
        check_knobs(self)
        if self.step_match not in STEP_MATCHES:
            raise ValueError(
                f"policy {self.kind!r}: field 'step_match' is {self.step_match!r}, expected one of {list(STEP_MATCHES)}"
            )

    # -- what subclasses provide ----------------------------------------------------------------
    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        raise NotImplementedError

    # -- the runtime's extension points (see `l2c.extension`) -------------------------------------------------------
    def token_selector(self) -> TokenSelector:
        """Which tokens a PARTIAL branch recomputes (default: the stalest)."""
        return stalest_tokens

    def prepare(self, model: nn.Module) -> None:
        """Once per application, first of all (before the plan and the hooks; e.g. to build modules from the model)."""

    def decide(self, step: int, block: int, branch_index: int, state: TrajectoryState) -> Decision | None:
        """Override the plan's (action, ratio) at run time; `action` may be a tensor of per-row COMPUTE/REUSE codes
        (only the computing rows run). None: the plan's entry."""
        return None

    def before_blocks(self, point: BlockInput) -> None:
        """Once per denoiser call, after the step is resolved, with the first block's input (e.g. to score tokens)."""

    def observe(self, call: BranchCall) -> AbstractContextManager | None:
        """A context manager entered around this branch execution (to measure signals into `state.signals`)."""
        return None

    def token_pruning(self, call: BranchCall) -> TokenPruning | None:
        """Make a branch that computes (every row) run on some of its tokens and fill the others from kept ones."""
        return None

    def observe_output(self, out: StepOutput) -> None:
        """See the denoiser's output of every step."""

    def check_extensions(self) -> None:
        """Raise TypeError naming the policy class and method if an override does not fit its extension point."""
        check_extensions(self, CachePolicy)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors saved beside the plan in `policy.safetensors` (none for rule-based policies)."""
        return {}

    @classmethod
    def from_artifact(cls, params: dict, tensors: dict[str, torch.Tensor], target: PolicyTarget) -> CachePolicy:
        return cls(**params, target=target)

    # -- shared ---------------------------------------------------------------------------------
    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and not f.kw_only}

    @property
    def timesteps(self) -> tuple[float, ...] | None:
        return None if self.target is None else self.target.timesteps

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.described_params().items())
        return f"{self.kind}:{args}" if args else self.kind

    def described_params(self) -> dict:
        """The fields the preset string `describe` names (all of `params` unless a policy leaves some out)."""
        return self.params()

    def plan_for(self, spec: ModelSpec, timesteps: torch.Tensor) -> Plan:
        plan = self.build_plan(spec, len(timesteps))
        plan.present = spec.present()
        plan.validate(len(timesteps), spec.num_blocks, len(spec.branches), source=f"policy {self.describe()!r}")
        return plan

    def check_model(self, spec: ModelSpec, pipeline: object | None = None) -> None:
        """Raise ValueError naming the first field where the model differs from the policy's target."""
        if self.target is None:
            return
        mine = self.target.model
        for name in ("num_blocks", "branches", "hidden_size", "num_tokens"):
            ours, theirs = getattr(mine, name), getattr(spec, name)
            if name == "num_tokens" and theirs is None:
                continue  # the model's config does not fix it: each call's count is checked (`check_tokens`)
            if ours != theirs:
                raise ValueError(
                    f"policy does not fit this model: field '{name}' is {ours!r} in the policy, "
                    f"{theirs!r} in the model ({type_name(spec)})"
                )
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is not None and self.target.scheduler is not None:
            if type(scheduler).__name__ != self.target.scheduler:
                raise ValueError(
                    f"policy does not fit this pipeline: field 'scheduler' is {self.target.scheduler!r} in the "
                    f"policy, {type(scheduler).__name__!r} in the pipeline"
                )

    def check_timesteps(self, timesteps: torch.Tensor) -> None:
        """Raise ValueError if a run's step count or timesteps differ from the ones the policy was made for."""
        if self.target is None:
            return
        ours = torch.tensor(self.target.timesteps, dtype=torch.float64)
        theirs = timesteps.detach().flatten().to("cpu", torch.float64)
        if len(ours) != len(theirs):
            raise ValueError(
                f"policy does not fit this run: field 'num_steps' is {len(ours)} in the policy, "
                f"{len(theirs)} in the run (timesteps {_rounded(ours)} in the policy, {_rounded(theirs)} in the run)"
            )
        if self.step_match == "timestep" and not torch.allclose(ours, theirs, atol=1e-4):
            raise ValueError(
                f"policy does not fit this run: field 'timesteps' is {_rounded(ours)} in the policy, "
                f"{_rounded(theirs)} in the run; {HINT} to run the plan step by step on this table"
            )

    def check_tokens(self, num_tokens: int, shifts: bool = False) -> None:
        """Raise ValueError if a call's image token count differs from the one the policy was made for (`shifts`:
        the model family's scheduler shift depends on it, so the timesteps differ too); not with step_match='index'."""
        ours = None if self.target is None else self.target.model.num_tokens
        if ours is None or ours == num_tokens or self.step_match == "index":
            return
        why = "; it sets this family's scheduler shift, so every timestep moves" if shifts else ""
        raise ValueError(
            f"policy does not fit this run: field 'num_tokens' (image tokens) is {ours} in the policy, {num_tokens} "
            f"in the run{why}; {HINT}"
        )

    def bind(
        self,
        model: nn.Module | object,
        timesteps: torch.Tensor | list,
        scheduler: str | None,
        num_tokens: int | None = None,
    ) -> CachePolicy:
        """A copy of this policy tied to a model, a scheduler class and exact timesteps (needed to save).

        `num_tokens`: the image token count of the run, for models whose config does not fix it (Flux, Flux.2, SD3,
        Wan, Qwen-Image: `l2c.adapters.MODEL_FAMILIES`); a run at another count is then refused (`check_tokens`).
        """
        from ..adapters import model_spec

        bound = copy.copy(self)
        values = tuple(float(t) for t in torch.as_tensor(timesteps).flatten().tolist())
        bound.target = PolicyTarget(model_spec(model, num_tokens), scheduler, values)
        return bound

    def apply(
        self,
        target: nn.Module | object,
        timesteps: torch.Tensor | list | None = None,
        step_match: StepMatch | None = None,
    ) -> CacheRuntime:
        """Hook a pipeline (or its denoiser); returns the runtime, whose `remove()` undoes everything.

        `step_match="index"` runs a plan made for another timestep table (e.g. Flux at another resolution) step by
        step on this run's table, where the default ("timestep") refuses it naming both tables.
        """
        return CacheRuntime(target, self.matching(step_match), timesteps=timesteps)

    def matching(self, step_match: StepMatch | None) -> CachePolicy:
        """This policy with its steps matched by `step_match` (a copy; None: as it is)."""
        if step_match is None or step_match == self.step_match:
            return self
        if step_match not in STEP_MATCHES:
            raise ValueError(f"step_match is {step_match!r}, expected one of {list(STEP_MATCHES)}")
        policy = copy.copy(self)
        policy.step_match = step_match
        return policy

    def save_pretrained(self, directory: str | Path, metrics: dict | None = None, model_card: bool = True) -> Path:
        """Write the policy and its model card; `metrics`: numbers measured against the uncached model."""
        from ..policy_io import save_policy

        return save_policy(self, directory, metrics=metrics, model_card=model_card)

    def push_to_hub(self, repo_id: str, **options) -> str:
        """Upload the policy with its model card to the hub (`l2c.policy_io.push_policy`'s options)."""
        from ..policy_io import push_policy

        return push_policy(self, repo_id, **options)


def type_name(spec: ModelSpec) -> str:
    return f"{spec.family}, {spec.num_blocks} blocks"


def _rounded(timesteps: torch.Tensor) -> list[float]:
    return [round(t, 4) for t in timesteps.tolist()]
