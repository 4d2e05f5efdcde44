"""Forecasting a branch output from its history: `Σ_k w_k · h_k` over its last computed outputs, newest first.

One mechanism for every forecaster; only the weights w differ. Reuse is w = (1, 0, …). The rules read the step
indices at which the kept outputs were computed (`ForecastRequest.steps`), so unequal gaps are handled:

- `taylor`: TaylorSeer (Liu et al. 2025) as its code and diffusers' `TaylorSeerState` (0.42.1) compute it. Each
  computation updates order-j factors by backward differences, F_j(n) = (F_{j-1}(n) − F_{j-1}(n−1)) / (s_n − s_{n−1}),
  always divided by the newest gap, and the forecast is Σ_j F_j · (t − s_n)^j / j!. Exact for a linear history;
  at order ≥ 2 it is not the polynomial through the points (F_1 is the slope between the last two, not at s_n).
- `lagrange`: the polynomial of degree m through the last m+1 computed outputs, evaluated at the current step
  (exact continuation of any polynomial of degree ≤ m, whatever the gaps).
- `hermite`: HiCache (Feng et al. 2025, "HiCache: Training-free Acceleration of Diffusion Models via Hermite
  Polynomial-based Feature Caching"): TaylorSeer's factors F_j, each multiplied by σ^j · H_j(σ·(t − s_n)) / j! in
  place of (t − s_n)^j / j!, with H_j the physicists' Hermite polynomials and σ the "dual scaling" (the authors'
  code's default 0.5; its FLUX scripts use 0.6–0.7). σ = 1/√2 gives TaylorSeer's first-order term exactly; at
  σ < 1/√2 every term is damped, and H_2's constant adds −σ²·F_2 even at the computed step's own offset.

`WeightTable` is the learned case: weights looked up per (step, block, branch), saved as a tensor beside the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .extension import Computed, Forecaster, ForecastRequest, first_stream, map_streams
from .plan import Action, Plan

StepRule = Literal["taylor", "lagrange", "hermite"]
# (step, history steps newest first, order, σ) -> w [float64]; σ is read by `hermite` only.
WeightRule = Callable[[int, Sequence[int], int, float], torch.Tensor]
HICACHE_SCALE = 0.5  # HiCache's σ: the default of the authors' code


def factor_weights(step: int, steps: Sequence[int], order: int, term: Callable[[int, int], float]) -> torch.Tensor:
    """Σ_j term(j, t − s_n) · F_j over TaylorSeer's factors F_j (order ≤ `order`) of the computations at `steps`
    (newest first), as weights on those computations."""
    count = min(order + 1, len(steps))
    # level[i]: the current order's factor of the computation at steps[i], as coefficients on the kept outputs.
    level = list(torch.eye(count, dtype=torch.float64))
    offset = step - steps[0]
    weights = level[0] * term(0, offset)
    for j in range(1, count):
        level = [(level[i] - level[i + 1]) / (steps[i] - steps[i + 1]) for i in range(count - j)]
        weights += level[0] * term(j, offset)
    return weights


def taylor_weights(step: int, steps: Sequence[int], order: int) -> torch.Tensor:
    """TaylorSeer's order-`order` expansion from the computations at `steps` (newest first), as weights on them."""
    return factor_weights(step, steps, order, lambda j, offset: offset**j / math.factorial(j))


def physicists_hermite(j: int, x: float) -> float:
    """H_j(x): H_0 = 1, H_1 = 2x, H_{k+1} = 2x·H_k − 2k·H_{k−1}."""
    previous, current = 1.0, 2.0 * x
    if j == 0:
        return previous
    for k in range(1, j):
        previous, current = current, 2.0 * x * current - 2.0 * k * previous
    return current


def hermite_weights(step: int, steps: Sequence[int], order: int, scale: float = HICACHE_SCALE) -> torch.Tensor:
    """HiCache's order-`order` scaled-Hermite expansion of TaylorSeer's factors, as weights on the computations."""
    return factor_weights(
        step, steps, order, lambda j, offset: scale**j * physicists_hermite(j, scale * offset) / math.factorial(j)
    )


