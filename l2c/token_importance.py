"""`TokenImportancePredictor`: the trainable part of TokenCache, one score per (block, token) of a sampling step.

A light copy of the teacher's first transformer block reads the tokens that enter the teacher's first block and the
same conditioning (timestep, class or text), so the predictor sees exactly the step's input; a linear head turns
each output *image* token into one sigmoid score per teacher block. Score ≈ 1: recompute the token in that block;
≈ 0: its cached output will do.

The family-specific part is one `ScoredBlock` entry per block class (`SCORED_BLOCKS`): where a block's output holds
its image tokens (a DiT/PixArt `BasicTransformerBlock` and a Wan block return them; the Flux.1, Flux.2, SD3 and
Qwen-Image dual-stream blocks return (text, image); a Flux.2 single block returns [text; image] in one tensor), which
of the copied block's submodules feed only the text stream the head never reads (the dual-stream blocks' text MLP,
`ff_context` or `txt_mlp`: replaced by an identity, same scores, no compute) and which MLP `ff_inner_dim` narrows.
Other block classes are refused, naming the block.

"Initialised from the teacher's first block where shapes allow": attention, norms and the adaLN / timestep
embedding are copied as they are; the image-stream MLP is narrowed to `ff_inner_dim` hidden units (the teacher's
first `ff_inner_dim` units, so the narrowed MLP starts as a truncation of the teacher's; a Flux.2 SwiGLU MLP keeps
the same units of its gate and value halves), which keeps the predictor near half a block of compute (see
docs/tokencache.md for its measured FLOPs share).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward, JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_flux2 import (
    Flux2FeedForward,
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
)
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from .adapters import block_family, find_blocks


def _image_of_pair(output: tuple) -> torch.Tensor:
    return output[1]  # a dual-stream block returns (text, image)


@dataclass(frozen=True)
class ScoredBlock:
    """How TokenCache reads one block class: the image tokens of its output; the text-only parts of a copy of it."""

    block_class: type[nn.Module]
    # the block's output -> the tensor [batch, tokens, C] whose last tokens are its image tokens
    image_tokens: Callable[[object], torch.Tensor]
    text_only: tuple[str, ...] = ()  # submodules whose output reaches only the text stream the head never reads
    mlp: str | None = None  # the image-stream MLP `ff_inner_dim` narrows (None: the block has none apart)


SCORED_BLOCKS: tuple[ScoredBlock, ...] = (
    ScoredBlock(BasicTransformerBlock, lambda output: output, mlp="ff"),
    # The dual-stream blocks return (text, image); their text MLP feeds only the returned text stream.
    ScoredBlock(FluxTransformerBlock, _image_of_pair, text_only=("ff_context",), mlp="ff"),
    ScoredBlock(FluxSingleTransformerBlock, _image_of_pair),
    ScoredBlock(Flux2TransformerBlock, _image_of_pair, text_only=("ff_context",), mlp="ff"),
    # Flux.2's single block returns [text; image] in one tensor; its MLP is fused into the attention module.
    ScoredBlock(Flux2SingleTransformerBlock, lambda output: output),
    ScoredBlock(JointTransformerBlock, _image_of_pair, text_only=("ff_context",), mlp="ff"),
    ScoredBlock(WanTransformerBlock, lambda output: output, mlp="ffn"),  # video tokens only; text enters by attn2
    ScoredBlock(QwenImageTransformerBlock, _image_of_pair, text_only=("txt_mlp",), mlp="img_mlp"),
)


def scored_block(block: nn.Module) -> ScoredBlock:
    """The entry of `block`'s class; TypeError naming the block and the supported ones otherwise."""
    found = next((entry for entry in SCORED_BLOCKS if isinstance(block, entry.block_class)), None)
    if found is None:
        known = ", ".join(entry.block_class.__name__ for entry in SCORED_BLOCKS)
        raise TypeError(
            f"tokencache: cannot score the tokens of a {type(block).__name__} (TokenCache reads the image tokens of "
            f"these transformer blocks only: {known})"
        )
    return found


def block_image_tokens(block: nn.Module, output: object, image_tokens: int) -> torch.Tensor:
    """The image tokens [batch, image_tokens, C] of what `block` returned (the last ones of a [text; image] output)."""
    return scored_block(block).image_tokens(output)[:, -image_tokens:]


