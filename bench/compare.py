"""Every policy and every peer side by side on one model, at equal compute: a table, JSON rows, a Pareto plot.

    python bench/compare.py --json out/bench/compare.json \
        --l2c 0.75=out/l2c-r2-long --l2c 0.5=out/l2c-r3 --l2c 0.33=out/l2c-r4 \
        --l2c-label "L2C forecast, Taylor weights=0.5=out/l2c-forecast-taylor"   # a labelled row (ablations)
    python bench/compare.py --quick --json out/bench/compare-quick.json   # CI: well under a minute
    python bench/compare.py --json docs/bench/compare_tokenwise.json --targets 0.58 0.5 0.44 0.35 \
        --tokencache out/tokencache-digits --only uncached "static every-N" "TaylorSeer (native)" ToCa DuCa \
        "ToCa + TaylorSeer forecast" "DuCa + TaylorSeer forecast" TokenCache "TokenCache + TaylorSeer forecast"

Compute points 0.75, 0.5, 0.35, 0.25, 0.2 (`--targets`); after the table, the learned row against the best other
at each point (JSON key `margins`). The "+ TaylorSeer forecast" rows are ToCa, DuCa and each TokenCache directory
with `taylor_order=1` (the third command: BENCHMARKS.md's token-wise table); the "TokenCache, tuned" rows
(`--only "TokenCache, tuned"`) are each directory's tables set to every compute point on the calibration noise, as
TaylorSeer's knobs are. The logic lives in `l2c/compare.py`
(also `python infer.py compare`); see BENCHMARKS.md for the latest table.
"""

from __future__ import annotations

import argparse
import sys

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

from l2c.compare import add_arguments, config_from_args, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:  # e.g. --scheduler ddpm on a flow-matching model
        parser.error(str(error))
    return run_from_args(args, config)


if __name__ == "__main__":
    sys.exit(main())
