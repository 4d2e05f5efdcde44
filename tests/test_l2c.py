"""Learning-to-Cache end to end: the runtime's differentiable blend, `LayerRouterPolicy` plans, the importer of the
published DiT-XL/2 router, and the router trainers (`SegmentRouterTrainer`, `RolloutRouterTrainer`) fitted on a tiny
real teacher (API and CLI)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from l2c_testing import FixedPlanPolicy, ddim_timesteps, dit_inputs, plan_maker, tiny_dit
from torch.utils.data import DataLoader, TensorDataset

import l2c
from data.conditions import ClassConditionDataModule
from l2c import Action, PolicyFormatError
from l2c.import_l2c import DIT_XL_2_256, import_official_router
from l2c.metrics import branch_flops
from l2c.models import load_model, make_scheduler
from l2c.policies import LayerRouterPolicy
from l2c.policies.learned import full_step_mask, select_by_budget, soft_select_by_budget
from l2c.runtime import BRANCH_HOOK, STEP_HOOK
from l2c.sampling import GuidedDenoiser, noise_from_seeds, sample
from predictors.l2c_trainer import (
    LayerRouterTrainer,
    RolloutRouterTrainer,
    RouterTrainer,
    SegmentRouterTrainer,
    even_steps,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
OFFICIAL = FIXTURES / "l2c_official" / "DiT-XL-2_DDIM20_router.pt"
OFFICIAL_SUMMARY = "computed 312 of 560 branch slots in reuse steps"
DIT_XL_2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
TEACHER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
    num_embeds_ada_norm=10,
)  # fmt: skip
TRAINER_KWARGS = dict(steps=4, guidance_scale=2.0, refresh_interval=2, lr=0.05, l1=1e-3)
SPEC = l2c.ModelSpec(family="dit", num_blocks=2, branches=("attn1", "ff"), hidden_size=16, num_tokens=16)


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def at(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1).expand(x.shape[0])


def quiet_trainer(root: Path, **overrides) -> L.Trainer:
    kwargs = dict(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=True,
        enable_model_summary=False,
        default_root_dir=root,
    )
    return L.Trainer(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------------------------------
# 1. The runtime's training blend: g·f(x) + (1−g)·cached
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def blend_setup():
    """A tiny DiT, 4 DDIM steps, two different step inputs (so that reuse and compute differ)."""
    model = tiny_dit().requires_grad_(False)
    timesteps = ddim_timesteps(4)
    x0, labels = dit_inputs(batch=2, seed=1)
    x1, _ = dit_inputs(batch=2, seed=2)
    with torch.no_grad():
        compute = model(x1, timestep=at(timesteps[1], x1), class_labels=labels).sample  # unhooked: a compute step
        reuse_policy = FixedPlanPolicy(plan_maker({1: Action.REUSE}))
        with reuse_policy.apply(model, timesteps=timesteps):
            model(x0, timestep=at(timesteps[0], x0), class_labels=labels)
            reuse = model(x1, timestep=at(timesteps[1], x1), class_labels=labels).sample  # pure reuse of step 0
    assert not torch.allclose(compute, reuse, atol=1e-4), "the test needs reuse to differ from compute"
    return SimpleNamespace(model=model, timesteps=timesteps, x0=x0, x1=x1, labels=labels, compute=compute, reuse=reuse)


def blended_step(s, runtime, gates, refresh: bool = False) -> torch.Tensor:
    """Step 0 computes (and caches) every branch without a blend; step 1 runs with `gates` as the blend."""
    with torch.no_grad():
        s.model(s.x0, timestep=at(s.timesteps[0], s.x0), class_labels=s.labels)
    with runtime.blending(gates, refresh=refresh):
        return s.model(s.x1, timestep=at(s.timesteps[1], s.x1), class_labels=s.labels).sample


def test_blend_all_ones_equals_compute_and_all_zeros_equals_reuse(blend_setup):
    s = blend_setup
    with l2c.FullPolicy().apply(s.model, timesteps=s.timesteps) as runtime:
        with torch.no_grad():
            ones = blended_step(s, runtime, torch.ones(2, 2))
            zeros = blended_step(s, runtime, torch.zeros(2, 2))
    torch.testing.assert_close(ones, s.compute, atol=1e-6, rtol=0)
    torch.testing.assert_close(zeros, s.reuse, atol=1e-6, rtol=0)


def test_blend_per_sample_and_per_token_gates(blend_setup):
    s = blend_setup
    per_sample = torch.zeros(2, 2, 2)  # [blocks, branches, batch]: sample 0 computes, sample 1 reuses
    per_sample[..., 0] = 1.0
    per_token = torch.zeros(2, 2, 2, 16)  # [blocks, branches, batch, tokens]: sample 1 computes every token
    per_token[:, :, 1] = 1.0
    with l2c.FullPolicy().apply(s.model, timesteps=s.timesteps) as runtime:
        with torch.no_grad():
            by_sample = blended_step(s, runtime, per_sample)
            by_token = blended_step(s, runtime, per_token)
    torch.testing.assert_close(by_sample[0], s.compute[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(by_sample[1], s.reuse[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(by_token[0], s.reuse[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(by_token[1], s.compute[1], atol=1e-6, rtol=0)


def test_blend_leaves_the_cache_as_the_full_step_stored_it(blend_setup):
    """After a blended step 1, a plan's REUSE at step 2 still returns step 0's outputs (the blend stores nothing)."""
    s = blend_setup
    x2, _ = dit_inputs(batch=2, seed=3)
    policy = FixedPlanPolicy(plan_maker({1: Action.REUSE, 2: Action.REUSE}))
    outputs = []
    with torch.no_grad():
        for gates in (None, torch.ones(2, 2)):
            with policy.apply(s.model, timesteps=s.timesteps) as runtime:
                blended_step(s, runtime, gates)  # gates None: the plan's own REUSE at step 1
                outputs.append(s.model(x2, timestep=at(s.timesteps[2], x2), class_labels=s.labels).sample)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)


def test_blend_refresh_makes_the_blend_the_cache_as_inference_would(blend_setup):
    """With `blend_refresh`, gates of 1 at step 1 refresh the cache: step 2's REUSE returns step 1's outputs."""
    s = blend_setup
    x2, _ = dit_inputs(batch=2, seed=3)
    with torch.no_grad():
        with FixedPlanPolicy(plan_maker({2: Action.REUSE})).apply(s.model, timesteps=s.timesteps):
            for t, x in zip(s.timesteps[:2], (s.x0, s.x1)):
                s.model(x, timestep=at(t, x), class_labels=s.labels)
            expected = s.model(x2, timestep=at(s.timesteps[2], x2), class_labels=s.labels).sample
        with FixedPlanPolicy(plan_maker({1: Action.REUSE, 2: Action.REUSE})).apply(
            s.model, timesteps=s.timesteps
        ) as runtime:
            blended_step(s, runtime, torch.ones(2, 2), refresh=True)
            refreshed = s.model(x2, timestep=at(s.timesteps[2], x2), class_labels=s.labels).sample
    torch.testing.assert_close(refreshed, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("refresh", [False, True])
def test_blend_refresh_carries_gradients_to_earlier_gates(blend_setup, refresh):
    s = blend_setup
    x2, _ = dit_inputs(batch=2, seed=3)
    first, second = torch.full((2, 2), 0.5, requires_grad=True), torch.full((2, 2), 0.5, requires_grad=True)
    with l2c.FullPolicy().apply(s.model, timesteps=s.timesteps) as runtime:
        blended_step(s, runtime, first, refresh)
        with runtime.blending(second, refresh=refresh):
            out = s.model(x2, timestep=at(s.timesteps[2], x2), class_labels=s.labels).sample
        torch.nn.functional.mse_loss(out, s.compute).backward()
    assert bool((second.grad != 0).all())
    assert (first.grad is not None and bool((first.grad != 0).all())) == refresh


def test_blend_gradients_reach_the_gates_only(blend_setup):
    s = blend_setup
    gates = torch.full((2, 2), 0.5, requires_grad=True)
    with l2c.FullPolicy().apply(s.model, timesteps=s.timesteps) as runtime:
        out = blended_step(s, runtime, gates)
        loss = torch.nn.functional.mse_loss(out, s.compute)
        loss.backward()
    assert gates.grad is not None
    assert torch.isfinite(gates.grad).all() and bool((gates.grad != 0).all())
    assert bool((gates.grad < 0).all()), "raising a gate toward 1 moves the output toward the compute step"
    assert all(p.grad is None for p in s.model.parameters())


def test_blend_gradient_matches_finite_differences():
    model = tiny_dit().double().requires_grad_(False)
    timesteps = ddim_timesteps(4)
    x0, labels = dit_inputs(batch=2, seed=1)
    x1, _ = dit_inputs(batch=2, seed=2)
    s = SimpleNamespace(model=model, timesteps=timesteps, x0=x0.double(), x1=x1.double(), labels=labels)
    with l2c.FullPolicy().apply(model, timesteps=timesteps) as runtime:
        ok = torch.autograd.gradcheck(
            lambda g: blended_step(s, runtime, g).pow(2).mean(),
            (torch.full((2, 2), 0.4, dtype=torch.float64, requires_grad=True),),
            eps=1e-6,
            atol=1e-7,
        )
    assert ok


def test_pause_runs_unhooked_and_keeps_the_cache(blend_setup):
    s = blend_setup
    policy = FixedPlanPolicy(plan_maker({1: Action.REUSE}))
    with torch.no_grad(), policy.apply(s.model, timesteps=s.timesteps) as runtime:
        s.model(s.x0, timestep=at(s.timesteps[0], s.x0), class_labels=s.labels)
        with runtime.pause():
            paused = s.model(s.x1, timestep=at(s.timesteps[1], s.x1), class_labels=s.labels).sample
            s.model(s.x1, timestep=torch.full((2,), 123.0), class_labels=s.labels)  # not in the table: fine paused
        after = s.model(s.x1, timestep=at(s.timesteps[1], s.x1), class_labels=s.labels).sample
    torch.testing.assert_close(paused, s.compute, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, s.reuse, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# 2. LayerRouterPolicy: threshold and budget plans, round trip, summary
# ------------------------------------------------------------------------------------------------------------------


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def test_threshold_plan_known_slots():
    logits = torch.full((4, 2, 2), -3.0)  # every reuse-step slot scores below the threshold …
    logits[1, 0, 1] = 3.0  # … except these two
    logits[3, 1, 0] = 0.5
    logits[3, 0, 0] = 0.0  # score exactly 0.5: not above the threshold, reused
    policy = LayerRouterPolicy(refresh_interval=2, threshold=0.5, logits=logits)
    plan = policy.build_plan(SPEC, 4)
    expected = torch.full((4, 2, 2), int(Action.REUSE), dtype=torch.int8)
    expected[[0, 2]] = int(Action.COMPUTE)  # full steps compute whatever their logits say
    expected[1, 0, 1] = expected[3, 1, 0] = int(Action.COMPUTE)
    assert torch.equal(plan.actions, expected)
    assert policy.reuse_summary(4) == "computed 2 of 8 branch slots in reuse steps"


def test_full_steps_follow_the_refresh_interval():
    policy = LayerRouterPolicy(refresh_interval=3, threshold=0.5, logits=torch.full((7, 2, 2), -9.0))
    plan = policy.build_plan(SPEC, 7)
    full = (plan.actions == Action.COMPUTE).flatten(1).all(1)
    reuse = (plan.actions == Action.REUSE).flatten(1).all(1)
    assert full.tolist() == [True, False, False, True, False, False, True]
    assert torch.equal(reuse, ~full)
    assert full_step_mask(7, 3).tolist() == full.tolist()
    assert policy.reuse_summary(7) == "computed 0 of 16 branch slots in reuse steps"


def budget_logits() -> torch.Tensor:
    """Reuse-step slots (steps 1, 3) with distinct scores in a known order; full steps score highest of all."""
    logits = torch.full((4, 2, 2), 9.0)
    order = [(1, 0, 0), (3, 1, 1), (1, 1, 0), (3, 0, 1), (1, 0, 1), (3, 0, 0), (1, 1, 1), (3, 1, 0)]  # best first
    for rank, slot in enumerate(order):
        logits[slot] = logit(0.9 - 0.1 * rank)
    return logits, order


@pytest.mark.parametrize("kept", [0, 1, 3, 8])
def test_budget_keeps_exactly_the_top_scoring_reuse_slots(kept):
    logits, order = budget_logits()
    budget = (8 + kept) / 16  # 8 full-step slots of 16, plus `kept` reuse-step slots
    policy = LayerRouterPolicy(refresh_interval=2, threshold=None, budget=budget, logits=logits)
    mask = policy.computed_mask(4)
    expected = full_step_mask(4, 2).view(-1, 1, 1).expand(4, 2, 2).clone()
    for slot in order[:kept]:
        expected[slot] = True
    assert torch.equal(mask, expected)
    plan = policy.build_plan(SPEC, 4)
    assert plan.compute_fraction() == pytest.approx(budget)
    assert policy.reuse_summary(4) == f"computed {kept} of 8 branch slots in reuse steps"
    assert torch.equal(select_by_budget(torch.sigmoid(logits), full_step_mask(4, 2), budget), expected)


@pytest.mark.parametrize("ff_first", [True, False])
def test_budget_weighs_slots_by_branch_cost(ff_first):
    """attn1 costs 1, ff 3 (weights 0.5, 1.5 of a mean slot); step 0 is full: 2 of 4 work units; budget 0.75 → 1
    unit left for step 1, where the best-scoring slot is kept only if at least half of it fits."""
    scores = torch.tensor([[[0.9, 0.9]], [[0.2, 0.8]]]) if ff_first else torch.tensor([[[0.9, 0.9]], [[0.8, 0.2]]])
    keep = select_by_budget(scores, full_step_mask(2, 2), 0.75, torch.tensor([1.0, 3.0]))
    assert keep[0].all()
    assert keep[1, 0].tolist() == ([False, True] if ff_first else [True, False])
    policy = LayerRouterPolicy(threshold=None, budget=0.75, branch_costs=(1.0, 3.0), logits=torch.logit(scores))
    assert torch.equal(policy.computed_mask(2), keep)
    with pytest.raises(ValueError, match="'branch_costs'"):
        LayerRouterPolicy(threshold=None, budget=0.75, branch_costs=(1.0, -3.0), logits=torch.logit(scores))
    with pytest.raises(ValueError, match="'branch_costs' has 3 entries"):
        LayerRouterPolicy(threshold=None, budget=0.75, branch_costs=(1, 1, 1), logits=scores).computed_mask(2)


def test_budget_below_the_full_steps_share_raises_naming_budget():
    logits, _ = budget_logits()
    policy = LayerRouterPolicy(refresh_interval=2, threshold=None, budget=0.25, logits=logits)
    with pytest.raises(ValueError, match="'budget'"):
        policy.computed_mask(4)
    with pytest.raises(ValueError, match="'budget'"):
        policy.apply(tiny_dit(), timesteps=ddim_timesteps(4))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(threshold=0.5, budget=0.5), "threshold"),
        (dict(threshold=None, budget=None), "threshold"),
        (dict(threshold=None, budget=1.5), "budget"),
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=0.5, refresh_interval=0), "refresh_interval"),
    ],
)
def test_invalid_policy_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LayerRouterPolicy(**kwargs, logits=torch.zeros(4, 2, 2))


def test_logits_of_the_wrong_shape_are_refused():
    policy = LayerRouterPolicy(threshold=0.5, logits=torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="router.logits"):
        policy.apply(tiny_dit(), timesteps=ddim_timesteps(4))


@pytest.mark.parametrize("mode", [dict(threshold=0.5), dict(threshold=None, budget=0.75)])
def test_save_load_round_trip_keeps_logits_and_plan(tmp_path, mode):
    logits, _ = budget_logits()
    logits[1, 1, 1] = -2.0
    model, timesteps = tiny_dit(), ddim_timesteps(4)
    policy = LayerRouterPolicy(refresh_interval=2, **mode, logits=logits).bind(model, timesteps, "DDIMScheduler")
    policy.provenance = {"note": "hand-made"}
    policy.save_pretrained(tmp_path / "router")
    loaded = l2c.load_policy(tmp_path / "router")
    assert isinstance(loaded, LayerRouterPolicy)
    assert loaded.params() == policy.params()
    assert torch.equal(loaded.logits, logits)
    assert loaded.provenance == {"note": "hand-made"}
    assert loaded.timesteps == tuple(float(t) for t in timesteps)
    spec = l2c.model_spec(model)
    assert torch.equal(loaded.build_plan(spec, 4).actions, policy.build_plan(spec, 4).actions)
    assert loaded.reuse_summary(4) == policy.reuse_summary(4)
    with loaded.apply(model) as runtime:
        assert torch.equal(runtime.plan.actions, policy.build_plan(spec, 4).actions)


# ------------------------------------------------------------------------------------------------------------------
# 3. The router released with Learning-to-Cache (DiT-XL/2, DDIM 20)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official() -> LayerRouterPolicy:
    assert OFFICIAL.is_file(), f"missing fixture {OFFICIAL}"
    return import_official_router(OFFICIAL, 0.1)


def meta_dit(**overrides) -> DiTTransformer2DModel:
    with torch.device("meta"):  # DiT-XL/2's shape without 675M parameters of memory or init time
        return DiTTransformer2DModel(**{**DIT_XL_2, **overrides})


def test_official_router_statistic_and_plan(official):
    assert official.reuse_summary(20) == OFFICIAL_SUMMARY
    assert official.refresh_interval == 2 and official.threshold == 0.1
    assert official.logits.shape == (20, 28, 2)
    assert official.target.model == DIT_XL_2_256
    scheduler = DDIMScheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(20)
    assert official.timesteps == tuple(float(t) for t in scheduler.timesteps)
    assert official.provenance["num_sampling_steps"] == 20 and official.provenance["l1"] == 5e-06

    plan = official.build_plan(DIT_XL_2_256, 20)
    assert bool((plan.actions[0::2] == Action.COMPUTE).all()), "full steps at every even step"
    reuse_slots = plan.actions[1::2]
    assert int((reuse_slots == Action.COMPUTE).sum()) == 312 and int((reuse_slots == Action.REUSE).sum()) == 248
    # Step s uses release router 19 − s: the reuse steps (odd s) read exactly the even-index routers.
    raw = torch.load(OFFICIAL, map_location="cpu", weights_only=True)["routers"]
    for step in range(1, 20, 2):
        wanted = torch.sigmoid(raw[f"{19 - step}.prob"].float()).view(28, 2) > 0.1
        assert torch.equal(plan.actions[step] == Action.COMPUTE, wanted), step


def test_official_router_applies_to_a_dit_xl_2_shaped_model(official):
    model = meta_dit()
    before = {name: set(module.__dict__) for name, module in model.named_modules()}
    runtime = official.apply(model)
    registries = [getattr(m, "_diffusers_hook", None) for m in model.modules()]
    hooked = [r for r in registries if r is not None and r.get_hook(BRANCH_HOOK) is not None]
    assert len(hooked) == 56 and len(runtime.branches) == 56
    assert model._diffusers_hook.get_hook(STEP_HOOK) is not None
    assert torch.equal(runtime.plan.actions, official.build_plan(DIT_XL_2_256, 20).actions)
    runtime.remove()
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert {name: set(module.__dict__) for name, module in model.named_modules()} == before


def test_official_router_refuses_another_block_count(official):
    with pytest.raises(ValueError, match="num_blocks"):
        official.apply(meta_dit(num_layers=12))
    other = l2c.ModelSpec(family="dit", num_blocks=12, branches=("attn1", "ff"), hidden_size=1152, num_tokens=256)
    with pytest.raises(ValueError, match="num_blocks"):
        import_official_router(OFFICIAL, 0.1, model=other)


def test_import_cli_prints_the_statistic_and_writes_a_loadable_policy(tmp_path, official):
    out = tmp_path / "imported"
    result = subprocess.run(
        [sys.executable, "infer.py", "import-l2c", str(OFFICIAL), "--threshold", "0.1", "--out", str(out)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert OFFICIAL_SUMMARY in result.stdout.splitlines()
    loaded = l2c.load_policy(out)
    assert isinstance(loaded, LayerRouterPolicy)
    assert loaded.reuse_summary(20) == OFFICIAL_SUMMARY
    assert torch.equal(loaded.logits, official.logits) and loaded.timesteps == official.timesteps
    assert loaded.provenance["trainer"] == "learning-to-cache (official release)"


class ReduceMarker:
    """Unpickling this runs `open(marker, "w")`: if the file appears, the loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_object_is_refused_without_running_its_reduce(tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(ReduceMarker(control))).close()
    assert control.exists(), "the marker class must really create its file when unpickled"

    marker = tmp_path / "marker"
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(ReduceMarker(marker), protocol=2))
    zipped = tmp_path / "zipped.pt"
    torch.save({"routers": {"0.prob": torch.zeros(56)}, "evil": ReduceMarker(marker)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(PolicyFormatError, match="weights_only"):
            import_official_router(path, 0.1)
    import infer

    assert infer.main(["import-l2c", str(plain), "--out", str(tmp_path / "never")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "never").exists()


def test_a_checkpoint_without_routers_is_refused(tmp_path):
    path = tmp_path / "no-routers.pt"
    torch.save({"opt": {}, "args": argparse.Namespace(num_sampling_steps=20)}, path)
    with pytest.raises(PolicyFormatError, match="'routers'"):
        import_official_router(path, 0.1)


def test_router_count_must_match_the_recorded_step_count(tmp_path):
    path = tmp_path / "short.pt"
    routers = {f"{i}.prob": torch.zeros(56) for i in range(10)}
    torch.save({"routers": routers, "args": argparse.Namespace(num_sampling_steps=20)}, path)
    with pytest.raises(PolicyFormatError, match="num_sampling_steps"):
        import_official_router(path, 0.1)


@pytest.mark.parametrize(
    "routers",
    [
        torch.zeros(20, 56),
        {},
        {"0.prob": torch.zeros(56), "1.prob": torch.zeros(55)},
        {"0.prob": "not a tensor"},
    ],
    ids=["tensor", "empty", "ragged", "not-a-tensor"],
)
def test_malformed_routers_raise_policy_format_error(tmp_path, routers):
    path = tmp_path / "malformed.pt"
    torch.save({"routers": routers}, path)
    with pytest.raises(PolicyFormatError, match="routers"):
        import_official_router(path, 0.1)


# ------------------------------------------------------------------------------------------------------------------
# 4. SegmentRouterTrainer end to end on a tiny teacher
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher-root") / "teacher"
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(root / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    return root


def teacher_state(module: RouterTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS, export_dir=str(root / "policy"))
    before = SimpleNamespace(logits=module.router.logits.detach().clone(), teacher=teacher_state(module))
    trainer = quiet_trainer(root)
    L.seed_everything(0, verbose=False)
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4))
    return SimpleNamespace(module=module, trainer=trainer, before=before, root=root, export=root / "policy")


def test_fit_trains_the_router_and_leaves_the_teacher_alone(fitted):
    module, before = fitted.module, fitted.before
    assert fitted.trainer.global_step == 3
    reuse = ~full_step_mask(4, 2)
    assert not torch.equal(module.router.logits.detach()[reuse], before.logits[reuse])
    after = teacher_state(module)
    assert after.keys() == before.teacher.keys()
    assert all(torch.equal(after[k], before.teacher[k]) for k in after)
    assert not module.teacher.training
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not any(hasattr(m, "_diffusers_hook") for m in module.teacher.modules()), "runtime removed at fit end"


def test_the_optimizer_holds_only_the_router(fitted):
    (optimizer,) = fitted.trainer.optimizers
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 1 and held[0] is fitted.module.router.logits
    assert [n for n, _ in fitted.module.named_parameters()] == ["router.logits"]


def test_the_checkpoint_holds_no_teacher(fitted, teacher_dir):
    (ckpt,) = (fitted.root / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert list(state) == ["router.logits"]
    teacher_bytes = sum(f.stat().st_size for f in (teacher_dir / "transformer").glob("*.safetensors"))
    assert ckpt.stat().st_size * 5 < teacher_bytes, (ckpt.stat().st_size, teacher_bytes)  # ~5 KB vs ~83 KB here
    restored = SegmentRouterTrainer.load_from_checkpoint(ckpt)
    assert torch.equal(restored.router.logits, fitted.module.router.logits)


def test_the_exported_policy_loads_records_its_provenance_and_samples(fitted, teacher_dir):
    policy = l2c.load_policy(fitted.export)
    assert isinstance(policy, LayerRouterPolicy)
    assert torch.equal(policy.logits, fitted.module.router.logits.detach())
    assert policy.threshold == 0.5 and policy.budget is None and policy.refresh_interval == 2
    provenance = json.loads((fitted.export / "config.json").read_text())["provenance"]
    assert provenance["l1"] == 1e-3 and provenance["lr"] == 0.05
    assert provenance["teacher"] == str(teacher_dir) and provenance["refresh_interval"] == 2
    assert policy.provenance == provenance
    # Adam moves a logit by about lr per step: 3 steps from 2.0 leave every score above 0.5, so all slots compute.
    assert policy.reuse_summary(4) == "computed 8 of 8 branch slots in reuse steps"

    bundle = load_model(str(teacher_dir))
    denoiser = GuidedDenoiser(bundle.transformer, 2.0)
    noise, labels = noise_from_seeds(torch.arange(2), (1, 8, 8)), torch.tensor([3, 7])
    uncached = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise, labels, 4)
    with policy.apply(bundle.transformer) as runtime:
        cached = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise, labels, 4)
        assert runtime.executed[Action.COMPUTE] == 4 * 4 and runtime.executed[Action.REUSE] == 0
    torch.testing.assert_close(cached, uncached, atol=1e-6, rtol=0)


def test_budget_export_computes_that_share_of_all_slots(teacher_dir, tmp_path):
    module = SegmentRouterTrainer(
        teacher=str(teacher_dir), **TRAINER_KWARGS, export_dir=str(tmp_path / "policy"), export_budget=0.75
    )
    L.seed_everything(0, verbose=False)
    quiet_trainer(tmp_path, max_steps=2).fit(module, ClassConditionDataModule(10, samples_per_epoch=8, batch_size=4))
    policy = l2c.load_policy(tmp_path / "policy")
    assert policy.budget == 0.75 and policy.threshold is None
    assert policy.provenance["export_budget"] == 0.75
    spec = l2c.model_spec(module.teacher)
    x = module.noise_for(torch.tensor([0]))
    measured = branch_flops(
        module.teacher, lambda: module.teacher(x, timestep=torch.tensor([1.0]), class_labels=torch.tensor([1]))
    )
    attn1, ff = policy.branch_costs  # measured on one sample's guided call: [cond; null] rows
    assert ff / attn1 == pytest.approx(measured["ff"] / measured["attn1"]) and ff != attn1
    plan = policy.build_plan(spec, 4)
    computed = plan.actions == Action.COMPUTE
    work = computed.double() * torch.tensor(policy.branch_costs, dtype=torch.float64)
    share = work.sum() / (torch.ones_like(work) * torch.tensor(policy.branch_costs, dtype=torch.float64)).sum()
    assert abs(share.item() - 0.75) <= max(policy.branch_costs) / 2 / sum(policy.branch_costs) / 4
    scores = torch.sigmoid(policy.logits)[~full_step_mask(4, 2)]
    kept = computed[~full_step_mask(4, 2)]
    assert scores[kept].min() >= scores[~kept].max(), "the kept reuse slots are the top-scoring ones"

    bundle = load_model(str(teacher_dir))
    noise, labels = noise_from_seeds(torch.arange(2), (1, 8, 8)), torch.tensor([1, 2])
    with policy.apply(bundle.transformer) as runtime:
        out = sample(GuidedDenoiser(bundle.transformer, 2.0), make_scheduler("ddim", bundle.scheduler_config),
                     noise, labels, 4)  # fmt: skip
        assert runtime.executed[Action.REUSE] == 4 and runtime.executed[Action.COMPUTE] == 12
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "trainer, kwargs, field",
    [
        (SegmentRouterTrainer, dict(steps=1), "steps"),
        (SegmentRouterTrainer, dict(refresh_interval=1), "refresh_interval"),
        (SegmentRouterTrainer, dict(export_budget=2.0), "budget"),
        (LayerRouterTrainer, dict(objective="trajectory"), "objective"),
        (RolloutRouterTrainer, dict(), "export_budget"),
        (SegmentRouterTrainer, dict(init="even"), "init"),
        (RolloutRouterTrainer, dict(export_budget=0.5, temperature=(0.1, 0.2)), "temperature"),
    ],
)
def test_trainer_refuses_bad_fields(teacher_dir, trainer, kwargs, field):
    base = {k: v for k, v in TRAINER_KWARGS.items() if k != "l1" or trainer is not RolloutRouterTrainer}  # no λ there
    with pytest.raises(ValueError, match=field):
        trainer(teacher=str(teacher_dir), **{**base, **kwargs})


