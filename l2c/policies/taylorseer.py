"""`taylorseer`: TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting") natively on the shared runtime.

Every branch (attn1, attn2, ff: the module outputs, before the block's gate, as diffusers' hook caches them) is
computed on the schedule of diffusers' `TaylorSeerCacheHook` (0.42.1) and forecast in between by the order-`order`
Taylor expansion of its last `order`+1 computed outputs (`l2c.forecast.taylor_weights`). The knobs map to
`diffusers.TaylorSeerCacheConfig` as `interval` = `cache_interval`, `order` = `max_order`, `warmup` =
`disable_cache_before_step`; with `taylor_factors_dtype=torch.float32` and the branch modules as
`cache_identifiers` (what `l2c.peers.TaylorSeer` applies) the samples equal diffusers' within float rounding.
`rule="lagrange"` keeps the schedule and forecasts by exact polynomial extrapolation instead (not TaylorSeer);
`rule="hermite"` is HiCache (its scaled-Hermite expansion of the same factors, σ = `scale`; `l2c.forecast`).

Published DiT-XL/2 settings (`DIT_XL_2_DDIM50`), from the TaylorSeer repository's `TaylorSeer-DiT.md` and
`TaylorSeer-DiT/cache_functions`: DDIM 50 steps, `interval=4, max_order=4` (recommended: 3.57× fewer FLOPs, FID
+0.17) and `interval=3, max_order=3` (FID 2.34 vs 2.32 uncached), two full steps first (`first_enhance = 2`).
The reference computes steps 0, 1, then 1 + N, 1 + 2N, …; diffusers' schedule (followed here, so that the two
agree) computes 0, 1, then `warmup` + 1, `warmup` + 1 + N, …: the same number of computed steps (14 of 50 at N=4),
shifted by one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..adapters import ModelSpec
from ..forecast import HICACHE_SCALE, RULES, PolynomialForecaster
from ..plan import Action, Plan
from .base import CachePolicy
from .knobs import Range, at_least


def compute_steps(num_steps: int, interval: int, warmup: int) -> list[int]:
    """The steps that compute (diffusers' `TaylorSeerCacheHook._measure_should_compute`): every step before
    `warmup`, then `warmup` + 1 and every `interval`-th step after it; the others are forecast."""
    return [s for s in range(num_steps) if s < warmup or (s - warmup - 1) % interval == 0]


@dataclass
class TaylorSeerPolicy(CachePolicy):
    kind = "taylorseer"
    knob_ranges: ClassVar[dict[str, Range]] = {
        "interval": at_least(1),
        "order": at_least(0),
        "warmup": at_least(1),
        "scale": Range(0, low_open=True),
    }
    interval: int = 5  # N: diffusers' `cache_interval`
    order: int = 1  # m: diffusers' `max_order`
    warmup: int = 3  # diffusers' `disable_cache_before_step`: steps before it always compute (≥ 1)
    rule: str = "taylor"  # a `StepRule`: "taylor" (TaylorSeer), "lagrange" (exact extrapolation), "hermite" (HiCache)
    scale: float = HICACHE_SCALE  # HiCache's σ (rule "hermite" only)

    def __post_init__(self) -> None:
        super().__post_init__()  # the knob ranges; warmup ≥ 1: step 0 must compute
        if self.rule not in RULES:
            raise ValueError(f"{self.kind} policy: field 'rule' must be one of {sorted(RULES)}, got {self.rule!r}")
        self.forecaster = PolynomialForecaster(self.rule, self.order, scale=self.scale)

    def described_params(self) -> dict:
        """`scale` only where it acts (rule "hermite"), so TaylorSeer's settings read as before."""
        return {k: v for k, v in self.params().items() if k != "scale" or self.rule == "hermite"}

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        plan = Plan.full(num_steps, spec.num_blocks, len(spec.branches))
        forecast = sorted(set(range(num_steps)) - set(compute_steps(num_steps, self.interval, self.warmup)))
        plan.actions[forecast] = Action.FORECAST
        return plan


# TaylorSeer's published DiT-XL/2 (256², DDIM 50, cfg 1.5) settings; see the module docstring.
DIT_XL_2_DDIM50 = TaylorSeerPolicy(interval=4, order=4, warmup=2)
DIT_XL_2_DDIM50_NEAR_LOSSLESS = TaylorSeerPolicy(interval=3, order=3, warmup=2)
