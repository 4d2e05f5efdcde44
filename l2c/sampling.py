"""A small sampling loop with classifier-free guidance over diffusers schedulers.

Used by the trainers (teacher trajectories), by `infer.py` and by the benchmarks. It calls the
transformer as the diffusers pipelines do (one batched call per step, conditional and null
halves together), so a policy applied with `policy.apply(transformer)` behaves the same here as
in the pipeline. Conditions are class labels (DiT; a Flux model through its learned class table,
`l2c.flux_digits`) or cached text embeddings (`TextCondition`, PixArt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SchedulerMixin
from torch import nn

from .flux_digits import ClassTable, flux_forward

FLUX_TIMESTEP_SCALE = 1000.0  # FluxPipeline passes the transformer t / 1000 (flow time in [0, 1])


@dataclass
class TextCondition:
    """Cached text-encoder output of a batch of prompts, with the empty prompt's for guidance (PixArt)."""

    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L], 1 = token, 0 = padding
    null_embeds: torch.Tensor  # [1, L, D]: the empty prompt
    null_mask: torch.Tensor  # [1, L]
    index: torch.Tensor  # [B]: which prompts of the data set (keys for trajectory caches)
    pooled: torch.Tensor | None = None  # [B, P]: the pooled text embedding (Flux, SD3)
    null_pooled: torch.Tensor | None = None  # [1, P]

    def __len__(self) -> int:
        return len(self.embeds)

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))

    def __getitem__(self, rows: torch.Tensor) -> TextCondition:
        pooled = None if self.pooled is None else self.pooled[rows]
        return dataclasses.replace(
            self, embeds=self.embeds[rows], mask=self.mask[rows], index=self.index[rows], pooled=pooled
        )

    def tolist(self) -> list[int]:
        return self.index.tolist()


Condition = torch.Tensor | TextCondition  # class labels [B], or prompts


