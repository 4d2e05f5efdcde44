"""How much of an fd_digits difference is the noise of 256 samples: each method over several noise seeds, beside the
uncached model on the same noise.

    OMP_NUM_THREADS=1 python bench/fd_spread.py --seeds 0 1 2 3 --num-samples 256 \\
        --policy docs/bench/policies/forecast-025 --policy taylorseer:interval=5,order=2,warmup=1 \\
        --json docs/bench/fd_spread.json

fd_digits (l2c.metrics.DigitsQuality: Fréchet distance of the shipped classifier's features against the held-out
real digits) is measured per seed for each policy's samples and for the uncached samples of the same noise. The
table gives, per method, the mean and standard deviation over seeds, `paired` (policy − uncached, per seed: the
noise shared by both sides cancels) and `pooled` (one FD over every seed's samples together, the least noisy number).
A paired difference whose sign holds on every seed is the method's own effect; one within its spread is noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

from l2c.evaluate import CacheMethod, SamplingSetup, SideBySide, quality_for
from l2c.metrics import DigitsQuality
from l2c.models import ModelBundle, load_model
from l2c.policy_io import load_policy
from l2c.results import format_table, write_results

COLUMNS = ("method", "flops_ratio", "fd_mean", "fd_std", "paired_mean", "paired_std", "paired_sign", "fd_pooled")


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sign_agreement(values: list[float]) -> str:
    """'+' or '-' when every value has that sign, else 'mixed'."""
    return "+" if all(v > 0 for v in values) else "-" if all(v < 0 for v in values) else "mixed"


def seeded_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a per-seed digits benchmark (this one and `bench/fd_anatomy.py`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--policy", action="append", required=True, help="a preset or a policy directory (repeat)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, required=True)
    return parser


@dataclass
class SeededRuns:
    """The teacher, its digits metrics and the policies of a per-seed benchmark; `bench(seed)` samples one noise."""

    args: argparse.Namespace
    bundle: ModelBundle
    quality: DigitsQuality
    policies: dict[str, CacheMethod]

    @classmethod
    def from_args(cls, parser: argparse.ArgumentParser, argv: list[str] | None) -> SeededRuns:
        args = parser.parse_args(argv)
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds: each seed once, got {args.seeds}")
        bundle = load_model(args.model)
        quality = quality_for(bundle)
        if quality is None:
            parser.error(
                f"--model {args.model}: fd_digits needs a digits teacher (embedded:digits, embedded:digits-flux)"
            )
        return cls(args, bundle, quality, {spec: load_policy(spec) for spec in args.policy})

    def bench(self, seed: int) -> SideBySide:
        args = self.args
        setup = SamplingSetup(
            model=args.model, num_samples=args.num_samples, seed=seed, batch_size=args.batch_size, steps=args.steps,
            flops_samples=min(16, args.num_samples),
        ).for_model(self.bundle)  # fmt: skip
        return SideBySide(self.bundle, setup)


def main(argv: list[str] | None = None) -> int:
    runs = SeededRuns.from_args(seeded_parser(__doc__), argv)
    args, quality, policies = runs.args, runs.quality, runs.policies
    per_seed: dict[str, list[float]] = {"uncached": [], **{spec: [] for spec in policies}}
    paired: dict[str, list[float]] = {spec: [] for spec in policies}
    images: dict[str, list[torch.Tensor]] = {name: [] for name in per_seed}
    flops: dict[str, float] = {}
    for seed in args.seeds:
        bench = runs.bench(seed)
        for index, (spec, policy) in enumerate(policies.items()):
            run = bench.run(policy, label=f"{spec} (seed {seed})")
            if index == 0:  # the uncached samples of this noise: the same for every policy of the seed
                per_seed["uncached"].append(quality.fd_digits(run.reference))
                images["uncached"].append(run.reference)
            fd = quality.fd_digits(run.images)
            per_seed[spec].append(fd)
            paired[spec].append(fd - per_seed["uncached"][-1])
            images[spec].append(run.images)
            flops[spec] = run.flops / run.flops_uncached

    rows = []
    for name, values in per_seed.items():
        mean, std = spread(values)
        row = {"method": name, "flops_ratio": flops.get(name, 1.0), "fd_per_seed": values, "fd_mean": mean,
               "fd_std": std, "fd_pooled": quality.fd_digits(torch.cat(images[name]))}  # fmt: skip
        if name in paired:
            row["paired_per_seed"] = paired[name]
            row["paired_mean"], row["paired_std"] = spread(paired[name])
            row["paired_sign"] = sign_agreement(paired[name])
        rows.append(row)
    record = {"model": args.model, "seeds": args.seeds, "num_samples": args.num_samples, "steps": args.steps}
    write_results(args.json, record, rows)
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
