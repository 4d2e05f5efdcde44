"""DaTo's searched schedule: per-step prune ratios (and which steps compute) chosen against the uncached output.

The DaTo paper searches its per-step pruning ratios (NSGA-II over the schedule) instead of one fixed ratio. Here a
small elitist evolution does it for one operating point: every candidate is a `dato` `schedule` (per step a prune
ratio from `ratios`, or reuse) whose FLOPs stay within the budget, the FLOPs of static every-`interval`; fitness is
the PSNR of its samples against the uncached ones on calibration noise (`seed`, apart from evaluation noise).
Static every-`interval` itself (ratio 0 on its full steps) is the first candidate and the best one is kept from
generation to generation, so the result is never worse than that schedule on the calibration set.

FLOPs are exact, not estimated: a step's FLOPs depend only on its own entry (a full step, a reused step, or a full
step whose pruned branches keep ⌈(1 − ratio)·N⌉ tokens, counted with the similarity products), so they are measured
once per entry kind on `flops_samples` samples (`StepCosts`) and a candidate's FLOPs are their sum.

    python -m l2c.policies.search --model embedded:digits --interval 2 --out out/dato-searched
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..evaluate import SamplingSetup, SideBySide
from ..metrics import count_flops, psnr_db
from ..models import ModelBundle, load_model
from ..options import AUTO_SCHEDULER, SCHEDULER_CHOICES, SCHEDULER_HELP
from ..sampling import sample
from .dato import DaToPolicy, format_schedule
from .static import StaticPolicy

Schedule = tuple[float | None, ...]  # per step: a prune ratio (the step computes) or None (it reuses)


@dataclass
class SearchConfig:
    """One search: the budget's schedule, the ratios tried, the evolution's size and the calibration run."""

    interval: int = 2  # the budget: FLOPs of static every-`interval` (also the first candidate)
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    generations: int = 6
    offspring: int = 6  # candidates per generation
    mutations: int = 2  # entries changed per offspring (at most)
    seed: int = 0  # of the evolution's random choices
    calibration_seed: int = 1  # noise seed of the calibration samples (evaluation noise is seed 0)
    calibration_samples: int = 16
    flops_samples: int = 2
    template: DaToPolicy = field(default_factory=DaToPolicy)  # the candidates' cell and branches

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 <= r < 1 for r in self.ratios) or 0.0 not in self.ratios:
            raise ValueError(f"dato search: field 'ratios' must hold 0 and prune ratios in [0, 1), got {self.ratios}")
        for name in ("interval", "generations", "offspring", "mutations", "calibration_samples", "flops_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"dato search: field '{name}' must be ≥ 1, got {getattr(self, name)}")


@dataclass
class Candidate:
    schedule: Schedule
    flops: int
    psnr_db: float

    @property
    def text(self) -> str:
        return format_schedule(self.schedule)


@dataclass
class SearchResult:
    """The best schedule, the one it must beat, and what finding it cost."""

    best: Candidate
    baseline: Candidate  # static every-interval
    budget_flops: int
    flops_uncached: int
    sampling_runs: int  # calibration sampling runs (candidates evaluated, the uncached reference included)
    flops_runs: int  # FLOP-counting runs of `StepCosts` (on `flops_samples` samples each)
    wall_s: float
    history: list[Candidate]

    def policy(self, config: SearchConfig) -> DaToPolicy:
        return config.template.with_schedule(self.best.schedule)

    def summary(self) -> dict:
        def row(c: Candidate) -> dict:
            return {"schedule": c.text, "flops_ratio": c.flops / self.flops_uncached, "psnr_db": c.psnr_db}

        return {
            "best": row(self.best),
            "baseline": row(self.baseline),
            "budget_flops_ratio": self.budget_flops / self.flops_uncached,
            "sampling_runs": self.sampling_runs,
            "flops_runs": self.flops_runs,
            "wall_s": self.wall_s,
            "history": [row(c) for c in self.history],
        }


class Calibration:
    """The calibration samples: their noise, labels and uncached images; samples and scores a candidate."""

    def __init__(self, bundle: ModelBundle, setup: SamplingSetup) -> None:
        self.bundle, self.setup = bundle, setup
        self.bench = SideBySide(bundle, setup, progress=False)
        self.reference = self._images(None)
        self.runs = 1

    def _images(self, policy: DaToPolicy | None, num: int | None = None) -> torch.Tensor:
        bench, num = self.bench, num or self.setup.num_samples
        scheduler = self.setup.new_scheduler(self.bundle.scheduler_config)
        noise, labels = bench.noise[:num], bench.labels[:num]
        if policy is None:
            return sample(bench.denoiser, scheduler, noise, labels, self.setup.steps).clamp(-1, 1)
        with policy.apply(self.bundle.transformer, timesteps=bench.timesteps):
            return sample(bench.denoiser, scheduler, noise, labels, self.setup.steps).clamp(-1, 1)

    def psnr(self, policy: DaToPolicy) -> float:
        self.runs += 1
        return psnr_db(self._images(policy), self.reference)

    def flops(self, policy: DaToPolicy | None, num: int) -> int:
        return count_flops(lambda: self._images(policy, num))[1]


@dataclass
class StepCosts:
    """FLOPs of one step per entry kind, on `samples` samples: full, reused, and full pruned by each ratio."""

    full: int
    reused: int
    pruned: dict[float, int]  # ratio → FLOPs of a full step pruned by it (steps ≥ 2: DaTo needs two outputs)
    uncached: int
    runs: int

    @classmethod
    def measure(cls, calibration: Calibration, config: SearchConfig, steps: int) -> StepCosts:
        n = config.flops_samples
        uncached = calibration.flops(None, n)
        reused_all = calibration.flops(StaticPolicy(interval=steps), n)  # step 0 full, every other step reused
        full, reused = uncached // steps, (reused_all - uncached // steps) // (steps - 1)
        pruned = {}
        for ratio in config.ratios:
            if ratio == 0:
                pruned[ratio] = full
                continue
            every_step = calibration.flops(replace(config.template, interval=1, prune=ratio), n)
            pruned[ratio] = full - (uncached - every_step) // (steps - 2)
        return cls(full, reused, pruned, uncached, runs=1 + (len(config.ratios)))

    def of(self, schedule: Schedule) -> int:
        return sum(self.reused if r is None else self.full if s < 2 else self.pruned[r] for s, r in enumerate(schedule))


def static_schedule(interval: int, steps: int) -> Schedule:
    return tuple(0.0 if s % interval == 0 else None for s in range(steps))


def mutate(schedule: Schedule, config: SearchConfig, rng: random.Random) -> Schedule:
    """Change up to `mutations` entries of steps ≥ 1 to another choice (a ratio or reuse)."""
    entries = list(schedule)
    choices: list[float | None] = [None, *config.ratios]
    for _ in range(rng.randint(1, config.mutations)):
        step = rng.randrange(1, len(entries))
        entries[step] = rng.choice([c for c in choices if c != entries[step]])
    return tuple(entries)


def search_schedule(bundle: ModelBundle, setup: SamplingSetup, config: SearchConfig) -> SearchResult:
    """The best `dato` schedule within static every-`interval`'s FLOPs on the calibration samples (see module)."""
    start = time.perf_counter()
    steps = setup.steps
    if steps < 3:
        raise ValueError(f"dato search: needs ≥ 3 steps (DaTo prunes from step 2 on), got {steps}")
    calibration = Calibration(bundle, replace(setup, seed=config.calibration_seed, flops_samples=0))
    costs = StepCosts.measure(calibration, config, steps)
    baseline_schedule = static_schedule(config.interval, steps)
    budget = costs.of(baseline_schedule)
    rng = random.Random(config.seed)
    seen: dict[Schedule, Candidate] = {}

    def evaluate(schedule: Schedule) -> Candidate:
        if schedule not in seen:
            policy = config.template.with_schedule(schedule)
            seen[schedule] = Candidate(schedule, costs.of(schedule), calibration.psnr(policy))
        return seen[schedule]

    baseline = best = evaluate(baseline_schedule)
    history = [baseline]
    for _ in range(config.generations):
        for _ in range(config.offspring):
            child = mutate(best.schedule, config, rng)
            tries = 0
            while (costs.of(child) > budget or child in seen) and tries < 50:
                child, tries = mutate(best.schedule, config, rng), tries + 1
            if costs.of(child) > budget or child in seen:
                continue
            candidate = evaluate(child)
            history.append(candidate)
            if candidate.psnr_db > best.psnr_db:
                best = candidate
    return SearchResult(
        best=best,
        baseline=baseline,
        budget_flops=budget,
        flops_uncached=costs.uncached,
        sampling_runs=calibration.runs,
        flops_runs=costs.runs,
        wall_s=time.perf_counter() - start,
        history=history,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=AUTO_SCHEDULER, help=SCHEDULER_HELP)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--ratios", default="0,0.2,0.4,0.6", help="comma-separated prune ratios (0 included)")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--offspring", type=int, default=6)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--calibration-seed", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="policy directory to write (config.json, ...)")
    args = parser.parse_args(argv)

    config = SearchConfig(
        interval=args.interval, ratios=tuple(float(r) for r in args.ratios.split(",")), generations=args.generations,
        offspring=args.offspring, seed=args.seed, calibration_seed=args.calibration_seed,
        calibration_samples=args.calibration_samples,
    )  # fmt: skip
    setup = SamplingSetup(
        model=args.model, steps=args.steps, scheduler=args.scheduler, num_samples=config.calibration_samples,
        batch_size=config.calibration_samples,
    )  # fmt: skip
    bundle = load_model(args.model)
    with torch.no_grad():
        result = search_schedule(bundle, setup, config)
    scheduler = setup.new_scheduler(bundle.scheduler_config)
    policy = result.policy(config).bind(bundle.transformer, scheduler.timesteps, type(scheduler).__name__)
    record = {**asdict(config), "template": config.template.describe()}
    policy.provenance = {"search": {**result.summary(), "config": record}}
    policy.save_pretrained(args.out)
    summary = result.summary()
    summary.pop("history")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} ({policy.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