def test_train_cli_smoke(teacher_dir, tmp_path):
    export = tmp_path / "policy"
    command = [
        sys.executable, "train.py", "fit", "--config", "configs/l2c/digits-ddim20.yaml",
        "--model.teacher", str(teacher_dir), "--model.steps", "4", "--model.export_dir", str(export),
        "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--data.init_args.batch_size", "4", "--data.init_args.samples_per_epoch", "8",
        "--trainer.default_root_dir", str(tmp_path / "root"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported l2c policy to" in result.stdout
    policy = l2c.load_policy(export)
    assert isinstance(policy, LayerRouterPolicy) and policy.logits.shape == (4, 2, 2)
    assert policy.provenance["global_steps"] == 2 and policy.provenance["teacher"] == str(teacher_dir)


@pytest.mark.parametrize(
    "recipe, objective, expected",
    [
        ("digits-ddim20.yaml", None, SegmentRouterTrainer),
        ("digits-ddim20.yaml", "segment", SegmentRouterTrainer),
        ("digits-ddim20-rollout.yaml", "rollout", RolloutRouterTrainer),
    ],
)
def test_a_config_naming_the_class_before_the_split_builds_its_objectives_class(
    teacher_dir, tmp_path, monkeypatch, recipe, objective, expected
):
    """Configs written before the split (`class_path: ...LayerRouterTrainer`, maybe `objective`) keep working."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    config = yaml.safe_load((ROOT / "configs/l2c" / recipe).read_text())
    config["model"]["class_path"] = "predictors.l2c_trainer.LayerRouterTrainer"
    config["model"]["init_args"].update(teacher=str(teacher_dir), steps=4, refresh_interval=4 if objective else 2)
    if objective is not None:
        config["model"]["init_args"]["objective"] = objective
    (tmp_path / "old.yaml").write_text(json.dumps(config))  # JSON is YAML
    monkeypatch.chdir(tmp_path)  # the recipe's relative run directories land in tmp_path
    args = ["--config", str(tmp_path / "old.yaml"), "--trainer.logger", "false"]
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    assert type(cli.model) is expected and cli.model.objective == (objective or "segment")
    assert cli.model.hparams.lr == config["model"]["init_args"]["lr"]


# ------------------------------------------------------------------------------------------------------------------
# 5. Real-image mode: (images, labels) batches noised to a segment's full step
# ------------------------------------------------------------------------------------------------------------------


def tiny_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 8, 8, generator=generator) * 2 - 1, torch.arange(count) % 10


class TinyImages(L.LightningDataModule):
    def __init__(self, count: int = 8, batch_size: int = 4, drop_last: bool = True) -> None:
        super().__init__()
        self.count, self.batch_size, self.drop_last = count, batch_size, drop_last

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*tiny_images(self.count))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=self.drop_last)


def direct_step(module: RouterTrainer, batch) -> torch.Tensor:
    """`training_step` outside a Trainer (its `self.log` only warns there), between the fit start/end hooks."""
    module.on_fit_start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return module.training_step(batch, 0)
    finally:
        module.on_fit_end()


def test_image_batches_give_a_finite_loss_with_gradient_on_the_router_only(teacher_dir):
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS)
    torch.manual_seed(0)
    loss = direct_step(module, tiny_images(4))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grad = module.router.logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert bool((grad[full_step_mask(4, 2)] == 0).all()), "full-step logits are never used"
    assert bool((grad[~full_step_mask(4, 2)] != 0).any())
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize("batch_kind", ["images", "conditions"])
def test_saturated_gates_reproduce_the_teacher_exactly(teacher_dir, batch_kind):
    """Scores of exactly 1 make every reuse step a compute step: the MSE vanishes and the loss is λ·Σ s."""
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS)
    batch = tiny_images(4) if batch_kind == "images" else (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8]))
    with torch.no_grad():
        module.router.logits.fill_(100.0)
    torch.manual_seed(0)
    saturated = direct_step(module, batch)
    assert saturated.item() == pytest.approx(1e-3 * 4, abs=1e-9)  # mse 0, l1 · (2 blocks × 2 branches)
    with torch.no_grad():
        module.router.logits.fill_(-100.0)
    torch.manual_seed(0)
    closed = direct_step(module, batch)
    assert closed.item() > 1e-8, "pure reuse differs from the teacher"


class GradProbe(L.Callback):
    def __init__(self) -> None:
        self.losses, self.router_grads, self.teacher_grads = [], [], []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.router_grads.append(pl_module.router.logits.grad.detach().clone())
        self.teacher_grads.append([p.grad for p in pl_module.teacher.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_image_mode_through_lightning(teacher_dir, tmp_path):
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS)
    before = teacher_state(module)
    probe = GradProbe()
    L.seed_everything(0, verbose=False)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[probe]).fit(module, TinyImages())
    assert len(probe.losses) == 4 and all(torch.isfinite(torch.tensor(probe.losses)))
    assert all(bool((g != 0).any()) for g in probe.router_grads)
    assert all(g is None for grads in probe.teacher_grads for g in grads)
    after = teacher_state(module)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_smaller_last_batch_does_not_break_training(teacher_dir, tmp_path):
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS)
    L.seed_everything(0, verbose=False)
    # 6 images in batches of 4 and 2; over 12 epochs some batch starts at segment 2 right after one ended at step 1.
    quiet_trainer(tmp_path, max_steps=24, enable_checkpointing=False).fit(module, TinyImages(6, 4, drop_last=False))
    assert module.global_step == 24


# ------------------------------------------------------------------------------------------------------------------
# 5. The rollout objective: whole trajectories with the budget's hard gates (straight-through)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, budget, expected",
    [(20, 0.5, list(range(0, 20, 2))), (20, 0.35, [0, 2, 5, 8, 11, 14, 17]), (20, 0.75, None), (4, 0.5, [0, 2])],
)
def test_even_steps_spread_the_budget_from_step_zero(steps, budget, expected):
    mask = even_steps(steps, budget)
    chosen = torch.nonzero(mask).flatten().tolist()
    assert len(chosen) == round(budget * steps) and chosen[0] == 0
    if expected is not None:
        assert chosen == expected
    gaps = torch.diff(torch.tensor(chosen + [steps]))
    assert int(gaps.max() - gaps.min()) <= 1, "evenly spread: gaps differ by at most one step"


ROLLOUT_KWARGS = dict(steps=4, guidance_scale=2.0, refresh_interval=4, export_budget=0.5, lr=0.05)


@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.05])
def test_soft_gates_spend_exactly_the_budget(temperature):
    logits = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(0))
    full, costs = full_step_mask(6, 3), torch.tensor([1.0, 3.0])
    gates = soft_select_by_budget(logits, full, 0.55, costs, temperature)
    work = gates * (costs / costs.mean())
    assert work.sum().item() == pytest.approx(0.55 * 6 * 3 * 2, rel=1e-5)
    assert bool((gates[full] == 1).all()) and bool(((gates >= 0) & (gates <= 1)).all())


def test_cold_soft_gates_are_the_budget_selection():
    """With room for a whole number of slots, T → 0 gives `select_by_budget`'s choice."""
    logits = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(1))
    full, costs = full_step_mask(6, 3), torch.ones(2)
    budget = (2 * 3 * 2 + 7) / (6 * 3 * 2)  # the full steps' 12 slots and the 7 best reuse slots
    cold = soft_select_by_budget(logits, full, budget, costs, 1e-4)
    hard = select_by_budget(logits, full, budget, costs)
    assert torch.equal(cold > 0.5, hard) and int(hard.sum()) == 19
    torch.testing.assert_close(cold, hard.float(), atol=1e-4, rtol=0)


def test_soft_gates_pass_gradients_to_every_reuse_logit():
    logits = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    weights = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(3))
    (soft_select_by_budget(logits, full_step_mask(6, 3), 0.6, torch.ones(2), 0.5) * weights).sum().backward()
    assert bool((logits.grad[full_step_mask(6, 3)] == 0).all()) and bool(
        (logits.grad[~full_step_mask(6, 3)] != 0).all()
    )


