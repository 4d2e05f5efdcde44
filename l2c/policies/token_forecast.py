"""The `taylor_order` option the token-wise policies share (ToCa, DuCa, TokenCache): forecast, instead of reuse, the
tokens a step between full steps does not recompute (TaylorSeer's combination with ToCa).

A policy that mixes `TokenForecast` in declares the dataclass field `taylor_order: int | None = None` (m ≥ 1:
TaylorSeer's order-m rule from the branch's last m+1 whole computations; None or 0: reuse, as before) with the knob
range `TAYLOR_ORDER`, calls `init_token_forecast()` from `__post_init__`, and gives the slots with nothing to
recompute between full steps `not_recomputed_action`. The runtime does the rest (`BranchHook._partial` with a
`fill_partial` forecaster): the unselected tokens of a partial slot are forecast, a token recomputed by a partial
step since the newest whole computation from its own last value plus the rule's change since then.
"""

from __future__ import annotations

from ..forecast import PolynomialForecaster
from ..plan import Action
from .knobs import at_least

TAYLOR_ORDER = at_least(0)  # the knob range of `taylor_order`


class TokenForecast:
    """Mixin for a policy dataclass with a `taylor_order` field (not annotated here, so that the field keeps its
    place among the policy's own in `params()` and `describe()`)."""

    def init_token_forecast(self) -> None:
        """Set the policy's forecaster: TaylorSeer's order-m rule, also filling partial steps (off: none)."""
        if self.taylor_order:
            self.forecaster = PolynomialForecaster("taylor", self.taylor_order, fill_partial=True)

    @property
    def not_recomputed_action(self) -> Action:
        """What a slot between full steps that recomputes no token runs: FORECAST with the option on, else REUSE."""
        return Action.FORECAST if self.taylor_order else Action.REUSE
