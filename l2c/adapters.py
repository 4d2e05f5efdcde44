"""Find the cacheable branches of a diffusers transformer and describe the model as a `ModelSpec`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from diffusers import (
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
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
    # (block, branch) plan slots that no module executes (a Flux single block has no `ff_context`): never counted as
    # work nor budgeted. Policies saved before this field have none recorded.
    absent: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "branches": list(self.branches), "absent": [list(slot) for slot in self.absent]}

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"absent"})
        extra = sorted(set(data) - names)
        if missing or extra:
            raise ValueError(f"model fingerprint: missing keys {missing}, unexpected keys {extra}")
        absent = tuple((int(block), str(name)) for block, name in data.get("absent", ()))
        return cls(**{**data, "branches": tuple(data["branches"]), "absent": absent})

    def present(self) -> torch.Tensor:
        """bool [blocks, branches]: the plan slots some module executes."""
        mask = torch.ones(self.num_blocks, len(self.branches), dtype=torch.bool)
        for block, name in self.absent:
            mask[block, self.branches.index(name)] = False
        return mask


@dataclass(frozen=True)
class BlockFamily:
    """One kind of transformer block l2c caches: a declarative entry, no runtime code per family.

    `branches` are the block's cacheable submodules, each hooked where its output enters the block's adaLN gate (the
    cached value is the ungated output: a tensor, or an (image, text) tuple for joint attention). A block may lack
    some of them (SD3's last block has no `ff_context`, only SD3.5 blocks have `attn2`): the model's branches are
    those present in at least one block, and an absent one's plan slot is never executed.
    `partial`: the branches that can run on a subset of their tokens (their output for a token depends only on that
    token, plus every token's keys for `attn1`); `joint`: those whose tokens are the block's [text; image]
    concatenation (Flux single blocks): only image tokens are selectable there, the text tokens always recompute.
    `hidden_size` reads the width of the tokens entering the block.
    """

    block_class: type[nn.Module]
    branches: tuple[str, ...]
    hidden_size: Callable[[nn.Module], int]
    partial: tuple[str, ...] = ()
    joint: tuple[str, ...] = ()


def _width(path: str) -> Callable[[nn.Module], int]:
    """The input width of the linear layer at `path` (dotted) inside a block."""

    def read(block: nn.Module) -> int:
        return int(block.get_submodule(path).in_features)

    return read


# A new family is one more entry here (and one `ModelFamily` below for its model class).
BLOCK_FAMILIES: tuple[BlockFamily, ...] = (
    BlockFamily(
        BasicTransformerBlock, ("attn1", "attn2", "ff"), _width("attn1.to_q"), partial=("attn1", "attn2", "ff")
    ),
    # Flux.1 double-stream: `attn` returns (image, text); `ff` on image tokens, `ff_context` on text tokens.
    # Token-partial (all families): the per-token branches on image (video) tokens only. A joint attention mixes the
    # streams (every image and text query reads every key, one processor call for both) and computes or reuses on a
    # partial step, as do the text-stream MLPs (`ff_context`, `txt_mlp`): the text stream is never partial.
    BlockFamily(FluxTransformerBlock, ("attn", "ff", "ff_context"), _width("attn.to_q"), partial=("ff",)),
    # Flux.1 single-stream on [text; image]: attention, the MLP input projection (`act_mlp` follows it) and the fused
    # output projection whose output the block gates.
    BlockFamily(
        FluxSingleTransformerBlock,
        ("attn", "proj_mlp", "proj_out"),
        _width("proj_mlp"),
        partial=("proj_mlp", "proj_out"),
        joint=("proj_mlp", "proj_out"),
    ),
    BlockFamily(Flux2TransformerBlock, ("attn", "ff", "ff_context"), _width("attn.to_q"), partial=("ff",)),
    # Flux.2 single-stream: one parallel attention + MLP module (fused projections in and out): the MLP runs inside the
    # attention processor on [text; image], so the block has no per-token branch and is never token-partial.
    BlockFamily(Flux2SingleTransformerBlock, ("attn",), _width("attn.to_qkv_mlp_proj")),
    # SD3/3.5 MMDiT: `attn` (image, text), SD3.5's dual image-only `attn2`; the last block has no `ff_context`. `attn2`
    # is image self-attention through the joint processor, which has no queries-only call: it computes or reuses.
    BlockFamily(JointTransformerBlock, ("attn", "attn2", "ff", "ff_context"), _width("attn.to_q"), partial=("ff",)),
    # Wan 2.x: self-attention on video tokens, cross-attention to the text (added ungated), FFN. The cross-attention's
    # output for a video token depends on that token and the text only, so it runs token-partial as the FFN does; the
    # self-attention (rotary positions of the queries) computes or reuses.
    BlockFamily(WanTransformerBlock, ("attn1", "attn2", "ffn"), _width("attn1.to_q"), partial=("attn2", "ffn")),
    # Qwen-Image dual stream: the joint `attn` (image, text), `img_mlp` on image tokens, `txt_mlp` on text tokens.
    BlockFamily(QwenImageTransformerBlock, ("attn", "img_mlp", "txt_mlp"), _width("attn.to_q"), partial=("img_mlp",)),
)


def block_family(block: nn.Module) -> BlockFamily | None:
    return next((f for f in BLOCK_FAMILIES if isinstance(block, f.block_class)), None)


@dataclass(frozen=True)
class ModelFamily:
    """How a denoiser class runs its blocks and is called: one entry per model class.

    `block_lists`: the attributes holding its blocks, in the order forward runs them; `timestep_scale`: the
    scheduler's timesteps are the called `timestep` times this (Flux-style pipelines call `timestep / 1000`);
    `image_tokens(model, hidden_states)`: the image (or video) token count of a call, which sets the scheduler's
    shift where it is resolution-dependent (`dynamic_shift`: Flux, Flux.2, Qwen-Image; SD3 when its scheduler
    asks for it).
    """

    name: str
    model_class: type[nn.Module]
    block_lists: tuple[str, ...]
    image_tokens: Callable[[nn.Module, torch.Tensor], int]
    timestep_scale: float = 1.0
    dynamic_shift: bool = False


def _packed_tokens(model: nn.Module, hidden: torch.Tensor) -> int:
    return int(hidden.shape[1])  # [batch, tokens, channels]: latents packed into tokens by the pipeline


def _patched_tokens(model: nn.Module, hidden: torch.Tensor) -> int:
    """[batch, channels, (frames,) height, width] latents, cut into `patch_size` patches."""
    patch = model.config.patch_size
    patch = (patch,) * (hidden.ndim - 2) if isinstance(patch, int) else tuple(patch)
    count = 1
    for size, side in zip(hidden.shape[2:], patch, strict=True):
        count *= size // side
    return count


MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "flux",
        FluxTransformer2DModel,
        ("transformer_blocks", "single_transformer_blocks"),
        _packed_tokens,
        timestep_scale=1000.0,
        dynamic_shift=True,
    ),
    ModelFamily(
        "flux2",
        Flux2Transformer2DModel,
        ("transformer_blocks", "single_transformer_blocks"),
        _packed_tokens,
        timestep_scale=1000.0,
        dynamic_shift=True,
    ),
    ModelFamily("sd3", SD3Transformer2DModel, ("transformer_blocks",), _patched_tokens),
    ModelFamily("wan", WanTransformer3DModel, ("blocks",), _patched_tokens),
    ModelFamily(
        "qwenimage",
        QwenImageTransformer2DModel,
        ("transformer_blocks",),
        _packed_tokens,
        timestep_scale=1000.0,
        dynamic_shift=True,
    ),
)


def model_family(model: nn.Module) -> ModelFamily | None:
    return next((f for f in MODEL_FAMILIES if isinstance(model, f.model_class)), None)


@dataclass(frozen=True)
class Branch:
    """One cacheable branch module: its block index, its name, and the module itself (and how it runs)."""

    block: int
    name: str
    module: nn.Module
    partial: bool = False  # may run on a subset of its tokens
    joint: bool = False  # its tokens are [text; image] (image tokens selectable)


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
    family = model_family(model)
    return family.name if family is not None else "generic"


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in execution order (the family's block lists, `transformer_blocks`, else every block
    of a known family).

    UNets register `mid_block` after `up_blocks` but run it between them, so their parts are walked in the order
    down, mid, up (the order their blocks run in).
    """
    family = model_family(model)
    if family is not None:
        return [block for name in family.block_lists for block in getattr(model, name)]
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and all(block_family(b) is not None for b in blocks):
        return list(blocks)
    parts = [getattr(model, name, None) for name in UNET_PARTS]
    roots = [p for p in parts if isinstance(p, nn.Module)] if all(p is not None for p in parts) else [model]
    found = [m for root in roots for m in root.modules() if block_family(m) is not None]
    if not found:
        known = ", ".join(sorted({f.block_class.__name__ for f in BLOCK_FAMILIES}))
        raise TypeError(f"{type(model).__name__} has no block l2c knows; l2c caches models built of {known}")
    return found


def branch_names(model: nn.Module) -> tuple[str, ...]:
    """The model's plan columns: every branch name present in at least one block, in family order."""
    names: list[str] = []
    for block in find_blocks(model):
        for name in block_family(block).branches:
            if name not in names and isinstance(getattr(block, name, None), nn.Module):
                names.append(name)
    return tuple(names)


def find_branches(model: nn.Module) -> list[Branch]:
    found = []
    for index, block in enumerate(find_blocks(model)):
        family = block_family(block)
        for name in family.branches:
            module = getattr(block, name, None)
            if isinstance(module, nn.Module):
                found.append(Branch(index, name, module, _partial_ok(name, module, family), name in family.joint))
    return found


def _num_tokens(model: nn.Module) -> int | None:
    """From the config where the model has one resolution (DiT, PixArt); else None: set by the run (`bind`)."""
    config = getattr(model, "config", None)
    sample_size = getattr(config, "sample_size", None)
    patch_size = getattr(config, "patch_size", None)
    if isinstance(sample_size, int) and isinstance(patch_size, int) and _family(model) in ("dit", "pixart"):
        return (sample_size // patch_size) ** 2
    return None


def model_spec(target: nn.Module | object, num_tokens: int | None = None) -> ModelSpec:
    """The model's fingerprint; `num_tokens` sets the image token count a run uses (Flux-style models, whose
    config does not fix the resolution, and whose scheduler shift depends on it)."""
    model = resolve_denoiser(target)
    blocks = find_blocks(model)
    names = branch_names(model)
    found = {(branch.block, branch.name) for branch in find_branches(model)}
    return ModelSpec(
        family=_family(model),
        num_blocks=len(blocks),
        branches=names,
        hidden_size=block_family(blocks[0]).hidden_size(blocks[0]),
        num_tokens=_num_tokens(model) if num_tokens is None else int(num_tokens),
        absent=tuple((block, name) for block in range(len(blocks)) for name in names if (block, name) not in found),
    )


def _partial_ok(name: str, module: nn.Module, family: BlockFamily) -> bool:
    if name not in family.partial:
        return False
    return not any(
        getattr(module, attr, None) for attr in ("group_norm", "spatial_norm", "residual_connection", "norm_cross")
    )


def token_partial_supported(branch: Branch) -> bool:
    """Whether a branch's output for a token depends only on that token (plus full keys for attention)."""
    return branch.partial


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def read_outside_their_block(model: nn.Module) -> list[nn.Module]:
    """Parts of a block that the model also calls outside that block's forward: they need an FSDP unit of their own
    (a block's unit is all-gathered only while the block runs). DiT's output head reads block 0's adaLN embedding."""
    if not isinstance(model, DiTTransformer2DModel):
        return []
    return [find_blocks(model)[0].norm1.emb]