class TokenImportancePredictor(nn.Module):
    """scores = sigmoid(head(norm(block(tokens, conditioning)))) → [batch, teacher blocks, tokens]."""

    def __init__(self, block: nn.Module, num_blocks: int, init_score: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < init_score < 1.0:
            raise ValueError(f"token importance predictor: field 'init_score' must be in (0, 1), got {init_score}")
        entry = scored_block(block)
        self.image_tokens, self.mlp = entry.image_tokens, entry.mlp
        dim = block_family(block).hidden_size(block)
        self.block = block
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_blocks)
        nn.init.zeros_(self.head.weight)  # every score starts at `init_score`: the student starts as the teacher
        nn.init.constant_(self.head.bias, math.log(init_score / (1 - init_score)))

    @classmethod
    def from_teacher(cls, model: nn.Module, ff_inner_dim: int | None = None, init_score: float = 0.9):
        """A predictor for `model`, its block copied from the model's first block (never hooked, never shared)."""
        blocks = find_blocks(model)
        first = blocks[0]
        if any("_diffusers_hook" in module.__dict__ for module in first.modules()):
            raise RuntimeError(
                "token importance predictor: the teacher's first block carries diffusers hooks (a policy is applied); "
                "build the predictor before applying a policy"
            )
        entry = scored_block(first)
        block = copy.deepcopy(first).float().requires_grad_(True).train()
        for name in entry.text_only:
            setattr(block, name, nn.Identity())
        if ff_inner_dim is not None:
            if entry.mlp is None:
                raise TypeError(
                    f"token importance predictor: field 'ff_inner_dim' narrows the first block's image MLP; a "
                    f"{type(first).__name__} has none apart from its attention, leave ff_inner_dim unset"
                )
            setattr(block, entry.mlp, narrowed_feed_forward(getattr(block, entry.mlp), ff_inner_dim))
        return cls(block, len(blocks), init_score)

    @property
    def ff_inner_dim(self) -> int:
        return mlp_width(getattr(self.block, self.mlp))

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Scores [batch, num_blocks, tokens] from the (args, kwargs) the teacher's first block is called with."""
        dtype = self.head.weight.dtype
        args = tuple(_cast(a, dtype) for a in args)  # the teacher may run in bf16/fp16, the predictor in fp32
        kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        tokens = self.image_tokens(self.block(*args, **kwargs))
        return torch.sigmoid(self.head(self.norm(tokens))).transpose(1, 2)


def mlp_width(ff: nn.Module) -> int:
    """The hidden units of a diffusers GELU `FeedForward` or a Flux.2 SwiGLU `Flux2FeedForward`."""
    if isinstance(ff, Flux2FeedForward):
        return ff.linear_out.in_features
    if isinstance(ff, FeedForward) and isinstance(ff.net[0], GELU) and isinstance(ff.net[-1], nn.Linear):
        return ff.net[0].proj.out_features
    raise TypeError(
        f"token importance predictor: field 'ff_inner_dim' narrows GELU and Flux.2 SwiGLU MLPs only, this block's "
        f"MLP is a {type(ff).__name__} starting with {type(getattr(ff, 'net', [ff])[0]).__name__}; leave "
        "ff_inner_dim unset to copy the MLP whole"
    )


def narrowed_feed_forward(ff: nn.Module, inner: int) -> nn.Module:
    """A copy of the MLP `ff` with `inner` hidden units: the first `inner` units of the original (of a SwiGLU MLP,
    the same units of its gate and value halves, which its input projection stacks)."""
    width = mlp_width(ff)
    if not 1 <= inner <= width:
        raise ValueError(f"token importance predictor: field 'ff_inner_dim' must be in [1, {width}], got {inner}")
    narrowed = copy.deepcopy(ff)
    units = torch.arange(inner)
    if isinstance(ff, Flux2FeedForward):
        narrowed.linear_in = _sliced_linear(ff.linear_in, rows=torch.cat([units, width + units]))
        narrowed.linear_out = _sliced_linear(ff.linear_out, columns=units)
    else:
        narrowed.net[0].proj = _sliced_linear(ff.net[0].proj, rows=units)
        narrowed.net[-1] = _sliced_linear(ff.net[-1], columns=units)
    return narrowed


def _sliced_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None
) -> nn.Linear:
    """A copy of `linear` keeping the output units `rows` and the input units `columns` (None: all)."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, tuple):  # Flux's rotary embedding: (cos, sin)
        return tuple(_cast(part, dtype) for part in value)
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
