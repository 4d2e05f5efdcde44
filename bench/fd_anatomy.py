"""What moves fd_digits: each method's Fréchet distance to the held-out real digits split into its two terms, beside
the spread of its samples' features and its distance to the uncached samples of the same noise, and beside a few
plain image operations applied to the uncached samples (no caching at all).

    OMP_NUM_THREADS=1 python bench/fd_anatomy.py --seeds 0 1 2 --num-samples 256 \\
        --policy docs/bench/policies/forecast-025 --policy taylorseer:interval=5,order=2,warmup=1 \\
        --json docs/bench/fd_anatomy.json

Per row, means over the seeds: `fd_digits` (as `bench/compare.py` reports it), `fd_paired` (that minus the uncached
samples' fd_digits on the same noise; `paired_sign` '+' or '-' when every seed agrees), `fd_location` and
`fd_spread_term` (||Δμ||² and tr(Σa + Σb − 2(ΣaΣb)^½): `l2c.metrics.frechet_terms`), `feature_spread` (tr Σ of the
row's classifier features: the real digits' is printed above the table) and `fd_to_uncached` (the same Fréchet
distance, to the uncached samples instead of the real digits: 0 for a policy that changes nothing). A method whose
samples spread less than the teacher's, where the teacher's spread more than the real digits', lowers the second
term without coming closer to anything; the image-operation rows show how little it takes.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

from bench.fd_spread import SeededRuns, seeded_parser, sign_agreement
from l2c.metrics import DigitsQuality, frechet_terms, gaussian_stats, psnr_db
from l2c.results import Column, format_table, write_results

COLUMNS = (
    "method", Column("flops_ratio", ".3f"), Column("psnr_db", ".2f"), Column("fd_digits", ".2f"),
    Column("fd_paired", "+.2f"), "paired_sign", Column("fd_location", ".2f"), Column("fd_spread_term", ".2f"),
    Column("feature_spread", ".1f"), Column("fd_to_uncached", ".2f"),
)  # fmt: skip


def blur3x3(images: torch.Tensor, weight: float) -> torch.Tensor:
    """A separable 3×3 blur, kernel [w, 1 − 2w, w] along each axis (edges replicated): w = 0 changes nothing."""
    kernel = torch.tensor([weight, 1 - 2 * weight, weight], dtype=images.dtype, device=images.device)
    kernel = (kernel[:, None] * kernel[None, :])[None, None].expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


@dataclass(frozen=True)
class ImageOperation:
    """A plain operation on the uncached samples, as a row: what the feature statistics reward, with no caching."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]


OPERATIONS = (
    ImageOperation("uncached, 3×3 blur w=0.05", lambda x: blur3x3(x, 0.05)),
    ImageOperation("uncached, 3×3 blur w=0.10", lambda x: blur3x3(x, 0.10)),
    ImageOperation("uncached, contrast ×0.9", lambda x: x * 0.9),
    ImageOperation("uncached, contrast ×1.1", lambda x: (x * 1.1).clamp(-1, 1)),
)


def anatomy(
    quality: DigitsQuality, images: torch.Tensor, reference: torch.Tensor, reference_stats: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """The row's numbers for one seed: FD to the real digits and its terms, feature spread, FD to `reference`
    (`reference_stats`: `gaussian_stats` of its features, computed once per seed)."""
    mu, sigma = gaussian_stats(quality.features(images))
    location, spread = frechet_terms(quality.real_mu, quality.real_sigma, mu, sigma)
    return {
        "psnr_db": psnr_db(images, reference), "fd_digits": location + spread, "fd_location": location,
        "fd_spread_term": spread, "feature_spread": float(torch.trace(sigma)),
        "fd_to_uncached": sum(frechet_terms(*reference_stats, mu, sigma)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = seeded_parser(__doc__)
    parser.set_defaults(seeds=[0])
    runs = SeededRuns.from_args(parser, argv)
    args, quality = runs.args, runs.quality

    per_seed: dict[str, list[dict[str, float]]] = {}
    flops: dict[str, float] = {}
    for seed in args.seeds:
        bench = runs.bench(seed)
        done = {spec: bench.run(policy, label=f"{spec} (seed {seed})") for spec, policy in runs.policies.items()}
        reference = next(iter(done.values())).reference  # the uncached samples of this noise, the same for each
        rows = {"uncached": reference, **{spec: run.images for spec, run in done.items()}}
        rows.update({operation.name: operation.apply(reference) for operation in OPERATIONS})
        reference_stats = gaussian_stats(quality.features(reference))
        for name, images in rows.items():
            per_seed.setdefault(name, []).append(anatomy(quality, images, reference, reference_stats))
        flops.update({spec: run.flops / run.flops_uncached for spec, run in done.items()})

    uncached_fd = [seed["fd_digits"] for seed in per_seed["uncached"]]
    table = []
    for name, seeds in per_seed.items():
        row = {"method": name, "flops_ratio": flops.get(name, 1.0)}
        row.update({key: statistics.fmean(seed[key] for seed in seeds) for key in seeds[0]})
        paired = [seed["fd_digits"] - fd for seed, fd in zip(seeds, uncached_fd, strict=True)]
        row.update(fd_paired=statistics.fmean(paired), paired_per_seed=paired)
        row["fd_per_seed"] = [seed["fd_digits"] for seed in seeds]
        row["paired_sign"] = sign_agreement(paired) if name != "uncached" else ""
        table.append(row)
    real_spread = float(torch.trace(quality.real_sigma))
    record = {"model": args.model, "seeds": args.seeds, "num_samples": args.num_samples, "steps": args.steps}
    write_results(args.json, record, table, real_feature_spread=real_spread)
    print(f"feature_spread of the held-out real digits: {real_spread:.1f}")
    print(format_table(table, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
