"""Which tokens a partial step recomputes, at equal FLOPs: reference selectors against the scored ones.

    OMP_NUM_THREADS=1 python bench/token_selectors.py --num-samples 64 --json docs/bench/token_selectors.json

Every token-wise row runs ToCa's plan at `--interval` (the same full steps and the same fresh-ratio table, so the
same FLOPs); only the selector differs:
- `oracle`: the tokens whose true branch output moved most since they were last computed (the full branch is run
  to know it; its FLOPs and wall time are not the method's: the row reports the plan's FLOPs, no speed-up);
- `random` (seeded), `stalest` (the runtime's default);
- `toca score`: attention received + cache frequency + spatial bonus (ToCa's published DiT settings);
- `duca score`: DuCa's value-norm score, on ToCa's schedule (the `duca` row itself alternates reuse steps);
- `tokencache predictor` (with `--tokencache DIR`, a trained TokenCache policy): its predictor's scores, run as
  TokenCache runs it (its FLOPs are counted: this row costs the predictor on every partial step), ranked by the
  score alone (`staleness="none"`, the paper's rule); `tokencache predictor × age`: the same scores ranked by
  score × steps since the token was last computed (`staleness="age"`).
Beside them: `static every-N` (the same full steps, the steps between reused: ToCa's plan at ratio 0) and the full
recompute (the uncached run, PSNR ∞ against itself).

`--taylor-order m` runs every row with the tokens a step does not recompute forecast by TaylorSeer's order-m rule
(`taylor_order`, ToCa + TaylorSeer) instead of reused: the reference row is then `static every-N + forecast` (ToCa's
plan with every ratio 0 and the forecast: TaylorSeer's rule between the same full steps), the oracle picks the
tokens farthest from their forecast (‖true − forecast‖), and the oracle and stalest rows also run with
`partial_keys="forecast"` (the unselected tokens' keys/values forecast too); the table asks how much token choice
adds to a forecast. `--only` takes names separated by ';' when a name has a comma ("oracle, cached keys").

`gap_closed` = 1 − MSE_selector / MSE_static: the share of static every-N's error (against the uncached images) the
selector removes; a full recompute closes 1, static 0. From PSNR: 1 − 10^(−(psnr_sel − psnr_static)/10).
The attribution (`--rank-samples`; the JSON's setup, key `rank_by_step`) adds, per step, the mean Spearman rank
correlation between each scored selector's token scores and the oracle's ‖true − cached‖, on that scored
selector's own trajectory, and (key `reselected_by_step`) the share of each selection, the oracle's included, that
the previous step had just recomputed: on a cache step that follows a partial one, the tokens whose age is 0 while
others are older (random: about the previous step's token share; stalest: 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch

from l2c.adapters import model_spec
from l2c.evaluate import Row, SamplingSetup, SideBySide, measure_rows, quality_for
from l2c.extension import BranchCall, SelectionRequest, TokenSelector
from l2c.models import load_model
from l2c.plan import Action
from l2c.policies import StaticPolicy, ToCaPolicy, TokenCachePolicy
from l2c.policies.selectors import (
    SelectorPolicy,
    measured_change,
    spearman,
    true_output_measured,
)
from l2c.policies.toca import SCORE_SOURCE
from l2c.policies.tokencache import STALENESS
from l2c.policy_io import load_policy
from l2c.results import format_table, write_results

RANK_STEPS = "rank_by_step"  # JSON key: {row: {step: mean Spearman}}
RESELECTED_STEPS = "reselected_by_step"  # JSON key: {row: {step: share of the selection the previous step computed}}
PREDICTOR_ROWS = {"none": "tokencache predictor", "age": "tokencache predictor × age"}  # by staleness
SCORED = (("toca score", "attention"), ("duca score", "value_norm"))
COLUMNS = ("method", "flops_ratio", "speedup_wall", "psnr_db", "gap_closed", "ssim", "digit_accuracy")


def gap_closed(psnr: float, psnr_static: float) -> float:
    """The share of static's squared error a row removes (1: none left, as a full recompute; 0: static's)."""
    return 1.0 - 10.0 ** (-(psnr - psnr_static) / 10.0)


FLAT = dict(step_weight=0.0, layer_weight=0.0, bonus=0.0, grid=1)  # no step/depth weighting, no spatial bonus
FLAT_DIT = dict(FLAT, attn1_factor=1.0, ff_factor=1.0)

Log = list  # (step, block, branch, mean Spearman or None, reselected share or None) per partial execution


def reselected(request: SelectionRequest, index: torch.Tensor) -> float | None:
    """The share of the selection `index` that the previous step had just recomputed (age 0 while other tokens are
    older); None when every token has the same age (the first cache step after a full step)."""
    age = request.store.age
    if bool((age == age[:, :1]).all()):
        return None
    return float((age.gather(1, index.to(age.device)) == 0).float().mean())


def rank_logged(score, pick: TokenSelector, log: Log) -> TokenSelector:
    """`pick`, logging the Spearman correlation of `score`'s token scores (None: not logged) with the oracle's
    ‖true − cached‖ and the share of the pick the previous step had just recomputed."""

    def select(request: SelectionRequest) -> torch.Tensor:
        rho = None
        if score is not None:
            rho = float(spearman(score(request), measured_change(request)).mean())
        index = pick(request)
        log.append((request.step, request.block, request.branch, rho, reselected(request, index)))
        return index

    return select


@dataclass
class RankProbe(ToCaPolicy):
    """ToCa (its plan, its selection) that also logs, at each partial execution, the Spearman correlation of its
    token scores with the oracle's ‖true − cached‖ (the true output measured as the oracle does)."""

    kind = "toca-rank-probe"
    log: Log = field(default_factory=list, compare=False, repr=False)

    def observe(self, call: BranchCall):
        return true_output_measured(call) if call.action == Action.PARTIAL else super().observe(call)

    def token_selector(self) -> TokenSelector:
        return rank_logged(self.token_scores(), super().token_selector(), self.log)


