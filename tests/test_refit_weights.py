"""predictors/refit_weights.py: each FORECAST slot's weights refit by least squares on the runtime's own histories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from l2c_testing import tiny_dit_pipeline

import l2c
from l2c import Action
from l2c.models import make_scheduler
from predictors.l2c_trainer import ForecastRouterTrainer
from predictors.refit_weights import (
    RefitConfig,
    SlotSolver,
    SlotStats,
    calibration_side,
    record,
    refit,
    refit_policy,
    refit_sequential,
    slot_mse,
)
from tests.test_forecast_training import KWARGS, STEPS, direct_step


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DiT teacher and a forecast policy exported by the trainer for it (after one training step)."""
    root = tmp_path_factory.mktemp("refit")
    teacher = root / "dit"
    tiny_dit_pipeline().save_pretrained(teacher)
    module = ForecastRouterTrainer(teacher=str(teacher), **KWARGS)
    direct_step(module, (torch.tensor([1, 7]), torch.tensor([5, 6])))  # measures the branch costs the budget weighs
    module.export(root / "policy")
    return teacher, root / "policy"


def test_normal_equations_solve_to_lstsq_on_a_hand_made_history():
    generator = torch.Generator().manual_seed(0)
    history = torch.randn(500, 3, generator=generator, dtype=torch.float64)
    target = history @ torch.tensor([1.7, -0.9, 0.2], dtype=torch.float64)
    target += 0.1 * torch.randn(500, generator=generator, dtype=torch.float64)
    stats = SlotStats.empty(3)
    for part in (slice(0, 120), slice(120, 500)):  # accumulated batch by batch
        stats.add(history[part], target[part])
    expected = torch.linalg.lstsq(history, target.unsqueeze(-1)).solution.squeeze(-1)
    solved = stats.solve(torch.zeros(3), ridge=0.0)
    torch.testing.assert_close(solved, expected, atol=1e-10, rtol=0)
    assert stats.mse(solved) == pytest.approx(float(((history @ solved - target) ** 2).mean()), rel=1e-9)
    # Σ_k w_k = 1: least squares over w = e_0 + N·z, N's columns spanning the weights that sum to zero.
    null = torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    newest = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    z = torch.linalg.lstsq(history @ null, (target - history @ newest).unsqueeze(-1)).solution.squeeze(-1)
    one = SlotSolver(ridge=0.0, weight_sum="one")(stats, torch.zeros(3))
    torch.testing.assert_close(one, newest + null @ z, atol=1e-10, rtol=0)
    kept = SlotSolver(ridge=0.0, weight_sum="kept")(stats, torch.tensor([0.5, 0.5, 0.7]))
    assert float(kept.sum()) == pytest.approx(1.7)
    # A ridge pulls the solution towards the current weights.
    current = torch.tensor([1.0, 0.0, 0.0])
    ridged = stats.solve(current, ridge=10.0)
    assert (ridged - current.double()).norm() < (solved - current.double()).norm()


def test_refit_lowers_the_calibration_mse_of_every_forecast_slot(exported):
    teacher, directory = exported
    policy = l2c.load_policy(directory)
    config = RefitConfig(samples=4, batch_size=4)
    side = calibration_side(policy, str(teacher), config)
    stats = record(policy, side)
    plan = policy.build_plan(policy.target.model, STEPS)
    assert set(stats) == {tuple(s) for s in (plan.actions == Action.FORECAST).nonzero().tolist()}
    before = slot_mse(policy, stats)
    # On the histories it is fit on, every slot's solution beats the weights that ran (the ridge's anchor).
    fitted = slot_mse(refit(policy, stats, config.solver), stats)
    assert all(fitted[slot] <= error for slot, error in before.items())
    assert sum(fitted.values()) < 0.9 * sum(before.values())

    refit_one, report = refit_policy(policy, side, config, source=str(directory))
    after = slot_mse(refit_one, record(refit_one, side))  # sampled with the refit weights: its own histories
    assert set(after) == set(before)
    assert report["mse_after"] == pytest.approx(sum(after.values()) / len(after))
    assert sum(after.values()) < 0.9 * sum(before.values())
    # Sampling with refit weights also moves the targets (a forecast upstream changes a branch's input): a slot may
    # end a little worse than it started (`slots_worse` in the report), never by much.
    for slot, error in before.items():
        assert after[slot] <= 1.01 * error, slot
    assert report["slots_worse"] == sum(after[s] > before[s] for s in before)
    assert torch.equal(refit_one.build_plan(refit_one.target.model, STEPS).actions, plan.actions)


def test_a_saved_refit_policy_samples_in_an_unmodified_dit_pipeline_as_the_in_memory_one(exported, tmp_path):
    teacher, directory = exported
    policy = l2c.load_policy(directory)
    config = RefitConfig(samples=4, batch_size=4, passes=1)
    refit, _ = refit_policy(policy, calibration_side(policy, str(teacher), config), config, source=str(directory))
    refit.save_pretrained(tmp_path / "refit")
    loaded = l2c.load_policy(tmp_path / "refit")
    assert loaded.provenance["refit_weights"]["passes"] == 1
    torch.testing.assert_close(loaded.forecast_weights, refit.forecast_weights, atol=0, rtol=0)

    pipe = type(tiny_dit_pipeline()).from_pretrained(teacher)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def images(applied) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in (21, 22)]
        with applied.apply(pipe):
            return pipe(class_labels=[2, 9], guidance_scale=2.0, generator=generators,
                        num_inference_steps=STEPS, output_type="pt").images  # fmt: skip

    saved = images(loaded)
    torch.testing.assert_close(saved, images(refit), atol=1e-6, rtol=0)
    assert not torch.allclose(saved, images(policy), atol=1e-4), "the refit changed the samples"


def test_a_sequential_refit_is_fit_on_the_histories_its_own_weights_make(exported):
    teacher, directory = exported
    policy = l2c.load_policy(directory)
    config = RefitConfig(samples=4, batch_size=4, sequential=True)
    side = calibration_side(policy, str(teacher), config)
    start = policy.forecast_weights.clone()
    refit_one = refit_sequential(policy, side, config.solver)
    assert torch.equal(policy.forecast_weights, start), "the source policy is left as it was"
    # Sampling with the result sees the histories each slot was solved on: solving again there changes nothing.
    stats = record(refit_one, side)
    again = refit(refit_one, stats, config.solver)
    torch.testing.assert_close(again.forecast_weights, refit_one.forecast_weights, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(refit_one.forecast_weights, start, atol=1e-3)
    with pytest.raises(ValueError, match="field 'batch_size' is 2"):
        refit_sequential(
            policy, calibration_side(policy, str(teacher), RefitConfig(samples=4, batch_size=2)), SlotSolver()
        )
