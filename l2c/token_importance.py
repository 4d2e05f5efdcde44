"""`TokenImportancePredictor`: the trainable part of TokenCache, one score per (block, token) of a sampling step.

A light copy of the teacher's first transformer block reads the tokens that enter the teacher's first block and the
same conditioning (timestep, class or text), so the predictor sees exactly the step's input; a linear head turns
each output *image* token into one sigmoid score per teacher block. Score ≈ 1: recompute the token in that block;
≈ 0: its cached output will do.

The family-specific part is one `ScoredBlock` entry per block class (`SCORED_BLOCKS`): where a block's output holds
its image tokens (a DiT/PixArt `BasicTransformerBlock` returns them; a Flux.1 block returns (text, image)) and which
of the copied block's submodules feed only the text stream the head never reads (the Flux double block's
`ff_context`: replaced by an identity, same scores, no compute). Other families are refused, naming the block.

"Initialised from the teacher's first block where shapes allow": attention, norms and the adaLN / timestep
embedding are copied as they are; the MLP is narrowed to `ff_inner_dim` hidden units (the teacher's first
`ff_inner_dim` units, so the narrowed MLP starts as a truncation of the teacher's), which keeps the predictor near
half a block of compute (see docs/tokencache.md for its measured FLOPs share).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from .adapters import block_family, find_blocks


@dataclass(frozen=True)
class ScoredBlock:
    """How TokenCache reads one block class: the image tokens of its output; the text-only parts of a copy of it."""

    block_class: type[nn.Module]
    image_tokens: Callable[[object], torch.Tensor]  # the block's output -> its image tokens [batch, tokens, C]
    text_only: tuple[str, ...] = ()  # submodules whose output reaches only the text stream the head never reads


SCORED_BLOCKS: tuple[ScoredBlock, ...] = (
    ScoredBlock(BasicTransformerBlock, lambda output: output),
    # Flux.1 blocks return (text, image); the double block's text MLP feeds only the returned text stream.
    ScoredBlock(FluxTransformerBlock, lambda output: output[1], text_only=("ff_context",)),
    ScoredBlock(FluxSingleTransformerBlock, lambda output: output[1]),
)


def scored_block(block: nn.Module) -> ScoredBlock:
    """The entry of `block`'s class; TypeError naming the block and the supported ones otherwise."""
    found = next((entry for entry in SCORED_BLOCKS if isinstance(block, entry.block_class)), None)
    if found is None:
        known = ", ".join(entry.block_class.__name__ for entry in SCORED_BLOCKS)
        raise TypeError(
            f"tokencache: cannot score the tokens of a {type(block).__name__} (TokenCache reads the image tokens of "
            f"DiT/PixArt and Flux.1 blocks only: {known})"
        )
    return found


def block_image_tokens(block: nn.Module, output: object) -> torch.Tensor:
    """The image tokens [batch, tokens, C] of what `block` returned."""
    return scored_block(block).image_tokens(output)


class TokenImportancePredictor(nn.Module):
    """scores = sigmoid(head(norm(block(tokens, conditioning)))) → [batch, teacher blocks, tokens]."""

    def __init__(self, block: nn.Module, num_blocks: int, init_score: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < init_score < 1.0:
            raise ValueError(f"token importance predictor: field 'init_score' must be in (0, 1), got {init_score}")
        self.image_tokens = scored_block(block).image_tokens
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
            if not isinstance(getattr(block, "ff", None), nn.Module):
                raise TypeError(
                    f"token importance predictor: field 'ff_inner_dim' narrows the first block's `ff` MLP; a "
                    f"{type(first).__name__} has none, leave ff_inner_dim unset"
                )
            block.ff = narrowed_feed_forward(block.ff, ff_inner_dim)
        return cls(block, len(blocks), init_score)

    @property
    def ff_inner_dim(self) -> int:
        return int(self.block.ff.net[-1].in_features)

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Scores [batch, num_blocks, tokens] from the (args, kwargs) the teacher's first block is called with."""
        dtype = self.head.weight.dtype
        args = tuple(_cast(a, dtype) for a in args)  # the teacher may run in bf16/fp16, the predictor in fp32
        kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        tokens = self.image_tokens(self.block(*args, **kwargs))
        return torch.sigmoid(self.head(self.norm(tokens))).transpose(1, 2)


def narrowed_feed_forward(ff: nn.Module, inner: int) -> nn.Module:
    """A copy of a diffusers `FeedForward` with `inner` hidden units: the first `inner` units of the original."""
    first, last = ff.net[0], ff.net[-1]
    if not isinstance(first, GELU) or not isinstance(last, nn.Linear):
        raise TypeError(
            f"token importance predictor: field 'ff_inner_dim' narrows GELU MLPs only, this block's MLP starts with "
            f"{type(first).__name__}; leave ff_inner_dim unset to copy the MLP whole"
        )
    width = first.proj.out_features
    if not 1 <= inner <= width:
        raise ValueError(f"token importance predictor: field 'ff_inner_dim' must be in [1, {width}], got {inner}")
    narrowed = copy.deepcopy(ff)
    proj = nn.Linear(first.proj.in_features, inner, bias=first.proj.bias is not None)
    out = nn.Linear(inner, last.out_features, bias=last.bias is not None)
    with torch.no_grad():
        proj.weight.copy_(first.proj.weight[:inner])
        out.weight.copy_(last.weight[:, :inner])
        if proj.bias is not None:
            proj.bias.copy_(first.proj.bias[:inner])
        if out.bias is not None:
            out.bias.copy_(last.bias)
    narrowed.net[0].proj = proj.to(first.proj.weight)
    narrowed.net[-1] = out.to(last.weight)
    return narrowed


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, tuple):  # Flux's rotary embedding: (cos, sin)
        return tuple(_cast(part, dtype) for part in value)
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