@dataclass
class PredictorRankProbe(SelectorPolicy):
    """The TokenCache predictor's selection on ToCa's plan, logging its scores' Spearman with the oracle's."""

    kind = "predictor-rank-probe"
    selector: str = "predictor"
    log: Log = field(default_factory=list, compare=False, repr=False)

    def observe(self, call: BranchCall):
        return true_output_measured(call) if call.action == Action.PARTIAL else None

    def token_selector(self) -> TokenSelector:
        return rank_logged(self.predictor.token_scores(), super().token_selector(), self.log)


@dataclass
class OracleProbe(SelectorPolicy):
    """The oracle's selection, logging the share of it the previous step had just recomputed."""

    kind = "oracle-probe"
    selector: str = "oracle"
    log: Log = field(default_factory=list, compare=False, repr=False)

    def token_selector(self) -> TokenSelector:
        return rank_logged(None, super().token_selector(), self.log)


def by_step(log: Log, column: int) -> dict[int, float]:
    """Mean of a logged column per step (over blocks, branches, batches), steps where it was logged."""
    steps: dict[int, list[float]] = {}
    for entry in log:
        if entry[column] is not None:
            steps.setdefault(entry[0], []).append(entry[column])
    return {step: sum(values) / len(values) for step, values in sorted(steps.items())}


def static_row(knobs: dict) -> Row:
    """ToCa's full steps with nothing recomputed between them: reused (static every-N) or, with the forecast,
    forecast (ToCa's plan with every branch's ratio factor 0)."""
    interval, order = knobs["interval"], knobs.get("taylor_order")
    if not order:
        return Row(f"static every-{interval}", f"static:interval={interval}", StaticPolicy(interval=interval))
    nothing = dict(attn1_factor=0.0, attn2_factor=0.0, ff_factor=0.0, score="none")
    policy = ToCaPolicy(**{**knobs, **nothing})
    setting = f"toca:interval={interval},factors=0,taylor_order={order}"
    return Row(f"static every-{interval} + forecast", setting, policy)


