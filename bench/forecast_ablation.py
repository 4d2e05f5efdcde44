"""What the learned forecast buys, part by part: one trained forecast policy against itself with a part taken away.

    OMP_NUM_THREADS=1 python bench/forecast_ablation.py --policy out/l2c-forecast-050 \
        --router out/l2c-rollout-050 --num-samples 256 --json docs/bench/forecast_ablation.json

From each `--policy` directory (exported by `ForecastRouterTrainer`), on the same noise and labels:
- `learned weights`: the policy as trained (its schedule, its forecast choices, its learned weights);
- `Taylor weights`: the same plan, the forecast weights reset to TaylorSeer's rule of order K − 1 over the same
  computed history (what the trainer starts from: `l2c.forecast.rule_table`), i.e. the learned weights taken away;
- `reuse only`: the same computed slots, every other slot reuses (no forecast action at all).
Each `--router` directory (a compute/reuse router trained by `RolloutRouterTrainer` at the same budget) is a row
of its own: the schedule learned without the forecast action. All rows spend the same branch work as their source
(the computed slots do not change), so their FLOPs ratios match.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

from l2c.evaluate import Row, SamplingSetup, SideBySide, measure_rows, quality_for
from l2c.forecast import PolynomialForecaster, rule_table
from l2c.models import load_model
from l2c.policies import LayerRouterPolicy
from l2c.policy_io import load_policy
from l2c.results import format_table, write_results

COLUMNS = ("method", "setting", "flops_ratio", "psnr_db", "ssim", "digit_accuracy", "fd_digits")


def with_taylor_weights(policy: LayerRouterPolicy, num_steps: int) -> LayerRouterPolicy:
    """The same plan with TaylorSeer's weights (order K − 1, K the policy's history) in place of the learned ones."""
    if policy.forecast_weights is None:
        raise ValueError("with_taylor_weights: the policy has no forecast action")
    spec, timesteps = policy.target.model, policy.target.timesteps
    history = policy.forecast_weights.shape[-1]
    plan = policy.build_plan(spec, num_steps)
    weights = rule_table(PolynomialForecaster("taylor", history - 1), plan, timesteps, spec.branches, history)
    return dataclasses.replace(policy, forecast_weights=weights)


def reuse_only(policy: LayerRouterPolicy) -> LayerRouterPolicy:
    """The same computed slots; every slot the policy forecasts reuses instead."""
    return dataclasses.replace(policy, forecast_logits=None, forecast_weights=None)


def ablation_rows(directory: str, num_steps: int) -> list[Row]:
    policy = load_policy(directory)
    if not isinstance(policy, LayerRouterPolicy) or policy.forecast_weights is None:
        raise SystemExit(f"--policy {directory}: not a forecast policy (exported by ForecastRouterTrainer)")
    variants = {
        "learned weights": policy,
        "Taylor weights": with_taylor_weights(policy, num_steps),
        "reuse only": reuse_only(policy),
    }
    return [Row(f"L2C forecast, {name}", directory, variant) for name, variant in variants.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", required=True, help="a forecast policy directory (repeatable)")
    parser.add_argument("--router", action="append", default=[], help="a compute/reuse router directory (repeatable)")
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--flops-samples", type=int, default=16)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    setup = SamplingSetup(
        model=args.model,
        steps=args.steps,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        flops_samples=args.flops_samples,
    )
    rows = [row for directory in args.policy for row in ablation_rows(directory, args.steps)]
    rows += [Row("L2C compute/reuse router", directory, load_policy(directory)) for directory in args.router]
    bundle = load_model(setup.model)
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        write_results(args.json, setup.for_model(bundle), results)  # the scheduler that ran, not `auto`

    measure_rows(SideBySide(bundle, setup, progress=not args.no_progress), rows, quality_for(bundle), on_row=done)
    print(format_table(results, COLUMNS))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
