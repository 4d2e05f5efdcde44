"""Scaffolding shared by every trainer of a caching predictor: a frozen teacher and its trajectories.

The teacher is kept outside the module tree on purpose: it is never in `parameters()`, so it
never reaches the optimizer, DDP's gradient buckets or a Lightning checkpoint, and it stays in
eval mode with `requires_grad_(False)` whatever Lightning does to the trainable module.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from l2c.models import ModelBundle, load_model, make_scheduler
from l2c.sampling import GuidedDenoiser, noise_from_seeds


@dataclass
class Trajectory:
    """The teacher's own sampling run: inputs and raw model outputs at every step (CFG halves stacked)."""

    start: int  # step index of inputs[0]
    inputs: list[torch.Tensor]  # x_s fed to the transformer, [2B, C, H, W] with guidance
    outputs: list[torch.Tensor]  # raw transformer output at step s
    timesteps: torch.Tensor
    labels: torch.Tensor  # [2B] labels actually fed (cond; null)


class FrozenTeacherModule(L.LightningModule):
    def __init__(self, teacher: str, steps: int, scheduler: str, guidance_scale: float) -> None:
        super().__init__()
        bundle = load_model(teacher)
        object.__setattr__(self, "_bundle", bundle)  # not a submodule: see the module docstring
        self.teacher.requires_grad_(False).eval()
        self.sampler = make_scheduler(scheduler, bundle.scheduler_config)
        self.sampler.set_timesteps(steps)
        self.guidance = GuidedDenoiser(self.teacher, guidance_scale)

    @property
    def bundle(self) -> ModelBundle:
        return self._bundle

    @property
    def teacher(self) -> nn.Module:
        return self._bundle.transformer

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sampler.timesteps

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        teacher_keys = [k for k in checkpoint["state_dict"] if k.startswith("_bundle.")]
        for key in teacher_keys:
            del checkpoint["state_dict"][key]

    def model_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the transformer sees at a step: [x; x] with [labels; null] under guidance."""
        if self.guidance.guidance_scale == 1.0:
            return x, labels
        return torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, self.guidance.null_class)])

    @torch.no_grad()
    def teacher_trajectory(self, x: torch.Tensor, labels: torch.Tensor, start: int = 0, until: int | None = None):
        """Sample with the uncached teacher from state `x` at step `start` up to step `until` inclusive."""
        scheduler = make_scheduler_like(self.sampler)
        inputs, outputs = [], []
        channels = x.shape[1]
        last = len(scheduler.timesteps) - 1 if until is None else until
        model_labels = labels
        for i in range(start, last + 1):
            t = scheduler.timesteps[i]
            model_x, model_labels = self.model_inputs(scheduler.scale_model_input(x, t), labels)
            out = self.teacher(model_x, timestep=t.to(self.device).expand(model_x.shape[0]), class_labels=model_labels)
            inputs.append(model_x)
            outputs.append(out.sample)
            eps = out.sample[:, :channels]
            if model_x.shape[0] != x.shape[0]:
                cond, uncond = eps.chunk(2)
                eps = uncond + self.guidance.guidance_scale * (cond - uncond)
            if i < last:
                x = scheduler.step(eps, t, x).prev_sample
        return Trajectory(start, inputs, outputs, scheduler.timesteps, model_labels)

    def noise_for(self, seeds: torch.Tensor) -> torch.Tensor:
        config = self.teacher.config
        shape = (config.in_channels, config.sample_size, config.sample_size)
        return noise_from_seeds(seeds, shape).to(self.device)


def make_scheduler_like(scheduler):
    """A fresh copy with the same config and steps (schedulers carry per-run state such as step counters)."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(len(scheduler.timesteps))
    return fresh
