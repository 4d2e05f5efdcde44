"""Sample with and without a policy from the same noise, side by side, and measure what users care about.

`SamplingSetup` is what a sampling run is, for every command that samples (`infer.py sample` and `fid`,
`bench/compare.py`, the bench scripts); `SideBySide` runs methods beside the uncached model; `report` is the
`report.json` payload and `measure_rows` the benchmark rows built from it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from diffusers import SchedulerMixin
from torch import nn
from tqdm.auto import tqdm

from .metrics import DigitsQuality, count_flops, psnr_db, ssim
from .models import ModelBundle, make_scheduler, resolve_scheduler
from .options import AUTO_SCHEDULER, parse_classes
from .plan import Action, Plan
from .policies import BlockCachePolicy, CachePolicy
from .sampling import balanced_labels, initial_noise, sample
from .timing import Interleaved


@dataclass
class SamplingSetup:
    """What one sampling run is: the model, the scheduler and its step count, the guidance scale, the noise seed,
    how many samples in which batches. The defaults are `infer.py sample`'s; commands that differ subclass this
    with their own defaults (`CompareConfig`, bench/overhead.py's `OverheadSetup`)."""

    model: str = "embedded:digits"
    steps: int = 20
    scheduler: str = AUTO_SCHEDULER  # a `--scheduler` name; `for_model` turns it into the one that samples
    num_samples: int = 64
    seed: int = 0
    guidance_scale: float = 1.5
    batch_size: int = 64
    flops_samples: int = 0  # count FLOPs over the first N samples' whole trajectories (0: all samples)
    classes: tuple[int, ...] | None = None  # the class labels to spread samples over (None: all the model's)

    def __post_init__(self) -> None:
        for name in ("steps", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation: field '{name}' must be ≥ 1, got {getattr(self, name)}")
        if self.classes is not None:
            self.classes = parse_classes(self.classes)

    def labels(self, num_classes: int) -> torch.Tensor:
        """Sample i's class label: `classes` (or 0 … num_classes−1), each equally often; refuses a class the model
        (its `num_classes` labels) does not have."""
        classes = tuple(range(num_classes)) if self.classes is None else self.classes
        outside = [c for c in classes if c >= num_classes]
        if outside:
            raise ValueError(
                f"evaluation: field 'classes' names {outside}, but the model has classes 0–{num_classes - 1} only"
            )
        return balanced_labels(self.num_samples, classes)

    @classmethod
    def trained_like(cls, policy: CachePolicy, **knobs) -> SamplingSetup:
        """Sampling as a trained policy was trained: its step count and guidance scale (1.5 if unrecorded)."""
        return cls(steps=len(policy.timesteps), guidance_scale=policy.provenance.get("guidance_scale", 1.5), **knobs)

    def for_model(self, bundle: ModelBundle) -> SamplingSetup:
        """This run with `scheduler` the name of what samples `bundle` (`auto` → `flow-euler` on a flow-matching
        model, `ddim` on others; ddim and euler → flow-euler on a flow model): what reports write."""
        return dataclasses.replace(self, scheduler=resolve_scheduler(self.scheduler, bundle.scheduler_config))

    def new_scheduler(self, scheduler_config: dict) -> SchedulerMixin:
        """A fresh scheduler of this setup's kind and step count, built from the model's scheduler config."""
        scheduler = make_scheduler(self.scheduler, scheduler_config)
        scheduler.set_timesteps(self.steps)
        return scheduler

    def calibration_run(self, num_samples: int) -> SamplingSetup:
        """The same run on `num_samples` samples of noise apart from the evaluation's (seed + 1), uncached: what
        policies calibrate and peers tune their thresholds on."""
        return dataclasses.replace(self, num_samples=num_samples, seed=self.seed + 1, flops_samples=0)

    def describe(self, policy: str) -> dict[str, Any]:
        """What ran, as `report.json` names it (the README's keys)."""
        return {
            "policy": policy,
            "model": self.model,
            "steps": self.steps,
            "scheduler": self.scheduler,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            **({} if self.classes is None else {"classes": list(self.classes)}),
        }


class Applied(Protocol):
    """What a method applied for one run leaves to read afterwards."""

    executed: Mapping[Action, int]  # branch calls by what they did
    plan: Plan | None  # None for methods that decide at run time


class CacheMethod(Protocol):
    """Anything `SideBySide` runs: a `CachePolicy`, or a peer cache from `l2c.peers`."""

    def apply(self, model: nn.Module, timesteps: torch.Tensor) -> AbstractContextManager[Applied]: ...

    def describe(self) -> str: ...


@dataclass
class PolicyRun:
    """Everything measured for one policy against the uncached model in one run."""

    policy: str
    images: torch.Tensor
    reference: torch.Tensor
    labels: torch.Tensor
    wall_s: float
    wall_s_uncached: float
    flops: int
    flops_uncached: int
    plan: Plan | None
    executed: dict[str, int] = field(default_factory=dict)


class SideBySide:
    """One model, one set of noises and labels; each policy is timed batch by batch beside the uncached run."""

    def __init__(
        self, bundle: ModelBundle, setup: SamplingSetup, progress: bool = True, reference_once: bool = False
    ) -> None:
        """`reference_once`: sample the uncached batches once, with their wall time, and measure every later policy
        against those (half the work of a long table; `speedup_wall` then compares runs made apart in time)."""
        self.bundle, self.setup, self.progress = bundle, setup.for_model(bundle), progress
        self.reference_once = reference_once
        self._references: dict[int, tuple[torch.Tensor, float]] = {}  # batch start -> uncached latents, seconds
        self.noise = initial_noise(setup.num_samples, bundle.sample_shape, setup.seed)
        self.labels = setup.labels(bundle.num_classes)
        self.denoiser = bundle.denoiser(setup.guidance_scale)
        self.timesteps = self._scheduler().timesteps.clone()
        self._flops_uncached: int | None = None  # the same for every policy: counted once
        self._executed: dict[str, int] = {}
        self._plan: Plan | None = None

    def _scheduler(self) -> SchedulerMixin:
        return self.setup.new_scheduler(self.bundle.scheduler_config)

    def _batches(self):
        size = self.setup.batch_size
        for start in range(0, self.setup.num_samples, size):
            yield slice(start, min(start + size, self.setup.num_samples))

    def _sample(self, batch: slice, policy: CacheMethod | None, bar=None, steps: int | None = None) -> torch.Tensor:
        def step(_: int) -> None:
            if bar is not None:
                bar.update((batch.stop - batch.start) * self.setup.steps / (steps or self.setup.steps))

        noise, labels = self.noise[batch], self.labels[batch]
        if policy is None:
            return sample(self.denoiser, self._scheduler(), noise, labels, steps or self.setup.steps, step)
        with policy.apply(self.bundle.transformer, timesteps=self.timesteps) as runtime:
            latents = sample(self.denoiser, self._scheduler(), noise, labels, self.setup.steps, step)
        for action, count in runtime.executed.items():
            self._executed[action.name.lower()] = self._executed.get(action.name.lower(), 0) + count
        self._plan = runtime.plan
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.bundle.vae
        if vae is None:
            return latents.clamp(-1, 1).float().cpu()
        with torch.no_grad():
            return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1).float().cpu()

    def _flops(self, policy: CacheMethod | None, steps: int | None = None) -> int:
        count = self.setup.flops_samples or self.setup.num_samples
        total = 0
        for batch in self._batches():
            if batch.start >= count:
                break
            part = slice(batch.start, min(batch.stop, count))
            _, flops = count_flops(partial(self._sample, part, policy, None, steps))
            total += flops
        return total

    def uncached(self) -> torch.Tensor:
        """Every sample, uncached (e.g. the run a policy calibrates on)."""
        return torch.cat([self._sample(batch, None) for batch in self._batches()])

    def images(self, policy: CacheMethod | None) -> torch.Tensor:
        """Every sample with `policy` (None: uncached), decoded as `run` decodes them, without timing, FLOPs or the
        uncached side: what a knob is tuned on."""
        return self._decode(torch.cat([self._sample(batch, policy) for batch in self._batches()]))

    def check(self, policy: CacheMethod) -> None:
        """Apply `policy` and remove it at once: errors that need no sampling (a model or run it does not fit, a
        policy not calibrated) are raised before any work."""
        with policy.apply(self.bundle.transformer, timesteps=self.timesteps):
            pass

    def flops_ratio(self, policy: CacheMethod) -> float:
        """FLOPs with `policy` ÷ uncached over the FLOPs samples, without timing or images: for tuning a knob."""
        if self._flops_uncached is None:
            self._flops_uncached = self._flops(None)
        return self._flops(policy) / self._flops_uncached

    def run(self, policy: CacheMethod | None, label: str | None = None, steps: int | None = None) -> PolicyRun:
        """`policy` beside the uncached run; `policy=None, steps=k`: the uncached model with k steps instead."""
        if (policy is None) != (steps is not None) or (policy is None and label is None):
            raise ValueError("SideBySide.run: pass a policy, or policy=None with `steps` and a `label` (fewer steps)")
        if policy is not None:
            self.check(policy)
        self._executed, self._plan = {}, None
        label = label or policy.describe()
        latents, reference = [], []
        timer = Interleaved("abba")  # which side runs first alternates batch by batch
        reference_s = 0.0  # seconds of the kept uncached batches (`reference_once`)
        work = 2 * self.setup.num_samples * self.setup.steps
        with tqdm(
            total=work, desc=f"sampling {label} + uncached", unit="sample-step", disable=not self.progress
        ) as bar:
            for batch in self._batches():
                kept = self._references.get(batch.start)
                if kept is not None:
                    bar.update((batch.stop - batch.start) * self.setup.steps)
                    reference_s += kept[1]
                calls = {"policy": partial(self._sample, batch, policy, bar, steps)}
                if kept is None:
                    calls = {"reference": partial(self._sample, batch, None, bar), **calls}
                results = timer.round(calls)
                if kept is None and self.reference_once:
                    self._references[batch.start] = (results["reference"], timer.seconds["reference"][-1])
                reference.append(kept[0] if kept is not None else results["reference"])
                latents.append(results["policy"])
        executed, plan = dict(self._executed), self._plan
        if self._flops_uncached is None:
            self._flops_uncached = self._flops(None)
        flops, flops_uncached = self._flops(policy, steps), self._flops_uncached
        return PolicyRun(
            policy=label,
            images=self._decode(torch.cat(latents)),
            reference=self._decode(torch.cat(reference)),
            labels=self.labels,
            wall_s=timer.total("policy"),
            wall_s_uncached=sum(timer.seconds.get("reference", [])) + reference_s,
            flops=flops,
            flops_uncached=flops_uncached,
            plan=plan,
            executed=executed,
        )


def report(run: PolicyRun, setup: SamplingSetup, quality: DigitsQuality | None) -> dict:
    """The `report.json` payload; keys are a contract (see the README)."""
    result = {
        **setup.describe(run.policy),
        "flops_ratio": run.flops / run.flops_uncached,
        "flops": run.flops,
        "flops_uncached": run.flops_uncached,
        "speedup_wall": run.wall_s_uncached / run.wall_s,
        "wall_s": run.wall_s,
        "wall_s_uncached": run.wall_s_uncached,
        "psnr_db": psnr_db(run.images, run.reference),
        "ssim": ssim(run.images, run.reference),
        "plan_compute_fraction": None if run.plan is None else run.plan.compute_fraction(),
        "executed": run.executed,
    }
    if quality is not None:
        result.update(
            digit_accuracy=quality.accuracy(run.images, run.labels),
            digit_accuracy_uncached=quality.accuracy(run.reference, run.labels),
            fd_digits=quality.fd_digits(run.images),
            fd_digits_uncached=quality.fd_digits(run.reference),
        )
    return result


@dataclass
class Row:
    """One benchmark row to measure: `policy` beside the uncached model, or (no policy) the uncached model at
    `steps` steps. `extra` adds keys to the JSON row (e.g. the budget a router was set to)."""

    method: str  # one marker per method in the plots
    setting: str  # the exact knob setting
    policy: CacheMethod | None = None
    steps: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def measure_rows(
    bench: SideBySide,
    rows: Iterable[Row],
    quality: DigitsQuality | None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The JSON row of each `Row`: method, setting, the `report` keys, note, extras; `digit_accuracy` and
    `fd_digits` are null without the digits metrics. `on_row(row)` follows each, so a long run can save as it goes."""
    results = []
    for row in rows:
        run = bench.run(row.policy, label=row.setting, steps=row.steps)
        result = {"method": row.method, "setting": row.setting, **report(run, bench.setup, quality), "note": row.note}
        if quality is None:
            result.update(digit_accuracy=None, fd_digits=None)
        result.update(row.extra)
        results.append(result)
        if on_row is not None:
            on_row(result)
    return results


@dataclass
class Calibration:
    """What calibrating a policy for a run cost: uncached samples from their own noise seed, and the seconds."""

    samples: int
    seed: int
    wall_s: float

    def describe(self) -> str:
        return f"calibrated on {self.samples} uncached samples (seed {self.seed}) in {self.wall_s:.1f}s"


def needs_calibration(policy: CacheMethod) -> bool:
    """Whether `policy` must measure the model before it can run (Block Caching without its measured changes)."""
    return isinstance(policy, BlockCachePolicy) and policy.change is None


def calibrate(
    policy: BlockCachePolicy, bundle: ModelBundle, setup: SamplingSetup, num_samples: int
) -> tuple[BlockCachePolicy, Calibration]:
    """`policy` calibrated on `num_samples` uncached samples of `setup`'s run drawn from noise apart from the
    evaluation's (seed + 1, as `l2c.compare` tunes peers), with what that cost."""
    calibration = setup.calibration_run(num_samples)
    bench = SideBySide(bundle, calibration, progress=False)
    start = time.perf_counter()
    calibrated = policy.calibrate(bundle.transformer, bench.uncached)
    return calibrated, Calibration(num_samples, calibration.seed, time.perf_counter() - start)


def quality_for(bundle: ModelBundle) -> DigitsQuality | None:
    """The digits metrics for the embedded teacher's kind of model; None for other models."""
    return DigitsQuality() if bundle.is_digits else None
