"""The model families' teachers (Flux.1, Flux.2, SD3/3.5, Wan 2.x, Qwen-Image) as their pipelines call them.

One `FamilyConditions` entry per `l2c.adapters.ModelFamily` name says what differs between the families: the
pipeline class (whose own `encode_prompt` caches the text conditions, `data.prompts`), the pooled condition, how
guidance is applied (`embedded`: Flux's and Flux.2's guidance embedding, one row per sample; `batched`: SD3's
[cond; null] rows in one call; `separate`: Wan's and Qwen-Image's two calls per step in `cache_context("cond")` /
`("uncond")`, also Flux.1's true CFG, `true_cfg_scale` > 1, on top of its embedded guidance), the position ids the
Flux transformers take, and the timestep table (`mu`: the pipeline's sigmas 1 … 1/N with the image-size-dependent
shift mu, Flux.1's and Qwen-Image's linear rule or Flux.2's empirical one).
The one `FamilyDenoiser` runs any entry in `l2c.sampling.denoise`, so trajectories, rollouts and the pipeline agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import nn

from l2c.adapters import ModelFamily, model_family
from l2c.models import ModelBundle, load_model, resolve_model_path
from l2c.sampling import GuidedDenoiser, TextCondition

Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # embeds [B, L, D], mask [B, L], pooled [B, P]


def _flux_encode(pipe, prompts: list[str], max_length: int) -> Encoded:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=max_length)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long), pooled


def _flux2_encode(pipe, prompts: list[str], max_length: int) -> Encoded:
    """Flux.2 pads every prompt to `max_length` and passes no text mask: the transformer attends to every row."""
    embeds, _ = pipe.encode_prompt(prompt=prompts, max_sequence_length=max_length)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None


def _sd3_encode(pipe, prompts: list[str], max_length: int) -> Encoded:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=max_length
    )
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long), pooled


def _wan_encode(pipe, prompts: list[str], max_length: int) -> Encoded:
    embeds, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=max_length)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None


def _qwen_encode(pipe, prompts: list[str], max_length: int) -> Encoded:
    """Qwen-Image's embeddings have each batch's longest prompt's length: padded to `max_length` (mask 0)."""
    embeds, mask = pipe.encode_prompt(prompt=prompts, max_sequence_length=max_length)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    pad = max_length - embeds.shape[1]
    return torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask.long(), (0, pad)), None


def _linear_mu(tokens: int, num_steps: int, config: dict) -> float:
    """Flux.1's and Qwen-Image's shift: linear in the image token count, from the scheduler config."""
    return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # fmt: skip


def _empirical_mu(tokens: int, num_steps: int, config: dict) -> float:
    """Flux.2's shift: fitted to the image token count and the step count (the pipeline's `compute_empirical_mu`)."""
    return compute_empirical_mu(image_seq_len=tokens, num_steps=num_steps)


def _flux_ids(grid: tuple[int, ...], x: torch.Tensor, embeds: torch.Tensor) -> dict:
    return {"img_ids": FluxPipeline._prepare_latent_image_ids(1, *grid, x.device, x.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)}  # fmt: skip


def _flux2_ids(grid: tuple[int, ...], x: torch.Tensor, embeds: torch.Tensor) -> dict:
    """Flux.2's (T, H, W, L) coordinates per row, integer, as its pipeline makes them (it reads the latents' shape)."""
    shape = x.new_empty(len(x), 0, *grid)
    return {"img_ids": Flux2Pipeline._prepare_latent_ids(shape).to(x.device),
            "txt_ids": Flux2Pipeline._prepare_text_ids(embeds).to(x.device)}  # fmt: skip


