"""Find the cacheable branches of a diffusers transformer and describe the model as a `ModelSpec`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

UNET_PARTS = ("down_blocks", "mid_block", "up_blocks")  # in the order a UNet runs them


@dataclass(frozen=True)
class ModelSpec:
    """The fingerprint a policy is made for: what must match for its plan to mean anything."""

    family: str
    num_blocks: int
    branches: tuple[str, ...]
    hidden_size: int
    num_tokens: int | None

    def to_dict(self) -> dict:
        return {**asdict(self), "branches": list(self.branches)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        extra = sorted(set(data) - names)
        if missing or extra:
            raise ValueError(f"model fingerprint: missing keys {missing}, unexpected keys {extra}")
        return cls(**{**data, "branches": tuple(data["branches"])})


@dataclass(frozen=True)
class BlockFamily:
    """One kind of transformer block l2c caches: a declarative entry, no runtime code per family.

    `branches` are the block's cacheable submodules, in the order plans index them (a model's branches are those
    present in every one of its blocks); `hidden_size` reads the width of the tokens entering the block.
    """

    block_class: type[nn.Module]
    branches: tuple[str, ...]
    hidden_size: Callable[[nn.Module], int]


# A new family (Flux double/single, SD3 `JointTransformerBlock`, Wan, ...) is one more entry here.
BLOCK_FAMILIES: tuple[BlockFamily, ...] = (
    BlockFamily(BasicTransformerBlock, ("attn1", "attn2", "ff"), lambda block: int(block.attn1.to_q.in_features)),
)


def block_family(block: nn.Module) -> BlockFamily | None:
    return next((f for f in BLOCK_FAMILIES if isinstance(block, f.block_class)), None)


@dataclass(frozen=True)
class Branch:
    """One cacheable branch module: its block index, its name, and the module itself."""

    block: int
    name: str
    module: nn.Module


def resolve_denoiser(target: nn.Module | object) -> nn.Module:
    """The denoiser of a pipeline (`pipe.transformer`, else `pipe.unet`), or the module itself.

    A `torch.compile(model)` wrapper (`OptimizedModule`) resolves to the model it wraps: the hooks go on the model's
    own modules, which the wrapper calls, so compiled calls run them (traced, or behind `torch.compiler.disable`).
    """
    if isinstance(target, nn.Module):
        return _uncompiled(target)
    for attr in ("transformer", "unet"):
        module = getattr(target, attr, None)
        if isinstance(module, nn.Module):
            return _uncompiled(module)
    raise TypeError(
        f"cannot find a denoiser in {type(target).__name__}: expected an nn.Module or a pipeline "
        "with a `transformer` or `unet` attribute"
    )


def _uncompiled(module: nn.Module) -> nn.Module:
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def _family(model: nn.Module) -> str:
    """By class, subclasses included: FSDP2 (`fully_shard`) turns a DiT into an `FSDPDiTTransformer2DModel`."""
    if isinstance(model, DiTTransformer2DModel):
        return "dit"
    if isinstance(model, PixArtTransformer2DModel):
        return "pixart"
    return "generic"


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in execution order (`transformer_blocks`, else every block of a known family).

    UNets register `mid_block` after `up_blocks` but run it between them, so their parts are walked in the order
    down, mid, up (the order their blocks run in).
    """
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and all(block_family(b) is not None for b in blocks):
        return list(blocks)
    parts = [getattr(model, name, None) for name in UNET_PARTS]
    roots = [p for p in parts if isinstance(p, nn.Module)] if all(p is not None for p in parts) else [model]
    found = [m for root in roots for m in root.modules() if block_family(m) is not None]
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no BasicTransformerBlock: l2c caches diffusers DiT, PixArt and "
            "BasicTransformerBlock-based models"
        )
    return found


def branch_names(model: nn.Module) -> tuple[str, ...]:
    """Branch names present in every block (attn2 only where blocks have cross-attention)."""
    blocks = find_blocks(model)
    names = block_family(blocks[0]).branches
    return tuple(name for name in names if all(getattr(b, name, None) is not None for b in blocks))


def find_branches(model: nn.Module) -> list[Branch]:
    names = branch_names(model)
    return [Branch(i, name, getattr(block, name)) for i, block in enumerate(find_blocks(model)) for name in names]


def _num_tokens(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    sample_size = getattr(config, "sample_size", None)
    patch_size = getattr(config, "patch_size", None)
    if isinstance(sample_size, int) and isinstance(patch_size, int) and _family(model) != "generic":
        return (sample_size // patch_size) ** 2
    return None


def model_spec(target: nn.Module | object) -> ModelSpec:
    model = resolve_denoiser(target)
    blocks = find_blocks(model)
    return ModelSpec(
        family=_family(model),
        num_blocks=len(blocks),
        branches=branch_names(model),
        hidden_size=block_family(blocks[0]).hidden_size(blocks[0]),
        num_tokens=_num_tokens(model),
    )


def token_partial_supported(branch: Branch) -> bool:
    """Whether a branch's output for a token depends only on that token (plus full keys for attention)."""
    if branch.name == "ff":
        return True
    attn = branch.module
    return not any(
        getattr(attn, attr, None) for attr in ("group_norm", "spatial_norm", "residual_connection", "norm_cross")
    )


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def read_outside_their_block(model: nn.Module) -> list[nn.Module]:
    """Parts of a block that the model also calls outside that block's forward: they need an FSDP unit of their own
    (a block's unit is all-gathered only while the block runs). DiT's output head reads block 0's adaLN embedding."""
    if not isinstance(model, DiTTransformer2DModel):
        return []
    return [find_blocks(model)[0].norm1.emb]
