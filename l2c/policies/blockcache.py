"""`blockcache`: Block Caching ("Cache Me if You Can", Wimbauer et al. 2024), training-free part.

A calibration run samples without caching, under the cache runtime with a full policy that records every
branch's output at every step (the runtime's `timesteps="record"` takes the step table from the first run).
From it, each branch's relative change between consecutive steps,

    change[s] = ‖out_s − out_{s−1}‖₁ / ‖out_s‖₁      (summed over the calibration batch; change[0] = 0),

gives a static schedule: a branch is computed at step 0, then reused until the change accumulated since its
last computation passes `threshold`, computed at that step, and so on. The caching unit is the runtime's
branch (attn1 / attn2 / ff of each block, or a family's own: `l2c.adapters.BLOCK_FAMILIES`), the residual branch
that the paper's "block" is for a UNet layer. A joint attention's change is read on both its streams (image and
text), the value its reuse returns. Pipelines that call the model twice per step (Wan, Qwen-Image: `cache_context`
"cond" / "uncond") are measured per context, each call against the same context's previous step, and summed.
The paper's learned scale-shift alignment is not training-free and is left out.

Calibrate once, then save: the directory stores the measured changes (`blockcache.change`) and the plan they
give, so loading it rebuilds the same schedule without a calibration run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import ModelSpec, find_branches, model_spec, resolve_denoiser
from ..extension import BlockInput, BranchCall, BranchOutput, map_streams, streams
from ..plan import Action, Plan
from ..runtime import BRANCH_HOOK, RECORD_TIMESTEPS, STEP_HOOK, CacheRuntime
from .base import CachePolicy, PolicyTarget
from .full import FullPolicy
from .knobs import NON_NEGATIVE, Range

CHANGE_TENSOR = "blockcache.change"


def schedule_from_change(change: torch.Tensor, threshold: float) -> torch.Tensor:
    """Computed mask [steps, …]: step 0, then every step where the change summed since the last compute > threshold."""
    computed = torch.zeros(change.shape, dtype=torch.bool)
    accumulated = torch.zeros(change.shape[1:], dtype=torch.float64)
    for step in range(change.shape[0]):
        if step == 0:
            computed[0] = True
            continue
        accumulated += change[step].double()
        computed[step] = accumulated > threshold
        accumulated[computed[step]] = 0.0
    return computed


@dataclass
class BlockCachePolicy(CachePolicy):
    kind = "blockcache"
    knob_ranges: ClassVar[dict[str, Range]] = {"threshold": NON_NEGATIVE}
    threshold: float = 0.1  # recompute once the accumulated relative change passes this
    change: torch.Tensor | None = field(default=None, repr=False, kw_only=True)  # [steps, blocks, branches]

    def _uncalibrated(self) -> ValueError:
        return ValueError(
            "blockcache policy is not calibrated: Block Caching schedules each branch from its measured change "
            "between steps. Calibrate on an uncached sampling run with the scheduler and step count you will use, "
            "e.g. `policy = BlockCachePolicy(threshold=0.1).calibrate(pipe, lambda: pipe(class_labels=[1], "
            "num_inference_steps=50))`, then `policy.apply(pipe)`, or `policy.save_pretrained(dir)` and pass "
            "that directory as --policy"
        )

    def check_model(self, spec: ModelSpec, pipeline: object | None = None) -> None:
        if self.change is None:
            raise self._uncalibrated()
        super().check_model(spec, pipeline)

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        if self.change is None:
            raise self._uncalibrated()
        expected = (num_steps, spec.num_blocks, len(spec.branches))
        if tuple(self.change.shape) != expected:
            raise ValueError(
                f"blockcache policy: field '{CHANGE_TENSOR}' has shape {tuple(self.change.shape)}, the model and run "
                f"need (steps, blocks, branches) = {expected}; calibrate with this model and step count"
            )
        plan = Plan.full(*expected)
        plan.actions[~schedule_from_change(self.change, self.threshold)] = Action.REUSE
        return plan

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.change is None else {CHANGE_TENSOR: self.change.detach().float().cpu()}

    @classmethod
    def from_artifact(cls, params: dict, tensors: dict[str, torch.Tensor], target: PolicyTarget) -> CachePolicy:
        if CHANGE_TENSOR not in tensors:
            raise ValueError(f"missing tensor '{CHANGE_TENSOR}' in policy.safetensors")
        return cls(**params, change=tensors[CHANGE_TENSOR].float(), target=target)

    @torch.no_grad()
    def calibrate(self, target: nn.Module | object, run: Callable[[], Any]) -> BlockCachePolicy:
        """Run `run()` (uncached sampling with `target`) and return a copy calibrated and bound to it.

        `run` may sample several batches; each run restarts at the first timestep, and the changes are summed
        over all of them. Calls at the same timestep (e.g. separate conditional / unconditional passes) are
        matched by their order within the step.
        """
        model = resolve_denoiser(target)
        if any(_has_hook(b.module, BRANCH_HOOK) for b in find_branches(model)) or _has_hook(model, STEP_HOOK):
            raise RuntimeError("blockcache calibration needs an uncached run: remove the l2c policy applied first")
        meter = _ChangeMeter()
        with CacheRuntime(target, meter, timesteps=RECORD_TIMESTEPS) as runtime:  # the first run sets the table
            run()
        if runtime.timesteps is None:
            raise ValueError("blockcache calibration: the run never called the model")
        timesteps = runtime.timesteps.tolist()
        scheduler = None if isinstance(target, nn.Module) else getattr(target, "scheduler", None)
        scheduler_name = None if scheduler is None else type(scheduler).__name__
        provenance = {**self.provenance, "calibration": {"runs": meter.runs, "model_calls": meter.calls}}
        return dataclasses.replace(
            self,
            change=meter.change(len(timesteps)),
            target=PolicyTarget(runtime.spec, scheduler_name, tuple(timesteps)),
            provenance=provenance,
        )


def _has_hook(module: nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def _shapes(output: BranchOutput) -> list[torch.Size]:
    return [part.shape for part in streams(output)]


def _l1(output: BranchOutput) -> float:
    """‖output‖₁ over every stream (a joint attention's image and text)."""
    return sum(float(part.abs().double().sum()) for part in streams(output))


class _ChangeMeter(FullPolicy):
    """Calibration: computes every branch (a full policy) and sums each branch's ‖Δout‖₁ and ‖out‖₁ per step.

    The runtime resolves the steps; the meter only tells calls within one step apart (their order) and new runs
    (a call back at step 0), so that each output is compared with the same call of the run's previous step.
    """

    kind = "blockcache-calibration"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.calls = 0
        self.step = -1
        self.call_in_step = 0
        self.spec: ModelSpec | None = None
        self.previous: dict[tuple[int, int, int], torch.Tensor] = {}  # (call in step, block, branch) -> output
        self.current: dict[tuple[int, int, int], torch.Tensor] = {}
        self.delta: dict[tuple[int, int, int], float] = {}  # (step, block, branch) -> Σ‖Δ‖₁
        self.norm: dict[tuple[int, int, int], float] = {}

    def prepare(self, model: nn.Module) -> None:
        self.spec = model_spec(model)

    def before_blocks(self, point: BlockInput) -> None:
        self.calls += 1
        if point.step == self.step:  # another call within the same step (e.g. a separate unconditional pass)
            self.call_in_step += 1
            return
        self._close_step()
        if point.step == 0:  # a run starts
            self.runs += 1
            self.previous.clear()
        self.step, self.call_in_step = point.step, 0

    def observe(self, call: BranchCall) -> AbstractContextManager:
        return self._record(call)

    @contextmanager
    def _record(self, call: BranchCall) -> Iterator[None]:
        yield
        branch = self.spec.branches.index(call.branch)
        self.current[(self.call_in_step, call.block, branch)] = map_streams(torch.Tensor.detach, call.store.output)

    def _close_step(self) -> None:
        """Fold the finished step's outputs into the sums, against the previous step of the same run."""
        if self.step < 0:
            return
        for key, output in self.current.items():
            before = self.previous.get(key)
            slot = (self.step, key[1], key[2])
            if before is not None and _shapes(before) == _shapes(output):
                self.delta[slot] = self.delta.get(slot, 0.0) + _l1(map_streams(torch.sub, output, before))
                self.norm[slot] = self.norm.get(slot, 0.0) + _l1(output)
        self.previous, self.current = self.current, {}

    def change(self, num_steps: int) -> torch.Tensor:
        """change [steps, blocks, branches]: Σ‖Δout‖₁ / Σ‖out‖₁ (0 where nothing was compared, e.g. step 0)."""
        self._close_step()
        change = torch.zeros((num_steps, self.spec.num_blocks, len(self.spec.branches)), dtype=torch.float32)
        for (step, block, branch), delta in self.delta.items():
            change[step, block, branch] = delta / max(self.norm[(step, block, branch)], 1e-12)
        return change