def test_rollout_samples_as_the_exported_plan_and_trains_every_reuse_slot(teacher_dir, tmp_path):
    """`rollout` with the hard gates samples exactly as the exported policy does at inference; the soft training
    step reaches every logit of a reuse step."""
    module = RolloutRouterTrainer(teacher=str(teacher_dir), **ROLLOUT_KWARGS, init="even")
    with torch.no_grad():
        module.router.logits.add_(torch.randn(module.router.logits.shape, generator=torch.Generator().manual_seed(3)))
    labels, seeds = torch.tensor([3, 7, 1]), torch.tensor([11, 12, 13])
    loss = direct_step(module, (labels, seeds))
    loss.backward()
    grad = module.router.logits.grad
    assert bool((grad[0] == 0).all()), "step 0 always computes: its logits take no gradient"
    assert bool((grad[1:] != 0).all()), "soft gates: every later slot gets a gradient"

    module.on_fit_start()
    with torch.no_grad():
        trained = module.rollout(labels, seeds, module.hard_gates().float())
    module.on_fit_end()
    policy = module.export(tmp_path / "policy")
    assert policy.budget == 0.5 and policy.refresh_interval == 4 and policy.provenance["objective"] == "rollout"
    bundle = load_model(str(teacher_dir))
    denoiser = GuidedDenoiser(bundle.transformer, 2.0)
    with l2c.load_policy(tmp_path / "policy").apply(bundle.transformer) as runtime:
        cached = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise_from_seeds(seeds, (1, 8, 8)),
                        labels, 4)  # fmt: skip
        reused = runtime.executed[Action.REUSE]
    assert 0 < reused < 3 * 4, "a plan between all-compute and all-reuse"
    torch.testing.assert_close(trained, cached, atol=1e-6, rtol=0)


