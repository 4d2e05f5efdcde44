"""A small class-conditional sampling loop with classifier-free guidance over diffusers schedulers.

Used by the trainers (teacher trajectories), by `infer.py` and by the benchmarks. It calls the
transformer exactly as `DiTPipeline` does (one batched call per step, conditional and null-class
halves together), so a policy applied with `policy.apply(transformer)` behaves the same here as
in the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from torch import nn


@dataclass
class GuidedDenoiser:
    """The transformer with classifier-free guidance: batched [cond; null] call, eps = u + g·(c − u)."""

    transformer: nn.Module
    guidance_scale: float = 1.0

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if self.guidance_scale == 1.0:
            out = self.transformer(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample
            return out[:, :channels]
        both = torch.cat([x, x])
        null = torch.full_like(labels, self.null_class)
        out = self.transformer(both, timestep=t.expand(both.shape[0]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out[:, :channels].chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed: a sample's noise never depends on its batch or its batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()])


def initial_noise(num: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The noise of samples 0..num−1 of run `seed`."""
    return noise_from_seeds(seed * 1_000_003 + torch.arange(num), shape)


@torch.no_grad()
def sample(
    denoiser: GuidedDenoiser,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise` and return x_0 (latents or pixels, as the model works)."""
    scheduler.set_timesteps(num_steps)
    model = denoiser.transformer
    param = next(model.parameters())
    x = noise.to(param.device, param.dtype) * scheduler.init_noise_sigma
    labels = labels.to(param.device)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        eps = denoiser(model_input, t.to(param.device), labels)
        x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step(i)
    return x


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, …, C−1, 0, 1, …: every class equally often (50 per class for 500 samples of 10 classes)."""
    return torch.arange(num) % num_classes
