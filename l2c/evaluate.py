"""Sample with and without a policy from the same noise, side by side, and measure what users care about."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from .metrics import DigitsQuality, count_flops, psnr_db, ssim
from .models import ModelBundle, make_scheduler
from .plan import Plan
from .policies import CachePolicy
from .sampling import GuidedDenoiser, balanced_labels, initial_noise, sample


@dataclass
class SamplingSetup:
    steps: int = 20
    scheduler: str = "ddim"
    num_samples: int = 64
    seed: int = 0
    guidance_scale: float = 1.5
    batch_size: int = 64
    flops_samples: int = 0  # count FLOPs over the first N samples' whole trajectories (0: all samples)

    @classmethod
    def trained_like(cls, policy: CachePolicy, **knobs) -> SamplingSetup:
        """Sampling as a trained policy was trained: its step count and guidance scale (1.5 if unrecorded)."""
        return cls(steps=len(policy.timesteps), guidance_scale=policy.provenance.get("guidance_scale", 1.5), **knobs)


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

    def __init__(self, bundle: ModelBundle, setup: SamplingSetup, progress: bool = True) -> None:
        self.bundle, self.setup, self.progress = bundle, setup, progress
        config = bundle.transformer.config
        channels, size = config.in_channels, config.sample_size
        self.noise = initial_noise(setup.num_samples, (channels, size, size), setup.seed)
        self.labels = balanced_labels(setup.num_samples, bundle.num_classes)
        self.denoiser = GuidedDenoiser(bundle.transformer, setup.guidance_scale)
        self.timesteps = self._scheduler().timesteps.clone()
        self._flops_uncached: int | None = None  # the same for every policy: counted once
        self._executed: dict[str, int] = {}
        self._plan: Plan | None = None

    def _scheduler(self):
        scheduler = make_scheduler(self.setup.scheduler, self.bundle.scheduler_config)
        scheduler.set_timesteps(self.setup.steps)
        return scheduler

    def _batches(self):
        size = self.setup.batch_size
        for start in range(0, self.setup.num_samples, size):
            yield slice(start, min(start + size, self.setup.num_samples))

    def _sample(self, batch: slice, policy: CachePolicy | None, bar=None, steps: int | None = None) -> torch.Tensor:
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

    def _flops(self, policy: CachePolicy | None, steps: int | None = None) -> int:
        count = self.setup.flops_samples or self.setup.num_samples
        total = 0
        for batch in self._batches():
            if batch.start >= count:
                break
            part = slice(batch.start, min(batch.stop, count))
            _, flops = count_flops(partial(self._sample, part, policy, None, steps))
            total += flops
        return total

    def flops_ratio(self, policy: CachePolicy) -> float:
        """FLOPs with `policy` ÷ uncached over the FLOPs samples, without timing or images: for tuning a knob."""
        if self._flops_uncached is None:
            self._flops_uncached = self._flops(None)
        return self._flops(policy) / self._flops_uncached

    def run(self, policy: CachePolicy | None, label: str | None = None, steps: int | None = None) -> PolicyRun:
        """`policy` beside the uncached run; `policy=None, steps=k`: the uncached model with k steps instead.

        `policy` may be anything with `apply(model, timesteps)` returning a context manager whose value has
        `executed` and `plan` (and `describe()`), such as the peer caches in `l2c.peers`.
        """
        if (policy is None) != (steps is not None) or (policy is None and label is None):
            raise ValueError("SideBySide.run: pass a policy, or policy=None with `steps` and a `label` (fewer steps)")
        self._executed, self._plan = {}, None
        label = label or policy.describe()
        latents, reference = [], []
        wall, wall_uncached = 0.0, 0.0
        work = 2 * self.setup.num_samples * self.setup.steps
        with tqdm(
            total=work, desc=f"sampling {label} + uncached", unit="sample-step", disable=not self.progress
        ) as bar:
            for index, batch in enumerate(self._batches()):
                # Alternate which runs first (ABBA) so drift in machine load falls on both sides alike.
                order = (True, False) if index % 2 == 0 else (False, True)
                for is_reference in order:
                    start = time.perf_counter()
                    if is_reference:
                        result = self._sample(batch, None, bar)
                    else:
                        result = self._sample(batch, policy, bar, steps)
                    elapsed = time.perf_counter() - start
                    if is_reference:
                        reference.append(result)
                        wall_uncached += elapsed
                    else:
                        latents.append(result)
                        wall += elapsed
        executed, plan = dict(self._executed), self._plan
        if self._flops_uncached is None:
            self._flops_uncached = self._flops(None)
        flops, flops_uncached = self._flops(policy, steps), self._flops_uncached
        return PolicyRun(
            policy=label,
            images=self._decode(torch.cat(latents)),
            reference=self._decode(torch.cat(reference)),
            labels=self.labels,
            wall_s=wall,
            wall_s_uncached=wall_uncached,
            flops=flops,
            flops_uncached=flops_uncached,
            plan=plan,
            executed=executed,
        )


def report(run: PolicyRun, setup: SamplingSetup, model: str, quality: DigitsQuality | None) -> dict:
    """The `report.json` payload; keys are a contract (see the README)."""
    result = {
        "policy": run.policy,
        "model": model,
        "steps": setup.steps,
        "scheduler": setup.scheduler,
        "num_samples": setup.num_samples,
        "seed": setup.seed,
        "guidance_scale": setup.guidance_scale,
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