def test_rollout_through_lightning_lowers_the_exported_plans_error(teacher_dir, tmp_path):
    """A few optimizer steps on one batch: the plan exported at the end samples closer to the teacher than at init."""
    labels, seeds = torch.tensor([3, 7, 1, 5]), torch.tensor([11, 12, 13, 14])
    bundle = load_model(str(teacher_dir))
    denoiser = GuidedDenoiser(bundle.transformer, 2.0)
    noise = noise_from_seeds(seeds, (1, 8, 8))
    uncached = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise, labels, 4)

    def exported_error(module: RouterTrainer, name: str) -> float:
        with module.export(tmp_path / name).apply(bundle.transformer):
            cached = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise, labels, 4)
        return torch.mean((cached - uncached) ** 2).item()

    module = RolloutRouterTrainer(
        teacher=str(teacher_dir), **{**ROLLOUT_KWARGS, "lr": 0.3, "init_logit": 0.5}, init="even"
    )
    before = exported_error(module, "before")
    data = DataLoader(TensorDataset(labels, seeds), batch_size=4)
    quiet_trainer(tmp_path, max_steps=8, enable_checkpointing=False).fit(module, data)
    after = exported_error(module, "after")
    assert after < before, (before, after)


class ValidationProbe(L.Callback):
    """Records the router and the validation PSNR after every validation (the sanity check at step 0 included)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module's own epoch-end hook
        psnr = float(trainer.callback_metrics.get("val/psnr_db", float("nan")))
        self.seen.append((trainer.global_step, psnr, pl_module.router.logits.detach().clone()))


def test_rollout_exports_the_best_validated_router_and_resumes_it(teacher_dir, tmp_path):
    module = RolloutRouterTrainer(
        teacher=str(teacher_dir), **{**ROLLOUT_KWARGS, "lr": 0.3}, init="even", init_logit=0.5,
        export_dir=str(tmp_path / "policy"),
    )  # fmt: skip
    probe = ValidationProbe()
    data = ClassConditionDataModule(10, samples_per_epoch=8, batch_size=4, seed=1000, val_samples=4)
    trainer = quiet_trainer(tmp_path, max_steps=6, val_check_interval=2, num_sanity_val_steps=-1, callbacks=[probe])
    trainer.fit(module, data)
    assert [step for step, _, _ in probe.seen] == [0, 2, 4, 6]  # the sanity check scores the starting plan
    best_step, best_psnr, best_logits = max(probe.seen, key=lambda seen: seen[1])
    assert module.best.global_step == best_step and module.best.psnr_db == pytest.approx(best_psnr, rel=1e-6)
    policy = l2c.load_policy(tmp_path / "policy")
    assert torch.equal(policy.logits, best_logits)
    assert policy.provenance["selected"] == {"global_step": best_step, "val_psnr_db": module.best.psnr_db}

    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    restored = RolloutRouterTrainer.load_from_checkpoint(ckpt)
    assert restored.best.global_step == best_step and torch.equal(restored.best.logits, best_logits)


def test_validation_conditions_are_held_out_and_fixed():
    data = ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4, seed=1000, val_samples=6)
    data.setup("fit")
    labels, seeds = (torch.cat(parts) for parts in zip(*data.val_dataloader()))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5] and seeds.tolist() == list(range(200_000, 200_006))
    train_seeds = torch.cat([seeds for _, seeds in data.train_dataloader()])
    assert not set(train_seeds.tolist()) & set(seeds.tolist())
    quiet = ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4)
    quiet.setup("fit")
    assert quiet.val_dataloader() == []
    with pytest.raises(ValueError, match="field 'val_samples' must be ≥ 0 .* got -3"):
        ClassConditionDataModule(num_classes=10, val_samples=-3)
