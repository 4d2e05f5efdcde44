"""A seeded uniform token selector: the `random` reference of the token-wise policies and TokenCache's ablation."""

from __future__ import annotations

import zlib

import torch

from ..extension import SelectionRequest, TokenSelector
from .scores import top_tokens


def random_tokens(seed: int) -> TokenSelector:
    """A selector of `num_selected` distinct tokens per sample, uniform, reproducible per (step, block, branch)."""

    def select(request: SelectionRequest) -> torch.Tensor:
        key = zlib.crc32(f"{seed}/{request.step}/{request.block}/{request.branch}".encode())
        generator = torch.Generator().manual_seed(key)
        batch, tokens = request.inputs.shape[:2]
        draw = torch.rand(batch, tokens, generator=generator)
        return top_tokens(draw, request.num_selected).to(request.inputs.device)

    return select
