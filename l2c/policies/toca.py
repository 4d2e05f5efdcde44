"""`toca`: token-wise feature caching (ToCa, Zou et al. 2024) on the shared runtime.

Every `interval`-th step is full (or, with `interval_weight` / `sensitive_gap`, the reference's varying interval:
longer gaps early, shorter late; see `full_steps`). On the steps between, each branch recomputes the fraction of its
tokens given by the fresh-ratio schedule (step × block depth × branch type) and reuses the rest; ratio 0 reuses the
branch.
Which tokens: the highest of

    score = s (per block, measured at the last full step) + freq_weight · age / interval, then the spatial bonus

where s is the attention each token received (self-attention, DiT), the entropy of its cross-attention over the
text (PixArt), the value-norm score (DuCa's V-caching) or nothing; `age` is the steps since the token was last
computed in that branch. s is measured only on full steps whose block has a partial step before its next full
step, by reading the attention module's own q/k (or v) projections (see `scores.py`).

Fields left `None` take the settings of the model family the policy is applied to (`presets`: the paper's DiT-XL/2
and PixArt-α settings, and untuned ones for Flux.1, Flux.2, SD3/3.5, Qwen-Image and Wan, see `FLUX` and below), or
those of the preset named by `preset`. `toca:score=none` ranks by staleness alone.

`taylor_order=m` (m ≥ 1; off by default) forecasts, instead of reusing, every token a step between full steps does not
recompute (TaylorSeer's combination with ToCa): the unselected tokens of partial slots and the slots with nothing to
recompute (ratio 0; DuCa's aggressive steps) take TaylorSeer's order-m forecast from the branch's last m+1 full
computations, evaluated at the current step. Partial steps push no history entry; a token recomputed on one since
the newest full computation is forecast as its last computed value plus the rule's change since (see
`BranchHook._predict`). The store keeps each token's last computed value either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..adapters import ModelSpec, model_spec
from ..extension import BranchCall, SelectionRequest, TokenSelector
from ..plan import Action, Plan
from .base import CachePolicy
from .knobs import FINITE, FRACTION, NON_NEGATIVE, Range, at_least
from .scores import (
    attention_bias,
    attention_received,
    capture_projections,
    cross_attention_entropy,
    frequency_term,
    spatial_bonus,
    split_heads,
    top_tokens,
    value_norm_score,
)
from .token_forecast import TAYLOR_ORDER, TokenForecast

if TYPE_CHECKING:
    from torch import nn

SCORES = ("attention", "cross_entropy", "value_norm", "none")
SCORE_SOURCE = {"attention": "attn1", "value_norm": "attn1", "cross_entropy": "attn2"}
SCORE_PROJECTIONS = {"attention": ("to_q", "to_k"), "cross_entropy": ("to_q", "to_k"), "value_norm": ("to_v",)}
SENSITIVE_STEPS = (0.6, 0.8)  # share of the steps where the DiT reference refreshes every 2 steps
SIGNAL = "toca.score"  # state.signals[(SIGNAL, block)] -> [batch, tokens]
TUNABLE = (
    "ratio",
    "score",
    "bonus",
    "grid",
    "step_weight",
    "layer_weight",
    "attn1_factor",
    "attn2_factor",
    "ff_factor",
    "attn_factor",
    "ff_context_factor",
    "proj_mlp_factor",
    "proj_out_factor",
    "img_mlp_factor",
    "txt_mlp_factor",
    "ffn_factor",
)

# The reference code's recommended settings (ToCa repository, `ToCa-ddim50` for DiT-XL/2 DDIM-50 with N=3,
# `ToCa` for PixArt-α with N=3). attn1_factor 0: self-attention is reused on partial steps in both.
DIT_DDIM50 = dict(
    ratio=0.07,
    score="attention",
    bonus=0.6,
    grid=2,
    step_weight=2.0,
    layer_weight=-0.2,
    attn1_factor=0.0,
    attn2_factor=1.0,
    ff_factor=2.5,
)
# FLUX.1 (double and single blocks): a plain setting, untuned, not the numbers of the reference's FLUX code: 30% of the
# image tokens on every partial step of every per-token branch (`ff`, the single blocks' `proj_mlp` and `proj_out`;
# text tokens are always recomputed, see l2c.runtime), the joint attention and the text MLP reused; no attention score
# (Flux's fused attention exposes none): staleness ranks. The structure is the reference's (Shenyi-Z/ToCa,
# flux-ToCa/src/flux/modules/layers.py): on its ToCa steps both block kinds reuse the cached attention and recompute
# only MLP tokens. It differs in its numbers (fresh ratio 0.1, interval 4, the attention-map score computed by its own
# attention function, frequency weight 0.25: flux-ToCa/.../cache_functions/cache_init.py) and in ranking text tokens
# with the image tokens (the double blocks' text MLP, which this preset reuses; the single blocks' text tokens, which
# the runtime always recomputes).
FLUX = dict(
    ratio=0.30,
    score="none",
    bonus=0.0,
    grid=1,
    step_weight=0.0,
    layer_weight=0.0,
    attn_factor=0.0,
    ff_factor=1.0,
    ff_context_factor=0.0,
    proj_mlp_factor=1.0,
    proj_out_factor=1.0,
)
# Families with no published ToCa setting take one of the two above, untuned and stated as such: the Flux.1 preset for
# the MMDiTs (Flux.2, SD3/3.5, Qwen-Image), DiT's for the single-stream video blocks (Wan 2.x), each branch given the
# factor of its counterpart there. MMDiTs: the joint attention as Flux's `attn` (SD3.5's image self-attention `attn2`
# too: reused), the image-token MLP as `ff` (Qwen-Image's `img_mlp`), the text MLP as `ff_context` (`txt_mlp`);
# Flux.2's single blocks are one fused `attn` module (reused). Wan: `attn1` and `attn2` as DiT's, `ffn` as its `ff`,
# with two changes: ranked by staleness, as Flux is (Wan normalises q and k over all heads and rotates them inside its
# processor, so the DiT attention score read from `to_q`/`to_k` is not what the model attends with, and is refused),
# and no spatial bonus (its cells assume a square image of tokens; Wan's are frames × height × width).
FLUX2 = FLUX
SD3 = {**FLUX, "attn2_factor": 0.0}
QWEN_IMAGE = {**FLUX, "img_mlp_factor": FLUX["ff_factor"], "txt_mlp_factor": FLUX["ff_context_factor"]}
WAN = {**DIT_DDIM50, "ffn_factor": DIT_DDIM50["ff_factor"], "score": "none", "bonus": 0.0}
# Scores read from q/k projections: a family whose attention transforms them in ways `split_heads` does not reproduce.
QK_SCORES_UNREAD = {"wan": "Wan normalises q/k over all heads and applies rotary positions inside its processor"}
PIXART_ALPHA = dict(
    ratio=0.30,
    score="cross_entropy",
    bonus=0.4,
    grid=4,
    step_weight=-0.9,
    layer_weight=0.6,
    attn1_factor=0.0,
    attn2_factor=0.6,
    ff_factor=1.6,
)


@dataclass
class ToCaPolicy(TokenForecast, CachePolicy):
    kind = "toca"
    presets: ClassVar[dict[str, dict]] = {
        "dit": DIT_DDIM50,
        "pixart": PIXART_ALPHA,
        "flux": FLUX,
        "flux2": FLUX2,
        "sd3": SD3,
        "qwenimage": QWEN_IMAGE,
        "wan": WAN,
    }
    knob_ranges: ClassVar[dict[str, Range]] = {
        "interval": at_least(1),
        "ratio": FRACTION,
        "freq_weight": NON_NEGATIVE,
        "bonus": NON_NEGATIVE,
        "grid": at_least(1),
        "step_weight": FINITE,  # the DiT setting (2.0) clamps the early steps' ratio to 0 on purpose
        "layer_weight": FINITE,
        "attn1_factor": NON_NEGATIVE,
        "attn2_factor": NON_NEGATIVE,
        "ff_factor": NON_NEGATIVE,
        "attn_factor": NON_NEGATIVE,
        "ff_context_factor": NON_NEGATIVE,
        "proj_mlp_factor": NON_NEGATIVE,
        "proj_out_factor": NON_NEGATIVE,
        "img_mlp_factor": NON_NEGATIVE,
        "txt_mlp_factor": NON_NEGATIVE,
        "ffn_factor": NON_NEGATIVE,
        "interval_weight": Range(0, 1, high_open=True),
        "sensitive_gap": at_least(0),
        "taylor_order": TAYLOR_ORDER,
    }

    interval: int = 3  # N: a full step every N steps (step 0 first)
    ratio: float | None = None  # base fresh ratio
    score: str | None = None  # attention | cross_entropy | value_norm | none
    freq_weight: float = 0.25  # weight of the cache-frequency term (steps since computed / interval)
    bonus: float | None = None  # spatial bonus: the best token per grid cell gains bonus × its score
    grid: int | None = None  # side of the spatial-bonus cells, in tokens
    step_weight: float | None = None  # step factor 1 − w + 2w·step/steps (w > 0: more fresh tokens late)
    layer_weight: float | None = None  # depth factor 1 + w − 2w·block/(blocks − 1) (w > 0: more in early blocks)
    attn1_factor: float | None = None  # branch factors
    attn2_factor: float | None = None
    ff_factor: float | None = None
    attn_factor: float | None = None  # Flux's branches (the `flux` preset)
    ff_context_factor: float | None = None
    proj_mlp_factor: float | None = None
    proj_out_factor: float | None = None
    img_mlp_factor: float | None = None  # Qwen-Image's (the `qwenimage` preset)
    txt_mlp_factor: float | None = None
    ffn_factor: float | None = None  # Wan's (the `wan` preset)
    interval_weight: float = 0.0  # varying N (force scheduler): gap after step s is round(N / (1 − w + 2w·s/S))
    sensitive_gap: int = 0  # > 0: a full step at 60–80% of the steps is followed by this gap (DiT reference: 2)
    preset: str | None = None  # whose settings fill the unset fields: a key of `presets` (None: the model family's)
    # m ≥ 1: forecast the tokens not recomputed (TaylorSeer order m; "forecast" is a name the runtime reserves).
    taylor_order: int | None = None  # None or 0: reuse them

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init_token_forecast()
        if self.score is not None and self.score not in SCORES:
            raise ValueError(f"{self.kind} policy: field 'score' must be one of {list(SCORES)}, got {self.score!r}")
        if self.preset is not None and self.preset not in self.presets:
            raise ValueError(
                f"{self.kind} policy: field 'preset' must be one of {sorted(self.presets)}, got {self.preset!r}"
            )

    # -- settings --------------------------------------------------------------------------------------------------
    def resolved(self, spec: ModelSpec) -> ToCaPolicy:
        """A copy with every `None` field set from `preset`'s settings, or else from the model's family's."""
        family = spec.family if spec.family in self.presets else ("pixart" if "attn2" in spec.branches else "dit")
        preset = self.presets[self.preset or family]
        unknown = [name for name in spec.branches if f"{name}_factor" not in TUNABLE]
        if unknown:
            raise ValueError(
                f"{self.kind} policy: no branch factor for {unknown} of this model ({spec.family}); it has presets "
                f"for {sorted(self.presets)}"
            )
        filled = {key: preset.get(key, 0.0) for key in TUNABLE if getattr(self, key) is None}
        policy = dataclasses.replace(self, **filled) if filled else self
        source = SCORE_SOURCE.get(policy.score)
        if source is not None and source not in spec.branches:
            raise ValueError(
                f"{self.kind} policy: score {policy.score!r} reads branch {source!r}, which this model "
                f"({spec.family}, branches {list(spec.branches)}) does not have"
            )
        if source is not None and policy.score != "value_norm" and spec.family in QK_SCORES_UNREAD:
            raise ValueError(
                f"{self.kind} policy: score {policy.score!r} cannot be read on {spec.family} "
                f"({QK_SCORES_UNREAD[spec.family]}); use score 'value_norm' or 'none'"
            )
        return policy

    def _require_resolved(self) -> None:
        # Branch factors are filled per model by `resolved` (the plan's `ratio_table`); scoring needs the rest.
        missing = [key for key in TUNABLE if getattr(self, key) is None and not key.endswith("_factor")]
        if missing:
            raise RuntimeError(
                f"{self.kind} policy: fields {missing} are unset; apply it with policy.apply(model) (which fills them "
                "from the model family's published settings) or set them explicitly"
            )

    def apply(self, target: nn.Module | object, timesteps=None, step_match=None):
        return CachePolicy.apply(self.resolved(model_spec(target)), target, timesteps, step_match)

    def bind(self, model, timesteps, scheduler, num_tokens=None):
        bound = super().bind(model, timesteps, scheduler, num_tokens)
        return bound.resolved(bound.target.model)

    def described_params(self) -> dict:
        """Unset fields (filled per model by `resolved`) are left out."""
        return {k: v for k, v in self.params().items() if v is not None}

    # -- plan ------------------------------------------------------------------------------------------------------
    def full_steps(self, num_steps: int) -> list[tuple[int, int]]:
        """(full step, steps until the next full step): `interval` apart, or varying with `interval_weight`."""
        segments, step = [], 0
        while step < num_steps:
            factor = 1 - self.interval_weight + 2 * self.interval_weight * step / num_steps
            gap = max(1, round(self.interval / factor))
            if self.sensitive_gap and SENSITIVE_STEPS[0] <= step / num_steps < SENSITIVE_STEPS[1]:
                gap = self.sensitive_gap
            segments.append((step, gap))
            step += gap
        return segments

    def step_kinds(self, num_steps: int) -> list[str]:
        """`full` at the full steps; each step between takes `between_kind`."""
        kinds = []
        for _, gap in self.full_steps(num_steps):
            kinds += ["full", *(self.between_kind(gap, position) for position in range(1, gap))]
        return kinds[:num_steps]

    def between_kind(self, gap: int, position: int) -> str:
        """The kind of the step `position` steps after a full step that is `gap` steps before the next: partial."""
        return "partial"

    def ratio_table(self, spec: ModelSpec, num_steps: int) -> torch.Tensor:
        """The fresh-ratio schedule [steps, blocks, branches]: ratio · step factor · depth factor · branch factor."""
        p = self.resolved(spec)
        step = torch.arange(num_steps, dtype=torch.float64) / max(num_steps, 1)
        step_factor = 1 - p.step_weight + 2 * p.step_weight * step
        depth = torch.arange(spec.num_blocks, dtype=torch.float64) / max(spec.num_blocks - 1, 1)
        layer_factor = 1 + p.layer_weight - 2 * p.layer_weight * depth
        branch_factor = torch.tensor([getattr(p, f"{name}_factor") for name in spec.branches], dtype=torch.float64)
        table = p.ratio * step_factor.view(-1, 1, 1) * layer_factor.view(1, -1, 1) * branch_factor.view(1, 1, -1)
        return table.clamp(0.0, 1.0)

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        shape = (num_steps, spec.num_blocks, len(spec.branches))
        plan = Plan.full(*shape)
        kinds = self.step_kinds(num_steps)
        partial = torch.tensor([k == "partial" for k in kinds], dtype=torch.bool).view(-1, 1, 1).expand(shape)
        reuse = torch.tensor([k == "reuse" for k in kinds], dtype=torch.bool).view(-1, 1, 1).expand(shape)
        ratio = self.ratio_table(spec, num_steps)
        if spec.num_tokens:  # exact token counts, as the reference: floor(ratio · tokens); 0 tokens → reuse
            count = torch.floor(ratio * spec.num_tokens + 1e-9)
            ratio = count / spec.num_tokens
        plan.actions[reuse | (partial & (ratio <= 0))] = self.not_recomputed_action
        fresh = partial & (ratio > 0) & (ratio < 1)
        plan.actions[fresh] = Action.PARTIAL
        plan.token_ratio[fresh] = ratio[fresh].float()
        return plan

    # -- scoring ---------------------------------------------------------------------------------------------------
    def token_selector(self) -> TokenSelector:
        score = self.token_scores()

        def select(request: SelectionRequest) -> torch.Tensor:
            return top_tokens(score(request), request.num_selected)

        return select

    def token_scores(self) -> Callable[[SelectionRequest], torch.Tensor]:
        """Each token's selection score [batch, tokens] at a partial step (the selector takes the highest)."""
        self._require_resolved()
        interval, freq_weight, bonus, grid = self.interval, self.freq_weight, self.bonus, self.grid

        def score(request: SelectionRequest) -> torch.Tensor:
            signals = request.state.signals if request.state is not None else {}
            measured = signals.get((SIGNAL, request.block))
            total = frequency_term(request.store.age, interval, freq_weight)
            if measured is not None:
                total = total + measured.to(total.device)
            return spatial_bonus(total, bonus, grid)

        return score

    def observe(self, call: BranchCall):
        """On full steps, read the block's score from its attention projections (only where a partial step needs it)."""
        if self.score == "none" or call.action != Action.COMPUTE or call.rows is not None:
            return None
        if call.branch != SCORE_SOURCE.get(self.score) or not _score_needed(call):
            return None
        return self._measure(call)

    @contextmanager
    def _measure(self, call: BranchCall):
        attn = call.module
        with capture_projections(attn, SCORE_PROJECTIONS[self.score]) as got:
            yield
        if self.score == "value_norm":
            score = value_norm_score(split_heads(attn, got["to_v"]))
        else:
            query, key = split_heads(attn, got["to_q"], "norm_q"), split_heads(attn, got["to_k"], "norm_k")
            if self.score == "attention":
                score = attention_received(query, key, attn.scale)
            else:
                bias = attention_bias(attn, call.kwargs.get("attention_mask"), query.shape[0], key.shape[2])
                score = cross_attention_entropy(query, key, bias, attn.scale)
        call.state.signals[(SIGNAL, call.block)] = score


def _score_needed(call: BranchCall) -> bool:
    """Whether a later step recomputes part of this block before the block is next computed in full."""
    if call.plan is None:
        return True
    actions = call.plan.actions[:, call.block]
    for step in range(call.step + 1, actions.shape[0]):
        row = actions[step]
        if bool((row == Action.PARTIAL).any()):
            return True
        if bool((row == Action.COMPUTE).all()):
            return False
    return False
