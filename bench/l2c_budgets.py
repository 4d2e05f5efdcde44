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
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2c.evaluate import SamplingSetup, SideBySide, report  # noqa: E402
from l2c.metrics import DigitsQuality  # noqa: E402
from l2c.models import load_model  # noqa: E402
from l2c.policies import CachePolicy, LayerRouterPolicy, StaticPolicy  # noqa: E402
from l2c.policy_io import load_policy  # noqa: E402
from predictors.l2c_trainer import even_steps  # noqa: E402

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


def rows_for(budget: float, router: LayerRouterPolicy, steps: int) -> list[tuple[str, CachePolicy]]:
    learned = dataclasses.replace(router, threshold=None, budget=budget)
    objective = router.provenance.get("objective", "segment")
    label = f"l2c (learned, {objective}, refresh {router.refresh_interval})"
    rows = [(label, learned), (f"static {static_at(budget, steps).describe()}", static_at(budget, steps))]
    rows.append(("even-steps", hand_made(learned, "even-steps", steps)))
    refresh = next(n for n in range(2, steps + 1) if len(range(0, steps, n)) / steps <= budget - 0.05)
    for kind in ("compute-bottom", "compute-top", "random"):
        rows.append((f"{kind} (refresh {refresh})", hand_made(learned, kind, refresh)))
    return rows


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

    bundle = load_model(args.model)
    quality = DigitsQuality() if bundle.is_digits else None
    results = []
    for item in args.router:
        budget_text, _, directory = item.partition("=")
        router = load_policy(directory)
        if not isinstance(router, LayerRouterPolicy):
            parser.error(f"--router {item}: {directory} is a {router.kind} policy, expected an l2c router")
        steps = len(router.timesteps)
        setup = SamplingSetup.trained_like(
            router, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
            flops_samples=args.flops_samples,
        )  # fmt: skip
        bench = SideBySide(bundle, setup)
        for method, policy in rows_for(float(budget_text), router, steps):
            result = report(bench.run(policy, label=method), setup, args.model, quality)
            result.update(budget=float(budget_text), method=method)
            results.append(result)
            print(" | ".join(f"{result.get(c, float('nan')):.3f}" if c != "method" else result[c] for c in COLUMNS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in results:
        cells = [row["method"] if c == "method" else f"{row.get(c, float('nan')):.3f}" for c in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
