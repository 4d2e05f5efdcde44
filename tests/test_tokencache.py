"""TokenCache: adaptive block ratios, TPRR, the predictor, the policy on a real tiny DiT, the artifact, the trainer."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from l2c_testing import ComputeCounter, FixedPlanPolicy, ddim_timesteps, dit_inputs, tiny_dit
from safetensors.torch import load_file, save_file

import l2c
from data.conditions import ClassConditionDataModule
from l2c.hooks import on_first_block
from l2c.metrics import count_flops
from l2c.policies.tokencache import (
    SIGNAL,
    TokenCacheCalibration,
    TokenCachePolicy,
    accumulated_change,
    adaptive_block_ratios,
    choose_tprr,
    single_interval,
    two_phase_full_steps,
)
from l2c.policy_io import PolicyFormatError
from l2c.token_importance import TokenImportancePredictor
from predictors.tokencache_trainer import TokenCacheTrainer, change_rate

NUM_TOKENS = 16


# -- adaptive block selection ----------------------------------------------------------------------------------------
def test_block_ratios_split_the_global_top_share_by_block():
    # 4 bins over [0, 1]; block 0 holds the high scores, block 1 the low ones.
    histogram = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 0.0, 0.0]])
    assert adaptive_block_ratios(histogram, 0.5, 0.0).tolist() == [1.0, 0.0]
    assert adaptive_block_ratios(histogram, 0.25, 0.0).tolist() == [0.5, 0.0]


def test_the_cut_bin_is_shared_in_proportion_and_the_floor_caches_blocks_whole():
    histogram = torch.tensor([[0.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    # want 4 of 8: bin 3 gives 3, bin 2 holds 2 (one per block) and gives half of each
    torch.testing.assert_close(adaptive_block_ratios(histogram, 0.5, 0.0), torch.tensor([0.625, 0.375]))
    torch.testing.assert_close(adaptive_block_ratios(histogram, 0.5, 0.4), torch.tensor([0.625, 0.0]))


# -- TPRR ------------------------------------------------------------------------------------------------------------
def test_two_phase_full_steps_and_drift():
    full = two_phase_full_steps(10, boundary=4, first=2, second=3)
    assert full.nonzero().flatten().tolist() == [0, 2, 4, 7]
    curve = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert accumulated_change(full, curve).tolist() == [0, 1, 0, 3, 0, 5, 11, 0, 8, 17]


def test_tprr_gives_the_late_changing_phase_the_shorter_interval():
    curve = torch.tensor([0.0, 1, 1, 1, 1, 4, 4, 4])  # the last three steps change 4× as much
    schedule = choose_tprr(curve, max_full=4)
    assert schedule.full_steps(8).nonzero().flatten().tolist() == [0, 3, 5, 7]  # worst drift 4, total 8
    flipped = choose_tprr(torch.tensor([0.0, 4, 4, 4, 1, 1, 1, 1]), max_full=4)
    assert flipped.full_steps(8).nonzero().flatten().tolist() == [0, 2, 3, 6]  # early phase: interval 2, late: 3


def test_single_interval_ablation_fits_the_full_step_count():
    assert single_interval(20, 6) == 4  # 0, 4, 8, 12, 16: 5 full steps (interval 3 would need 7)
    assert single_interval(20, 20) == 1


# -- the predictor ---------------------------------------------------------------------------------------------------
def test_predictor_starts_from_the_teachers_first_block_and_scores_every_block_and_token():
    model = tiny_dit()
    predictor = TokenImportancePredictor.from_teacher(model, ff_inner_dim=16, init_score=0.8)
    first = model.transformer_blocks[0]
    assert torch.equal(predictor.block.attn1.to_q.weight, first.attn1.to_q.weight)
    assert predictor.block.attn1.to_q.weight.data_ptr() != first.attn1.to_q.weight.data_ptr()
    assert torch.equal(predictor.block.ff.net[0].proj.weight, first.ff.net[0].proj.weight[:16])
    assert torch.equal(predictor.block.ff.net[2].weight, first.ff.net[2].weight[:, :16])
    assert predictor.ff_inner_dim == 16
    seen = {}
    handle = on_first_block(model, lambda a, k: seen.setdefault("scores", predictor(a, k)))
    latents, labels = dit_inputs(batch=3)
    with torch.no_grad():
        model(latents, timestep=torch.full((3,), 500), class_labels=labels)
    handle.remove()
    assert seen["scores"].shape == (3, 2, NUM_TOKENS)
    torch.testing.assert_close(seen["scores"], torch.full((3, 2, NUM_TOKENS), 0.8))


# -- the policy on a tiny DiT ----------------------------------------------------------------------------------------
def tiny_policy(model, steps: int = 6, **overrides) -> TokenCachePolicy:
    """Block 0 holds the high scores (ratio 0.5 at budget 0.25), block 1 the low ones (under the floor)."""
    predictor = TokenImportancePredictor.from_teacher(model, ff_inner_dim=16)
    torch.manual_seed(1)
    torch.nn.init.normal_(predictor.head.weight, std=0.5)  # scores that differ by token
    histogram = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 0.0, 0.0]])
    error = torch.tensor([0.0, 1, 1, 4, 4, 4][:steps])
    calibration = TokenCacheCalibration(histogram, torch.full((steps,), 0.5), error)
    params = dict(token_budget=0.25, floor=0.1, full_steps=3, ff_inner_dim=16, **overrides)
    state = {k: v.clone() for k, v in predictor.state_dict().items()}
    policy = TokenCachePolicy(**params, predictor_state=state, calibration=calibration)
    return policy.bind(model, ddim_timesteps(steps), "DDIMScheduler")


def test_plan_full_steps_partial_block_and_floored_block():
    model = tiny_dit()
    policy = tiny_policy(model)
    assert policy.block_ratios().tolist() == [0.5, 0.0]
    full = policy.step_types(6).nonzero().flatten().tolist()
    assert full == [0, 3, 5]  # worst drift 4 (step 4), total 1 + 2 + 4: less than 0, 2, 4 (1 + 4 + 4)
    plan = policy.plan_for(l2c.model_spec(model), ddim_timesteps(6))
    cache = [1, 2, 4]
    assert (plan.actions[full] == l2c.Action.COMPUTE).all()
    assert (plan.actions[cache, 0] == l2c.Action.PARTIAL).all() and (plan.token_ratio[cache, 0] == 0.5).all()
    assert (plan.actions[cache, 1] == l2c.Action.REUSE).all()


@pytest.mark.parametrize("staleness", ["none", "age"])
def test_cache_steps_recompute_the_predictors_top_tokens_and_count_its_flops(staleness):
    model = tiny_dit()
    policy = tiny_policy(model, staleness=staleness, rescore="step")
    latents, labels = dit_inputs(batch=2)
    timesteps = ddim_timesteps(6)
    counter = ComputeCounter(model)
    chosen = []
    ages_at_selection = {}
    with policy.apply(model, timesteps=timesteps) as runtime, torch.no_grad():
        runtime.selector = record(runtime.selector, chosen, ages_at_selection)
        for t in timesteps:
            model(latents, timestep=t.expand(2), class_labels=labels)
    counter.remove()
    computed = [(block, name, n) for block, name, n in counter.tokens]
    # full steps 0, 3, 5: both blocks, all 16 tokens; cache steps 1, 2, 4: block 0 only, 8 tokens; block 1 reused.
    assert computed.count((0, "ff", 8)) == 3 and computed.count((1, "ff", 16)) == 3
    assert not any(block == 1 and n != 16 for block, _, n in computed)
    # The selected tokens are the top-8 of the predictor's block-0 score on that step's own input ("none"), or of
    # score × steps since the token was computed ("age"; the store's age at selection is that count − 1).
    predictor = policy.build_predictor(model)
    for request, index in chosen:
        scores = request.state.signals[SIGNAL][:, 0]
        age = ages_at_selection[(request.step, request.branch)]
        ranked = scores * (age + 1) if staleness == "age" else scores
        assert torch.equal(index, torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :8])
    assert len(chosen) == 3 * 2  # 3 cache steps × (attn1, ff) of block 0
    step_2 = ages_at_selection[(2, "ff")]  # after partial step 1: its 8 tokens have age 0, the others 1
    assert sorted(step_2.flatten().tolist()) == [0] * 16 + [1] * 16
    reselected = [int((step_2.gather(1, index) == 0).sum()) for request, index in chosen if request.step == 2]
    if staleness == "age":  # scores are in (0, 1): a stale token's doubled score beats every fresh one
        assert reselected == [0, 0]
    # FLOPs: the same plan without the predictor costs exactly the predictor's FLOPs × 3 scored steps less.
    plan_only = FixedPlanPolicy(lambda spec, n: policy.build_plan(spec, n))
    plan_only.partial_keys = "cached"

    def run(p):
        with p.apply(model, timesteps=timesteps), torch.no_grad():
            for t in timesteps:
                model(latents, timestep=t.expand(2), class_labels=labels)

    _, with_predictor = count_flops(lambda: run(policy))
    _, without = count_flops(lambda: run(plan_only))
    grab = {}
    handle = on_first_block(model, lambda a, k: grab.setdefault("call", (a, k)))
    with torch.no_grad():
        model(latents, timestep=timesteps[1].expand(2), class_labels=labels)
    handle.remove()
    _, one_call = count_flops(lambda: predictor(*grab["call"]))
    assert one_call > 0 and with_predictor - without == 3 * one_call


def test_rescore_interval_runs_the_predictor_once_per_cache_interval_and_ranks_those_scores_by_age():
    model = tiny_dit()
    latents, labels = dit_inputs(batch=2)
    timesteps = ddim_timesteps(6)
    seen, flops = {}, {}
    for rescore in ("step", "interval"):
        policy = tiny_policy(model, rescore=rescore)  # full steps 0, 3, 5; cache steps 1, 2, 4

        def run(policy=policy, rescore=rescore):
            with policy.apply(model, timesteps=timesteps) as runtime, torch.no_grad():
                selector = runtime.selector

                def select(request):
                    scores = request.state.signals[SIGNAL][:, request.block].clone()
                    index = selector(request)
                    ranked = scores * (request.store.age + 1)
                    assert torch.equal(index, torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :8])
                    seen.setdefault(rescore, {})[request.step] = scores
                    return index

                runtime.selector = select
                for t in timesteps:
                    model(latents, timestep=t.expand(2), class_labels=labels)

        _, flops[rescore] = count_flops(run)
    every, interval = seen["step"], seen["interval"]
    assert sorted(every) == sorted(interval) == [1, 2, 4]
    assert not torch.equal(every[2], every[1])  # each step's own input scores differently...
    assert torch.equal(interval[2], every[1])  # ...but "interval" ranks step 1's scores again on step 2
    assert torch.equal(interval[1], every[1]) and torch.equal(interval[4], every[4])  # rescored after each full step
    grab = {}
    handle = on_first_block(model, lambda a, k: grab.setdefault("call", (a, k)))
    with torch.no_grad():
        model(latents, timestep=timesteps[2].expand(2), class_labels=labels)
    handle.remove()
    _, one_call = count_flops(lambda: policy.build_predictor(model)(*grab["call"]))
    assert one_call > 0 and flops["step"] - flops["interval"] == one_call  # step 2's predictor call, no other


def record(selector, chosen: list, ages: dict | None = None):
    def wrapped(request):
        if ages is not None:  # the store's ages as the selector saw them (the store is updated after selection)
            ages[(request.step, request.branch)] = request.store.age.clone()
        index = selector(request)
        chosen.append((request, index))
        return index

    return wrapped


def test_round_trip_keeps_tables_and_weights_and_refuses_tampering(tmp_path):
    model = tiny_dit()
    policy = tiny_policy(model)
    policy.save_pretrained(tmp_path / "tc")
    tensors = load_file(str(tmp_path / "tc" / "policy.safetensors"))
    assert tensors["tprr.step_type"].tolist() == [1, 0, 0, 1, 0, 1]
    assert tensors["tokencache.block_ratio"].tolist() == [0.5, 0.0]
    loaded = l2c.load_policy(tmp_path / "tc")
    assert isinstance(loaded, TokenCachePolicy) and loaded.partial_keys == "cached"
    assert all(torch.equal(loaded.predictor_state[k], v) for k, v in policy.predictor_state.items())
    spec = l2c.model_spec(model)
    assert torch.equal(
        loaded.plan_for(spec, ddim_timesteps(6)).actions, policy.plan_for(spec, ddim_timesteps(6)).actions
    )
    assert loaded.staleness == policy.staleness == "age"
    # A directory saved before `staleness` and `rescore` existed loads with the rules it was saved with: the score
    # alone, the predictor run on every cache step.
    shutil.copytree(tmp_path / "tc", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["params"]["staleness"], config["params"]["rescore"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = l2c.load_policy(tmp_path / "old")
    assert (old.staleness, old.rescore) == ("none", "step") and policy.rescore == "interval"
    shutil.copytree(tmp_path / "tc", tmp_path / "bad")
    tensors["tprr.step_type"] = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.int8)
    save_file(tensors, str(tmp_path / "bad" / "policy.safetensors"))
    with pytest.raises(PolicyFormatError, match="tprr.step_type"):
        l2c.load_policy(tmp_path / "bad")


def test_ablation_switches_change_only_their_table():
    policy = tiny_policy(tiny_dit())
    uniform = TokenCachePolicy(**{**policy.params(), "adaptive": False}, calibration=policy.calibration)
    assert uniform.block_ratios().tolist() == [0.25, 0.25]  # the adaptive ratios' mean, every block
    single = TokenCachePolicy(**{**policy.params(), "tprr": False}, calibration=policy.calibration)
    assert single.step_types(6).nonzero().flatten().tolist() == [0, 2, 4]  # one interval: 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"token_budget": 1.5}, "token_budget"),
        ({"full_steps": 0}, "full_steps"),
        ({"tprr_signal": "x"}, "tprr_signal"),
        ({"staleness": "steps"}, "staleness"),
        ({"rescore": "always"}, "rescore"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenCachePolicy(**kwargs)


def test_a_preset_without_weights_explains_what_is_missing():
    with pytest.raises(ValueError, match="no predictor weights.*policy directory"):
        l2c.load_policy("tokencache").apply(tiny_dit(), timesteps=ddim_timesteps(4))


# -- the trainer -----------------------------------------------------------------------------------------------------
TEACHER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
    num_embeds_ada_norm=10,
)  # fmt: skip


def save_tiny_teacher(directory: Path) -> None:
    """A seeded tiny DiT teacher directory (transformer + scheduler), as the trainers load one."""
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(directory / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(directory / "scheduler")


def quiet_trainer(max_steps: int, root: Path) -> L.Trainer:
    """A CPU Lightning trainer with no logger, bars, checkpoints or summary."""
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokencache")
    teacher = root / "teacher"
    save_tiny_teacher(teacher)
    module = TokenCacheTrainer(
        teacher=str(teacher), steps=4, guidance_scale=2.0, ff_inner_dim=16, lr=0.01, objective="blend",
        export_dir=str(root / "policy"),
        export_full_steps=2, export_token_budget=0.5, calibration_samples=4,
    )  # fmt: skip
    before_teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    before_head = module.predictor.head.weight.detach().clone()
    trainer = quiet_trainer(3, root)
    L.seed_everything(0, verbose=False)
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4, seed=100))
    return SimpleNamespace(module=module, trainer=trainer, root=root, teacher=teacher, head=before_head,
                           before_teacher=before_teacher)  # fmt: skip


def test_fit_trains_the_predictor_only_and_leaves_the_teacher_alone(fitted):
    module = fitted.module
    assert fitted.trainer.global_step == 3
    assert not torch.equal(module.predictor.head.weight.detach(), fitted.head)
    after = module.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fitted.before_teacher.items())
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    (optimizer,) = fitted.trainer.optimizers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.predictor.parameters()}
    assert all(name.startswith("predictor.") for name, _ in module.named_parameters())
    assert not any(hasattr(m, "_diffusers_hook") for m in module.teacher.modules()), "runtime removed at fit end"


def test_the_export_loads_and_samples_with_infer(fitted, tmp_path):
    import infer

    policy = l2c.load_policy(fitted.root / "policy")
    assert isinstance(policy, TokenCachePolicy)
    config = json.loads((fitted.root / "policy" / "config.json").read_text())
    assert config["provenance"]["trainer"] == "tokencache" and config["provenance"]["global_steps"] == 3
    assert int(policy.step_types(4).sum()) <= 2
    calibration = policy.calibration
    assert calibration.score_histogram.sum() == 3 * 4 * 2 * NUM_TOKENS * 2  # steps 1-3 × (4 samples × 2 halves)
    assert calibration.step_error[0] == 0 and (calibration.step_error[1:] > 0).all()
    out = tmp_path / "report"
    args = ["sample", "--model", str(fitted.teacher), "--policy", str(fitted.root / "policy"), "--steps", "4"]
    args += ["--scheduler", "ddim", "--num-samples", "4", "--out", str(out), "--no-progress", "--guidance-scale", "2"]
    assert infer.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["executed"].get("partial", 0) > 0 and report["flops_ratio"] < 1.0


def test_a_checkpoint_exports_the_same_policy_and_a_refusal_is_one_line(fitted, tmp_path, capsys):
    from predictors import tokencache_trainer

    checkpoint = tmp_path / "last.ckpt"
    fitted.trainer.save_checkpoint(checkpoint)
    assert tokencache_trainer.main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "again")]) == 0
    first, again = (load_file(root / "policy.safetensors") for root in (fitted.root / "policy", tmp_path / "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    capsys.readouterr()
    refused = tmp_path / "refused"
    for argv, message in (
        (["--ckpt", str(tmp_path / "missing.ckpt")], "missing.ckpt: no such file"),
        (["--ckpt", str(checkpoint), "--export-flops", "0.05"], "export_flops"),
    ):
        with pytest.raises(SystemExit) as stop:
            tokencache_trainer.main([*argv, "--out", str(refused)])
        error = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and message in error and "Traceback" not in error, error
        assert not refused.exists()


# -- the rate objective ------------------------------------------------------------------------------------------------
def test_change_rate_is_the_per_step_change_over_the_samples_mean_output_norm():
    later = {
        (0, "attn1"): torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]),
        (0, "ff"): torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]),
        (1, "ff"): torch.tensor([[[0.0, 2.0], [0.0, 0.0]]]),
    }
    earlier = {key: torch.zeros_like(value) for key, value in later.items()}
    earlier[(0, "attn1")] = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])  # moved 4 at token 0
    # output norms per (block, token): block 0: 5 + 1, 0 + 1; block 1: 2, 0 → mean 9 / 4. Change: block 0: 4 + 1,
    # 0 + 1; block 1: 2, 0 (its earlier output is 0).
    rate = change_rate(earlier, later, gap=2)
    torch.testing.assert_close(rate, torch.tensor([[[5.0, 1.0], [2.0, 0.0]]]) / 2 / 2.25)


def test_rate_objective_fits_scores_to_measured_change_and_exports_age_ranking(tmp_path):
    teacher = tmp_path / "teacher"
    save_tiny_teacher(teacher)
    module = TokenCacheTrainer(
        teacher=str(teacher), steps=4, guidance_scale=2.0, ff_inner_dim=16, lr=0.01, objective="rate",
        init_score=0.05, export_dir=str(tmp_path / "policy"), export_full_steps=2, export_token_budget=0.5,
        calibration_samples=4,
    )  # fmt: skip
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = quiet_trainer(12, tmp_path)
    L.seed_everything(0, verbose=False)
    data = ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4, seed=100)
    losses = []
    module.log_dict = lambda values, **_: losses.append(float(values["train/loss"].detach()))
    trainer.fit(module, data)
    assert len(losses) == 12 and min(losses[-3:]) < losses[0]  # log-space error from init_score 0.05 shrinks
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in before.items())
    policy = l2c.load_policy(tmp_path / "policy")
    assert isinstance(policy, TokenCachePolicy) and policy.staleness == "age"
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["provenance"]["objective"] == "rate"


def test_random_tokens_ablation_runs_the_same_plan_without_the_predictor():
    from l2c.policies.random_tokens import random_tokens

    model = tiny_dit()
    policy = tiny_policy(model, tokens="random")
    latents, labels = dit_inputs(batch=2)
    timesteps = ddim_timesteps(6)
    chosen = []

    def run(p, log=None):
        with p.apply(model, timesteps=timesteps) as runtime, torch.no_grad():
            if log is not None:
                runtime.selector = record(runtime.selector, log)
            for t in timesteps:
                model(latents, timestep=t.expand(2), class_labels=labels)
            return dict(runtime.executed)

    _, flops = count_flops(lambda: run(policy, chosen))
    plan_only = FixedPlanPolicy(lambda spec, n: policy.build_plan(spec, n))
    plan_only.partial_keys = "cached"
    _, without = count_flops(lambda: run(plan_only))
    assert flops == without  # no predictor call counted
    assert len(chosen) == 3 * 2
    for request, index in chosen:
        assert SIGNAL not in request.state.signals
        assert torch.equal(index, random_tokens(0)(request))
    assert run(policy) == run(tiny_policy(model))  # the same executions as the predictor's policy


def test_compare_sets_the_tables_to_each_point_on_calibration_noise_and_keeps_the_best(fitted):
    from l2c import compare
    from l2c.metrics import psnr_db
    from l2c.models import load_model

    config = compare.CompareConfig(model=str(fitted.teacher), steps=4, guidance_scale=2.0, targets=(0.75,),
                                   calibration_samples=2, tokencache=[str(fitted.root / "policy")])  # fmt: skip
    bundle = load_model(config.model)
    calibration = compare.CalibrationSet.of_config(bundle, config)
    notes = []
    rows = compare.tokencache_rows(config, calibration, notes)
    assert [row.method for row in rows] == ["TokenCache", "TokenCache + TaylorSeer forecast", "TokenCache, tuned",
                                            "TokenCache, tuned + TaylorSeer forecast"] and not notes  # fmt: skip
    policy = rows[0].policy
    grid = compare.tokencache_grid(policy, 0.75, 4, calibration.plan_flops.flops_ratio)
    assert grid and all(2 <= s.full_steps <= 3 for s in grid)  # at most 0.75 · 4 full steps
    tables = {tuple(s.of(policy).step_types(4).tolist()) for s in grid}
    assert len(tables) == len(grid)  # each step table once
    for setting in grid:
        assert abs(calibration.plan_flops.flops_ratio(setting.of(policy)) - 0.75) <= compare.SEER_TOLERANCE
    scores = [psnr_db(calibration.bench.images(s.of(policy)), calibration.reference) for s in grid]
    tuned = rows[2].policy
    assert (tuned.full_steps, tuned.tprr, tuned.token_budget) == dataclasses.astuple(grid[scores.index(max(scores))])
    assert rows[3].policy.taylor_order == 1 and "chosen of" in rows[2].note
