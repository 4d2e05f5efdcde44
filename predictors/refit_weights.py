"""Least-squares forecast weights for a learned plan: each FORECAST slot's weights refit in closed form.

For a fixed hard plan, the best linear forecast of a slot is w* = argmin_w Σ ‖Σ_k w_k h_k − y‖² over the
calibration samples, h_k the K kept computations the runtime's forecast reads there and y the branch's true output
at that step (L2P-style per-(step, block, branch) weights, solved instead of trained by SGD). The trainer's weights
are the starting point and the ridge's anchor:

    python -m predictors.refit_weights --policy docs/bench/policies/forecast-050 --out out/refit-050

The statistics come from the runtime's own `observe` point: at each FORECAST call the branch is also run in full
(`true_output_measured`, calibration only: its cost is not part of the policy) and HᵀH, Hᵀy, yᵀy are accumulated
in float64 over every element of the batch (both streams of a joint attention's (image, text) output). Each slot
then solves (HᵀH + λI) w = Hᵀy + λ w₀, λ = ridge · trace(HᵀH)/K: directions of the history whose energy is below
`ridge` of the mean eigenvalue stay at the current weights w₀ instead of being fit to rounding.

Passes: the histories a slot sees are made by earlier forecasts (they set the inputs of the later computations),
so weights fit on the starting policy's histories are fit to histories the refit policy no longer makes. Each pass
samples with the previous pass's weights; the second pass refits on the refit policy's own histories (what the
first pass changed), the default; further passes change the histories much less.

Calibration noise: run `CALIBRATION_RUN` of `l2c.sampling.initial_noise` (seeds 3·1 000 003 + i), apart from the
evaluation's (run 0: seeds 0 …), `bench/compare.py`'s calibration (run 1), the trainers' training (100 000 …) and
validation (200 000 …) seeds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from l2c.evaluate import SamplingSetup, SideBySide
from l2c.extension import BranchCall, ForecastRequest, streams
from l2c.forecast import WeightTable
from l2c.models import load_model
from l2c.plan import Action
from l2c.policies import LayerRouterPolicy
from l2c.policies.selectors import TRUE_OUTPUT, true_output_measured
from l2c.policy_io import load_policy

CALIBRATION_RUN = 3  # the noise run the statistics are measured on (see the module docstring)
DEFAULT_SAMPLES = 64
DEFAULT_PASSES = 2
DEFAULT_RIDGE = 1e-6
Slot = tuple[int, int, int]  # (step, block, branch index)


def flat(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A branch output as one float64 vector (a joint attention's streams one after the other)."""
    return torch.cat([stream.detach().reshape(-1).double() for stream in streams(output)])


@dataclass
class SlotStats:
    """The normal equations of one slot, summed over calibration elements: HᵀH [K, K], Hᵀy [K], yᵀy, count."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, k: int) -> SlotStats:
        return cls(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def add(self, history: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate H [elements, K] and y [elements] (float64)."""
        self.gram += history.T @ history
        self.cross += history.T @ target
        self.energy += float(target @ target)
        self.count += int(target.numel())

    def mse(self, weights: torch.Tensor) -> float:
        """Mean squared error of the forecast Σ_k w_k h_k over the accumulated elements."""
        w = weights.double()
        return float(w @ self.gram @ w - 2 * w @ self.cross + self.energy) / max(self.count, 1)

    def solve(self, current: torch.Tensor, ridge: float, total: float | None = None) -> torch.Tensor:
        """argmin_w ‖Hw − y‖² + λ‖w − current‖², λ = ridge · trace(HᵀH)/K (ridge 0: least squares, `lstsq`);
        with `total`, subject to Σ_k w_k = total (the KKT system of the constrained problem)."""
        k = len(self.cross)
        strength = ridge * float(torch.trace(self.gram)) / k
        system = self.gram + strength * torch.eye(k, dtype=torch.float64)
        rhs = self.cross + strength * current.double()
        if total is not None:
            ones = torch.ones(k, 1, dtype=torch.float64)
            system = torch.cat(
                [torch.cat([system, ones], 1), torch.cat([ones.T, torch.zeros(1, 1, dtype=torch.float64)], 1)]
            )
            rhs = torch.cat([rhs, torch.tensor([float(total)], dtype=torch.float64)])
        return torch.linalg.lstsq(system, rhs.unsqueeze(-1)).solution.squeeze(-1)[:k]


WeightSum = Literal["free", "one", "kept"]
WEIGHT_SUMS: tuple[str, ...] = get_args(WeightSum)


@dataclass(frozen=True)
class SlotSolver:
    """How a slot is solved: the ridge towards the current weights, and what Σ_k w_k must be: `free`, `one` (a
    constant history is forecast as that constant, as every rule here does) or `kept` (the current weights' sum:
    only how the history is combined is refit, not the overall gain)."""

    ridge: float = DEFAULT_RIDGE
    weight_sum: WeightSum = "free"

    def __post_init__(self) -> None:
        if not self.ridge >= 0:
            raise ValueError(f"refit: field 'ridge' must be ≥ 0, got {self.ridge}")
        if self.weight_sum not in WEIGHT_SUMS:
            raise ValueError(f"refit: field 'weight_sum' must be one of {list(WEIGHT_SUMS)}, got {self.weight_sum!r}")

    def __call__(self, stats: SlotStats, current: torch.Tensor) -> torch.Tensor:
        totals = {"free": None, "one": 1.0, "kept": float(current.sum())}
        return stats.solve(current, self.ridge, totals[self.weight_sum])


