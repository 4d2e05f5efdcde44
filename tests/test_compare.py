"""The side-by-side benchmark: peers on real diffusers models (exact counts, model restored), knob tuning, fewer-step
rows, and `bench/compare.py --quick` end to end on the embedded teacher."""

import json

import pytest
import torch
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit, tiny_pixart

import infer
from bench import compare as bench_compare
from l2c import compare
from l2c.adapters import model_spec
from l2c.evaluate import SamplingSetup, SideBySide
from l2c.metrics import psnr_db
from l2c.models import ModelBundle
from l2c.peers import DBCache, FBCache, TaylorSeer
from l2c.plan import Action
from l2c.policies import StaticPolicy
from l2c.policies.taylorseer import compute_steps

ROW_KEYS = {"method", "flops_ratio", "speedup_wall", "psnr_db", "ssim", "digit_accuracy", "fd_digits"}
BRANCHES = 2  # a DiT block's attn1 and ff


def instance_state(model):
    return {name: (set(vars(module)), set(module._modules)) for name, module in model.named_modules()}


def run_peer(model, peer, steps=10):
    latents, labels = dit_inputs(batch=2)
    with peer.apply(model, ddim_timesteps(steps)) as run:
        out, _ = ddim_sample(model, latents, labels, steps)
    return out, run.executed


def test_fbcache_at_threshold_zero_is_the_uncached_model_and_leaves_nothing_behind():
    model = tiny_dit(num_layers=3)
    before = instance_state(model)
    reference, _ = ddim_sample(model, *dit_inputs(batch=2), 10)
    out, executed = run_peer(model, FBCache(threshold=0.0))
    assert torch.equal(out, reference)
    assert executed == {Action.COMPUTE: 10 * 3 * BRANCHES, Action.REUSE: 0}
    assert instance_state(model) == before  # no hook registry, no patched forward left on any module


def test_fbcache_with_a_huge_threshold_runs_only_the_first_block_after_step_zero():
    model = tiny_dit(num_layers=3)
    out, executed = run_peer(model, FBCache(threshold=1e6))
    computed = 3 * BRANCHES + 9 * 1 * BRANCHES  # step 0 runs all 3 blocks; steps 1-9 only the first block
    assert executed == {Action.COMPUTE: computed, Action.REUSE: 10 * 3 * BRANCHES - computed}
    reference, _ = ddim_sample(model, *dit_inputs(batch=2), 10)
    assert not torch.equal(out, reference)


@pytest.mark.parametrize(("interval", "warmup"), [(2, 3), (3, 1)])
def test_taylorseer_computes_exactly_the_steps_the_rule_says(interval, warmup):
    model = tiny_dit(num_layers=2)
    steps = compute_steps(10, interval, warmup)
    assert steps == {(2, 3): [0, 1, 2, 4, 6, 8], (3, 1): [0, 2, 5, 8]}[(interval, warmup)]
    _, executed = run_peer(model, TaylorSeer(interval=interval, warmup=warmup))
    assert executed[Action.COMPUTE] == len(steps) * 2 * BRANCHES
    assert executed[Action.REUSE] == (10 - len(steps)) * 2 * BRANCHES


def test_dbcache_counts_warmup_and_front_blocks_and_restores_the_model():
    pytest.importorskip("cache_dit")
    model = tiny_dit(num_layers=4)
    before = instance_state(model)
    reference, _ = ddim_sample(model, *dit_inputs(batch=2), 10)
    out, executed = run_peer(model, DBCache(threshold=0.0))
    assert torch.equal(out, reference) and executed[Action.REUSE] == 0
    _, executed = run_peer(model, DBCache(threshold=1e6, front=1, warmup=2))
    assert executed[Action.COMPUTE] == 2 * 4 * BRANCHES + 8 * 1 * BRANCHES  # 2 warm-up steps, then block 0 only
    assert instance_state(model) == before
    after, _ = ddim_sample(model, *dit_inputs(batch=2), 10)
    assert torch.equal(after, reference)


def test_peers_say_why_they_cannot_run_and_need_timesteps():
    reason = DBCache.unavailable(tiny_pixart())
    assert reason is not None and ("PixArtTransformer2DModel" in reason or "not installed" in reason)
    assert FBCache.unavailable(tiny_pixart()) is None  # BasicTransformerBlock is in diffusers' registry
    with pytest.raises(ValueError, match="timesteps"):
        FBCache().apply(tiny_dit())