def lagrange_weights(step: int, steps: Sequence[int], order: int) -> torch.Tensor:
    """The degree-`order` polynomial through the newest `order`+1 computations, at `step`, as weights on them."""
    points = steps[: order + 1]
    weights = torch.ones(len(points), dtype=torch.float64)
    for i, s_i in enumerate(points):
        for j, s_j in enumerate(points):
            if i != j:
                weights[i] *= (step - s_j) / (s_i - s_j)
    return weights


RULES: dict[str, WeightRule] = {
    "taylor": lambda step, steps, order, scale: taylor_weights(step, steps, order),
    "lagrange": lambda step, steps, order, scale: lagrange_weights(step, steps, order),
    "hermite": hermite_weights,
}


@dataclass(frozen=True)
class PolynomialForecaster:
    """A rule of the step gaps (`RULES`) of order `order`; keeps `order`+1 computations per forecasting branch."""

    rule: StepRule = "taylor"
    order: int = 1
    fill_partial: bool = False
    scale: float = HICACHE_SCALE  # σ of the `hermite` rule

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"forecaster: field 'rule' must be one of {sorted(RULES)}, got {self.rule!r}")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 0:
            raise ValueError(f"forecaster: field 'order' must be an integer ≥ 0, got {self.order!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale < math.inf:
            raise ValueError(f"forecaster: field 'scale' must be a number > 0, got {self.scale!r}")

    @property
    def history(self) -> int:
        return self.order + 1

    def weights(self, request: ForecastRequest) -> torch.Tensor:
        return RULES[self.rule](request.step, request.steps, self.order, self.scale)


@dataclass(frozen=True, eq=False)
class WeightTable:
    """Learned weights: `table[step, block, branch, k]` multiplies the k-th newest kept computation.

    K = `table.shape[-1]`. Where fewer than K computations exist yet, the first ones are used (as in training,
    which runs the same runtime). The table may require grad: the forecast is differentiable in it.
    """

    table: torch.Tensor  # [steps, blocks, branches, K]
    fill_partial: bool = False

    @property
    def history(self) -> int:
        return int(self.table.shape[-1])

    def weights(self, request: ForecastRequest) -> torch.Tensor:
        return self.table[request.step, request.block, request.branch_index, : len(request.steps)]

    def validate(self, plan: Plan, source: str = "forecast weights") -> None:
        """Raise ValueError unless the table is a finite float [steps, blocks, branches, K ≥ 1] fitting `plan`."""
        shape, expected = tuple(self.table.shape), tuple(plan.actions.shape)
        if len(shape) != 4 or shape[:3] != expected or shape[3] < 1:
            raise ValueError(f"{source}: shape {shape}, expected (steps, blocks, branches, K ≥ 1) = {expected} + (K,)")
        if not self.table.is_floating_point() or not bool(torch.isfinite(self.table).all()):
            raise ValueError(f"{source}: must hold finite floats, got {self.table.dtype}")


DEFAULT_HISTORY = 3  # K, when a policy does not say
# What a plan's FORECAST slots use when the policy declares no forecaster: TaylorSeer's rule of order K − 1.
DEFAULT_FORECASTER = PolynomialForecaster("taylor", order=DEFAULT_HISTORY - 1)


def or_default(forecaster: Forecaster | None) -> Forecaster:
    """The policy's forecaster, or `DEFAULT_FORECASTER`: any plan the validator accepts can forecast."""
    return DEFAULT_FORECASTER if forecaster is None else forecaster


def weighted_sum(outputs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · outputs[k], newest first, in the outputs' dtype and device (fewer weights: the newest outputs)."""
    if not 1 <= len(weights) <= len(outputs):
        raise ValueError(f"forecast: {len(weights)} weights for a history of {len(outputs)} computations")
    weights = weights.to(outputs[0])
    output = weights[0] * outputs[0]
    for weight, value in zip(weights[1:], outputs[1 : len(weights)], strict=True):
        output = output + weight * value
    return output


def forecast(history: Sequence[Computed], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · history[k].output (`weighted_sum` of the computations' outputs)."""
    return weighted_sum([computed.output for computed in history], weights)


def kept_history(plan: Plan | None, forecaster: Forecaster, block: int, branch_index: int) -> int:
    """How many computations a branch keeps: the forecaster's K where the plan forecasts it (or fills its partial
    steps from a forecast), else none (the branch keeps only its last output, as a reusing branch does)."""
    if plan is None:
        return 0
    column = plan.actions[:, block, branch_index]
    uses = bool((column == Action.FORECAST).any())
    if forecaster.fill_partial:
        uses = uses or bool((column == Action.PARTIAL).any())
    return forecaster.history if uses else 0


def rule_table(
    forecaster: Forecaster,
    plan: Plan,
    timesteps: Sequence[float],
    branch_names: Sequence[str],
    history: int | None = None,
) -> torch.Tensor:
    """The weights `forecaster` gives at every slot of `plan` (for the history its COMPUTE slots leave), as a
    [steps, blocks, branches, K] table (zeros where nothing is computed yet): how a learned `WeightTable` starts
    from a rule (e.g. Taylor). `branch_names` are the model's (`ModelSpec.branches`); K defaults to the rule's."""
    keep = forecaster.history if history is None else history
    steps, blocks, branches = plan.actions.shape
    table = torch.zeros(steps, blocks, branches, keep)
    for block in range(blocks):
        for index in range(branches):
            computed: list[int] = []
            for step in range(steps):
                if computed:
                    kept = tuple(float(timesteps[s]) for s in computed)
                    request = ForecastRequest(
                        step, float(timesteps[step]), block, branch_names[index], index, tuple(computed), kept
                    )
                    weights = forecaster.weights(request).detach()
                    table[step, block, index, : len(weights)] = weights
                if plan.actions[step, block, index] == Action.COMPUTE:
                    computed = [step, *computed[: keep - 1]]
    return table


# -- training: a soft history, differentiable in the compute gate ------------------------------------------------------
@dataclass(frozen=True)
class SoftComputed(Computed):
    """Training: one computed output in a soft history, with `share[k]`, its weight in the k-th newest position.

    A slot that computes with gate g pushes: its output enters position 0 with share g, every older entry moves one
    position back with weight g and stays with weight 1 − g. At g ∈ {0, 1} this is exactly the inference history
    (the shares are one-hot, or zero once an entry has dropped out of the last K). Each output is kept once, however
    many positions share it, so a rollout holds one tensor per slot and step.
    """

    share: torch.Tensor = None  # [K]


def soft_history(history: Sequence[Computed], output: torch.Tensor, keep: int) -> list[SoftComputed]:
    """`history` as a soft one (hard entries get one-hot shares); an empty one starts from the cached `output`."""
    if history and isinstance(history[0], SoftComputed):
        return list(history)
    entries = list(history[:keep]) or [Computed(-1, math.nan, output)]
    image = first_stream(output)  # a joint attention's output is a tuple (image, text): the shares are shared
    eye = torch.eye(keep, dtype=image.dtype, device=image.device)
    return [SoftComputed(c.step, c.timestep, c.output, share=eye[k]) for k, c in enumerate(entries)]


def soft_value(history: Sequence[SoftComputed], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · h_k of a soft history (h_k = Σ_j share_j[k] · output_j), newest output first."""
    output = None
    for computed in history:  # one fused pass per kept output (the history grows with the steps between full ones)
        weight = (computed.share * weights).sum()
        if output is None:
            output = map_streams(lambda stream, w=weight: w * stream, computed.output)
        else:
            output = map_streams(lambda sum_, stream, w=weight: torch.addcmul(sum_, w, stream), output, computed.output)
    return output


def soft_push(history: Sequence[SoftComputed], computed: Computed, gate: torch.Tensor) -> list[SoftComputed]:
    """The history after a slot computed `computed.output` with gate g (see `SoftComputed`)."""
    first = history[0].share
    entry = torch.zeros_like(first)
    entry[0] = 1
    pushed = [SoftComputed(computed.step, computed.timestep, computed.output, share=gate * entry)]
    for old in history:
        shifted = torch.cat([old.share.new_zeros(1), old.share[:-1]])
        pushed.append(SoftComputed(old.step, old.timestep, old.output, share=gate * shifted + (1 - gate) * old.share))
    return pushed