@dataclass(frozen=True)
class FamilyConditions:
    """How one model family is conditioned, guided and scheduled, as its diffusers pipeline does it."""

    pipeline: type
    encode: Callable[[object, list[str], int], Encoded]  # the pipeline's own encoders: (embeds, mask, pooled)
    guidance: Literal["embedded", "batched", "separate"]
    layout: Literal["packed", "image", "video"]  # the latents: 2×2-packed tokens, [C, H, W] or [C, F, H, W]
    # sigmas 1 … 1/N and the shift mu(image tokens, steps, scheduler config) (Flux, Flux.2, Qwen-Image); None: the
    # scheduler's own table
    mu: Callable[[int, int, dict], float] | None = None
    positions: Callable[[tuple[int, ...], torch.Tensor, torch.Tensor], dict] | None = None  # img_ids / txt_ids
    masked: bool = False  # the transformer takes the text mask (Qwen-Image)
    # the pipeline also offers true CFG (FluxPipeline's `true_cfg_scale` > 1 with a negative prompt): separate cond /
    # uncond calls, each with the embedded guidance
    true_cfg: bool = False
    cfg_renorm: bool = False  # true CFG rescaled to the conditional prediction's norm (Qwen-Image)


FAMILY_CONDITIONS: dict[str, FamilyConditions] = {
    "flux": FamilyConditions(
        FluxPipeline, _flux_encode, "embedded", "packed", mu=_linear_mu, positions=_flux_ids, true_cfg=True
    ),
    "flux2": FamilyConditions(
        Flux2Pipeline, _flux2_encode, "embedded", "packed", mu=_empirical_mu, positions=_flux2_ids
    ),
    "sd3": FamilyConditions(StableDiffusion3Pipeline, _sd3_encode, "batched", "image"),
    "wan": FamilyConditions(WanPipeline, _wan_encode, "separate", "video"),
    "qwenimage": FamilyConditions(
        QwenImagePipeline, _qwen_encode, "separate", "packed", mu=_linear_mu, masked=True, cfg_renorm=True
    ),
}