def test_threshold_bisection_finds_the_known_compute_point():
    # A made-up peer whose FLOPs ratio is 1 / (1 + threshold): ratio 0.5 at threshold 1.
    peer, ratio = compare.tune_threshold(lambda t: FBCache(threshold=t), 0.5, lambda p: 1 / (1 + p.threshold))
    assert peer.threshold == pytest.approx(1.0, rel=0.05)
    assert ratio == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(("target", "computed"), [(0.5, 10), (0.75, 15), (0.35, 7), (0.25, 5), (0.2, 4)])
def test_untuned_taylorseer_hits_the_compute_point_at_the_warmup_closest_to_the_one_asked(target, computed):
    peer = compare.taylorseer_at(target, 20, order=2, warmup=1)
    assert len(compute_steps(20, peer.interval, peer.warmup)) == computed
    assert peer.order == 2 and peer.warmup == {0.75: 10}.get(target, 1)
    default = compare.taylorseer_at(target, 20)  # order 1, the warm-up nearest diffusers' 3
    assert len(compute_steps(20, default.interval, default.warmup)) == computed and default.order == 1


def test_one_static_every_n_per_compute_point():
    expected = ["static:interval=2,first_full=10", "static:interval=2", "static:interval=3", "static:interval=4",
                "static:interval=5"]  # fmt: skip
    assert compare.static_presets(compare.CompareConfig()) == expected  # 15, 10, 7, 5 and 4 of 20 steps computed
    assert compare.static_presets(compare.CompareConfig(targets=(0.5, 0.52, 0.35))) == expected[1:3]  # no duplicate


def test_the_taylorseer_grid_is_every_distinct_schedule_at_the_point_at_orders_one_and_two():
    grid = compare.taylorseer_grid(0.5, 10)
    knobs = [(2, 1), (3, 2), (3, 3), (4, 3), (5, 3), (5, 4)]  # (interval, warm-up): 5 of 10 steps each
    assert grid == [compare.SeerSetting(n, order, w) for n, w in knobs for order in (1, 2)]
    assert len({tuple(s.computed_steps(10)) for s in grid}) == len(knobs)  # no schedule twice
    assert [len(compare.taylorseer_grid(t, 20)) for t in (0.75, 0.5, 0.35, 0.25, 0.2)] == [14, 22, 30, 26, 24]
    # Nothing within 0.03 of 0.07 at 10 steps: the closest share, 0.2 (steps 0 and 2: warm-up 1, interval ≥ 8).
    assert compare.taylorseer_grid(0.07, 10, orders=(1,)) == [compare.SeerSetting(8, 1, 1)]


def test_calibration_tuning_picks_the_setting_closest_to_the_uncached_samples():
    bundle = ModelBundle("tiny", tiny_dit(num_layers=2), {"num_train_timesteps": 1000})
    bench = SideBySide(bundle, SamplingSetup(steps=8, num_samples=2, batch_size=2, guidance_scale=1.0), progress=False)
    reference = bench.images(None)
    grid = [compare.SeerSetting(4, 1, 1), compare.SeerSetting(2, 2, 1), compare.SeerSetting(8, 1, 1)]
    tuned = compare.tune_on_calibration(grid, compare.SeerSetting.native, bench, reference)
    scores = [psnr_db(bench.images(setting.native()), reference) for setting in grid]
    assert tuned.setting == grid[scores.index(max(scores))] and tuned.psnr_db == max(scores)
    assert tuned.grid_size == 3 and tuned.wall_s > 0
    assert "chosen of 3 settings" in tuned.note(bench.setup) and f"{max(scores):.2f} dB" in tuned.note(bench.setup)


def _row(method, flops_ratio, psnr, accuracy=0.9, fd=2.0):
    return {"method": method, "setting": "s", "flops_ratio": flops_ratio, "psnr_db": psnr, "digit_accuracy": accuracy,
            "digit_accuracy_uncached": 0.9, "fd_digits": fd}  # fmt: skip