@dataclass(frozen=True, eq=False)
class HandedWeights(WeightTable):
    """A `WeightTable` whose lookups are copies, kept by slot until the call's probe has solved them in place (the
    runtime reads a FORECAST call's weights before entering its probe, and uses them after)."""

    handed: dict[Slot, torch.Tensor] = field(default_factory=dict)

    def weights(self, request: ForecastRequest) -> torch.Tensor:
        weights = super().weights(request).clone()
        self.handed[(request.step, request.block, request.branch_index)] = weights
        return weights


@dataclass
class CalibratingRouter(LayerRouterPolicy):
    """A forecast router that, at each FORECAST call, also measures the branch's true output and accumulates its
    slot's `SlotStats` from the history the forecast reads (for analysis; not a registered policy kind).

    With a `solver` (sequential refit, one batch) each slot is solved as the run reaches it, before its forecast
    is made: every later slot then sees exactly the histories the refit weights make.
    """

    kind = "l2c-refit-calibration"
    stats: dict[Slot, SlotStats] = field(default_factory=dict, kw_only=True, repr=False)
    solver: SlotSolver | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver is not None:
            self.forecaster = HandedWeights(self.forecast_weights)

    @classmethod
    def of(cls, policy: LayerRouterPolicy, solver: SlotSolver | None = None) -> CalibratingRouter:
        values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
        values["forecast_weights"] = policy.forecast_weights.detach().clone().float()  # solved in place: a copy
        return cls(**values, solver=solver)

    def observe(self, call: BranchCall):
        return self._recorded(call) if call.action == Action.FORECAST else None

    @contextmanager
    def _recorded(self, call: BranchCall) -> Iterator[None]:
        with true_output_measured(call):
            target = flat(call.state.signals[(TRUE_OUTPUT, call.block, call.branch)])
            history = torch.stack([flat(computed.output) for computed in call.store.history], dim=1)
            slot = (call.step, call.block, self.target.model.branches.index(call.branch))
            stats = self.stats.setdefault(slot, SlotStats.empty(history.shape[1]))
            stats.add(history, target)
            if self.solver is not None:
                kept = self.forecast_weights[slot][: history.shape[1]]
                kept.copy_(self.solver(stats, kept))
                self.forecaster.handed.pop(slot).copy_(kept)
            yield


def record(policy: LayerRouterPolicy, side: SideBySide) -> dict[Slot, SlotStats]:
    """Every FORECAST slot's statistics over `side`'s noises and labels, sampled with `policy`."""
    calibrating = CalibratingRouter.of(policy)
    side.images(calibrating)
    return calibrating.stats


def refit_sequential(policy: LayerRouterPolicy, side: SideBySide, solver: SlotSolver) -> LayerRouterPolicy:
    """The policy with every FORECAST slot solved in run order, each on the histories the slots before it (already
    refit) make: one run, all calibration samples in one batch (a slot's solution must see all of them)."""
    if side.setup.batch_size < side.setup.num_samples:
        raise ValueError(
            f"refit: sequential refit samples in one batch: field 'batch_size' is {side.setup.batch_size}, "
            f"below the {side.setup.num_samples} samples"
        )
    calibrating = CalibratingRouter.of(policy, solver=solver)
    side.images(calibrating)
    return dataclasses.replace(policy, forecast_weights=calibrating.forecast_weights)


def refit(policy: LayerRouterPolicy, stats: dict[Slot, SlotStats], solver: SlotSolver) -> LayerRouterPolicy:
    """The policy with each recorded slot's weights on its kept history replaced by the slot's solution."""
    table = policy.forecast_weights.detach().clone().float()
    for (step, block, branch), slot in stats.items():
        kept = len(slot.cross)
        table[step, block, branch, :kept] = solver(slot, table[step, block, branch, :kept]).float()
    return dataclasses.replace(policy, forecast_weights=table)


def slot_mse(policy: LayerRouterPolicy, stats: dict[Slot, SlotStats]) -> dict[Slot, float]:
    """Each recorded slot's calibration MSE under `policy`'s weights."""
    weights = policy.forecast_weights
    return {s: stat.mse(weights[s][: len(stat.cross)]) for s, stat in stats.items()}


def mean(values: dict[Slot, float]) -> float:
    return sum(values.values()) / max(len(values), 1)


