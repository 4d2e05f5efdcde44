"""`duca`: dual feature caching (DuCa, Zou et al. 2024) — ToCa's partial steps alternating with pure reuse.

Every `interval`-th step is full. Between two full steps, steps alternate between *conservative* (ToCa-style:
each branch recomputes its scheduled fraction of tokens) and *aggressive* (every branch reuses its cache),
counted back from the next full step as the reference code does: the step just before a full step is
conservative, the one before it aggressive, and so on (N=3: full, aggressive, conservative, full, …).

Tokens are chosen by V-caching by default: the value-vector norms of the block's self-attention, read from its
value projection on full steps. Unlike ToCa's attention score this needs no attention map, so the attention
keeps running through the model's fused `scaled_dot_product_attention` and scoring adds no matrix product.
Everything else (fresh-ratio schedule, cache-frequency term, spatial bonus, the `taylor_order` option, under which the
aggressive steps forecast every branch) is ToCa's (`toca.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .toca import DIT_DDIM50, PIXART_ALPHA, WAN, ToCaPolicy

# DuCa repository: DiT-XL/2 DDIM-50 with N=3, ratio 0.05 and a spatial bonus of 0.8 on 2×2 cells; PixArt-α with
# N=3, ratio 0.75 (ToCa's PixArt schedule). Both use V-caching here (the DuCa; the reference DiT script
# passes `--cache-type attention`, which `duca:score=attention` reproduces).
DUCA_DIT = {**DIT_DDIM50, "ratio": 0.05, "score": "value_norm", "bonus": 0.8}
DUCA_PIXART = {**PIXART_ALPHA, "ratio": 0.75, "score": "value_norm"}
# FLUX.1: ToCa's plain Flux setting (l2c.policies.toca.FLUX, untuned), ranked by staleness as there; the other MMDiTs
# take ToCa's presets for them (derived from it, see toca.py). Wan: ToCa's (DiT's factors, no spatial bonus) with
# DuCa-DiT's ratio and V-caching (Wan's `to_v` is plain: its value norms are what the model attends with).
DUCA_WAN = {**WAN, "ratio": DUCA_DIT["ratio"], "score": "value_norm"}


@dataclass
class DuCaPolicy(ToCaPolicy):
    kind = "duca"
    presets: ClassVar[dict[str, dict]] = {**ToCaPolicy.presets, "dit": DUCA_DIT, "pixart": DUCA_PIXART, "wan": DUCA_WAN}

    def between_kind(self, gap: int, position: int) -> str:
        """Between full steps, `partial` (conservative) and `reuse` (aggressive) alternate, the last one partial."""
        return "partial" if (gap - position) % 2 == 1 else "reuse"
