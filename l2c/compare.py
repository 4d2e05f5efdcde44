"""Every policy and every peer side by side: one model, one set of noises and conditions, rows at equal compute.

Rows: the uncached model (`full`: hooks on, nothing reused), fewer sampling steps of the same scheduler, static
every-N, ToCa, DuCa, DaTo, trained L2C and TokenCache policy directories, and the peers users would pick instead
(`l2c.peers`: diffusers' FBCache and TaylorSeer, cache-dit's DBCache). Methods with a knob are set to the compute
points in `targets` (FLOPs ratio): peers with a threshold are tuned by bisection on a separate calibration noise
set, step-count knobs are chosen by rule. A method that cannot run here is left out and said so in a note, never
faked. `bench/compare.py` and `infer.py compare` are thin command lines over `run_comparison`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .evaluate import Row, SamplingSetup, SideBySide, measure_rows, quality_for
from .models import ModelBundle, load_model
from .options import SCHEDULERS, class_spec
from .peers import DBCache, FBCache, Peer, TaylorSeer, taylorseer_compute_steps
from .policies import FullPolicy
from .policy_io import load_policy, parse_preset
from .rebudget import load_router, parse_budget_dir
from .results import format_table, write_results

COLUMNS = ("method", "setting", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits")


@dataclass
class CompareConfig(SamplingSetup):
    """The sampling (here 256 samples in batches of 128, FLOPs counted over the first 32) and which methods run at
    which compute points."""

    num_samples: int = 256
    batch_size: int = 128
    flops_samples: int = 32
    targets: tuple[float, ...] = (0.75, 0.5, 0.33)  # compute points (FLOPs ratio) for methods with a knob
    l2c: list[str] = field(default_factory=list)  # "DIR" (as exported) or "BUDGET=DIR" (re-budgeted)
    tokencache: list[str] = field(default_factory=list)  # trained TokenCache policy directories
    calibration_samples: int = 8  # noises (another seed) on which peer thresholds are tuned
    tune_iters: int = 6  # bisection steps per tuned threshold; 0: thresholds fixed at `fixed_threshold`
    fixed_threshold: float = 0.3
    quick: bool = False  # CI: one compute point, one setting per method
    only: tuple[str, ...] = ()  # run only these methods (and the uncached row); empty: all

    def wants(self, method: str) -> bool:
        return not self.only or method.lower() in {m.lower() for m in self.only}

    @property
    def compute_points(self) -> tuple[float, ...]:
        """The targets the knobs are set to: `targets`, or 0.5 alone in a quick run."""
        return (0.5,) if self.quick else self.targets


# -- rows of each method ----------------------------------------------------------------------------------------------
def preset_rows(method: str, presets: list[str], notes: list[str]) -> list[Row]:
    """Rows from policy presets; a preset that does not parse (e.g. a kind not registered yet) is skipped with a
    note, the others are kept."""
    rows = []
    for preset in presets:
        try:
            rows.append(Row(method, preset, parse_preset(preset)))
        except ValueError as error:
            notes.append(f"skipped {method} ({preset}): {error}")
    return rows


def fewer_steps_rows(config: CompareConfig) -> list[Row]:
    counts = sorted({max(1, round(t * config.steps)) for t in config.compute_points} - {config.steps}, reverse=True)
    return [Row("fewer steps", f"{k} of {config.steps} steps", steps=k) for k in counts]


def static_presets(config: CompareConfig) -> list[str]:
    """Every-2 after leading full steps for compute points above 1/2, then every-N (`interval_presets`)."""
    points = config.compute_points
    presets = [f"static:interval=2,first_full={round(config.steps * (2 * t - 1))}" for t in points if t > 0.5]
    return presets + interval_presets("static", config)


def interval_presets(kind: str, config: CompareConfig) -> list[str]:
    """Every-N for N = 2, 3, 4 (a quick run: N = 2 only)."""
    return [f"{kind}:interval={n}" for n in ((2,) if config.quick else (2, 3, 4))]


def l2c_rows(config: CompareConfig, notes: list[str]) -> list[Row]:
    if not config.l2c:
        notes.append("skipped L2C: no --l2c policy directory given (train one: see README)")
    rows = []
    for item in config.l2c:
        budget, directory = parse_budget_dir(item)
        router = load_router(directory, budget, config.steps, flag=f"--l2c {item}")
        setting = f"{directory} (refresh {router.refresh_interval}, " + (
            f"budget {router.budget})" if router.budget is not None else f"threshold {router.threshold})"
        )
        rows.append(Row("L2C", setting, router))
    return rows


def tokencache_rows(config: CompareConfig, notes: list[str]) -> list[Row]:
    if not config.tokencache:
        notes.append("skipped TokenCache: no --tokencache policy directory given")
    rows = []
    for directory in config.tokencache:
        try:
            rows.append(Row("TokenCache", directory, load_policy(directory)))
        except ValueError as error:
            notes.append(f"skipped TokenCache ({directory}): {error}")
    return rows


def taylorseer_at(target: float, steps: int, default_warmup: int = 3) -> TaylorSeer:
    """The TaylorSeer interval and warm-up whose share of computed steps is closest to `target`.

    Ties go to the warm-up closest to diffusers' default (3), then to the shorter interval.
    """
    best = min(
        ((w, n) for w in range(1, steps + 1) for n in range(2, steps + 1)),
        key=lambda wn: (
            round(abs(len(taylorseer_compute_steps(steps, wn[1], wn[0])) / steps - target), 9),
            abs(wn[0] - default_warmup),
            wn[1],
        ),
    )
    return TaylorSeer(interval=best[1], warmup=best[0])


def tune_threshold(
    make: Callable[[float], Peer], target: float, measure: Callable[[Peer], float], low=1e-3, high=2.0, iters=8
) -> tuple[Peer, float]:
    """Bisection (in log space) of a peer's threshold until its FLOPs ratio is closest to `target`.

    A higher threshold skips more, so the FLOPs ratio falls as the threshold grows. Returns the best peer seen and
    its calibration ratio.
    """
    seen: list[tuple[float, Peer, float]] = []
    for _ in range(iters):
        middle = math.sqrt(low * high)
        peer = make(middle)
        ratio = measure(peer)
        seen.append((abs(ratio - target), peer, ratio))
        if ratio > target:
            low = middle
        else:
            high = middle
    _, peer, ratio = min(seen, key=lambda item: item[0])
    return peer, ratio


def _with_threshold(cls: type[Peer], threshold: float) -> Peer:
    return cls(threshold=round(threshold, 5))


def peer_rows(config: CompareConfig, bundle: ModelBundle, notes: list[str]) -> list[Row]:
    calibration = config.calibration_run(config.calibration_samples)
    bench = SideBySide(bundle, calibration, progress=False)
    rows = []
    for cls in (FBCache, TaylorSeer, DBCache):
        if not config.wants(cls.method):
            continue
        reason = cls.unavailable(bundle.transformer)
        if reason is not None:
            notes.append(f"skipped {cls.method}: {reason}")
            continue
        for target in config.compute_points:
            if cls is TaylorSeer:
                peer, note = taylorseer_at(target, config.steps), cls.note
            elif config.tune_iters == 0:
                peer = _with_threshold(cls, config.fixed_threshold)
                note = f"{cls.note}; fixed threshold, not tuned"
            else:
                make = partial(_with_threshold, cls)
                peer, ratio = tune_threshold(make, target, bench.flops_ratio, iters=config.tune_iters)
                note = f"{cls.note}; tuned to {target} (calibration flops_ratio {ratio:.3f})"
            rows.append(Row(cls.method, peer.describe(), peer, note=note))
    return rows


def build_rows(config: CompareConfig, bundle: ModelBundle, notes: list[str]) -> list[Row]:
    rows = [Row("uncached", "full (hooks on, nothing reused)", FullPolicy())]
    rows += fewer_steps_rows(config)
    rows += preset_rows("static every-N", static_presets(config), notes)
    rows += preset_rows("ToCa", interval_presets("toca", config), notes)
    if not config.quick:  # a quick run leaves out ToCa's variant
        rows += preset_rows("DuCa", interval_presets("duca", config), notes)
    rows += preset_rows("DaTo", interval_presets("dato", config), notes)
    rows += l2c_rows(config, notes)
    rows += tokencache_rows(config, notes)
    rows += peer_rows(config, bundle, notes)
    return [row for row in rows if row.method == "uncached" or config.wants(row.method)]


# -- running -----------------------------------------------------------------------------------------------------------
def run_comparison(
    config: CompareConfig, progress: bool = True, on_row: Callable[[list[dict]], None] | None = None
) -> tuple[list[dict], list[str]]:
    """All rows measured in one run; returns the JSON rows and the notes on what was skipped.

    `on_row(rows so far)` is called after every row, so a long run leaves its finished rows behind.
    """
    bundle = load_model(config.model)
    quality = quality_for(bundle)
    notes = [] if quality else ["digit_accuracy and fd_digits need the embedded digits teacher; they are null here"]
    rows = build_rows(config, bundle, notes)
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        if on_row is not None:
            on_row(results)

    measure_rows(SideBySide(bundle, config, progress=progress), rows, quality, on_row=done)
    return results, notes


# -- command line (bench/compare.py and infer.py compare) --------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompareConfig()
    parser.add_argument("--json", type=Path, required=True, help="where to write the results (JSON: setup and rows)")
    parser.add_argument("--plot", type=Path, default=None, help="Pareto plot PNG (default: the JSON path, .png)")
    parser.add_argument("--quick", action="store_true", help="CI: 4 samples, 10 steps, one compute point")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--steps", type=int, default=None, help=f"default {defaults.steps} (quick: 10)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=defaults.scheduler)
    parser.add_argument("--num-samples", type=int, default=None, help=f"default {defaults.num_samples} (quick: 4)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--classes", type=class_spec, default=None, help="class labels, e.g. 0-9 or 1,3,5 (default: all)"
    )
    parser.add_argument("--flops-samples", type=int, default=None, help=f"default {defaults.flops_samples}")
    parser.add_argument("--targets", type=float, nargs="+", default=list(defaults.targets), help="compute points")
    parser.add_argument("--l2c", action="append", default=[], help="L2C policy DIR or BUDGET=DIR (repeatable)")
    parser.add_argument("--tokencache", action="append", default=[], help="TokenCache policy DIR (repeatable)")
    parser.add_argument("--only", nargs="+", default=[], help="run only these methods, e.g. TokenCache L2C")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    quick = args.quick
    return CompareConfig(
        model=args.model,
        steps=args.steps or (10 if quick else CompareConfig.steps),
        scheduler=args.scheduler,
        num_samples=args.num_samples or (4 if quick else CompareConfig.num_samples),
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        classes=args.classes,
        flops_samples=args.flops_samples if args.flops_samples is not None else (2 if quick else 32),
        targets=tuple(args.targets),
        l2c=list(args.l2c),
        tokencache=list(args.tokencache),
        calibration_samples=2 if quick else CompareConfig.calibration_samples,
        tune_iters=0 if quick else CompareConfig.tune_iters,
        quick=quick,
        only=tuple(args.only),
    )


def run_from_args(args: argparse.Namespace) -> int:
    from .plots import save_pareto

    config = config_from_args(args)
    results, notes = run_comparison(
        config, progress=not args.no_progress, on_row=lambda rows: write_results(args.json, config, rows)
    )
    plot = args.plot or args.json.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    title = f"{config.model}, {config.scheduler} {config.steps} steps, {config.num_samples} samples"
    save_pareto(results, plot, title)
    print(format_table(results, COLUMNS))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.json} and {plot}")
    return 0
