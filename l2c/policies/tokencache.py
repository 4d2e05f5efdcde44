"""`tokencache`: Token Caching (TokenCache, Lou et al. 2024) — predictor scores, per-block ratios, TPRR step types.

Steps are *full* (every branch computes) or *cache* steps, set by a Two-Phase Round-Robin schedule (TPRR): a
boundary step splits the run into two phases, each with its own interval between full steps. On a cache step,
block b recomputes the share `ratio[b]` of its image tokens in every token-partial branch (DiT/PixArt: attn1, attn2,
ff; Flux.1: the double blocks' `ff`, the single blocks' `proj_mlp` and `proj_out`, whose text tokens always
recompute; Flux.2 and SD3: `ff`; Wan: `attn2`, `ffn`; Qwen-Image: `img_mlp`) and reuses the rest; a branch that
cannot run token by token (the joint attentions, the text MLPs, SD3.5's `attn2`, Wan's self-attention, Flux.2's fused
single blocks) computes on full steps and is reused on cache steps, as ToCa's presets do. Which tokens: the
highest scores of a `TokenImportancePredictor` (`l2c/token_importance.py`) run on that step's input inside the model
call, at the runtime's before-blocks point (so FlopCounterMode counts it). Blocks whose ratio falls under `floor`
are cached whole. Which slots are token-partial is read from the model when the policy is bound to it
(`partial_slots`, saved as `tokencache.partial_slots`; a directory without it is from a DiT, where every slot is).

`staleness` says how a token's age enters the selection. The predictor reads only the step's input, so it cannot tell
a token recomputed on the previous cache step from one cached since the last full step: ranking by its score alone
(`"none"`, the paper's rule) picks the same tokens again on consecutive cache steps. `"age"` reads the score as a rate
(how fast the token's output changes per step) and ranks score × (steps since the token was last computed), the
drift its cached output has accumulated at that rate; on the first cache step after a full step every token has the
same age and the two rules agree. A policy directory without the field loads as `"none"` (what it was saved with).
`tokens="random"` (the ablation of the predictor) picks seeded uniform tokens on the same plan, the predictor not run.
`rescore="interval"` (the default; a directory saved before the field existed loads as `"step"`, the paper's rule:
every cache step) runs the predictor on the first cache step after each full step only and ranks the same scores
(× the tokens' ages) on the interval's later cache steps: the predictor is a copy of a whole block, which on a model
of few blocks costs as much as recomputing a fifth of the tokens on every cache step (docs/tokencache.md).

Both tables come from statistics measured at export (`TokenCacheCalibration`), not from constants:
- per-block ratios (adaptive block selection): every calibration score of every (block, token) is pooled (the
  blocks with a token-wise slot), the top `token_budget` share of the pool is kept, and block b's ratio is the share
  of its own scores in that top set;
- TPRR: among all two-phase schedules with at most `full_steps` full steps, the one whose worst accumulated
  per-step change since the last full step is smallest (the measured per-step error or the predictor's mean
  per-step importance, `tprr_signal`). See docs/tokencache.md for the choices and their measurements.

`taylor_order=m` (m ≥ 1; off by default) forecasts, instead of reusing, the tokens a cache step does not recompute
(a partial block's unselected tokens and the blocks under the floor) with TaylorSeer's order-m rule from the
branch's last m+1 full computations: ToCa's option (`token_forecast.py`), on TokenCache's schedule and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, get_args
from weakref import WeakKeyDictionary

import torch

from ..adapters import ModelSpec, find_branches, model_spec, module_device, resolve_denoiser
from ..extension import BlockInput, PartialKeys, SelectionRequest, TokenSelector
from ..plan import Action, Plan
from ..token_importance import TokenImportancePredictor
from .base import CachePolicy, PolicyTarget
from .knobs import Range
from .random_tokens import random_tokens
from .scores import top_tokens
from .token_forecast import TAYLOR_ORDER, TokenForecast

if TYPE_CHECKING:
    from torch import nn

SIGNAL = "tokencache.scores"  # state.signals[SIGNAL] -> [batch, blocks, tokens], the predictor's scores this step
TPRR_SIGNALS = ("error", "importance")
Staleness = Literal["none", "age"]  # selection score: the predictor's score, or score × steps since last computed
STALENESS: tuple[str, ...] = get_args(Staleness)
STALENESS_OF_OLD_FILES = "none"  # what a policy directory saved before the field existed selected by
RESCORE_OF_OLD_FILES = "step"  # when the predictor of a directory saved before `rescore` existed ran
# When the predictor runs: on every cache step ("step", the paper), or on the first cache step after each full step
# only ("interval"), the later cache steps of that interval ranking the same scores (× their tokens' new ages).
Rescore = Literal["step", "interval"]
RESCORE: tuple[str, ...] = get_args(Rescore)
TokenChoice = Literal["predictor", "random"]  # who picks a cache step's tokens ("random": the ablation)
TOKEN_CHOICES: tuple[str, ...] = get_args(TokenChoice)
PREDICTOR_PREFIX = "predictor."


@dataclass
class TokenCacheCalibration:
    """What the export measured on teacher trajectories; the policy's tables are derived from it."""

    score_histogram: torch.Tensor  # [blocks, bins]: counts of predictor scores in [0, 1] on cache-candidate steps
    step_importance: torch.Tensor  # [steps]: mean predictor score at each step (step 0: unused)
    step_error: torch.Tensor  # [steps]: relative change of the block outputs from step s−1 to s (step 0: 0)

    NAMES = ("score_histogram", "step_importance", "step_error")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"calibration.{name}": getattr(self, name).detach().float().cpu() for name in self.NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TokenCacheCalibration:
        missing = [f"calibration.{n}" for n in cls.NAMES if f"calibration.{n}" not in tensors]
        if missing:
            raise ValueError(f"missing tensors {missing} in policy.safetensors")
        return cls(*(tensors[f"calibration.{name}"].float() for name in cls.NAMES))


