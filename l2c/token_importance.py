"""`TokenImportancePredictor`: the trainable part of TokenCache, one score per (block, token) of a sampling step.

A light copy of the teacher's first transformer block reads the tokens that enter the teacher's first block and the
same conditioning (timestep, class or text), so the predictor sees exactly the step's input; a linear head turns
each output token into one sigmoid score per teacher block. Score ≈ 1: recompute the token in that block; ≈ 0:
its cached output will do.

"Initialised from the teacher's first block where shapes allow": attention, norms and the adaLN / timestep
embedding are copied as they are; the MLP is narrowed to `ff_inner_dim` hidden units (the teacher's first
`ff_inner_dim` units, so the narrowed MLP starts as a truncation of the teacher's), which keeps the predictor near
half a block of compute (see docs/tokencache.md for its measured FLOPs share).
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .adapters import find_blocks


class TokenImportancePredictor(nn.Module):
    """scores = sigmoid(head(norm(block(tokens, conditioning)))) → [batch, teacher blocks, tokens]."""

    def __init__(self, block: BasicTransformerBlock, num_blocks: int, init_score: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < init_score < 1.0:
            raise ValueError(f"token importance predictor: field 'init_score' must be in (0, 1), got {init_score}")
        dim = int(block.attn1.to_q.in_features)
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
        block = copy.deepcopy(first).float().requires_grad_(True).train()
        if ff_inner_dim is not None:
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
        tokens = self.block(*args, **kwargs)
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
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
