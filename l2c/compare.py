"""Every policy and every peer side by side: one model, one set of noises and conditions, rows at equal compute.

Rows: the uncached model (`full`: hooks on, nothing reused), fewer sampling steps of the same scheduler, static
every-N, ToCa, DuCa, DaTo, trained L2C and TokenCache policy directories, ToCa, DuCa and TokenCache each also with
the tokens they do not recompute forecast (`taylor_order=1`, the "+ TaylorSeer forecast" rows: the same plan, so the
same compute), native TaylorSeer, HiCache (TaylorSeer's schedule, its scaled-Hermite forecast), and the peers users
would pick instead (`l2c.peers`: diffusers' FBCache and TaylorSeer, cache-dit's DBCache). Methods with a knob are
set to the compute points in `targets` (FLOPs ratio), always on a calibration noise set apart from the evaluation's:
peers with a threshold by bisection of their FLOPs ratio; TaylorSeer (native and diffusers') and HiCache by the best
calibration PSNR over a grid (orders 1, 2 × every interval and warm-up computing the point's share of steps); each
TokenCache directory also by the best calibration PSNR over its step tables (up to the point's share of full steps,
TPRR's or one interval's), the token budget solved for the point's FLOPs ("TokenCache, tuned": the trained predictor
as it is, its tables re-derived from the saved calibration); static every-N by rule. `margins` checks the issue's
rule at each point (the learned row ≥ 3 dB ahead of the best other). A method that cannot run here is left out and
said so in a note, never faked. `bench/compare.py` and `infer.py compare` are thin command lines over
`run_comparison`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from .adapters import ModelSpec, model_spec
from .evaluate import CacheMethod, Row, SamplingSetup, SideBySide, measure_rows, quality_for
from .metrics import psnr_db
from .models import ModelBundle, load_model, model_scheduler_config, resolve_scheduler
from .options import SCHEDULER_CHOICES, SCHEDULER_HELP, class_spec
from .peers import DBCache, FBCache, Peer, TaylorSeer
from .policies import FullPolicy, StaticPolicy, TokenCachePolicy
from .policies.taylorseer import compute_steps
from .policy_io import load_policy, parse_preset
from .rebudget import load_router, parse_budget_dir
from .results import Column, format_table, write_results

Setting = TypeVar("Setting")
COLUMNS = ("method", "setting", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits")


@dataclass
class CompareConfig(SamplingSetup):
    """The sampling (here 256 samples in batches of 128, FLOPs counted over the first 32) and which methods run at
    which compute points."""

    num_samples: int = 256
    batch_size: int = 128
    flops_samples: int = 32
    targets: tuple[float, ...] = (0.75, 0.5, 0.35, 0.25, 0.2)  # compute points (FLOPs ratio) for methods with a knob
    l2c: list[str] = field(default_factory=list)  # "DIR" (as exported), "BUDGET=DIR" (re-budgeted), "LABEL=…"
    l2c_labels: list[str] = field(default_factory=list)  # "LABEL=DIR" or "LABEL=BUDGET=DIR": rows told apart
    tokencache: list[str] = field(default_factory=list)  # trained TokenCache policy directories
    calibration_samples: int = 8  # noises (another seed) on which peer thresholds and TaylorSeer's knobs are tuned
    tune_iters: int = 6  # bisection steps per tuned threshold; 0: thresholds fixed at `fixed_threshold`
    fixed_threshold: float = 0.3
    quick: bool = False  # CI: one compute point, one setting per method
    only: tuple[str, ...] = ()  # run only these methods (and the uncached row); empty: all
    reference_once: bool = False  # uncached samples made once, not beside every row (`SideBySide.reference_once`)

    def wants(self, method: str) -> bool:
        return not self.only or method.lower() in {m.lower() for m in self.only}

    @property
    def compute_points(self) -> tuple[float, ...]:
        """The targets the knobs are set to: `targets`, or 0.5 alone in a quick run."""
        return (0.5,) if self.quick else self.targets


# -- rows of each method ----------------------------------------------------------------------------------------------
def preset_rows(method: str, presets: list[str], notes: list[str], spec: ModelSpec) -> list[Row]:
    """Rows from policy presets; a preset that does not parse (e.g. a kind not registered yet) or does not apply
    to this model (DaTo prunes DiT's `attn1`, which a Flux model has not) is skipped with a note, the others are
    kept."""
    rows = []
    for preset in presets:
        try:
            policy = parse_preset(preset)
            policy.check_model(spec)
        except ValueError as error:
            notes.append(f"skipped {method} ({preset}): {error}")
            continue
        rows.append(Row(method, preset, policy))
    return rows


def fewer_steps_rows(config: CompareConfig) -> list[Row]:
    counts = sorted({max(1, round(t * config.steps)) for t in config.compute_points} - {config.steps}, reverse=True)
    return [Row("fewer steps", f"{k} of {config.steps} steps", steps=k) for k in counts]


def near_point(share: float, point: float, tolerance: float) -> bool:
    """Whether `share` is within `tolerance` of `point` (with room for float rounding: 0.5 − 0.47 > 0.03)."""
    return abs(share - point) <= tolerance + 1e-9


def _closest(candidates, share: Callable, target: float):
    """The candidates whose share of computed steps is nearest `target` (rounded so that equal shares tie)."""
    distance = {c: round(abs(share(c) - target), 9) for c in candidates}
    best = min(distance.values())
    return [c for c in candidates if distance[c] == best]


def static_preset_at(target: float, steps: int) -> str:
    """The static every-N (after `first_full` full steps) whose share of computed steps is closest to `target`;
    ties go to the shorter interval, then to fewer leading full steps (20 steps: 0.75 → every-2 after 10 full
    steps, 0.5 → every-2, 0.35 → every-3, 0.25 → every-4, 0.2 → every-5)."""

    def share(knobs: tuple[int, int]) -> float:
        return len(StaticPolicy(interval=knobs[0], first_full=knobs[1]).full_steps(steps)) / steps

    interval, first_full = min(_closest([(n, k) for n in range(2, steps + 1) for k in range(steps)], share, target))
    return f"static:interval={interval}" + (f",first_full={first_full}" if first_full else "")


def static_presets(config: CompareConfig) -> list[str]:
    """One static every-N per compute point (`static_preset_at`), each once."""
    return list(dict.fromkeys(static_preset_at(t, config.steps) for t in config.compute_points))


def interval_presets(kind: str, config: CompareConfig, knobs: str = "") -> list[str]:
    """Every-N for N = 2, 3, 4 (a quick run: N = 2 only), with `knobs` (",key=value…") after the interval."""
    return [f"{kind}:interval={n}{knobs}" for n in ((2,) if config.quick else (2, 3, 4))]


# The token-wise rows with the tokens a step between full steps does not recompute forecast (TaylorSeer's rule of
# this order from the branch's full computations; `l2c/policies/token_forecast.py`) instead of reused.
FORECAST_ORDER = 1
FORECAST_SUFFIX = " + TaylorSeer forecast"  # "ToCa" -> "ToCa + TaylorSeer forecast"


def tokenwise_presets(config: CompareConfig) -> list[tuple[str, list[str]]]:
    """(method, presets) of ToCa and DuCa at every-N, each followed by its forecast variant at the same intervals
    (a quick run leaves out DuCa and its variant)."""
    kinds = [("ToCa", "toca")] + ([] if config.quick else [("DuCa", "duca")])
    forecast = f",taylor_order={FORECAST_ORDER}"
    return [
        item
        for method, kind in kinds
        for item in (
            (method, interval_presets(kind, config)),
            (method + FORECAST_SUFFIX, interval_presets(kind, config, forecast)),
        )
    ]


def parse_l2c_label(text: str) -> tuple[str, str]:
    """`LABEL=DIR` or `LABEL=BUDGET=DIR` → (method, `DIR` or `BUDGET=DIR`); the method is LABEL, with "L2C " in
    front unless it names L2C already (a learned row's method contains L2C)."""
    label, sep, spec = text.partition("=")
    if not sep or not label.strip() or not spec:
        raise ValueError(f"--l2c-label {text!r}: expected LABEL=DIR or LABEL=BUDGET=DIR")
    label = label.strip()
    return (label if "L2C" in label else f"L2C {label}"), spec


def l2c_rows(config: CompareConfig, notes: list[str]) -> list[Row]:
    items = [("L2C", item, "--l2c") for item in config.l2c]
    items += [(*parse_l2c_label(item), "--l2c-label") for item in config.l2c_labels]
    if not items:
        notes.append("skipped L2C: no --l2c policy directory given (train one: see README)")
    rows = []
    for method, item, flag in items:
        budget, directory = parse_budget_dir(item)
        router = load_router(directory, budget, config.steps, flag=f"{flag} {item}")
        knob = f"budget {router.budget}" if router.budget is not None else f"threshold {router.threshold}"
        forecast = ", forecast" if router.forecast_logits is not None else ""
        rows.append(Row(method, f"{directory} (refresh {router.refresh_interval}, {knob}{forecast})", router))
    return rows


@dataclass(frozen=True)
class SeerSetting:
    """One TaylorSeer setting, the same knobs for the native policy and diffusers' hook."""

    interval: int
    order: int
    warmup: int

    def computed_steps(self, steps: int) -> list[int]:
        return compute_steps(steps, self.interval, self.warmup)

    def share(self, steps: int) -> float:
        return len(self.computed_steps(steps)) / steps

    def native(self, rule: str = "taylor") -> CacheMethod:
        """l2c's `taylorseer:` policy on this schedule; rule "hermite" is HiCache (σ: its code's default)."""
        return parse_preset(f"taylorseer:interval={self.interval},order={self.order},warmup={self.warmup},rule={rule}")

    def peer(self) -> TaylorSeer:
        return TaylorSeer(interval=self.interval, warmup=self.warmup, order=self.order)


NATIVE_TAYLORSEER = "TaylorSeer (native)"
HICACHE = "HiCache (native)"
HICACHE_NOTE = "l2c's runtime (`taylorseer:rule=hermite`, σ 0.5: HiCache's code default)"
SEER_ORDERS = (1, 2)
SEER_TOLERANCE = 0.03  # a grid setting computes a share of steps this close to the compute point


def taylorseer_grid(target: float, steps: int, orders: tuple[int, ...] = SEER_ORDERS) -> list[SeerSetting]:
    """Every distinct TaylorSeer schedule (interval ≥ 2, warm-up ≥ 1) whose share of computed steps is within
    `SEER_TOLERANCE` of `target` (none: the closest share), at each order. Settings that compute the same steps
    are one schedule (the shortest interval is kept): they give the same samples."""
    schedules: dict[tuple[int, ...], tuple[int, int]] = {}
    for warmup in range(1, steps + 1):
        for interval in range(2, steps + 1):
            schedules.setdefault(tuple(compute_steps(steps, interval, warmup)), (interval, warmup))

    def share(schedule: tuple[int, ...]) -> float:
        return len(schedule) / steps

    near = [s for s in schedules if near_point(share(s), target, SEER_TOLERANCE)]
    near = near or _closest(schedules, share, target)
    return [SeerSetting(schedules[s][0], order, schedules[s][1]) for s in near for order in orders]


def taylorseer_at(target: float, steps: int, order: int = 1, warmup: int = 3) -> TaylorSeer:
    """diffusers' TaylorSeer at the closest share of computed steps to `target` without tuning: of the closest
    schedules, the one whose warm-up is nearest `warmup` (default: diffusers' 3), then the shortest interval, at
    `order`."""
    closest = _closest(taylorseer_grid(target, steps, (order,)), lambda s: s.share(steps), target)
    best = min(closest, key=lambda s: (abs(s.warmup - warmup), s.interval))
    return best.peer()


BESIDE_RULE = "static every-N and native TaylorSeer (order 2, warm-up 1) at the closest share of computed steps"


def beside_presets(flops_ratio: float, steps: int) -> list[tuple[str, str]]:
    """(method, preset) of static every-N and native TaylorSeer at the compute of a measured policy
    (`BESIDE_RULE`, no tuning): what `infer.py sample` prints beside the policy."""
    seer = taylorseer_at(flops_ratio, steps, order=2, warmup=1)
    native = SeerSetting(seer.interval, seer.order, seer.warmup).native()
    return [("static every-N", static_preset_at(flops_ratio, steps)), (NATIVE_TAYLORSEER, native.describe())]


SEER_GRID = (
    f"orders {', '.join(map(str, SEER_ORDERS))} × intervals and warm-ups computing within {SEER_TOLERANCE} of the point"
)


@dataclass
class Tuned(Generic[Setting]):
    """The setting chosen on the calibration noise and what choosing it cost."""

    setting: Setting
    psnr_db: float
    grid_size: int
    wall_s: float
    scores: list[float] = field(default_factory=list)  # every grid setting's calibration PSNR, in grid order

    def note(self, calibration: SamplingSetup, grid: str = SEER_GRID) -> str:
        return (
            f"chosen of {self.grid_size} settings ({grid}) by PSNR on {calibration.num_samples} "
            f"calibration samples (seed {calibration.seed}): {self.psnr_db:.2f} dB; tuning took {self.wall_s:.1f}s"
        )


def tune_on_calibration(
    grid: list[Setting], make: Callable[[Setting], CacheMethod], bench: SideBySide, reference: torch.Tensor
) -> Tuned[Setting]:
    """The grid setting whose samples on `bench`'s (calibration) noise are closest to `reference`, the uncached
    samples of that noise, by PSNR; ties go to the earlier setting."""
    start = time.perf_counter()
    scores = [psnr_db(bench.images(make(setting)), reference) for setting in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -i))
    return Tuned(grid[best], scores[best], len(grid), time.perf_counter() - start, scores)


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


def taylorseer_rows(config: CompareConfig, bench: SideBySide, reference: torch.Tensor) -> list[Row]:
    """Native TaylorSeer, diffusers' hook and HiCache (TaylorSeer's schedules, its Hermite rule), each tuned on the
    calibration noise at every compute point."""
    implementations = [
        (NATIVE_TAYLORSEER, SeerSetting.native, "l2c's runtime (`taylorseer:` preset)"),
        (TaylorSeer.method, SeerSetting.peer, TaylorSeer.note),
        (HICACHE, partial(SeerSetting.native, rule="hermite"), HICACHE_NOTE),
    ]
    rows = []
    for method, make, note in implementations:
        if not config.wants(method):
            continue
        for target in config.compute_points:
            tuned = tune_on_calibration(taylorseer_grid(target, config.steps), make, bench, reference)
            policy = make(tuned.setting)
            rows.append(Row(method, policy.describe(), policy, note=f"{note}; {tuned.note(bench.setup)}"))
    return rows


PLAN_FLOPS_SAMPLES = 2


class CalibrationSet:
    """The calibration noise every tuned knob is set on (the run `run`: compare's, `of_config`, or the TokenCache
    export's tuning run, on a seed of its own), and its uncached samples, made once for all the methods tuned on
    them."""

    def __init__(self, bundle: ModelBundle, run: SamplingSetup) -> None:
        self.bench = SideBySide(bundle, run, progress=False)
        # A plan fixes what TokenCache computes whatever the noise: its FLOPs are counted on a couple of samples.
        plan_run = dataclasses.replace(run, num_samples=PLAN_FLOPS_SAMPLES, flops_samples=0)
        self.plan_flops = SideBySide(bundle, plan_run, progress=False)

    @classmethod
    def of_config(cls, bundle: ModelBundle, config: CompareConfig) -> CalibrationSet:
        """Compare's: `calibration_samples` noises of the evaluation's seed + 1."""
        return cls(bundle, config.calibration_run(config.calibration_samples))

    @cached_property
    def reference(self) -> torch.Tensor:
        return self.bench.images(None)


# -- TokenCache: as exported, and its tables set to each compute point on the calibration noise -----------------------
TOKENCACHE = "TokenCache"
TOKENCACHE_TUNED = "TokenCache, tuned"
TOKENCACHE_PROBES = (0.1, 0.5)  # token budgets whose FLOPs fix the line a point's budget is read from
TOKENCACHE_SECANT_STEPS = 3  # refinements of that budget until its FLOPs are within the point's tolerance
TOKENCACHE_GRID = (
    f"full steps ≤ the point's share × TPRR or one interval, the token budget solved for FLOPs within "
    f"{SEER_TOLERANCE} of the point"
)


@dataclass(frozen=True)
class TokenCacheSetting:
    """One operating point of a trained TokenCache policy: its tables re-derived from the saved calibration (no
    retraining), as `bench/tokencache_compare.py --token-budget --full-steps` does."""

    full_steps: int
    tprr: bool
    token_budget: float

    def of(self, policy: TokenCachePolicy) -> TokenCachePolicy:
        return dataclasses.replace(
            policy, full_steps=self.full_steps, tprr=self.tprr, token_budget=self.token_budget
        )  # fmt: skip

    def describe(self) -> str:
        schedule = "TPRR" if self.tprr else "one interval"
        return f"full_steps={self.full_steps} ({schedule}), token_budget={self.token_budget:.3f}"


def budget_at(flops: Callable[[float], float], target: float) -> float | None:
    """The token budget in (0, 1] whose FLOPs ratio (`flops(budget)`) is within `SEER_TOLERANCE` of `target`: read
    off the line through the two probe budgets, then refined by secant steps; None if no budget gets there."""
    points = [(budget, flops(budget)) for budget in TOKENCACHE_PROBES]
    for _ in range(TOKENCACHE_SECANT_STEPS):
        (low, f_low), (high, f_high) = points
        if f_high <= f_low:  # the budget does not move the FLOPs (e.g. no token-wise slot)
            return None
        guess = round(low + (target - f_low) * (high - low) / (f_high - f_low), 4)
        if not 0.0 < guess <= 1.0:
            return None
        f_guess = flops(guess)
        if near_point(f_guess, target, SEER_TOLERANCE):
            return guess
        nearer = min(points, key=lambda point: abs(point[1] - target))
        points = sorted([nearer, (guess, f_guess)])
    return None


def tokencache_grid(
    policy: TokenCachePolicy, target: float, steps: int, flops_ratio: Callable[[CacheMethod], float]
) -> list[TokenCacheSetting]:
    """Every distinct step table of `policy` with at most the point's share of full steps (TPRR's and the single
    interval's, 2 full steps or more), each with the token budget that brings it to `target` (`budget_at`); a table
    no budget brings there is left out."""
    settings, seen = [], set()
    for full_steps in range(2, math.floor(target * steps + 1e-9) + 1):
        for tprr in (True, False):
            table = tuple(dataclasses.replace(policy, full_steps=full_steps, tprr=tprr).step_types(steps).tolist())
            if table in seen:
                continue
            seen.add(table)
            budget = budget_at(
                lambda b, f=full_steps, t=tprr: flops_ratio(TokenCacheSetting(f, t, b).of(policy)), target
            )  # fmt: skip
            if budget is not None:
                settings.append(TokenCacheSetting(full_steps, tprr, budget))
    return settings


def load_tokencache(directory: str, notes: list[str]) -> TokenCachePolicy | None:
    try:
        policy = load_policy(directory)
    except ValueError as error:
        notes.append(f"skipped TokenCache ({directory}): {error}")
        return None
    if not isinstance(policy, TokenCachePolicy):
        notes.append(f"skipped TokenCache ({directory}): a {policy.kind} policy, not a tokencache one")
        return None
    return policy


def tokencache_rows(config: CompareConfig, calibration: CalibrationSet, notes: list[str]) -> list[Row]:
    """Each directory as exported (and its forecast variant), then, as TaylorSeer is, set to every compute point on
    the calibration noise: the `tokencache_grid` setting of best calibration PSNR (the forecast variant tuned on
    its own)."""
    if not config.tokencache:
        notes.append("skipped TokenCache: no --tokencache policy directory given")
    rows = []
    for directory in config.tokencache:
        policy = load_tokencache(directory, notes)
        if policy is None:
            continue
        forecast = dataclasses.replace(policy, taylor_order=FORECAST_ORDER)
        rows.append(Row(TOKENCACHE, directory, policy))
        rows.append(Row(TOKENCACHE + FORECAST_SUFFIX, f"{directory} (taylor_order={FORECAST_ORDER})", forecast))
        variants = [(TOKENCACHE_TUNED, policy), (TOKENCACHE_TUNED + FORECAST_SUFFIX, forecast)]
        variants = [(method, base) for method, base in variants if config.wants(method)]
        if not variants:
            continue
        for target in config.compute_points:
            grid = tokencache_grid(policy, target, config.steps, calibration.plan_flops.flops_ratio)
            if not grid:
                notes.append(f"skipped {TOKENCACHE_TUNED} ({directory}) at {target}: no table reaches the point")
                continue
            for method, base in variants:
                tuned = tune_on_calibration(grid, lambda s, base=base: s.of(base), calibration.bench,
                                            calibration.reference)  # fmt: skip
                setting = f"{directory} at {target}: {tuned.setting.describe()}"
                if base.taylor_order:
                    setting += f", taylor_order={base.taylor_order}"
                note = tuned.note(calibration.bench.setup, TOKENCACHE_GRID)
                rows.append(Row(method, setting, tuned.setting.of(base), note=note))
    return rows


def peer_rows(config: CompareConfig, bundle: ModelBundle, calibration: CalibrationSet, notes: list[str]) -> list[Row]:
    bench = calibration.bench
    rows = []
    for cls in (FBCache, DBCache):
        if not config.wants(cls.method):
            continue
        reason = cls.unavailable(bundle.transformer)
        if reason is not None:
            notes.append(f"skipped {cls.method}: {reason}")
            continue
        for target in config.compute_points:
            if config.tune_iters == 0:
                peer = _with_threshold(cls, config.fixed_threshold)
                note = f"{cls.note}; fixed threshold, not tuned"
            else:
                make = partial(_with_threshold, cls)
                peer, ratio = tune_threshold(make, target, bench.flops_ratio, iters=config.tune_iters)
                note = f"{cls.note}; tuned to {target} (calibration flops_ratio {ratio:.3f})"
            rows.append(Row(cls.method, peer.describe(), peer, note=note))
    if any(config.wants(method) for method in (NATIVE_TAYLORSEER, TaylorSeer.method, HICACHE)):
        rows += taylorseer_rows(config, bench, calibration.reference)
    return rows


def build_rows(config: CompareConfig, bundle: ModelBundle, notes: list[str]) -> list[Row]:
    spec = model_spec(bundle.transformer)
    rows = [Row("uncached", "full (hooks on, nothing reused)", FullPolicy())]
    rows += fewer_steps_rows(config)
    rows += preset_rows("static every-N", static_presets(config), notes, spec)
    for method, presets in tokenwise_presets(config):
        rows += preset_rows(method, presets, notes, spec)
    rows += preset_rows("DaTo", interval_presets("dato", config), notes, spec)
    rows += l2c_rows(config, notes)
    calibration = CalibrationSet.of_config(bundle, config)
    rows += tokencache_rows(config, calibration, notes)
    rows += peer_rows(config, bundle, calibration, notes)
    return [row for row in rows if row.method == "uncached" or config.wants(row.method)]


# -- the rule at each compute point ---------------------------------------------------------------------------
MARGIN_DB = 3.0  # the learned row must lead the best other row by this much PSNR
ACCURACY_POINTS = 0.01  # … keep digit accuracy within 1 point of the uncached samples
FD_SLACK = 1.0  # … and fd_digits no worse than the best other row's + this
POINT_TOLERANCE = 0.03  # a row counts at a compute point when its flops_ratio is this close


def is_learned(row: Mapping[str, Any]) -> bool:
    return "L2C" in row["method"]


def _best(rows: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(rows, key=lambda row: row["psnr_db"], default=None)


def _within(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit + 1e-12


METRICS = ("flops_ratio", "psnr_db", "digit_accuracy", "fd_digits")


def _named(row: Mapping[str, Any] | None) -> str | None:
    return None if row is None else f"{row['method']}: {row['setting']}"


def margins(rows: list[Mapping[str, Any]], points: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per compute point: the best learned row (`method` contains L2C) and the best other (not uncached) row within
    `POINT_TOLERANCE` of it, by psnr_db; the PSNR margin, the learned row's digit accuracy against the uncached
    samples' (|difference| ≤ 1 point), its fd_digits against that best other row's + `FD_SLACK`, and whether the
    issue's rule holds (None: a row or a metric is missing)."""
    result = []
    for point in points:
        near = [r for r in rows if r["method"] != "uncached" and near_point(r["flops_ratio"], point, POINT_TOLERANCE)]
        learned, other = _best([r for r in near if is_learned(r)]), _best([r for r in near if not is_learned(r)])
        entry: dict[str, Any] = {"compute_point": point}
        for key, row in (("learned", learned), ("best_other", other)):
            entry[key] = None if row is None else {k: row.get(k) for k in ("method", "setting", *METRICS)}
        if learned is None or other is None:
            entry.update(psnr_margin_db=None, accuracy_ok=None, fd_ok=None, holds=None)
            result.append(entry)
            continue
        accuracy, uncached = learned.get("digit_accuracy"), learned.get("digit_accuracy_uncached")
        fd, fd_other = learned.get("fd_digits"), other.get("fd_digits")
        entry["psnr_margin_db"] = learned["psnr_db"] - other["psnr_db"]
        entry["digit_accuracy_uncached"] = uncached
        drift = None if accuracy is None or uncached is None else abs(accuracy - uncached)
        entry["accuracy_ok"] = _within(drift, ACCURACY_POINTS)
        entry["fd_ok"] = _within(fd, None if fd_other is None else fd_other + FD_SLACK)
        checks = (entry["psnr_margin_db"] >= MARGIN_DB, entry["accuracy_ok"], entry["fd_ok"])
        entry["holds"] = False if False in checks else (None if None in checks else True)
        result.append(entry)
    return result


MARGIN_COLUMNS = (
    Column("point", ".2f", "compute_point"),
    Column("best L2C", value=lambda m: _named(m["learned"])),
    Column("its psnr_db", ".2f", value=lambda m: m["learned"] and m["learned"]["psnr_db"]),
    Column("best other", value=lambda m: _named(m["best_other"])),
    Column("its psnr_db", ".2f", value=lambda m: m["best_other"] and m["best_other"]["psnr_db"]),
    Column("margin_db", "+.2f", "psnr_margin_db"),
    Column("accuracy ok", key="accuracy_ok"),
    Column("fd ok", key="fd_ok"),
    Column("holds", key="holds"),
)


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

    bench = SideBySide(bundle, config, progress=progress, reference_once=config.reference_once)
    measure_rows(bench, rows, quality, on_row=done)
    return results, notes


# -- command line (bench/compare.py and infer.py compare) --------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompareConfig()
    parser.add_argument("--json", type=Path, required=True, help="where to write the results (JSON: setup and rows)")
    parser.add_argument("--plot", type=Path, default=None, help="Pareto plot PNG (default: the JSON path, .png)")
    parser.add_argument("--quick", action="store_true", help="CI: 4 samples, 10 steps, one compute point")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--steps", type=int, default=None, help=f"default {defaults.steps} (quick: 10)")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=defaults.scheduler, help=SCHEDULER_HELP)
    parser.add_argument("--num-samples", type=int, default=None, help=f"default {defaults.num_samples} (quick: 4)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--classes", type=class_spec, default=None, help="class labels, e.g. 0-9 or 1,3,5 (default: all)"
    )
    parser.add_argument("--flops-samples", type=int, default=None, help=f"default {defaults.flops_samples}")
    parser.add_argument("--targets", type=float, nargs="+", default=list(defaults.targets), help="compute points")
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        help=f"noises (seed + 1) that thresholds and TaylorSeer's knobs are tuned on; default "
        f"{defaults.calibration_samples} (quick: 2)",
    )
    parser.add_argument("--l2c", action="append", default=[], help="L2C policy DIR or BUDGET=DIR (repeatable)")
    parser.add_argument(
        "--l2c-label",
        action="append",
        default=[],
        help="a labelled L2C row, LABEL=DIR or LABEL=BUDGET=DIR, e.g. 'L2C forecast, Taylor weights=0.5=out/x' "
        "(repeatable; the method is LABEL, with 'L2C ' in front unless it names L2C)",
    )
    parser.add_argument("--tokencache", action="append", default=[], help="TokenCache policy DIR (repeatable)")
    parser.add_argument("--only", nargs="+", default=[], help="run only these methods, e.g. TokenCache L2C")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--reference-once",
        action="store_true",
        help="sample the uncached model once and measure every row against it (about half the time of a long run; "
        "speedup_wall then compares runs made apart in time, not side by side)",
    )


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    quick = args.quick
    return CompareConfig(
        model=args.model,
        steps=args.steps or (10 if quick else CompareConfig.steps),
        scheduler=resolve_scheduler(args.scheduler, model_scheduler_config(args.model)),  # the one that runs
        num_samples=args.num_samples or (4 if quick else CompareConfig.num_samples),
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        classes=args.classes,
        flops_samples=args.flops_samples if args.flops_samples is not None else (2 if quick else 32),
        targets=tuple(args.targets),
        l2c=list(args.l2c),
        l2c_labels=list(args.l2c_label),
        tokencache=list(args.tokencache),
        calibration_samples=args.calibration_samples or (2 if quick else CompareConfig.calibration_samples),
        tune_iters=0 if quick else CompareConfig.tune_iters,
        quick=quick,
        only=tuple(args.only),
        reference_once=args.reference_once,
    )


def run_from_args(args: argparse.Namespace, config: CompareConfig | None = None) -> int:
    """Run the comparison `args` describe (`config`: `config_from_args(args)`, when the caller made it already)."""
    from .plots import save_pareto

    config = config or config_from_args(args)

    def write(rows: list[dict]) -> None:
        write_results(args.json, config, rows, margins=margins(rows, config.compute_points))

    results, notes = run_comparison(config, progress=not args.no_progress, on_row=write)
    plot = args.plot or args.json.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    title = f"{config.model}, {config.scheduler} {config.steps} steps, {config.num_samples} samples"
    save_pareto(results, plot, title)
    print(format_table(results, COLUMNS))
    print("\nthe learned policy against the best other row at each compute point (±0.03 flops_ratio):")
    print(format_table(margins(results, config.compute_points), MARGIN_COLUMNS))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.json} and {plot}")
    return 0