# -- adaptive block selection ---------------------------------------------------------------------------------------
def adaptive_block_ratios(histogram: torch.Tensor, budget: float, floor: float) -> torch.Tensor:
    """Per-block ratios [blocks]: the top `budget` share of all pooled scores, split by block; under `floor` → 0.

    The global cut falls inside one histogram bin; that bin's scores are taken in equal proportion from every block,
    so the ratios average exactly to `budget` before the floor is applied.
    """
    counts = histogram.double()
    per_block = counts.sum(dim=1)
    if bool((per_block <= 0).any()):
        raise ValueError("tokencache policy: field 'calibration.score_histogram' has a block with no scores")
    above = counts.flip(1).cumsum(1).flip(1)  # above[b, i] = scores of block b in bins i.. (highest bins last)
    pooled_above = above.sum(0)
    wanted = budget * float(per_block.sum())
    reached = torch.nonzero(pooled_above >= wanted - 1e-9).flatten()
    cut = int(reached.max()) if len(reached) else 0  # the highest bin at which the pool holds `wanted` scores
    strictly_above = above[:, cut + 1] if cut + 1 < counts.shape[1] else torch.zeros_like(per_block)
    in_bin = counts[:, cut]
    needed = wanted - float(strictly_above.sum())
    share = needed / float(in_bin.sum()) if float(in_bin.sum()) > 0 else 0.0
    ratios = ((strictly_above + share * in_bin) / per_block).float().clamp(0.0, 1.0)
    return torch.where(ratios < floor, torch.zeros_like(ratios), ratios)


# -- TPRR ------------------------------------------------------------------------------------------------------------
def two_phase_full_steps(num_steps: int, boundary: int, first: int, second: int) -> torch.Tensor:
    """Full-step mask: steps 0, first, 2·first, … before `boundary`; boundary, boundary + second, … after."""
    steps = torch.arange(num_steps)
    before = (steps < boundary) & (steps % first == 0)
    after = (steps >= boundary) & ((steps - boundary) % second == 0)
    return before | after


