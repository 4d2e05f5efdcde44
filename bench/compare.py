"""Every policy and every peer side by side on one model, at equal compute: a table, JSON rows, a Pareto plot.

    python bench/compare.py --json out/bench/compare.json \
        --l2c 0.75=out/l2c-r2-long --l2c 0.5=out/l2c-r3 --l2c 0.33=out/l2c-r4 \
        --l2c-label "L2C forecast, Taylor weights=0.5=out/l2c-forecast-taylor"   # a labelled row (ablations)
    python bench/compare.py --quick --json out/bench/compare-quick.json   # CI: well under a minute

Compute points 0.75, 0.5, 0.35, 0.25, 0.2 (`--targets`); after the table, the learned row against the best other
at each point (JSON key `margins`). The logic lives in `l2c/compare.py` (also `python infer.py compare`); see
BENCHMARKS.md for the latest table.
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
