"""TokenCache against the Learning-to-Cache router and static every-2 at about the same FLOPs, with two ablations.

    python bench/tokencache_compare.py --policy out/tokencache-digits --l2c out/l2c-r3 --l2c-budget 0.5 \
        --num-samples 256 --json out/bench/tokencache_compare.json

Rows, all on the same noise and labels, each timed batch by batch beside the uncached model (ABBA):
- `tokencache`: the exported policy (optionally with `--token-budget` / `--full-steps` set anew: the tables are
  re-derived from the calibration saved in the policy, no retraining);
- `tokencache, uniform ratios`: every block recomputes the adaptive ratios' mean share (no adaptive selection);
- `tokencache, single interval`: one round-robin interval for the whole run (no TPRR);
- `l2c router`: the router exported by budget (fraction of branch slots, full steps included);
- `static every-2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2c.evaluate import SamplingSetup, SideBySide, report  # noqa: E402
from l2c.metrics import DigitsQuality  # noqa: E402
from l2c.models import load_model  # noqa: E402
from l2c.policies import CachePolicy, LayerRouterPolicy, StaticPolicy, TokenCachePolicy  # noqa: E402
from l2c.policy_io import load_policy  # noqa: E402

COLUMNS = ("method", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits")


def rows_for(tokencache: TokenCachePolicy, router: LayerRouterPolicy, budget: float) -> list[tuple[str, CachePolicy]]:
    steps = len(tokencache.timesteps)
    full = tokencache.step_types(steps).nonzero().flatten().tolist()
    ratios = ", ".join(f"{r:.2f}" for r in tokencache.block_ratios().tolist())
    uniform = dataclasses.replace(tokencache, adaptive=False)
    single = dataclasses.replace(tokencache, tprr=False)
    single_full = single.step_types(steps).nonzero().flatten().tolist()
    return [
        (f"tokencache (ratios [{ratios}], full steps {full})", tokencache),
        (f"tokencache, uniform ratios ({float(uniform.block_ratios()[0]):.2f} every block)", uniform),
        (f"tokencache, single interval (full steps {single_full})", single),
        (f"l2c router (budget {budget}, refresh {router.refresh_interval})", _by_budget(router, budget)),
        ("static every-2", StaticPolicy(interval=2)),
    ]


def _by_budget(router: LayerRouterPolicy, budget: float) -> LayerRouterPolicy:
    return dataclasses.replace(router, threshold=None, budget=budget)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="tokencache policy directory")
    parser.add_argument("--l2c", required=True, help="l2c router policy directory")
    parser.add_argument("--l2c-budget", type=float, default=0.5)
    parser.add_argument("--token-budget", type=float, default=None, help="override the policy's token_budget")
    parser.add_argument("--full-steps", type=int, default=None, help="override the policy's full_steps")
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--flops-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows whose label starts with these")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    tokencache, router = load_policy(args.policy), load_policy(args.l2c)
    if not isinstance(tokencache, TokenCachePolicy):
        parser.error(f"--policy {args.policy}: a {tokencache.kind} policy, expected a tokencache policy")
    if not isinstance(router, LayerRouterPolicy):
        parser.error(f"--l2c {args.l2c}: a {router.kind} policy, expected an l2c router")
    overrides = {k: v for k, v in (("token_budget", args.token_budget), ("full_steps", args.full_steps)) if v}
    tokencache = dataclasses.replace(tokencache, **overrides)
    bundle = load_model(args.model)
    quality = DigitsQuality() if bundle.is_digits else None
    setup = SamplingSetup.trained_like(
        tokencache, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        flops_samples=args.flops_samples,
    )  # fmt: skip
    bench = SideBySide(bundle, setup)
    results = []
    for method, policy in rows_for(tokencache, router, args.l2c_budget):
        if args.only and not any(method.startswith(prefix) for prefix in args.only):
            continue
        result = report(bench.run(policy, label=method), setup, args.model, quality)
        result["method"] = method
        results.append(result)
        print(" | ".join(_cell(result, c) for c in COLUMNS), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": results}, indent=2) + "\n")
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in results:
        print("| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |")
    return 0


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    return value if isinstance(value, str) else f"{value:.3f}" if value is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