def accumulated_change(full: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """At every step, the per-step change summed since the last full step (0 on full steps): the cache's drift."""
    drift = torch.zeros(len(curve), dtype=torch.float64)
    for step in range(1, len(curve)):
        drift[step] = 0.0 if full[step] else drift[step - 1] + float(curve[step])
    return drift


@dataclass(frozen=True)
class TPRRSchedule:
    boundary: int  # first step of phase 2 (a full step)
    first_interval: int  # phase 1: a full step every `first_interval` steps from step 0
    second_interval: int  # phase 2: a full step every `second_interval` steps from `boundary`

    def full_steps(self, num_steps: int) -> torch.Tensor:
        return two_phase_full_steps(num_steps, self.boundary, self.first_interval, self.second_interval)


def choose_tprr(curve: torch.Tensor, max_full: int) -> TPRRSchedule:
    """The two-phase schedule with ≤ `max_full` full steps whose worst accumulated drift is smallest.

    Ties: the smaller total drift, then fewer full steps, then the earlier boundary. `curve[s]` is the measured change
    from step s−1 to s; the drift of a cached step bounds (triangle inequality) how far its cache is from fresh.
    """
    num_steps = len(curve)
    best, best_key = None, None
    for boundary in range(1, num_steps):
        for first in range(1, boundary + 1):
            for second in range(1, num_steps - boundary + 1):
                full = two_phase_full_steps(num_steps, boundary, first, second)
                count = int(full.sum())
                if count > max_full:
                    continue
                drift = accumulated_change(full, curve)
                key = (round(float(drift.max()), 9), round(float(drift.sum()), 9), count, boundary)
                if best_key is None or key < best_key:
                    best, best_key = TPRRSchedule(boundary, first, second), key
    if best is None:
        raise ValueError(f"tokencache policy: field 'full_steps' is {max_full}; TPRR needs at least 2 full steps")
    return best


def single_interval(num_steps: int, max_full: int) -> int:
    """The ablation without TPRR: the shortest one interval whose full steps (0, k, 2k, …) fit in `max_full`."""
    return next(k for k in range(1, num_steps + 1) if math.ceil(num_steps / k) <= max_full)


# -- the policy ------------------------------------------------------------------------------------------------------
@dataclass
class TokenCachePolicy(TokenForecast, CachePolicy):
    kind = "tokencache"
    knob_ranges: ClassVar[dict[str, Range]] = {"taylor_order": TAYLOR_ORDER}
    token_budget: float = 0.3  # share of all (block, token) pairs recomputed on a cache step, before the floor
    floor: float = 0.05  # blocks whose ratio is under this are cached whole on cache steps
    full_steps: int = 6  # at most this many full (independent) steps, step 0 included
    tprr_signal: str = "error"  # per-step curve TPRR is chosen from: "error" (measured) or "importance" (predictor)
    adaptive: bool = True  # False (ablation): every block recomputes the adaptive ratios' mean share of its tokens
    tprr: bool = True  # False (ablation): one interval for the whole run
    partial_keys: PartialKeys = "cached"  # what partial self-attention's queries see (l2c.extension.PartialKeys)
    ff_inner_dim: int | None = None  # the predictor's MLP width (None: the teacher's)
    staleness: Staleness = "age"  # "none": rank by the score (the paper); "age": by score × steps since computed
    tokens: TokenChoice = "predictor"  # "random" (ablation): seeded uniform tokens, the predictor not run
    rescore: Rescore = "interval"  # "step": the predictor runs on every cache step (the paper)
    # m ≥ 1: forecast the tokens a cache step does not recompute (TaylorSeer order m; `token_forecast.py`).
    taylor_order: int | None = None  # None or 0: reuse them
    predictor_state: dict[str, torch.Tensor] | None = field(default=None, kw_only=True, repr=False)
    calibration: TokenCacheCalibration | None = field(default=None, kw_only=True, repr=False)
    # bool [blocks, branches]: the slots whose branch runs token-partial on the bound model (None: every slot, as on
    # a DiT); set by `bind`, saved as `tokencache.partial_slots`.
    partial_slots: torch.Tensor | None = field(default=None, kw_only=True, repr=False, compare=False)
    # The predictor of each model the policy is applied to (built by `prepare`, dropped with the model).
    _predictors: WeakKeyDictionary = field(default_factory=WeakKeyDictionary, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init_token_forecast()
        name = self.kind
        for key in ("token_budget", "floor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} policy: field '{key}' must be a number in [0, 1], got {value!r}")
        if isinstance(self.full_steps, bool) or not isinstance(self.full_steps, int) or self.full_steps < 1:
            raise ValueError(f"{name} policy: field 'full_steps' must be an integer ≥ 1, got {self.full_steps!r}")
        choices = (
            ("tprr_signal", TPRR_SIGNALS),
            ("tokens", TOKEN_CHOICES),
            ("rescore", RESCORE),
            ("staleness", STALENESS),
        )
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{name} policy: field '{key}' must be one of {list(allowed)}, got {getattr(self, key)!r}"
                )
        for key in ("adaptive", "tprr"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{name} policy: field '{key}' must be true or false, got {getattr(self, key)!r}")

    # -- tables --------------------------------------------------------------------------------------------------------
    def _calibration(self, what: str) -> TokenCacheCalibration:
        if self.calibration is None:
            raise ValueError(
                f"{self.kind} policy: {what} needs the calibration measured at export; load the policy from a "
                "directory written by predictors/tokencache_trainer.py"
            )
        return self.calibration

    def block_ratios(self) -> torch.Tensor:
        """Exported per-block ratios [blocks] (0 = cached whole on cache steps). The budget is shared among the blocks
        with a token-wise slot; a block without one (Flux.2's single blocks) is cached whole on cache steps."""
        histogram = self._calibration("block selection").score_histogram
        scored = self.scored_blocks(len(histogram))
        ratios = torch.zeros(len(histogram))
        if not bool(scored.any()):
            return ratios
        ratios[scored] = adaptive_block_ratios(histogram[scored], self.token_budget, self.floor)
        if self.adaptive:
            return ratios
        return torch.where(scored, ratios[scored].mean(), ratios)

    def scored_blocks(self, num_blocks: int) -> torch.Tensor:
        """bool [blocks]: the blocks with at least one token-wise slot (all of them without `partial_slots`)."""
        if self.partial_slots is None:
            return torch.ones(num_blocks, dtype=torch.bool)
        if len(self.partial_slots) != num_blocks:
            raise ValueError(
                f"{self.kind} policy: field 'partial_slots' has {len(self.partial_slots)} blocks, the calibration "
                f"{num_blocks}"
            )
        return self.partial_slots.bool().any(dim=1)

    def tprr_schedule(self, num_steps: int) -> TPRRSchedule:
        calibration = self._calibration("TPRR")
        curve = calibration.step_error if self.tprr_signal == "error" else calibration.step_importance
        if len(curve) != num_steps:
            raise ValueError(f"{self.kind} policy: calibration has {len(curve)} steps, the run has {num_steps}")
        if not self.tprr:
            interval = single_interval(num_steps, self.full_steps)
            return TPRRSchedule(num_steps, interval, 1)
        return choose_tprr(curve, self.full_steps)

    def step_types(self, num_steps: int) -> torch.Tensor:
        """Exported step-type table [steps], int8: 1 = full (independent) step, 0 = cache step."""
        return self.tprr_schedule(num_steps).full_steps(num_steps).to(torch.int8)

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        shape = (num_steps, spec.num_blocks, len(spec.branches))
        plan = Plan.full(*shape)
        ratios = self.block_ratios()
        if len(ratios) != spec.num_blocks:
            raise ValueError(f"{self.kind} policy: calibration has {len(ratios)} blocks, the model {spec.num_blocks}")
        if spec.num_tokens:  # what the runtime will run: round(ratio · tokens) tokens
            ratios = torch.round(ratios * spec.num_tokens) / spec.num_tokens
        cache = ~self.step_types(num_steps).bool()
        per_slot = ratios.view(1, -1, 1).expand(shape)
        cache_slots = cache.view(-1, 1, 1).expand(shape)
        token_wise = torch.ones(shape[1:], dtype=torch.bool) if self.partial_slots is None else self.partial_slots
        if tuple(token_wise.shape) != shape[1:]:
            raise ValueError(
                f"{self.kind} policy: field 'partial_slots' is {list(token_wise.shape)} [blocks, branches], the model "
                f"has {list(shape[1:])}"
            )
        token_wise = token_wise.bool().view(1, *shape[1:]).expand(shape)
        plan.actions[cache_slots & ((per_slot <= 0) | ~token_wise)] = self.not_recomputed_action
        partial = cache_slots & token_wise & (per_slot > 0) & (per_slot < 1)
        plan.actions[partial] = Action.PARTIAL
        plan.token_ratio[partial] = per_slot[partial]
        return plan

    # -- run time --------------------------------------------------------------------------------------------------
    def token_scores(self) -> Callable[[SelectionRequest], torch.Tensor]:
        """Each token's selection score [batch, tokens] at a cache step (the selector takes the highest)."""
        by_age = self.staleness == "age"

        def score(request: SelectionRequest) -> torch.Tensor:
            scores = request.state.signals.get(SIGNAL) if request.state is not None else None
            if scores is None:
                raise RuntimeError(
                    f"{self.kind} policy: no predictor scores at step {request.step} (block {request.block} "
                    f"{request.branch} runs partially); the policy's runtime scores every step that has partial slots"
                )
            block = scores[:, request.block]
            if not by_age:
                return block
            # The store's age is 0 for a token computed on the previous step: steps since computed = age + 1.
            return block * (request.store.age + 1).to(block)

        return score

    def token_selector(self) -> TokenSelector:
        if self.tokens == "random":
            return random_tokens(0)
        score = self.token_scores()

        def select(request: SelectionRequest) -> torch.Tensor:
            return top_tokens(score(request), request.num_selected)

        return select

    def build_predictor(self, model: nn.Module) -> nn.Module:
        """The trained predictor, rebuilt on `model`'s first block and loaded with the saved weights."""
        if self.predictor_state is None:
            raise ValueError(f"{self.kind} policy has no predictor weights (load it from a policy directory)")
        predictor = TokenImportancePredictor.from_teacher(model, self.ff_inner_dim)
        missing, unexpected = predictor.load_state_dict(self.predictor_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{self.kind} policy: the predictor weights do not fit this model's first block "
                f"(ff_inner_dim {self.ff_inner_dim}): missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return predictor.to(module_device(model)).eval().requires_grad_(False)

    def bind(
        self,
        model: nn.Module | object,
        timesteps: torch.Tensor | list,
        scheduler: str | None,
        num_tokens: int | None = None,
    ) -> CachePolicy:
        """As `CachePolicy.bind`, and record which of the model's slots run token-partial (`partial_slots`)."""
        bound = super().bind(model, timesteps, scheduler, num_tokens)
        bound.partial_slots = token_partial_slots(model)
        return bound

    def prepare(self, model: nn.Module) -> None:
        """Build the predictor on the model's unhooked first block (`before_blocks` runs it on every scored step)."""
        if self.partial_slots is None and not bool(token_partial_slots(model).all()):
            raise ValueError(
                f"{self.kind} policy: field 'partial_slots' is unset and this {model_spec(model).family} model has "
                "branches that cannot run token by token; bind the policy to the model (`policy.bind(model, ...)`) "
                "or load it from a directory written by predictors/tokencache_trainer.py"
            )
        if self.tokens == "predictor":
            self._predictors[model] = self.build_predictor(model)

    def before_blocks(self, point: BlockInput) -> None:
        """Score the step's tokens from the first block's input, on steps with partial slots only (`rescore=
        "interval"`: only where the step before had none, i.e. on the first cache step after a full step)."""
        if self.tokens != "predictor" or point.plan is None:
            return
        actions = point.plan.actions
        if not bool((actions[point.step] == Action.PARTIAL).any()):
            return
        scored_before = point.step > 0 and bool((actions[point.step - 1] == Action.PARTIAL).any())
        if self.rescore == "interval" and scored_before and SIGNAL in point.state.signals:
            return
        with torch.no_grad():
            point.state.signals[SIGNAL] = self._predictors[point.model](point.args, point.kwargs)

    # -- artifact --------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        if self.predictor_state is None or self.target is None:
            raise ValueError(f"{self.kind} policy: nothing to save without predictor weights and a bound target")
        predictor = {PREDICTOR_PREFIX + k: v.detach().float().cpu() for k, v in self.predictor_state.items()}
        tables = {
            "tokencache.block_ratio": self.block_ratios(),
            "tprr.step_type": self.step_types(len(self.target.timesteps)),
        }
        if self.partial_slots is not None:
            tables["tokencache.partial_slots"] = self.partial_slots.to(torch.int8)
        return {**predictor, **self._calibration("saving").tensors(), **tables}

    @classmethod
    def from_artifact(cls, params: dict, tensors: dict[str, torch.Tensor], target: PolicyTarget) -> CachePolicy:
        state = {k[len(PREDICTOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREDICTOR_PREFIX)}
        if not state:
            raise ValueError("missing tensors 'predictor.*' (the token importance predictor) in policy.safetensors")
        params = {"staleness": STALENESS_OF_OLD_FILES, "rescore": RESCORE_OF_OLD_FILES, **params}
        slots = tensors.get("tokencache.partial_slots")  # absent: a directory written on a DiT, every slot partial
        policy = cls(
            **params, predictor_state=state, calibration=TokenCacheCalibration.from_tensors(tensors), target=target,
            partial_slots=None if slots is None else slots.bool(),
        )  # fmt: skip
        for name, derived in (
            ("tokencache.block_ratio", policy.block_ratios()),
            ("tprr.step_type", policy.step_types(len(target.timesteps))),
        ):
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r} in policy.safetensors")
            if tensors[name].shape != derived.shape or not torch.allclose(tensors[name].float(), derived.float()):
                raise ValueError(f"tensor {name!r} disagrees with the table its calibration and params give")
        return policy


def token_partial_slots(model: nn.Module | object) -> torch.Tensor:
    """bool [blocks, branches]: the model's plan slots whose branch can run on a subset of its tokens."""
    spec = model_spec(model)
    slots = torch.zeros(spec.num_blocks, len(spec.branches), dtype=torch.bool)
    for branch in find_branches(resolve_denoiser(model)):
        slots[branch.block, spec.branches.index(branch.name)] = branch.partial
    return slots
