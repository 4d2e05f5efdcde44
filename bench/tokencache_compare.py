"""TokenCache against static every-2 (and the Learning-to-Cache router) at about the same FLOPs, with ablations.

    python bench/tokencache_compare.py --policy out/tokencache-digits --l2c out/l2c-r3 --l2c-budget 0.5 \
        --num-samples 256 --json out/bench/tokencache_compare.json

Rows, all on the same noise and labels, each timed batch by batch beside the uncached model (ABBA):
- `tokencache`: the exported policy (optionally with `--token-budget` / `--full-steps` set anew: the tables are
  re-derived from the calibration saved in the policy, no retraining; `--taylor-order m`: the tokens not recomputed
  forecast, as ToCa's option; `--rescore`: when its predictor runs; `--partial-keys`: what partial
  self-attention attends to; `--single-interval`: one interval, not TPRR);
- `tokencache, uniform ratios`: every block recomputes the adaptive ratios' mean share (no adaptive selection);
- `tokencache, single interval`: one round-robin interval for the whole run (no TPRR);
- `tokencache, random tokens`: seeded uniform tokens on the same plan (no predictor, whose FLOPs it saves);
- `tokencache, oracle tokens (analysis bound)`: the same plan with the oracle's tokens (those whose true output is
  farthest from what they would get: `OracleTokenCache`); the true outputs are measured with the full branch, so the
  row reports the random-token plan's FLOPs and no speed-up;
- `tokencache, staleness X`: the other token ranking (`none`: the score alone; `age`: score × steps since computed);
- `l2c router` (with `--l2c`): the router exported by budget (fraction of branch slots, full steps included);
- `static every-2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

from l2c.evaluate import Row, SamplingSetup, SideBySide, measure_rows, quality_for
from l2c.extension import PARTIAL_KEYS
from l2c.models import load_model
from l2c.policies import LayerRouterPolicy, StaticPolicy, TokenCachePolicy
from l2c.policies.selectors import OracleTokenCache
from l2c.policies.tokencache import RESCORE, STALENESS
from l2c.policy_io import load_policy
from l2c.rebudget import load_router
from l2c.results import format_table, write_results

COLUMNS = ("method", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits")
ORACLE_ROW = "tokencache, oracle tokens (analysis bound)"


def rows_for(tokencache: TokenCachePolicy, router: LayerRouterPolicy | None) -> list[Row]:
    """The policy, its ablations, the router (already exported by budget; None: no row) and static every-2."""
    steps = len(tokencache.timesteps)
    full = tokencache.step_types(steps).nonzero().flatten().tolist()
    ratios = ", ".join(f"{r:.2f}" for r in tokencache.block_ratios().tolist())
    uniform = dataclasses.replace(tokencache, adaptive=False)
    single = dataclasses.replace(tokencache, tprr=False)
    single_full = single.step_types(steps).nonzero().flatten().tolist()
    other = next(s for s in STALENESS if s != tokencache.staleness)
    policies = [
        (f"tokencache (ratios [{ratios}], full steps {full}, staleness {tokencache.staleness})", tokencache),
        (f"tokencache, uniform ratios ({float(uniform.block_ratios()[0]):.2f} every block)", uniform),
        (f"tokencache, single interval (full steps {single_full})", single),
        ("tokencache, random tokens", dataclasses.replace(tokencache, tokens="random")),
        (ORACLE_ROW, OracleTokenCache.of(tokencache)),
        (f"tokencache, staleness {other}", dataclasses.replace(tokencache, staleness=other)),
    ]
    if router is not None:
        policies.append((f"l2c router (budget {router.budget}, refresh {router.refresh_interval})", router))
    policies.append(("static every-2", StaticPolicy(interval=2)))
    return [Row(method, method, policy) for method, policy in policies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="tokencache policy directory")
    parser.add_argument("--l2c", default=None, help="l2c router policy directory (none: no router row)")
    parser.add_argument("--l2c-budget", type=float, default=0.5)
    parser.add_argument("--token-budget", type=float, default=None, help="override the policy's token_budget")
    parser.add_argument("--full-steps", type=int, default=None, help="override the policy's full_steps")
    parser.add_argument("--taylor-order", type=int, default=None, help="override the policy's taylor_order")
    parser.add_argument("--rescore", choices=RESCORE, default=None, help="override the policy's rescore")
    parser.add_argument("--partial-keys", choices=PARTIAL_KEYS, default=None, help="override the policy's partial_keys")
    parser.add_argument("--single-interval", action="store_true", help="one interval instead of TPRR (tprr=false)")
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--flops-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows whose label starts with these")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    tokencache = load_policy(args.policy)
    if not isinstance(tokencache, TokenCachePolicy):
        parser.error(f"--policy {args.policy}: a {tokencache.kind} policy, expected a tokencache policy")
    steps = len(tokencache.timesteps)
    try:
        router = None if args.l2c is None else load_router(args.l2c, args.l2c_budget, steps, flag=f"--l2c {args.l2c}")
    except ValueError as error:
        parser.error(str(error))
    given = (
        ("token_budget", args.token_budget),
        ("full_steps", args.full_steps),
        ("taylor_order", args.taylor_order),
        ("rescore", args.rescore),
        ("partial_keys", args.partial_keys),
    )
    overrides = {k: v for k, v in given if v}
    if args.single_interval:
        overrides["tprr"] = False
    tokencache = dataclasses.replace(tokencache, **overrides)
    bundle = load_model(args.model)
    setup = SamplingSetup.trained_like(
        tokencache, model=args.model, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        flops_samples=args.flops_samples,
    )  # fmt: skip
    record = {**dataclasses.asdict(setup), **{k: getattr(args, k) for k in ("policy", "l2c", "l2c_budget", "only")}}
    record.update(overrides)
    every_row = rows_for(tokencache, router)
    random_row = next(row for row in every_row if row.method == "tokencache, random tokens")
    rows = [row for row in every_row if not args.only or row.method.startswith(tuple(args.only))]
    results: list[dict] = []

    def done(row: dict) -> None:
        if row["method"] == ORACLE_ROW:  # its true-output calls are analysis: the random row's plan and FLOPs
            flops = bench.flops_ratio(random_row.policy)
            row.update(flops_ratio=flops, speedup_wall=None, note="flops_ratio: the random-token plan's (same plan)")
        results.append(row)
        write_results(args.json, record, results)

    bench = SideBySide(bundle, setup)
    measure_rows(bench, rows, quality_for(bundle), on_row=done)
    print(format_table(results, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
