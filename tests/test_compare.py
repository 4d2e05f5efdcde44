"""The side-by-side benchmark: peers on real diffusers models (exact counts, model restored), knob tuning, fewer-step
rows, and `bench/compare.py --quick` end to end on the embedded teacher."""

import json

import pytest
import torch
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit, tiny_pixart

import infer
from bench import compare as bench_compare
from l2c import compare
from l2c.evaluate import SamplingSetup, SideBySide
from l2c.models import ModelBundle
from l2c.peers import DBCache, FBCache, TaylorSeer, taylorseer_compute_steps
from l2c.plan import Action

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
    steps = taylorseer_compute_steps(10, interval, warmup)
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


@pytest.mark.parametrize(("target", "computed"), [(0.5, 10), (0.75, 15), (0.35, 7)])
def test_taylorseer_knobs_hit_the_compute_point(target, computed):
    peer = compare.taylorseer_at(target, 20)
    assert len(taylorseer_compute_steps(20, peer.interval, peer.warmup)) == computed


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
    methods = {row["method"] for row in rows}
    assert {"static every-N", "ToCa", FBCache.method, TaylorSeer.method} <= methods
    assert not methods & {"L2C", "TokenCache"}  # no policy directories given: absent, and said so
    printed = capsys.readouterr().out
    assert "skipped L2C" in printed and "skipped TokenCache" in printed
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
                               notes)  # fmt: skip
    assert [row.setting for row in rows] == ["static:interval=2", "static:interval=3"]
    assert len(notes) == 1 and "nosuchkind" in notes[0]


def test_interval_presets_follow_the_config():
    assert compare.interval_presets("toca", compare.CompareConfig()) == [f"toca:interval={n}" for n in (2, 3, 4)]
    assert compare.interval_presets("toca", compare.CompareConfig(quick=True)) == ["toca:interval=2"]
    assert compare.static_presets(compare.CompareConfig(quick=True)) == ["static:interval=2"]


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