@dataclass
class GuidedDenoiser:
    """The transformer with classifier-free guidance: batched [cond; null] call, eps = u + g·(c − u).

    A `FluxTransformer2DModel` is conditioned by `class_table` (its null row for guidance) and predicts the flow
    velocity, guided the same way (true CFG, as the class-conditional model was trained: no guidance embedding).
    """

    transformer: nn.Module
    guidance_scale: float = 1.0
    class_table: ClassTable | None = None

    def __post_init__(self) -> None:
        if isinstance(self.transformer, FluxTransformer2DModel) and self.class_table is None:
            raise ValueError(
                "a FluxTransformer2DModel is conditioned through its class table: build the denoiser with "
                "ModelBundle.denoiser(guidance_scale), or pass class_table="
            )

    @property
    def null_class(self) -> int:
        if self.class_table is not None:
            return self.class_table.null_class
        return int(self.transformer.config.num_embeds_ada_norm)

    def model_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the transformer sees: [x; x] with [labels; null] under guidance, else x and labels."""
        if self.guidance_scale == 1.0:
            return x, labels
        return torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, self.null_class)])

    def model_kwargs(self, x: torch.Tensor, condition: Condition) -> tuple[torch.Tensor, dict]:
        """The transformer's batch and conditioning keywords; [cond; null] rows under guidance."""
        if not isinstance(condition, TextCondition):
            model_x, labels = self.model_inputs(x, condition)
            return model_x, {"class_labels": labels}
        dtype = next(self.transformer.parameters()).dtype  # cached embeddings may be stored in fp16
        embeds, mask, model_x = condition.embeds.to(dtype), condition.mask, x
        if self.guidance_scale != 1.0:
            model_x = torch.cat([x, x])
            embeds = torch.cat([embeds, condition.null_embeds.to(dtype).expand_as(embeds)])
            mask = torch.cat([mask, condition.null_mask.expand_as(mask)])
        kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        kwargs["added_cond_kwargs"] = self._size_conditions(model_x, dtype)
        return model_x, kwargs

    def _size_conditions(self, x: torch.Tensor, dtype: torch.dtype) -> dict:
        """PixArt-α 1024 conditions on the image size and aspect ratio (pixels: latents × 8, as its pipeline)."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        resolution = torch.tensor([height, width], dtype=dtype, device=x.device).repeat(len(x), 1)
        aspect = torch.tensor([height / width], dtype=dtype, device=x.device).repeat(len(x), 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def raw(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The transformer's output for the guided batch ([cond; null] rows), before guidance is applied."""
        if self.class_table is not None:
            model_x, labels = self.model_inputs(x, condition)
            text, pooled = self.class_table(labels)
            timestep = (t / FLUX_TIMESTEP_SCALE).expand(len(model_x))
            return flux_forward(self.transformer, model_x, timestep, text, pooled)
        model_x, kwargs = self.model_kwargs(x, condition)
        return self.transformer(model_x, timestep=t.expand(len(model_x)), **kwargs).sample

    def set_timesteps(self, scheduler: SchedulerMixin, num_steps: int) -> None:
        """The run's timestep table (a model family's pipeline may set it with its own sigmas and shift)."""
        scheduler.set_timesteps(num_steps)

    def guide(self, halves: torch.Tensor, channels: int) -> torch.Tensor:
        """ε from outputs split as [G, B, ...] (G = 2: cond, null); learned-sigma channels dropped."""
        eps = halves[:, :, :channels]
        if eps.shape[0] == 1:
            return eps[0]
        return eps[1] + self.guidance_scale * (eps[0] - eps[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        out = self.raw(x, t, condition)
        return self.guide(out.unflatten(0, (len(out) // len(x), len(x))), x.shape[1])


def noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed: a sample's noise never depends on its batch or its batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()])


def sample_seeds(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise seeds of samples `indices` of run `seed` (any slice of a run draws the noise the whole run would)."""
    return seed * 1_000_003 + indices


def initial_noise(num: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The noise of samples 0..num−1 of run `seed`."""
    return noise_from_seeds(sample_seeds(torch.arange(num), seed), shape)


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
    return denoise(denoiser, scheduler, noise, labels, num_steps, on_step)


def denoise(
    denoiser: GuidedDenoiser,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    labels: Condition,
    num_steps: int,
    on_step: Callable[[int], None] | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    step_context: Callable[[int], AbstractContextManager] | None = None,
    on_output: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """`sample` under whatever grad mode the caller set: the trainers' rollouts backpropagate through it.

    The trainers' options: steps `start` … `stop` − 1 only (from step 0, `noise` is scaled by the scheduler's
    `init_noise_sigma` where it has one; a later start takes it as the state x_start); `step_context(i)` is entered
    around step i's model call (the rollout's per-step gates); `on_output(i, model_input, halves)` sees each step's
    scaled input and raw output split as [G, B, ...] (G = 2: cond, null), before guidance (the teacher's trajectories).
    """
    denoiser.set_timesteps(scheduler, num_steps)
    model = denoiser.transformer
    param = next(model.parameters())
    x = noise.to(param.device, param.dtype)
    if start == 0:
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at the noise itself
    labels = labels.to(param.device)
    for i in range(start, num_steps if stop is None else stop):
        t = scheduler.timesteps[i]
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        with step_context(i) if step_context is not None else nullcontext():
            out = denoiser.raw(model_input, t.to(param.device), labels)
        halves = out.unflatten(0, (len(out) // len(x), len(x)))
        if on_output is not None:
            on_output(i, model_input, halves)
        x = scheduler.step(denoiser.guide(halves, x.shape[1]), t, x).prev_sample
        if on_step is not None:
            on_step(i)
    return x


def balanced_labels(num: int, classes: int | Sequence[int]) -> torch.Tensor:
    """c₀, c₁, …, c_{K−1}, c₀, …: every class equally often (50 per class for 500 samples of 10 classes).

    `classes`: the labels in order (`l2c.options.parse_classes` of a spec such as "0-9"), or a count C for 0 … C−1.
    """
    table = torch.arange(classes) if isinstance(classes, int) else torch.tensor(list(classes), dtype=torch.long)
    return table[torch.arange(num) % len(table)]
