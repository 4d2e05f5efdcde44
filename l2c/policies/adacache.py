"""`adacache`: adaptive caching (AdaCache, Kahatapitiya et al. 2024), per sample and content dependent.

Each sample (batch row) either computes every branch at a step or reuses every branch's cache. Whenever a
sample computes, the probe branch's output (by default the middle block's attention, the residual it adds to the
stream) is compared with its output at the sample's previous computed step:

    change = mean|out_t − out_prev| / mean|out_prev| / (t − prev)        (per sample)

and the codebook picks how many steps until that sample computes again: `codebook="0.12:4+0.18:3+0.3:2"` means
change < 0.12 → compute again 4 steps later (reuse 3), < 0.18 → 3, < 0.3 → 2, otherwise the next step. Steps 0
and 1 always compute (the first change needs two computed steps). The paper's motion regularisation scales the
rate with a video's frame-to-frame motion; it is video-only and left out here.

The probe: block `probe_block` (-1: `num_blocks // 2` of the blocks in execution order), branch `probe_branch`
(None: the model's first branch, its self or joint attention in every family: `attn1` of BasicTransformerBlock and
Wan, `attn` of Flux.1/Flux.2 (double and single blocks), SD3 and Qwen-Image; a saved "attn1" stays attn1). A joint
attention's change is read on its image stream (`first_stream`); a Flux single block's attention runs on [text;
image], so there it reads both. A probe slot that no module executes (e.g. `ff` on a Flux single block, SD3.5's
`attn2` on a block without dual attention) is refused at apply: the probe would never fire.

The decision lives in `decide` and the measurement in `observe` (the runtime's dynamic hooks); all per-trajectory
signals sit in the trajectory state (`state.signals["adacache"]`), never on the policy. Rows that reuse are not
computed at all: the runtime runs each branch on the computing rows only, so FLOPs fall with every reused sample.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..adapters import ModelSpec, model_spec
from ..extension import BlockInput, BranchCall, TrajectoryState, first_stream
from ..plan import Action, Plan
from .base import CachePolicy
from .knobs import Range, at_least

SIGNAL = "adacache"


def parse_codebook(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`"0.05:4+0.1:3"` → (thresholds [K] increasing, steps-until-next-compute [K]); raises ValueError if malformed."""
    pairs = []
    for item in filter(None, str(text).split("+")):
        threshold, sep, rate = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            pairs.append((float(threshold), int(rate)))
        except ValueError:
            raise ValueError(
                f"adacache policy: field 'codebook' entry {item!r} is not threshold:steps (e.g. 0.05:4+0.1:3)"
            ) from None
    thresholds = [t for t, _ in pairs]
    if not pairs or any(not t > 0 for t in thresholds) or thresholds != sorted(set(thresholds)):
        raise ValueError(f"adacache policy: field 'codebook' needs thresholds > 0 in increasing order, got {text!r}")
    if any(r < 1 for _, r in pairs):
        raise ValueError(f"adacache policy: field 'codebook' needs steps ≥ 1, got {text!r}")
    return torch.tensor(thresholds, dtype=torch.float64), torch.tensor([r for _, r in pairs], dtype=torch.long)


