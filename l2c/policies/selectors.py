"""Reference token selectors for ToCa-style partial steps: the bounds a learned or scored selection is judged by.

`SelectorPolicy` is ToCa's plan (same full steps, same fresh-ratio schedule, so the same FLOPs) with the tokens a
partial step recomputes chosen by one of:

- `stalest`: the tokens computed longest ago (the runtime's default selector; ties: lowest index);
- `random`: uniformly at random, seeded by (seed, step, block, branch), so a run is reproducible and a selection
  does not depend on the order branches are called in;
- `oracle`: the tokens whose true branch output is farthest from what they would get unselected, ‖f(x)ᵢ − cᵢ‖:
  c the cached output (the tokens that moved most since they were last computed) or, under `taylor_order`, the
  forecast that fills the step (the tokens the forecast gets most wrong). The true output is computed with the
  full branch just before the partial execution (an analysis bound: that extra branch call is real work which FLOP
  counters see, so a benchmark must report the plan's FLOPs for it);
- `predictor`: the highest selection scores of a trained TokenCache policy (`predictor=`, a loaded
  `TokenCachePolicy`): its predictor run as TokenCache runs it (before the blocks, on steps with partial slots; its
  FLOPs count), ranked as that policy ranks (`TokenCachePolicy.staleness`: the score, or score × age).

The oracle reads the full branch through the public surface only: its `observe` probe runs the branch's module
with the trajectory marked not running (`TrajectoryState.running`), so the branch's hook passes the call through
to the original forward and leaves the store untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch

from ..extension import (
    BlockInput,
    BranchCall,
    PartialKeys,
    SelectionRequest,
    TokenSelector,
    first_stream,
    stalest_tokens,
)
from ..plan import Action
from .random_tokens import random_tokens
from .scores import top_tokens
from .toca import ToCaPolicy
from .tokencache import TokenCachePolicy

if TYPE_CHECKING:
    from torch import nn

SelectorName = Literal["oracle", "random", "stalest", "predictor"]
SELECTORS: tuple[str, ...] = get_args(SelectorName)
TRUE_OUTPUT = "oracle.true_output"  # state.signals[(TRUE_OUTPUT, block, branch)] -> [batch, tokens, channels]


@contextmanager
def true_output_measured(call: BranchCall) -> Iterator[None]:
    """Around a branch execution: its true (full) output in `state.signals[(TRUE_OUTPUT, block, branch)]`, measured
    first by calling the module with the trajectory marked not running (its hook then passes the call through to
    the original forward, leaving the store as it was), dropped after the execution."""
    state, key = call.state, (TRUE_OUTPUT, call.block, call.branch)
    state.running = False
    try:
        state.signals[key] = call.module(*call.args, **call.kwargs)
    finally:
        state.running = True
    try:
        yield
    finally:
        state.signals.pop(key, None)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of `a` and `b` [batch, tokens] per row → [batch] (ties ranked by index)."""
    ranks = [x.argsort(dim=1, stable=True).argsort(dim=1).double() for x in (a, b)]
    centred = [r - r.mean(dim=1, keepdim=True) for r in ranks]
    return (centred[0] * centred[1]).sum(1) / (centred[0].norm(dim=1) * centred[1].norm(dim=1))


def moved(true_output: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """How far each token's true output is from its cached one: ‖true − cached‖ over channels, [batch, tokens]."""
    return (true_output.float() - cached.float()).norm(dim=-1)


def measured_change(request: SelectionRequest) -> torch.Tensor:
    """‖true − unselected‖ of each selectable token [batch, tokens]: the true output `SelectorPolicy`'s probe measured
    against what the token gets if it is not selected (`SelectionRequest.unselected_output`: cached or forecast).

    A joint branch (Flux single blocks: [text; image]) selects among its image tokens, the last ones of the output.
    """
    signals = request.state.signals if request.state is not None else {}
    true_output = signals.get((TRUE_OUTPUT, request.block, request.branch))
    if true_output is None:
        raise RuntimeError(
            f"oracle selector: no true output of block {request.block} {request.branch} at step {request.step}; "
            "the oracle runs only under SelectorPolicy(selector='oracle'), whose probe measures it"
        )
    unselected, true_output = request.unselected_output(), first_stream(true_output)
    return moved(true_output[:, true_output.shape[1] - unselected.shape[1] :], unselected)


def oracle_tokens(request: SelectionRequest) -> torch.Tensor:
    """The tokens whose true output is farthest from what they would get unselected (stored or forecast)."""
    return top_tokens(measured_change(request), request.num_selected)


@dataclass
class SelectorPolicy(ToCaPolicy):
    """ToCa's schedule with a reference selector (for analysis; not a registered policy kind)."""

    kind = "toca-selector"

    selector: SelectorName = "stalest"
    seed: int = 0  # of the `random` selector
    score: str | None = "none"  # no attention score is measured: the selector does not read one
    partial_keys: PartialKeys = "fresh"  # what partial self-attention's queries see (l2c.extension.PartialKeys)
    predictor: TokenCachePolicy | None = field(default=None, kw_only=True, repr=False)  # of the `predictor` selector

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selector not in SELECTORS:
            raise ValueError(
                f"{self.kind} policy: field 'selector' must be one of {list(SELECTORS)}, got {self.selector!r}"
            )
        if (self.selector == "predictor") != isinstance(self.predictor, TokenCachePolicy):
            raise ValueError(
                f"{self.kind} policy: field 'predictor' must be a TokenCachePolicy exactly when selector='predictor' "
                f"(selector {self.selector!r}, predictor {type(self.predictor).__name__})"
            )

    def prepare(self, model: nn.Module) -> None:
        if self.predictor is not None:
            self.predictor.prepare(model)

    def before_blocks(self, point: BlockInput) -> None:
        """Under the predictor, score the step's tokens as TokenCache does (steps with partial slots only)."""
        if self.predictor is not None:
            self.predictor.before_blocks(point)

    def token_selector(self) -> TokenSelector:
        self._require_resolved()
        if self.selector == "oracle":
            return oracle_tokens
        if self.selector == "random":
            return random_tokens(self.seed)
        if self.selector == "predictor":
            return self.predictor.token_selector()
        return stalest_tokens

    def observe(self, call: BranchCall):
        """Under the oracle, measure the branch's true output before each partial execution."""
        if self.selector != "oracle" or call.action != Action.PARTIAL:
            return None
        return true_output_measured(call)


@dataclass
class OracleTokenCache(TokenCachePolicy):
    """TokenCache's own plan (its step table and block ratios) with the oracle's tokens: the bound of its token
    choice, for analysis (not a registered kind). No predictor runs (`tokens="random"`'s plan and FLOPs); the
    oracle's true-output calls are analysis, so a benchmark reports the `tokens="random"` row's FLOPs for it."""

    kind = "tokencache-oracle"

    @classmethod
    def of(cls, policy: TokenCachePolicy) -> OracleTokenCache:
        fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
        return cls(**{**fields, "tokens": "random"})

    def token_selector(self) -> TokenSelector:
        return oracle_tokens

    def observe(self, call: BranchCall):
        """Measure the branch's true output before each partial execution (what the oracle ranks against)."""
        return true_output_measured(call) if call.action == Action.PARTIAL else None
