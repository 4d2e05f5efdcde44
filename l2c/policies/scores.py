"""Token scoring shared by the token-wise policies (ToCa, DuCa, DaTo): signals, score terms and top-k selection.

Every function is per sample: row b of the result depends only on row b of the inputs, so a sample's selection
never depends on the other samples in its batch. Higher score = recompute first.

Signals are captured while a branch computes (see `capture_projections`): forward hooks (`l2c.hooks`) on the
attention module's own `to_q` / `to_k` / `to_v` linears, registered for the one call and removed after it, so the
attention itself still runs through whatever processor the model uses (fused SDPA included) and the projections
are never recomputed. Only the attention map itself (q·kᵀ and its softmax) is extra work, and only the policies
and steps that ask for it pay it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import record_outputs, submodules

# -- capture -------------------------------------------------------------------------------------------------------


@contextmanager
def capture_projections(attn: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, record the outputs of `attn.<name>` (e.g. "to_q", "to_k", "to_v"): {name: [B, tokens, inner]}."""
    with record_outputs(submodules(attn, names, "projection to read a token score from")) as captured:
        yield captured


def split_heads(attn: nn.Module, projected: torch.Tensor, norm: str | None = None) -> torch.Tensor:
    """[B, tokens, heads·d] → [B, heads, tokens, d], with the module's q/k norm applied as its processor does."""
    batch, tokens, inner = projected.shape
    heads = attn.heads
    out = projected.view(batch, tokens, heads, inner // heads).transpose(1, 2)
    layer = getattr(attn, norm, None) if norm else None
    return layer(out) if layer is not None else out


def attention_bias(attn: nn.Module, mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """The additive mask the attention processor applies, as [B, heads, 1 or queries, keys] (None if no mask)."""
    if mask is None:
        return None
    bias = attn.prepare_attention_mask(mask, keys, batch)
    return bias.view(batch, attn.heads, -1, bias.shape[-1])


# -- score terms (s1, s2, DuCa's value norm, s3, s4) ---------------------------------------------------------------


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """ToCa s1: attention each token receives, Σ_queries mean_heads softmax(q·kᵀ), L2-normalised over tokens.

    `query` [B, H, N, d], `key` [B, H, N, d] → [B, N]. Computed head by head so the map never holds more than
    one head's [B, N, N] at a time. Costs 2·B·N²·d·H multiply-adds for q·kᵀ plus the softmax.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    received = torch.zeros(query.shape[0], key.shape[2], dtype=torch.float32, device=query.device)
    for head in range(query.shape[1]):
        logits = torch.matmul(query[:, head].float(), key[:, head].float().transpose(-1, -2)) * scale
        received += logits.softmax(dim=-1).sum(dim=1)
    return F.normalize(received / query.shape[1], dim=1)


def received_from_map(attention: torch.Tensor) -> torch.Tensor:
    """s1 from a given (head-averaged) attention map [B, queries, keys] → [B, keys], L2-normalised."""
    return F.normalize(attention.float().sum(dim=1), dim=1)


def cross_attention_entropy(
    query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """ToCa s2: entropy of each image token's head-averaged attention over the text tokens, of 1 + H, L2-normalised.

    `query` [B, H, N, d] (image tokens), `key` [B, H, L, d] (text tokens), `bias` the additive mask
    [B, H, 1|N, L] (padding text tokens carry a large negative bias, so they get no probability).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return entropy_score(logits.softmax(dim=-1).mean(dim=1))


def entropy_score(attention: torch.Tensor) -> torch.Tensor:
    """s2 from a head-averaged map [B, N, L] (rows sum to 1) → [B, N]: normalize(1 + entropy) over tokens."""
    entropy = -(attention * torch.log(attention + 1e-7)).sum(dim=-1)
    return F.normalize(1 + entropy, dim=1)


def value_norm_score(value: torch.Tensor) -> torch.Tensor:
    """DuCa's V-caching score: Σ_heads (1 − ‖v_h‖), L2-normalised over tokens; small value norms rank first.

    `value` [B, H, N, d] → [B, N]. Needs no attention map: reading the value projection leaves the fused
    attention path untouched; the cost is one norm per (token, head).
    """
    return F.normalize((1 - value.float().norm(dim=-1)).sum(dim=1), dim=1)


def frequency_term(age: torch.Tensor, interval: int, weight: float) -> torch.Tensor:
    """ToCa s3: weight · (steps since the token was last computed) / interval, [B, N]."""
    return weight * age.float() / interval


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int) -> torch.Tensor:
    """ToCa s4: in every grid×grid cell of the token image, the best token's score grows by bonus × its score.

    Tokens are taken as a square image in row-major order; cells at a ragged edge are smaller. A sequence that
    is not a square (or bonus 0, grid ≤ 1) is returned unchanged. Ties within a cell: the lowest index wins.
    """
    side = math.isqrt(score.shape[1])
    if bonus == 0 or grid <= 1 or side * side != score.shape[1]:
        return score
    index, best = cell_best(score, side, side, grid)
    return score.scatter_add(1, index, best * bonus)


def cell_best(score: torch.Tensor, height: int, width: int, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best token of every cell×cell cell of a height×width token image: (token index, score), each [B, cells].

    Tokens are in row-major order; cells are in row-major order too; cells at a ragged edge are smaller. Ties
    within a cell: the lowest token index wins.
    """
    batch = score.shape[0]
    rows, cols = -(-height // cell), -(-width // cell)
    image = score.view(batch, height, width)
    padded = F.pad(image, (0, cols * cell - width, 0, rows * cell - height), value=-math.inf)
    blocks = padded.view(batch, rows, cell, cols, cell).permute(0, 1, 3, 2, 4).reshape(batch, rows * cols, -1)
    best = blocks.max(dim=-1).values
    position = torch.arange(blocks.shape[-1], device=score.device).expand_as(blocks)
    where = position.masked_fill(blocks != best.unsqueeze(-1), blocks.shape[-1]).min(dim=-1).values  # first best
    row = torch.arange(rows, device=score.device).repeat_interleave(cols) * cell + torch.div(
        where, cell, rounding_mode="floor"
    )
    col = torch.arange(cols, device=score.device).repeat(rows) * cell + where % cell
    return row * width + col, best


def top_tokens(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of the highest scores, ties broken by the lowest token index (deterministic)."""
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :count]
