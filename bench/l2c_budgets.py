"""Learned routers against hand-made schedules at equal compute, on the embedded teacher.

    python bench/l2c_budgets.py --router 0.75=out/l2c-r2 --router 0.5=out/l2c-r3 --router 0.33=out/l2c-r4 \
        --num-samples 256 --json out/bench/l2c_budgets.json

For each budget (fraction of branch work computed) the learned router is exported by budget and
compared with schedules that compute the same fraction: static every-N (with leading full steps
where needed), whole steps spread evenly over the run (the rollout trainer's starting plan), and
layer routers with hand-made scores over the refresh pattern N (full steps every N, the budget's
remaining work in between; N the smallest ≥ 2 whose full steps leave at least 5% of the work):
compute the bottom blocks first ("cache the top"), the top blocks first ("cache the bottom"), and
random. Every row uses the same noise and labels; speedup is measured beside the uncached run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch

from l2c.evaluate import Row, SamplingSetup, SideBySide, measure_rows, quality_for
from l2c.models import load_model
from l2c.policies import LayerRouterPolicy, StaticPolicy
from l2c.rebudget import load_router, parse_budget_dir
from l2c.results import format_table, write_results
from predictors.l2c_trainer import even_steps

COLUMNS = ("budget", "method", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits")


def static_at(budget: float, steps: int) -> StaticPolicy:
    """Static every-N with leading full steps, computing the share of steps closest to `budget`."""
    best = None
    for interval in range(1, steps + 1):
        for first in range(steps + 1):
            policy = StaticPolicy(interval=interval, first_full=first)
            error = abs(len(policy.full_steps(steps)) / steps - budget)
            if best is None or error < best[0] - 1e-9:
                best = (error, policy)
    return best[1]


def hand_made(learned: LayerRouterPolicy, kind: str, refresh: int, seed: int = 0) -> LayerRouterPolicy:
    """A layer router over refresh pattern `refresh` and the same budget, with scores set by a rule, not training."""
    steps, blocks, branches = learned.logits.shape
    depth = torch.arange(blocks, dtype=torch.float32).view(1, blocks, 1).expand(steps, blocks, branches)
    if kind == "compute-bottom":  # reuse the top blocks
        logits = -depth
    elif kind == "compute-top":  # reuse the bottom blocks
        logits = depth.clone()
    elif kind == "even-steps":  # whole steps spread evenly: every slot of a chosen step outranks every other slot
        logits = even_steps(steps, learned.budget).float().view(-1, 1, 1).expand(steps, blocks, branches)
    else:
        logits = torch.randn((steps, blocks, branches), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(learned, refresh_interval=refresh, logits=logits.contiguous())


def rows_for(learned: LayerRouterPolicy) -> list[Row]:
    """The re-budgeted router `learned` and the hand-made schedules at its budget."""
    steps, budget = len(learned.timesteps), learned.budget
    objective = learned.provenance.get("objective", "segment")
    static = static_at(budget, steps)
    policies = [
        (f"l2c (learned, {objective}, refresh {learned.refresh_interval})", learned),
        (f"static {static.describe()}", static),
        ("even-steps", hand_made(learned, "even-steps", steps)),
    ]
    refresh = next(n for n in range(2, steps + 1) if len(range(0, steps, n)) / steps <= budget - 0.05)
    for kind in ("compute-bottom", "compute-top", "random"):
        policies.append((f"{kind} (refresh {refresh})", hand_made(learned, kind, refresh)))
    return [Row(method, method, policy, extra={"budget": budget}) for method, policy in policies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", action="append", required=True, help="BUDGET=POLICY_DIR (repeatable)")
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--flops-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    routers = []
    for item in args.router:
        budget, directory = parse_budget_dir(item)
        if budget is None:
            parser.error(f"--router {item}: expected BUDGET=POLICY_DIR")
        try:
            routers.append(load_router(directory, budget, flag=f"--router {item}"))
        except ValueError as error:
            parser.error(str(error))
    knobs = dict(model=args.model, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                 flops_samples=args.flops_samples)  # fmt: skip
    bundle = load_model(args.model)
    quality = quality_for(bundle)
    results: list[dict] = []

    def done(row: dict) -> None:
        results.append(row)
        write_results(args.json, {**knobs, "routers": args.router}, results)

    for router in routers:  # each sampled as it was trained (steps, guidance)
        setup = SamplingSetup.trained_like(router, **knobs)
        measure_rows(SideBySide(bundle, setup), rows_for(router), quality, on_row=done)
    print(format_table(results, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