def rows_for(
    knobs: dict, seed: int, predictor: TokenCachePolicy | None = None, branches: tuple[str, ...] = ("attn1",)
) -> list[Row]:
    """Static every-N, then ToCa's plan with each selector (all with the same fresh-ratio knobs, `taylor_order`
    among them); a score row only where the model has the branch the score reads (Flux's fused attention exposes no
    attention score)."""
    rows = [static_row(knobs)]
    for name in ("oracle", "random", "stalest"):
        rows.append(Row(name, f"selector={name}", SelectorPolicy(selector=name, seed=seed, **knobs)))
    if knobs.get("attn1_factor"):  # self-attention is partial: the oracle and stalest with cached keys/values too
        modes = ("cached", "forecast") if knobs.get("taylor_order") else ("cached",)  # forecast keys need the forecast
        for mode in modes:
            for name in ("oracle", "stalest"):
                policy = SelectorPolicy(selector=name, seed=seed, partial_keys=mode, **knobs)
                rows.append(Row(f"{name}, {mode} keys", f"selector={name},partial_keys={mode}", policy))
    for method, score in SCORED:
        if SCORE_SOURCE[score] in branches:
            rows.append(Row(method, f"score={score}", ToCaPolicy(**{**knobs, "score": score})))
    for staleness in STALENESS if predictor is not None else ():
        ranked = dataclasses.replace(predictor, staleness=staleness)
        policy = SelectorPolicy(selector="predictor", predictor=ranked, seed=seed, **knobs)
        rows.append(Row(PREDICTOR_ROWS[staleness], f"selector=predictor,staleness={staleness}", policy))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:digits")
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=None, help="ToCa's base fresh ratio (None: the DiT preset)")
    parser.add_argument("--flat", action="store_true", help="no step/depth weighting; ff and attn1 both partial")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flops-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank-samples", type=int, default=16, help="samples of the rank attribution (0: none)")
    parser.add_argument("--tokencache", type=Path, default=None, help="a trained TokenCache policy directory")
    parser.add_argument(
        "--only", default=None, help="method names to run, separated by ';' or, if none has one, ',' (default: all)"
    )
    parser.add_argument(
        "--taylor-order", type=int, default=None, help="forecast the tokens not recomputed (TaylorSeer's order m)"
    )
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    only = None if args.only is None else set(args.only.split(";" if ";" in args.only else ","))
    predictor = None if args.tokencache is None else load_policy(args.tokencache)
    if predictor is not None and not isinstance(predictor, TokenCachePolicy):
        parser.error(f"--tokencache {args.tokencache}: a {predictor.kind} policy, expected a tokencache one")
    if predictor is not None:  # a selector row scores every partial step, whatever the directory's `rescore`
        predictor = dataclasses.replace(predictor, rescore="step")

    knobs: dict = {"interval": args.interval, "ratio": args.ratio, "taylor_order": args.taylor_order}
    bundle = load_model(args.model)
    branches = model_spec(bundle.transformer).branches
    if args.flat:  # a DiT's self-attention partial too; Flux's joint attention stays reused (its preset)
        knobs.update(FLAT_DIT if "attn1" in branches else FLAT)
    setup = SamplingSetup(
        model=args.model, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        flops_samples=args.flops_samples,
    ).for_model(bundle)  # fmt: skip
    record = {**dataclasses.asdict(setup), "interval": args.interval, "ratio": args.ratio, "flat": args.flat}
    record["taylor_order"] = args.taylor_order
    if predictor is not None:
        record["tokencache"] = {"policy": str(args.tokencache), "provenance": predictor.provenance}
    results: list[dict] = []

    def done(row: dict) -> None:
        if row["method"].startswith("oracle"):  # the oracle's own full-branch calls are analysis, not the method's cost
            row.update(
                speedup_wall=None, note="flops_ratio: the stalest row's, same keys; true-output calls not counted"
            )
        static = next((r for r in results if r["method"].startswith("static every")), None)
        row["gap_closed"] = gap_closed(row["psnr_db"], static["psnr_db"]) if static else 0.0
        results.append(row)
        write_results(args.json, record, results)

    bench = SideBySide(bundle, setup)
    rows = [row for row in rows_for(knobs, args.seed, predictor, branches) if only is None or row.method in only]
    measure_rows(bench, rows, quality_for(bundle), on_row=done)
    flops = {r["method"].replace("stalest", "oracle"): r["flops_ratio"] for r in results if "stalest" in r["method"]}
    for row in results:
        if row["method"] in flops:  # the stalest row with the same plan and keys
            row["flops_ratio"] = flops[row["method"]]
    if args.rank_samples:
        rank_setup = dataclasses.replace(setup, num_samples=args.rank_samples, batch_size=args.rank_samples)
        record[RANK_STEPS], record[RESELECTED_STEPS] = {}, {}
        probes = {"oracle": OracleProbe(**knobs)}
        scored = [(label, score) for label, score in SCORED if SCORE_SOURCE[score] in branches]
        probes.update({label: RankProbe(**{**knobs, "score": score}) for label, score in scored})
        for staleness in STALENESS if predictor is not None else ():
            ranked = dataclasses.replace(predictor, staleness=staleness)
            probes[PREDICTOR_ROWS[staleness]] = PredictorRankProbe(predictor=ranked, **knobs)
        for label, probe in probes.items():
            if only is not None and label not in only:
                continue
            SideBySide(bundle, rank_setup, progress=False).run(probe, label=f"rank {label}")
            for key, column in ((RANK_STEPS, 3), (RESELECTED_STEPS, 4)):
                record[key][label] = by_step(probe.log, column)
                values = " ".join(f"{s}:{r:+.2f}" for s, r in record[key][label].items())
                print(label, key, values or "-")
    write_results(args.json, record, results)
    print(format_table(results, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