def test_margins_compare_the_best_learned_and_the_best_other_row_near_each_point():
    rows = [
        _row("uncached", 1.0, 100.0),
        _row("L2C", 0.51, 45.0, accuracy=0.895, fd=2.9),
        _row("L2C forecast, Taylor weights", 0.5, 44.0),
        _row("TaylorSeer (native)", 0.5, 41.5, fd=2.0),
        _row("static every-N", 0.47, 41.9, fd=5.0),  # the best other row: its fd is the one compared
        _row("TaylorSeer (native)", 0.56, 60.0),  # 0.06 away from 0.5: not at the point
        _row("L2C", 0.35, 30.0, accuracy=0.85),
        _row("static every-N", 0.35, 29.0),
        _row("FBCache (diffusers)", 0.2, 20.0),
    ]
    at_half, at_35, at_20 = compare.margins(rows, (0.5, 0.35, 0.2))
    assert at_half["learned"]["psnr_db"] == 45.0 and at_half["best_other"]["method"] == "static every-N"
    assert at_half["psnr_margin_db"] == pytest.approx(3.1)
    assert (at_half["accuracy_ok"], at_half["fd_ok"], at_half["holds"]) == (True, True, True)
    assert at_35["psnr_margin_db"] == pytest.approx(1.0)
    assert (at_35["accuracy_ok"], at_35["holds"]) == (False, False)  # 5 points of digit accuracy lost
    assert at_20["learned"] is None and at_20["holds"] is None and at_20["psnr_margin_db"] is None
    assert compare.margins([_row("L2C", 0.5, 40.0, fd=3.1), _row("ToCa", 0.5, 30.0)], (0.5,))[0]["fd_ok"] is False


def test_the_rows_beside_a_sampled_policy_are_at_its_compute_untuned():
    assert compare.beside_presets(0.508, 20) == [
        ("static every-N", "static:interval=2"),
        (compare.NATIVE_TAYLORSEER, "taylorseer:interval=2,order=2,warmup=1,rule=taylor"),
    ]
    static, seer = compare.beside_presets(0.3, 20)  # 6 of 20 steps computed by both
    assert static[1] == "static:interval=4,first_full=2"
    assert seer[1] == "taylorseer:interval=4,order=2,warmup=1,rule=taylor"


def test_l2c_labels_name_the_method_and_always_contain_l2c():
    assert compare.parse_l2c_label("L2C forecast, Taylor weights=0.5=out/a") == ("L2C forecast, Taylor weights",
                                                                              "0.5=out/a")  # fmt: skip
    assert compare.parse_l2c_label("compute/reuse only=out/b") == ("L2C compute/reuse only", "out/b")
    for bad in ("out/b", "=out/b", "label="):
        with pytest.raises(ValueError, match="LABEL=DIR"):
            compare.parse_l2c_label(bad)


def test_fewer_steps_row_counts_half_the_flops_and_needs_a_label():
    bundle = ModelBundle("tiny", tiny_dit(num_layers=2), {"num_train_timesteps": 1000})
    bench = SideBySide(bundle, SamplingSetup(steps=8, num_samples=2, batch_size=2, guidance_scale=1.0), progress=False)
    run = bench.run(None, label="4 of 8 steps", steps=4)
    assert run.flops / run.flops_uncached == 0.5  # every step runs the same transformer; the scheduler has no matmuls
    assert run.executed == {} and run.plan is None
    with pytest.raises(ValueError, match="steps"):
        bench.run(None)