@dataclass(frozen=True)
class RefitConfig:
    samples: int = DEFAULT_SAMPLES
    passes: int = DEFAULT_PASSES
    ridge: float = DEFAULT_RIDGE
    batch_size: int = 64
    sequential: bool = False  # one run, each slot solved as it is reached (`refit_sequential`), in place of passes
    weight_sum: WeightSum = "free"  # see `SlotSolver`

    def __post_init__(self) -> None:
        for name in ("samples", "passes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"refit: field '{name}' must be ≥ 1, got {getattr(self, name)}")
        SlotSolver(self.ridge, self.weight_sum)  # refuses a bad ridge or weight sum

    @property
    def solver(self) -> SlotSolver:
        return SlotSolver(self.ridge, self.weight_sum)


def calibration_side(policy: LayerRouterPolicy, model: str, config: RefitConfig) -> SideBySide:
    """Sampling as the policy was trained (steps, scheduler, guidance), on the calibration noise."""
    setup = SamplingSetup.trained_like(
        policy,
        model=model,
        scheduler=policy.provenance.get("scheduler", "auto"),
        num_samples=config.samples,
        batch_size=config.batch_size,
        seed=CALIBRATION_RUN,
    )
    return SideBySide(load_model(model), setup, progress=False)


def refit_policy(
    policy: LayerRouterPolicy, side: SideBySide, config: RefitConfig, source: str = ""
) -> tuple[LayerRouterPolicy, dict]:
    """`config.passes` passes of record-and-refit, then one run that measures the result; returns the refit policy
    (its provenance says what was done) and the per-pass report."""
    if not isinstance(policy, LayerRouterPolicy) or policy.forecast_weights is None:
        raise ValueError(f"refit: {source or 'the policy'} is not a forecast policy (no 'forecast.weights')")
    passes, start = [], None
    current = policy
    if config.sequential:
        start = slot_mse(policy, record(policy, side))
        current = refit_sequential(policy, side, config.solver)
    for _ in range(0 if config.sequential else config.passes):
        stats = record(current, side)
        if not stats:
            raise ValueError(f"refit: {source or 'the policy'} has no FORECAST slot in its plan")
        fitted = refit(current, stats, config.solver)
        ran = slot_mse(current, stats)
        start = ran if start is None else start
        passes.append({"mse_ran": mean(ran), "mse_fit": mean(slot_mse(fitted, stats))})
        current = fitted
    if not start:
        raise ValueError(f"refit: {source or 'the policy'} has no FORECAST slot in its plan")
    final = slot_mse(current, record(current, side))
    # Per slot, a refit beats the weights that ran on the histories it was fit on; a run with the refit weights
    # also moves the targets (upstream forecasts change a branch's input), so a slot may end slightly worse.
    worse = {s: final[s] / start[s] for s in start if final[s] > start[s]}
    report = {
        "from": source,
        "model": side.setup.model,
        "samples": config.samples,
        "noise": f"l2c.sampling.initial_noise run {CALIBRATION_RUN}",
        "order": "sequential" if config.sequential else "passes",
        "passes": 1 if config.sequential else config.passes,
        "ridge": config.ridge,
        "weight_sum": config.weight_sum,
        "slots": len(start),
        "mse_per_pass": passes,
        "mse_before": mean(start),
        "mse_after": mean(final),
        "slots_worse": len(worse),
        "worst_ratio": max(worse.values(), default=None),
    }
    provenance = copy.deepcopy(policy.provenance)
    provenance["refit_weights"] = report
    return dataclasses.replace(current, provenance=provenance), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a forecast policy directory (ForecastRouterTrainer's export)")
    parser.add_argument("--out", required=True, type=Path, help="where to save the refit policy")
    parser.add_argument("--model", help="the teacher (default: the policy's provenance 'teacher')")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"default {DEFAULT_SAMPLES}")
    parser.add_argument("--passes", type=int, default=DEFAULT_PASSES, help=f"default {DEFAULT_PASSES}")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help=f"default {DEFAULT_RIDGE:g}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-sum", choices=WEIGHT_SUMS, default="free", help="Σ_k w_k: free (default), one, kept")
    parser.add_argument(
        "--sequential", action="store_true", help="one run, each slot solved as it is reached (one batch: --samples)"
    )
    args = parser.parse_args(argv)

    policy = load_policy(args.policy)
    model = args.model or policy.provenance.get("teacher")
    if model is None:
        raise SystemExit(f"--model: {args.policy} records no teacher in its provenance; name the model")
    batch_size = max(args.batch_size, args.samples) if args.sequential else args.batch_size
    config = RefitConfig(args.samples, args.passes, args.ridge, batch_size, args.sequential, args.weight_sum)
    side = calibration_side(policy, model, config)
    refit_one, report = refit_policy(policy, side, config, source=str(args.policy))
    refit_one.save_pretrained(args.out)
    for number, result in enumerate(report["mse_per_pass"], 1):
        print(f"pass {number}: calibration mse {result['mse_ran']:.4e} as sampled, {result['mse_fit']:.4e} refit")
    print(
        f"{report['slots']} forecast slots: mse {report['mse_before']:.4e} → {report['mse_after']:.4e} (sampled "
        f"with the refit weights); {report['slots_worse']} slots worse, worst ×{report['worst_ratio'] or 1:.4f}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
