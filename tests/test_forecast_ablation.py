"""bench/forecast_ablation.py's variants of a forecast policy: the Taylor-weights variant is the trainer's start, the
reuse-only variant keeps the computed slots and forecasts nothing."""

from __future__ import annotations

import torch
from l2c_testing import tiny_dit_pipeline

from bench.forecast_ablation import reuse_only, with_taylor_weights
from l2c import Action
from l2c.policy_io import load_policy
from predictors.l2c_trainer import ForecastRouterTrainer
from tests.test_forecast_training import KWARGS, STEPS, direct_step


def test_taylor_and_reuse_only_variants_of_an_exported_forecast_policy(tmp_path):
    teacher = tmp_path / "dit"
    tiny_dit_pipeline().save_pretrained(teacher)
    module = ForecastRouterTrainer(teacher=str(teacher), **KWARGS)
    start = module.forecast_weights.detach().clone()
    direct_step(module, (torch.tensor([1, 7]), torch.tensor([5, 6])))  # measures the branch costs the budget weighs
    with torch.no_grad():
        module.forecast_weights.mul_(1.5)  # "learned": away from the Taylor rule
    module.export(tmp_path / "policy")
    policy = load_policy(tmp_path / "policy")
    spec = policy.target.model
    plan = policy.build_plan(spec, STEPS)
    assert int((plan.actions == Action.FORECAST).sum()) > 0

    taylor = with_taylor_weights(policy, STEPS)
    assert torch.equal(taylor.build_plan(spec, STEPS).actions, plan.actions)
    assert torch.allclose(taylor.forecast_weights, start)  # the even start plan is the export's: the trainer's init
    assert not torch.allclose(policy.forecast_weights, start)

    reuse = reuse_only(policy).build_plan(spec, STEPS).actions
    assert torch.equal(reuse == Action.COMPUTE, plan.actions == Action.COMPUTE)
    assert not bool((reuse == Action.FORECAST).any())