def pipeline_family(path: Path) -> FamilyConditions | None:
    """The family of the pipeline a diffusers pipeline directory holds (its `model_index.json`), else None."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    return next((c for c in FAMILY_CONDITIONS.values() if c.pipeline.__name__ == name), None)


def image_tokens(rules: FamilyConditions, grid: tuple[int, ...]) -> int | None:
    """The packed image token count (it sets Flux's, Flux.2's and Qwen-Image's scheduler shift); None for other
    layouts."""
    return int(np.prod(grid)) if rules.layout == "packed" else None


@torch.no_grad()
def encode_with_pipeline(path: Path, prompts: list[str], max_length: int, batch_size: int, dtype: torch.dtype):
    """The prompts' and the empty prompt's conditions, encoded by the pipeline's own `encode_prompt` (no
    transformer or VAE loaded): the tensors `data.prompts` caches."""
    rules = pipeline_family(path)
    pipe = rules.pipeline.from_pretrained(path, transformer=None, vae=None)

    def run(texts: list[str]) -> Encoded:
        embeds, mask, pooled = rules.encode(pipe, texts, max_length)
        return embeds.to("cpu", dtype), mask.cpu(), None if pooled is None else pooled.to("cpu", dtype)

    parts = [run(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    null = run([""])
    tensors = {"embeds": torch.cat([p[0] for p in parts]), "mask": torch.cat([p[1] for p in parts]),
               "null_embeds": null[0], "null_mask": null[1]}  # fmt: skip
    if null[2] is not None:
        tensors |= {"pooled": torch.cat([p[2] for p in parts]), "null_pooled": null[2]}
    return tensors


@dataclass
class FamilyDenoiser:
    """A family's transformer called as its pipeline calls it, with the family's guidance (`FamilyConditions`).

    `raw` returns the rows of one step ([cond; null] under batched or separate guidance); `guide` combines them.
    With `true_cfg_scale` > 1 (a family whose pipeline offers it: Flux.1) the step is the separate cond / uncond calls,
    combined by `true_cfg_scale`, while `guidance_scale` stays the embedded guidance of both calls, as in FluxPipeline.
    """

    transformer: nn.Module
    guidance_scale: float
    family: ModelFamily
    rules: FamilyConditions
    grid: tuple[int, ...]  # the latent grid: (height, width) of the packed patches, or the latents' spatial shape
    scheduler_config: dict
    true_cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.true_cfg_scale == 1.0:
            return
        name = self.rules.pipeline.__name__
        if not self.rules.true_cfg:
            raise ValueError(
                f"field 'true_cfg_scale': {name} has no true-CFG mode on top of its guidance (only FluxPipeline "
                f"does); its guidance is 'guidance_scale'. Got true_cfg_scale={self.true_cfg_scale}, expected 1"
            )
        if not self.true_cfg_scale >= 1.0:  # also NaN
            raise ValueError(
                f"field 'true_cfg_scale' must be ≥ 1 ({name} runs true CFG only above 1, and 1 is off), "
                f"got {self.true_cfg_scale}"
            )

    @property
    def mode(self) -> Literal["embedded", "batched", "separate"]:
        """How this teacher's steps are guided: the family's way, or true CFG's separate calls when asked."""
        return "separate" if self.true_cfg_scale > 1.0 else self.rules.guidance

    @property
    def cfg_scale(self) -> float:
        """The scale combining a step's cond and null rows."""
        return self.true_cfg_scale if self.true_cfg_scale > 1.0 else self.guidance_scale

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        """The pipeline's timestep table (`retrieve_timesteps` with its sigmas and mu)."""
        if self.rules.mu is None:
            scheduler.set_timesteps(num_steps)
            return
        mu = self.rules.mu(image_tokens(self.rules, self.grid), num_steps, self.scheduler_config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    @property
    def _two_rows(self) -> bool:
        return self.mode != "embedded" and self.cfg_scale != 1.0

    def raw(self, x: torch.Tensor, t: torch.Tensor, condition: TextCondition) -> torch.Tensor:
        x = x.to(next(self.transformer.parameters()).dtype)
        rows = (condition.embeds, condition.mask, condition.pooled)
        if not self._two_rows:
            return self._call(x, t, *rows, None)
        n = len(x)
        null = (condition.null_embeds.expand(n, -1, -1), condition.null_mask.expand(n, -1),
                None if condition.null_pooled is None else condition.null_pooled.expand(n, -1))  # fmt: skip
        if self.mode == "separate":
            return torch.cat([self._call(x, t, *rows, "cond"), self._call(x, t, *null, "uncond")])
        both = [None if a is None else torch.cat([a, b]) for a, b in zip(rows, null, strict=True)]
        return self._call(torch.cat([x, x]), t, *both, None)

    def _call(self, x, t, embeds, mask, pooled, context: str | None) -> torch.Tensor:
        dtype = x.dtype
        kwargs = {"hidden_states": x, "timestep": (t / self.family.timestep_scale).expand(len(x)).to(dtype),
                  "encoder_hidden_states": embeds.to(dtype), "return_dict": False}  # fmt: skip
        if pooled is not None:
            kwargs["pooled_projections"] = pooled.to(dtype)
        if self.rules.masked:
            kwargs["encoder_hidden_states_mask"] = mask
            kwargs["img_shapes"] = [[(1, *self.grid)]] * len(x)
        if self.rules.positions is not None:
            kwargs |= self.rules.positions(self.grid, x, embeds)
        if self.rules.guidance == "embedded" and self.transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full([len(x)], self.guidance_scale, device=x.device, dtype=torch.float32)
        with self.transformer.cache_context(context) if context is not None else nullcontext():
            return self.transformer(**kwargs)[0]

    def guide(self, halves: torch.Tensor, channels: int) -> torch.Tensor:
        """The step's prediction from its rows [G, B, ...] (G = 2: cond, null), as the family's pipeline combines."""
        if halves.shape[0] == 1:
            return halves[0]
        cond, null = halves[0], halves[1]
        combined = null + self.cfg_scale * (cond - null)
        if self.rules.cfg_renorm:
            combined = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return combined

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: TextCondition) -> torch.Tensor:
        out = self.raw(x, t, condition)
        return self.guide(out.unflatten(0, (len(out) // len(x), len(x))), x.shape[1])


@dataclass
class FamilyBundle(ModelBundle):
    """A family pipeline directory as a teacher: its transformer, scheduler config and the latent shape of the
    resolution trained for (no VAE: the trainers work on latents)."""

    rules: FamilyConditions | None = None
    latent_shape: tuple[int, ...] = ()  # one sample's latents as the pipeline's `latents=` takes them
    grid: tuple[int, ...] = ()

    @property
    def text_conditioned(self) -> bool:
        return True

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    @property
    def is_digits(self) -> bool:
        return False

    @property
    def image_tokens(self) -> int | None:
        return image_tokens(self.rules, self.grid)

    def denoiser(self, guidance_scale: float, true_cfg_scale: float = 1.0) -> FamilyDenoiser:
        family = model_family(self.transformer)
        return FamilyDenoiser(
            self.transformer, guidance_scale, family, self.rules, self.grid, self.scheduler_config, true_cfg_scale
        )


def teacher_denoiser(
    bundle: ModelBundle, guidance_scale: float, true_cfg_scale: float
) -> GuidedDenoiser | FamilyDenoiser:
    """The teacher's denoiser with its guidance; `true_cfg_scale` ≠ 1 only for a family pipeline that offers it."""
    if isinstance(bundle, FamilyBundle):
        return bundle.denoiser(guidance_scale, true_cfg_scale)
    if true_cfg_scale != 1.0:
        raise ValueError(
            f"field 'true_cfg_scale': teacher {bundle.name!r} is not a Flux pipeline (true CFG on top of embedded "
            f"guidance); its guidance is 'guidance_scale'. Got true_cfg_scale={true_cfg_scale}, expected 1"
        )
    return bundle.denoiser(guidance_scale)


def latent_layout(
    rules: FamilyConditions, transformer: nn.Module, vae_config: dict, height: int, width: int, frames: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(one sample's latent shape, the grid) the family's pipeline prepares for a height × width (× frames) image."""
    if rules.layout == "video":
        spatial, temporal = vae_config.get("scale_factor_spatial", 8), vae_config.get("scale_factor_temporal", 4)
        shape = (transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
        return shape, shape[1:]
    scale = 2 ** (len(vae_config.get("block_out_channels", ())) - 1) if "block_out_channels" in vae_config else 8
    if "temperal_downsample" in vae_config:  # Qwen-Image's video-style VAE
        scale = 2 ** len(vae_config["temperal_downsample"])
    if rules.layout == "image":
        side = (height // scale, width // scale)
        return (transformer.config.in_channels, *side), side
    side = scale * 2  # 2×2 patches of the latents, packed into tokens
    if height % side or width % side:
        raise ValueError(
            f"{rules.pipeline.__name__} teacher: fields 'height' and 'width' must be multiples of {side}, got "
            f"{height} × {width}"
        )
    grid = (height // side, width // side)
    return (grid[0] * grid[1], transformer.config.in_channels), grid


def load_teacher(name: str, height: int = 1024, width: int = 1024, frames: int = 81) -> ModelBundle:
    """A family pipeline directory (or hub id) as a `FamilyBundle` at this resolution; anything else `load_model`."""
    path = resolve_model_path(name)
    rules = pipeline_family(path)
    if rules is None:
        return load_model(name)
    transformer_class = getattr(diffusers, _config(path / "transformer")["_class_name"])
    transformer = transformer_class.from_pretrained(path / "transformer")
    scheduler_config, vae_config = _flow_config(_config(path / "scheduler")), _config(path / "vae")
    shape, grid = latent_layout(rules, transformer, vae_config, height, width, frames)
    transformer = transformer.eval().requires_grad_(False)
    return FamilyBundle(name, transformer, scheduler_config, None, None, rules, shape, grid)


def _config(directory: Path) -> dict:
    for file in ("scheduler_config.json", "config.json"):
        if (directory / file).is_file():
            return json.loads((directory / file).read_text())
    raise FileNotFoundError(f"{directory}: no scheduler_config.json or config.json")


def _flow_config(config: dict) -> dict:
    """A FlowMatchEulerDiscreteScheduler config for the teacher's flow: its own, or (Wan ships UniPC with
    `flow_shift`) the Euler sampler of the same flow and shift."""
    if config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__:
        return config
    flow = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0)
    )
    return {**flow.config, "_class_name": FlowMatchEulerDiscreteScheduler.__name__}
