"""Load a denoiser to sample from: `embedded:digits`, a local diffusers directory, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SchedulerMixin,
)
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from .flux_digits import CLASS_TABLE_FILE, PACK, ClassTable
from .options import AUTO_SCHEDULER, SCHEDULER_CHOICES, SCHEDULERS
from .sampling import GuidedDenoiser

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED = {"embedded:digits": EMBEDDED_DIR / "digits", "embedded:digits-flux": EMBEDDED_DIR / "digits-flux"}
TRANSFORMERS = {cls.__name__: cls for cls in (DiTTransformer2DModel, PixArtTransformer2DModel, FluxTransformer2DModel)}
FLOW_SAMPLER = "flow-euler"  # the --scheduler name of FlowMatchEulerDiscreteScheduler
FLOW_ALIASES = (AUTO_SCHEDULER, "ddim", "euler")  # also mean flow-euler on a flow model (ddim: older commands)
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear"}  # a directory without scheduler/


@dataclass
class ModelBundle:
    """What sampling needs: a transformer (class- or text-conditional), its scheduler config, a VAE for latents,
    and for a class-conditional Flux model its learned class table (`l2c.flux_digits`)."""

    name: str
    transformer: nn.Module
    scheduler_config: dict
    vae: AutoencoderKL | None = None
    class_table: ClassTable | None = None

    @property
    def text_conditioned(self) -> bool:
        return isinstance(self.transformer, PixArtTransformer2DModel)

    @property
    def num_classes(self) -> int:
        if self.text_conditioned:
            raise ValueError(f"{self.name} is text-conditioned (PixArt): it takes prompts, not class labels")
        if self.class_table is not None:
            return self.class_table.num_classes
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the sampler denoises: pixels, or latents when there is a VAE."""
        config = self.transformer.config
        if self.class_table is not None:  # Flux takes packed 2×2 patches; the table records the image side
            size = self.class_table.sample_size
            return config.in_channels // (PACK * PACK), size, size
        return config.in_channels, config.sample_size, config.sample_size

    @property
    def is_digits(self) -> bool:
        """A pixel-space 16×16 one-channel 10-class model: the digits metrics apply."""
        if self.text_conditioned or self.vae is not None:
            return False
        return self.sample_shape == (1, 16, 16) and self.num_classes == 10

    def denoiser(self, guidance_scale: float) -> GuidedDenoiser:
        """The transformer with classifier-free guidance, conditioned as this model is (labels, prompts, table)."""
        return GuidedDenoiser(self.transformer, guidance_scale, class_table=self.class_table)


def resolve_model_path(name: str) -> Path:
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"{name}: the embedded model is missing from {path} (broken install?)")
        return path
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    path = Path(name)
    if path.exists():
        return path
    if name.count("/") == 1:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    raise FileNotFoundError(f"model {name!r}: not an embedded name, a local directory, or a hub id (owner/name)")


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Accepts a directory holding `transformer/` (+ `scheduler/`, optional `vae/`) or a bare transformer dir."""
    path = resolve_model_path(name)
    transformer_dir = path / "transformer" if (path / "transformer").is_dir() else path
    if not (transformer_dir / "config.json").is_file():
        raise FileNotFoundError(f"{transformer_dir}: no config.json; expected a diffusers transformer directory")
    transformer = _transformer_class(transformer_dir).from_pretrained(transformer_dir, torch_dtype=dtype)
    transformer = transformer.to(device).eval().requires_grad_(False)
    scheduler_config = scheduler_config_at(path)
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype).to(device).eval().requires_grad_(False)
    class_table = None
    if isinstance(transformer, FluxTransformer2DModel):
        if not (path / CLASS_TABLE_FILE).is_file():
            raise FileNotFoundError(
                f"{path}: a FluxTransformer2DModel sampled by class needs its class table {CLASS_TABLE_FILE} there"
            )
        class_table = ClassTable.load(path / CLASS_TABLE_FILE, transformer).to(device, dtype)
    return ModelBundle(name, transformer, scheduler_config, vae, class_table)


def _transformer_class(directory: Path) -> type[nn.Module]:
    name = DiTTransformer2DModel.load_config(directory).get("_class_name")
    if name not in TRANSFORMERS:
        raise ValueError(
            f"{directory / 'config.json'}: field '_class_name' is {name!r}, expected one of {sorted(TRANSFORMERS)}"
        )
    return TRANSFORMERS[name]


def scheduler_config_at(path: Path) -> dict:
    """The scheduler config of a model directory (`scheduler/`), or DDPM's linear betas when it has none."""
    scheduler_dir = path / "scheduler"
    return dict(DDPMScheduler.load_config(scheduler_dir)) if scheduler_dir.is_dir() else dict(DEFAULT_SCHEDULER_CONFIG)


def model_scheduler_config(name: str) -> dict:
    """The scheduler config `load_model(name)` samples with, without loading the model (e.g. to resolve `auto`)."""
    return scheduler_config_at(resolve_model_path(name))


def is_flow_matching(config: dict) -> bool:
    return config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__


def resolve_scheduler(name: str, config: dict, flag: str = "--scheduler") -> str:
    """The `--scheduler` name of what samples when `name` is asked for a model with scheduler config `config`.

    A flow-matching model (its config a `FlowMatchEulerDiscreteScheduler`'s) samples with that scheduler,
    `flow-euler`, for `auto` and also for `ddim` and `euler`, which older commands pass: on a rectified flow,
    DDIM's deterministic step from the predicted x₀ and noise is exactly the Euler step of the flow ODE. Any other
    model samples with `name`, `auto` meaning `ddim`. An incompatible pair raises one line naming `flag`, the value
    and what the model supports.
    """
    if name not in SCHEDULER_CHOICES:
        raise ValueError(f"{flag} {name!r}: expected one of {list(SCHEDULER_CHOICES)}")
    if is_flow_matching(config):
        if name not in (FLOW_SAMPLER, *FLOW_ALIASES):
            raise ValueError(
                f"{flag} {name!r}: the model is flow-matching (FlowMatchEulerDiscreteScheduler); it samples with "
                f"{FLOW_SAMPLER} only (or {', '.join(FLOW_ALIASES)}, which mean it)"
            )
        return FLOW_SAMPLER
    if name == FLOW_SAMPLER:
        kind = config.get("_class_name", "DDPM-style, no class recorded")
        others = [n for n in SCHEDULER_CHOICES if n != FLOW_SAMPLER]
        raise ValueError(
            f"{flag} {name!r}: the model is not flow-matching (scheduler config: {kind}); expected one of {others}"
        )
    return "ddim" if name == AUTO_SCHEDULER else name


def make_scheduler(name: str, config: dict, flag: str = "--scheduler") -> SchedulerMixin:
    """A fresh scheduler of the kind `resolve_scheduler(name, config)` names, built from the model's own config."""
    import diffusers

    cls: type[ConfigMixin] = getattr(diffusers, SCHEDULERS[resolve_scheduler(name, config, flag)])
    return cls.from_config(config)
