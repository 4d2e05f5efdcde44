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

    def model_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the transformer sees: [x; x] with [labels; null] under guidance, else x and labels."""
        if self.guidance_scale == 1.0:
            return x, labels
        return torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, self.null_class)])

    def guide(self, halves: torch.Tensor, channels: int) -> torch.Tensor:
        """ε from outputs split as [G, B, ...] (G = 2: cond, null); learned-sigma channels dropped."""
        eps = halves[:, :, :channels]
        if eps.shape[0] == 1:
            return eps[0]
        return eps[1] + self.guidance_scale * (eps[0] - eps[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model_x, model_labels = self.model_inputs(x, labels)
        out = self.transformer(model_x, timestep=t.expand(len(model_x)), class_labels=model_labels).sample
        return self.guide(out.unflatten(0, (len(model_x) // len(x), len(x))), x.shape[1])


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
