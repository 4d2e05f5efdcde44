"""Load a denoiser to sample from: `embedded:digits`, a local diffusers directory, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from .options import SCHEDULERS

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED = {"embedded:digits": EMBEDDED_DIR / "digits"}
TRANSFORMERS = {cls.__name__: cls for cls in (DiTTransformer2DModel, PixArtTransformer2DModel)}


@dataclass
class ModelBundle:
    """What sampling needs: a transformer (class- or text-conditional), its scheduler config, a VAE for latents."""

    name: str
    transformer: nn.Module
    scheduler_config: dict
    vae: AutoencoderKL | None = None

    @property
    def text_conditioned(self) -> bool:
        return isinstance(self.transformer, PixArtTransformer2DModel)

    @property
    def num_classes(self) -> int:
        if self.text_conditioned:
            raise ValueError(f"{self.name} is text-conditioned (PixArt): it takes prompts, not class labels")
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def is_digits(self) -> bool:
        """A pixel-space 16×16 one-channel 10-class model: the digits metrics apply."""
        config = self.transformer.config
        if self.text_conditioned or self.vae is not None:
            return False
        return config.in_channels == 1 and config.sample_size == 16 and self.num_classes == 10


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
    scheduler_dir = path / "scheduler"
    if scheduler_dir.is_dir():
        scheduler_config = dict(DDPMScheduler.load_config(scheduler_dir))
    else:
        scheduler_config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype).to(device).eval().requires_grad_(False)
    return ModelBundle(name=name, transformer=transformer, scheduler_config=scheduler_config, vae=vae)


def _transformer_class(directory: Path) -> type[nn.Module]:
    name = DiTTransformer2DModel.load_config(directory).get("_class_name")
    if name not in TRANSFORMERS:
        raise ValueError(
            f"{directory / 'config.json'}: field '_class_name' is {name!r}, expected one of {sorted(TRANSFORMERS)}"
        )
    return TRANSFORMERS[name]


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """A fresh scheduler of the named kind, built from the model's own scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler {name!r}: expected one of {sorted(SCHEDULERS)}")
    cls: type[ConfigMixin] = getattr(diffusers, SCHEDULERS[name])
    return cls.from_config(config)
