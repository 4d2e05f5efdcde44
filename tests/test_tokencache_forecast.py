"""TokenCache with `taylor_order` (the token-wise forecast ToCa has, `l2c/policies/token_forecast.py`) on a real tiny
DiT: off, the samples are the reusing policy's bit for bit; on, a cache step's floored block is TaylorSeer's rule
written out by hand on the recorded full computations, and a partial block's unselected tokens are too."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from l2c_testing import BranchRecorder, ddim_sample, ddim_timesteps, dit_inputs, tiny_dit
from test_tokencache import record, tiny_policy

import l2c
from l2c import Action
from l2c.forecast import PolynomialForecaster
from l2c.policies.tokencache import TokenCachePolicy

STEPS = 6  # tiny_policy: full steps 0, 3, 5; block 0 recomputes half its tokens on cache steps, block 1 is floored


def samples(policy: TokenCachePolicy, model) -> tuple[torch.Tensor, l2c.CacheRuntime]:
    with policy.apply(model, timesteps=ddim_timesteps(STEPS)) as runtime:
        return ddim_sample(model, *dit_inputs(batch=2), STEPS)[0], runtime


def test_off_gives_the_reusing_policys_samples_bit_for_bit_and_on_differs():
    model = tiny_dit()
    default, runtime = samples(tiny_policy(model), model)
    off, _ = samples(tiny_policy(model, taylor_order=0), model)
    assert torch.equal(default, off)
    assert runtime.executed[Action.FORECAST] == 0 and runtime.executed[Action.PARTIAL] > 0
    on, runtime = samples(tiny_policy(model, taylor_order=1), model)
    assert runtime.executed[Action.FORECAST] > 0 and not torch.equal(on, default)


def test_the_option_forecasts_where_the_plan_reused_at_the_same_compute():
    model = tiny_dit()
    spec, timesteps = l2c.model_spec(model), ddim_timesteps(STEPS)
    plain = tiny_policy(model).plan_for(spec, timesteps)
    policy = tiny_policy(model, taylor_order=2)
    filled = policy.plan_for(spec, timesteps)
    reused = plain.actions == Action.REUSE
    assert bool(reused.any()) and bool((filled.actions[reused] == Action.FORECAST).all())
    assert torch.equal(filled.actions[~reused], plain.actions[~reused])
    assert torch.equal(filled.token_ratio, plain.token_ratio)
    assert filled.compute_fraction() == plain.compute_fraction()
    assert policy.forecaster == PolynomialForecaster("taylor", 2, fill_partial=True)
    assert dataclasses.replace(tiny_policy(model), taylor_order=1).forecaster.order == 1  # how compare makes its row


def test_cache_step_slots_are_the_taylor_rule_on_the_full_computations():
    model = tiny_dit()
    chosen = []
    with tiny_policy(model, taylor_order=1).apply(model, timesteps=ddim_timesteps(STEPS)) as runtime:
        recorder = BranchRecorder(model, fresh=True)  # after apply: the predictor's copy of block 0 is not recorded
        runtime.selector = record(runtime.selector, chosen)
        ddim_sample(model, *dit_inputs(batch=2), STEPS)
    recorder.remove()
    tolerance = dict(rtol=0, atol=1e-5)
    # Step 4 follows the full steps 0 and 3: TaylorSeer order 1 in step index, F_4 = h3 + (4 − 3)·(h3 − h0)/3.
    floored = [call["output"] for call in recorder.calls[(1, "ff")]]
    torch.testing.assert_close(floored[4], floored[3] + (floored[3] - floored[0]) / 3, **tolerance)
    partial = recorder.calls[(0, "ff")]
    assert len(partial) == len(floored) == STEPS
    h0, h3 = partial[0]["output"], partial[3]["output"]
    (index,) = [index for request, index in chosen if request.step == 4 and request.branch == "ff"]
    selected = torch.zeros(h3.shape[:2], dtype=torch.bool).scatter(1, index, True).unsqueeze(-1)
    expected = torch.where(selected, partial[4]["fresh"], h3 + (h3 - h0) / 3)
    torch.testing.assert_close(partial[4]["output"], expected, **tolerance)


@pytest.mark.parametrize("order", [-1, 1.5, True])
def test_bad_orders_are_refused_naming_the_field_and_range(order):
    with pytest.raises(ValueError, match=r"tokencache policy: field 'taylor_order' must be an integer ≥ 0"):
        TokenCachePolicy(taylor_order=order)
