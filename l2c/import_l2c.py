"""Import the routers released with the Learning-to-Cache paper (Ma et al., 2024) as an `l2c` policy.

The release is a `torch.save` dict: `routers` holds `"{i}.prob"` (2·blocks logits each, entry 2j
gating block j's attention and 2j+1 its MLP), indexed by the respaced timestep in ascending
order, so the first sampling step uses router S−1. The released sampler alternates full and
reuse steps starting with a full one, reading only even-index routers, so here step s gets
router S−1−s and `refresh_interval` is 2. Loaded with `weights_only=True`; only
`argparse.Namespace` is allow-listed, for the release's `args` entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from .adapters import ModelSpec
from .policies import LayerRouterPolicy
from .policies.base import PolicyTarget
from .policy_io import PolicyFormatError

DIT_XL_2_256 = ModelSpec(family="dit", num_blocks=28, branches=("attn1", "ff"), hidden_size=1152, num_tokens=256)


def read_official_routers(path: str | Path) -> tuple[torch.Tensor, dict]:
    """Logits [routers, 2·blocks] in release order, and the training arguments recorded with them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler raises many kinds; all mean "refused"
        raise PolicyFormatError(
            f"{path}: not a Learning-to-Cache checkpoint loadable with weights_only ({error})"
        ) from error
    if not isinstance(checkpoint, dict) or "routers" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise PolicyFormatError(f"{path}: field 'routers' missing (found {found}); expected the released dict")
    routers = checkpoint["routers"]
    if not isinstance(routers, dict) or not routers:
        raise PolicyFormatError(f"{path}: field 'routers' is {type(routers).__name__}, expected a non-empty state dict")
    keys = [f"{i}.prob" for i in range(len(routers))]
    if set(routers) != set(keys):
        found = sorted(map(str, routers))[:4]
        raise PolicyFormatError(f"{path}: field 'routers' has keys {found}…, expected '0.prob'…'{keys[-1]}'")
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in routers.items()}
    if len(set(shapes.values())) != 1 or not isinstance(routers["0.prob"], torch.Tensor) or routers["0.prob"].ndim != 1:
        raise PolicyFormatError(f"{path}: field 'routers' must hold 1-D tensors of one length, found {shapes}")
    logits = torch.stack([routers[k].float() for k in keys])
    args = vars(checkpoint.get("args", argparse.Namespace()))
    return logits, args


def import_official_router(
    path: str | Path,
    threshold: float = 0.1,
    model: ModelSpec = DIT_XL_2_256,
    timestep_spacing: str = "linspace",
    num_train_timesteps: int = 1000,
) -> LayerRouterPolicy:
    """An `l2c` policy for `model` with the release's gates; timesteps from a DDIM schedule with this spacing."""
    logits, args = read_official_routers(path)
    steps, width = logits.shape
    if model.branches != ("attn1", "ff") or width != 2 * model.num_blocks:
        raise ValueError(
            f"{path}: routers gate {width} branches per step ({width // 2} blocks × attention, MLP); the model has "
            f"field 'num_blocks' {model.num_blocks} with branches {list(model.branches)}"
        )
    recorded = args.get("num_sampling_steps")
    if recorded is not None and recorded != steps:
        raise PolicyFormatError(f"{path}: field 'args.num_sampling_steps' is {recorded}, but it holds {steps} routers")
    per_step = logits.flip(0).view(steps, model.num_blocks, 2)  # step s ← router S−1−s
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=timestep_spacing)
    scheduler.set_timesteps(steps)
    policy = LayerRouterPolicy(refresh_interval=2, threshold=threshold, logits=per_step)
    policy.target = PolicyTarget(model, "DDIMScheduler", tuple(float(t) for t in scheduler.timesteps.tolist()))
    policy.provenance = {
        "trainer": "learning-to-cache (official release)",
        "source": str(path),
        "timestep_spacing": timestep_spacing,
        **{k: args[k] for k in ("model", "num_sampling_steps", "l1", "lr", "global_batch_size") if k in args},
    }
    return policy