def test_quick_compare_writes_rows_notes_and_the_pareto_plot(tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert bench_compare.main(["--quick", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    uncached = [row for row in rows if row["method"] == "uncached"]
    assert len(uncached) == 1 and uncached[0]["flops_ratio"] == 1.0 and uncached[0]["psnr_db"] == 100.0
    fewer = [row for row in rows if row["method"] == "fewer steps"]
    assert [row["flops_ratio"] for row in fewer] == [0.5]  # 5 of the quick run's 10 steps
    methods = [row["method"] for row in rows]
    assert {"static every-N", "ToCa", FBCache.method, TaylorSeer.method, compare.NATIVE_TAYLORSEER} <= set(methods)
    for method in ("static every-N", TaylorSeer.method, compare.NATIVE_TAYLORSEER):
        assert methods.count(method) == 1  # one row per compute point (one point in a quick run)
    seer = next(row for row in rows if row["method"] == compare.NATIVE_TAYLORSEER)
    assert seer["flops_ratio"] == pytest.approx(0.5, abs=0.03) and "chosen of 12 settings" in seer["note"]
    # HiCache: tuned on the same grid, TaylorSeer's schedules, its own forecast (so other samples at the same FLOPs).
    hicache = next(row for row in rows if row["method"] == compare.HICACHE)
    assert hicache["setting"].endswith(",rule=hermite,scale=0.5") and "chosen of 12 settings" in hicache["note"]
    assert hicache["executed"]["forecast"] > 0 and hicache["flops_ratio"] == pytest.approx(0.5, abs=0.03)
    # ToCa with its unrecomputed tokens forecast: the same plan (so the same FLOPs), forecasting where ToCa reuses.
    toca, filled = (next(row for row in rows if row["method"] == m) for m in ("ToCa", "ToCa + TaylorSeer forecast"))
    assert filled["setting"] == "toca:interval=2,taylor_order=1"
    assert filled["flops_ratio"] == pytest.approx(toca["flops_ratio"], rel=1e-6)
    assert filled["executed"]["forecast"] == toca["executed"]["reuse"] > 0 and "reuse" not in filled["executed"]
    assert filled["executed"]["partial"] == toca["executed"]["partial"] > 0
    assert filled["psnr_db"] != toca["psnr_db"]
    assert not set(methods) & {"L2C", "TokenCache"}  # no policy directories given: absent, and said so
    printed = capsys.readouterr().out
    assert "skipped L2C" in printed and "skipped TokenCache" in printed and "margin_db" in printed
    margins = json.loads(out.read_text())["margins"]
    assert [m["compute_point"] for m in margins] == [0.5] and margins[0]["learned"] is None
    assert all(0 < row["flops_ratio"] < 1 for row in rows if row["method"] != "uncached")
    assert out.with_suffix(".png").stat().st_size > 0


def test_infer_compare_is_the_same_command():
    args = infer.build_parser().parse_args(["compare", "--quick", "--json", "x.json", "--l2c", "0.5=dir"])
    config = compare.config_from_args(args)
    assert (config.quick, config.steps, config.num_samples, config.l2c) == (True, 10, 4, ["0.5=dir"])
    assert infer.cmd_compare is compare.run_from_args


def test_only_keeps_the_named_methods_and_the_uncached_row():
    config = compare.CompareConfig(only=("tokencache", "ToCa"))
    assert config.wants("TokenCache") and config.wants("ToCa") and not config.wants("DuCa")
    assert compare.CompareConfig().wants("DuCa")  # no filter: every method


def test_a_preset_that_fails_is_noted_and_the_rows_built_before_and_after_it_are_kept():
    notes = []
    rows = compare.preset_rows("static every-N", ["static:interval=2", "nosuchkind:interval=2", "static:interval=3"],
                               notes, model_spec(tiny_dit()))  # fmt: skip
    assert [row.setting for row in rows] == ["static:interval=2", "static:interval=3"]
    assert len(notes) == 1 and "nosuchkind" in notes[0]


def test_toca_and_duca_rows_come_with_their_forecast_variants_at_the_same_intervals():
    presets = dict(compare.tokenwise_presets(compare.CompareConfig()))
    assert list(presets) == ["ToCa", "ToCa + TaylorSeer forecast", "DuCa", "DuCa + TaylorSeer forecast"]
    for kind, method in (("toca", "ToCa"), ("duca", "DuCa")):
        assert presets[method] == [f"{kind}:interval={n}" for n in (2, 3, 4)]
        assert presets[f"{method} + TaylorSeer forecast"] == [f"{kind}:interval={n},taylor_order=1" for n in (2, 3, 4)]
    assert compare.tokenwise_presets(compare.CompareConfig(quick=True)) == [
        ("ToCa", ["toca:interval=2"]),
        ("ToCa + TaylorSeer forecast", ["toca:interval=2,taylor_order=1"]),
    ]


def test_interval_presets_follow_the_config():
    assert compare.interval_presets("toca", compare.CompareConfig()) == [f"toca:interval={n}" for n in (2, 3, 4)]
    assert compare.interval_presets("toca", compare.CompareConfig(quick=True)) == ["toca:interval=2"]
    assert compare.static_presets(compare.CompareConfig(quick=True)) == ["static:interval=2"]
    assert compare.CompareConfig().compute_points == (0.75, 0.5, 0.35, 0.25, 0.2)


def test_budget_dir_parsing_and_abba_order():
    from l2c.rebudget import parse_budget_dir
    from l2c.timing import Interleaved

    assert parse_budget_dir("0.5=out/a=b") == (0.5, "out/a=b")
    assert parse_budget_dir("out/l2c-r3") == (None, "out/l2c-r3")
    order = []
    timer = Interleaved("abba", warmup=1)
    for _ in range(3):
        timer.round({"a": lambda: order.append("a"), "b": lambda: order.append("b")})
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert len(timer.seconds["a"]) == 2  # the warm-up round is not kept


@pytest.fixture(scope="module")
def forecast_policy(tmp_path_factory):
    """A forecast router exported by `ForecastRouterTrainer` on the embedded teacher (10 steps, one training step)."""
    import warnings

    from predictors.l2c_trainer import ForecastRouterTrainer

    module = ForecastRouterTrainer(teacher="embedded:digits", steps=10, refresh_interval=10, export_budget=0.5,
                                   init="even")  # fmt: skip
    module.on_fit_start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.training_step((torch.tensor([3, 7]), torch.tensor([1, 2])), 0).backward()
    module.on_fit_end()
    directory = tmp_path_factory.mktemp("forecast") / "policy"
    module.export(directory)
    return directory


def test_exported_forecast_routers_run_as_labelled_l2c_rows(forecast_policy, tmp_path):
    out = tmp_path / "compare.json"
    args = ["--quick", "--json", str(out), "--no-progress", "--only", "L2C", "static every-N",
            "L2C forecast, Taylor weights", "--l2c", str(forecast_policy),
            "--l2c-label", f"L2C forecast, Taylor weights=0.3={forecast_policy}"]  # fmt: skip
    assert bench_compare.main(args) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"uncached", "static every-N", "L2C", "L2C forecast, Taylor weights"}
    assert rows["L2C"]["executed"]["forecast"] > 0 and "forecast" in rows["L2C"]["setting"]
    assert rows["L2C forecast, Taylor weights"]["flops_ratio"] < rows["L2C"]["flops_ratio"]  # re-budgeted to 0.3
    (at_half,) = result["margins"]
    assert at_half["best_other"]["method"] == "static every-N"
    expected = rows["L2C"]["psnr_db"] - rows["static every-N"]["psnr_db"]
    assert at_half["learned"]["method"] == "L2C" and at_half["psnr_margin_db"] == pytest.approx(expected)


def test_the_token_budget_is_solved_for_the_point_through_a_curved_flops_line():
    calls = []

    def flops(budget):
        calls.append(budget)
        return 0.2 + 0.5 * budget**2  # convex: the line through the probes overshoots, secant steps correct it

    budget = compare.budget_at(flops, 0.45)
    assert budget is not None and abs(flops(budget) - 0.45) <= compare.SEER_TOLERANCE
    assert calls[:2] == list(compare.TOKENCACHE_PROBES) and len(calls) <= 2 + compare.TOKENCACHE_SECANT_STEPS + 1
    assert compare.budget_at(lambda b: 0.3, 0.5) is None  # the budget does not move the FLOPs
    assert compare.budget_at(lambda b: 0.2 + 0.1 * b, 0.9) is None  # no budget in (0, 1] gets there


def test_reference_once_samples_the_uncached_model_once_and_measures_every_row_as_side_by_side_does():
    bundle = ModelBundle("tiny", tiny_dit(num_layers=2), {"num_train_timesteps": 1000})
    setup = SamplingSetup(steps=4, num_samples=3, batch_size=2, guidance_scale=1.0)
    policies = [StaticPolicy(interval=2), StaticPolicy(interval=3)]
    calls = {}
    runs = {}
    for once in (False, True):
        bench = SideBySide(bundle, setup, progress=False, reference_once=once)
        calls[once] = 0

        def count(*_, once=once):
            calls[once] += 1

        handle = bundle.transformer.register_forward_pre_hook(count)
        try:
            runs[once] = [bench.run(policy) for policy in policies]
        finally:
            handle.remove()
    # Each run: 4 steps × 2 batches for the policy, and as much again for the uncached side unless kept; then the
    # FLOPs count: the policy's (8 calls) every run, the uncached model's (8) once.
    counting = 2 * 8 + 8
    assert calls[False] == 2 * (8 + 8) + counting and calls[True] == 8 + 8 + 8 + counting
    for plain, kept in zip(runs[False], runs[True], strict=True):
        assert torch.equal(plain.images, kept.images) and torch.equal(plain.reference, kept.reference)
        assert kept.wall_s_uncached > 0
    assert runs[True][0].wall_s_uncached == runs[True][1].wall_s_uncached  # the kept batches' own time