def steps_until_next(change: torch.Tensor, thresholds: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Per sample: the rate of the first codebook threshold above `change`; 1 (the next step) above them all."""
    slot = torch.searchsorted(thresholds, change.double().cpu().contiguous(), right=True)
    table = torch.cat([rates, torch.ones(1, dtype=torch.long)])
    return table[slot]


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per sample (row): mean|new − old| / mean|old|, [B]."""
    dims = tuple(range(1, new.ndim))
    delta = (new.float() - old.float()).abs().mean(dim=dims)
    return delta / old.float().abs().mean(dim=dims).clamp_min(1e-12)


@dataclass
class AdaState:
    """One trajectory's per-sample bookkeeping (lives in `TrajectoryState.signals`)."""

    next_compute: torch.Tensor  # [B] step at which each sample computes next
    last_computed: torch.Tensor  # [B] last step the sample computed (-1: never)
    probe: tuple[int, str] | None = None  # the (block, branch) whose change is measured
    codes_step: int = -1
    codes: torch.Tensor | None = None  # [B] this step's action per sample
    history: list[tuple[int, list[int]]] = field(default_factory=list)  # (step, action per sample)
    changes: list[tuple[int, list[int], list[float]]] = field(default_factory=list)  # (step, rows, change)


@dataclass
class AdaCachePolicy(CachePolicy):
    kind = "adacache"
    knob_ranges: ClassVar[dict[str, Range]] = {"probe_block": at_least(-1)}  # -1: the middle block
    codebook: str = "0.12:4+0.18:3+0.3:2"  # threshold:steps-to-next-compute, '+'-separated ('/' reads as a hub id)
    probe_block: int = -1  # -1: the middle block (num_blocks // 2)
    probe_branch: str | None = None  # None: the model's first branch (its self or joint attention)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_codebook(self.codebook)

    def described_params(self) -> dict:
        """An unset probe branch (the model's own) is left out."""
        return {k: v for k, v in self.params().items() if v is not None}

    def probe(self, spec: ModelSpec) -> tuple[int, str]:
        """The (block, branch) this policy measures on a model; ValueError where no module executes that slot."""
        if self.probe_block >= spec.num_blocks:
            raise ValueError(
                f"adacache policy: field 'probe_block' is {self.probe_block}; the model has {spec.num_blocks} blocks"
            )
        block = spec.num_blocks // 2 if self.probe_block == -1 else self.probe_block
        branch = spec.branches[0] if self.probe_branch is None else self.probe_branch
        if branch not in spec.branches:
            raise ValueError(
                f"adacache policy: field 'probe_branch' is {branch!r}; the model's branches are {list(spec.branches)}"
            )
        if (block, branch) in spec.absent:
            there = [name for name in spec.branches if (block, name) not in spec.absent]
            raise ValueError(
                f"adacache policy: block {block} of this model ({spec.family}) has no {branch!r} branch (it has "
                f"{there}), so the probe would never fire; set field 'probe_block' to a block that has it, or "
                "'probe_branch' to one of those"
            )
        return block, branch

    def check_model(self, spec: ModelSpec, pipeline: object | None = None) -> None:
        self.probe(spec)
        super().check_model(spec, pipeline)

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        """Static view: compute everywhere. The real decisions are made per sample at run time (`decide`)."""
        return Plan.full(num_steps, spec.num_blocks, len(spec.branches))

    def _state(self, state: TrajectoryState) -> AdaState:
        ada = state.signals.get(SIGNAL)
        if ada is None:
            batch = state.batch_size
            ada = AdaState(torch.zeros(batch, dtype=torch.long), torch.full((batch,), -1, dtype=torch.long))
            state.signals[SIGNAL] = ada
        return ada

    def decide(self, step: int, block: int, branch_index: int, state: TrajectoryState):
        """Every branch of a step follows the same per-sample codes, fixed at the step's first branch."""
        ada = self._state(state)
        if ada.codes_step != step:
            compute = ada.next_compute <= step
            ada.codes = torch.where(compute, int(Action.COMPUTE), int(Action.REUSE)).to(torch.int8)
            ada.codes_step = step
            ada.history.append((step, ada.codes.tolist()))
        return ada.codes, 1.0

    def before_blocks(self, point: BlockInput) -> None:
        """Resolve the probe once per trajectory (the runtime checked at apply that it exists)."""
        ada = self._state(point.state)
        if ada.probe is None:
            ada.probe = self.probe(model_spec(point.model))

    def observe(self, call: BranchCall):
        if call.action != Action.COMPUTE or (call.block, call.branch) != self._state(call.state).probe:
            return None
        return self._measure(call)

    @contextmanager
    def _measure(self, call: BranchCall):
        old = call.store.output
        yield
        ada = self._state(call.state)
        new = first_stream(call.store.output)
        rows = call.rows if call.rows is not None else torch.arange(new.shape[0])
        rows_cpu = rows.cpu()
        if old is None:  # the first computed step: measure from the next one
            ada.next_compute[rows_cpu] = call.step + 1
        else:
            device_rows = rows.to(new.device)
            gap = (call.step - ada.last_computed[rows_cpu]).clamp_min(1)
            old = first_stream(old)
            change = relative_change(new.index_select(0, device_rows), old.index_select(0, device_rows)).cpu()
            change = change / gap
            ada.next_compute[rows_cpu] = call.step + steps_until_next(change, *parse_codebook(self.codebook))
            ada.changes.append((call.step, rows_cpu.tolist(), change.tolist()))
        ada.last_computed[rows_cpu] = call.step
