"""Token-partial steps that forecast the tokens they do not recompute (ToCa/DuCa `taylor_order`, TaylorSeer + ToCa).

Checked on a real tiny DiT against the Taylor rule written out by hand on the recorded whole computations: the
selected tokens are the module's output, a token not recomputed since the newest whole computation is the rule's
forecast, and one recomputed by an earlier partial step is its value then plus the rule's change since. With the
option off, ToCa's samples are today's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
from l2c_testing import (
    BranchRecorder,
    FixedPlanPolicy,
    ddim_sample,
    ddim_timesteps,
    dit_inputs,
    plan_maker,
    tiny_dit,
)
from test_compile import CountingBackend

import l2c
from l2c import Action
from l2c.forecast import PolynomialForecaster
from l2c.runtime import STEP_HOOK

# Per step: the tokens (of 16) each of the 2 samples recomputes; they overlap across steps on purpose.
SELECTED = {2: [[0, 1, 2, 3], [4, 5, 6, 7]], 3: [[2, 3, 8, 9], [7, 10, 11, 12]], 5: [[0, 9, 14, 15], [1, 2, 3, 4]]}
STEPS = {2: Action.PARTIAL, 3: Action.PARTIAL, 4: Action.FORECAST, 5: Action.PARTIAL}  # 0 and 1 compute


@dataclass
class FillingPolicy(FixedPlanPolicy):
    """A fixed plan on `ff` with fixed token selections and TaylorSeer order 1 filling the partial steps."""

    kind = "test-fill"

    def __post_init__(self) -> None:
        self.forecaster = PolynomialForecaster("taylor", 1, fill_partial=True)


def fixed_selection(request) -> torch.Tensor:
    return torch.tensor(SELECTED[request.step])


def mask(step: int) -> torch.Tensor:
    chosen = torch.zeros(2, 16, dtype=torch.bool)
    chosen[torch.arange(2).unsqueeze(1), torch.tensor(SELECTED[step])] = True
    return chosen.unsqueeze(-1)


def test_partial_steps_forecast_unselected_tokens_by_the_rule_and_compute_the_selected():
    model = tiny_dit(num_layers=1)
    recorder = BranchRecorder(model, fresh=True)
    policy = FillingPolicy(plan_maker(STEPS, ratio=0.25, branches=("ff",)), fixed_selection)
    runtime = policy.apply(model, ddim_timesteps(6))
    ddim_sample(model, *dit_inputs(batch=2), 6)
    calls = recorder.calls[(0, "ff")]
    out = [call["output"] for call in calls]
    fresh = [call["fresh"] for call in calls]
    # Whole computations at steps 0 and 1: TaylorSeer order 1 in step index, F_t = h1 + (t − 1)·(h1 − h0).
    h0, h1 = out[0], out[1]
    slope = h1 - h0
    tolerance = dict(rtol=0, atol=1e-5)
    # Step 2: the selected tokens are the module's output, the others F_2.
    expected = torch.where(mask(2), fresh[2], h1 + slope)
    torch.testing.assert_close(out[2], expected, **tolerance)
    # Step 3: a token recomputed at step 2 and not now is its step-2 value plus F_3 − F_2 = slope; untouched ones F_3.
    last = torch.where(mask(2), fresh[2], h1)  # each token's last computed value, and when: step 2 or step 1
    since = torch.where(mask(2), 2, 1)
    expected = torch.where(mask(3), fresh[3], last + (3 - since) * slope)
    torch.testing.assert_close(out[3], expected, **tolerance)
    # Step 4 forecasts every token the same way, from its last computed value.
    last, since = torch.where(mask(3), fresh[3], last), torch.where(mask(3), 3, since)
    torch.testing.assert_close(out[4], last + (4 - since) * slope, **tolerance)
    expected = torch.where(mask(5), fresh[5], last + (5 - since) * slope)
    torch.testing.assert_close(out[5], expected, **tolerance)
    # The history holds only the whole computations; the store each token's last computed value.
    (state,) = runtime.model._diffusers_hook.get_hook(STEP_HOOK).states._state_cache.values()
    store = state.stores[(0, "ff")]
    assert [c.step for c in store.history] == [1, 0]
    torch.testing.assert_close(store.output, torch.where(mask(5), fresh[5], last), **tolerance)
    runtime.remove()
    recorder.remove()


def toca_samples(policy: str, steps: int = 6) -> tuple[torch.Tensor, l2c.CacheRuntime]:
    model = tiny_dit()
    with l2c.load_policy(policy).apply(model, timesteps=ddim_timesteps(steps)) as runtime:
        return ddim_sample(model, *dit_inputs(batch=2), steps)[0], runtime


@pytest.mark.parametrize("kind", ["toca", "duca"])
def test_off_gives_todays_samples_bit_for_bit_and_keeps_no_history(kind):
    default, runtime = toca_samples(kind)
    off, _ = toca_samples(f"{kind}:taylor_order=0")
    assert torch.equal(default, off)
    assert runtime.executed[Action.FORECAST] == 0 and runtime.executed[Action.PARTIAL] > 0
    on, runtime = toca_samples(f"{kind}:taylor_order=1")
    assert runtime.executed[Action.FORECAST] > 0 and not torch.equal(on, default)


@pytest.mark.parametrize("kind", ["toca", "duca"])
def test_the_option_forecasts_where_the_plan_reused_at_the_same_compute(kind):
    spec = l2c.model_spec(tiny_dit())
    plain = l2c.load_policy(kind).resolved(spec).build_plan(spec, 20)
    filled = l2c.load_policy(f"{kind}:taylor_order=2").resolved(spec).build_plan(spec, 20)
    reused = plain.actions == Action.REUSE
    assert bool(reused.any()) and bool((filled.actions[reused] == Action.FORECAST).all())
    assert torch.equal(filled.actions[~reused], plain.actions[~reused])
    assert torch.equal(filled.token_ratio, plain.token_ratio)
    assert filled.compute_fraction() == plain.compute_fraction()
    assert l2c.load_policy(f"{kind}:taylor_order=2").forecaster == PolynomialForecaster("taylor", 2, True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("toca:taylor_order=-1", "toca policy: field 'taylor_order' must be an integer ≥ 0, got -1"),
        ("duca:taylor_order=-2", "duca policy: field 'taylor_order' must be an integer ≥ 0, got -2"),
        ("toca:taylor_order=1.5", "policy 'toca': option 'taylor_order' expects int, got '1.5'"),
    ],
)
def test_bad_orders_are_refused_naming_the_field_and_range(text, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        l2c.load_policy(text)


def test_compiled_graph_count_does_not_grow_with_the_step_count():
    counts = {}
    try:
        with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for steps in (20, 50):
                torch._dynamo.reset()
                model, backend = tiny_dit(), CountingBackend()
                x, labels = dit_inputs(batch=2)
                runtime = l2c.load_policy("toca:taylor_order=2").apply(model, timesteps=ddim_timesteps(steps))
                compiled = ddim_sample(torch.compile(model, backend=backend), x, labels, steps)[0]
                runtime.remove()
                counts[steps] = backend.graphs
        assert runtime.executed[Action.FORECAST] > 0
        eager, _ = toca_samples("toca:taylor_order=2", steps=50)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert counts[20] == counts[50], counts  # per branch action and block segment, never per step
