"""FORECAST: the rules on hand-made histories, the history the runtime keeps (K entries, forecasting branches only),
forecast-filled partial steps, learned weight tables in policy files, and the refusals."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState
from l2c_testing import (
    BranchRecorder,
    FixedPlanPolicy,
    ddim_sample,
    ddim_timesteps,
    dit_inputs,
    plan_maker,
    tiny_dit,
    tiny_dit_pipeline,
)
from safetensors.torch import load_file

import l2c
from l2c import Action
from l2c.extension import Computed, ForecastRequest
from l2c.forecast import (
    PolynomialForecaster,
    WeightTable,
    forecast,
    hermite_weights,
    lagrange_weights,
    rule_table,
    taylor_weights,
)
from l2c.policies import POLICY_KINDS
from l2c.policy_io import FORMAT_VERSION
from l2c.runtime import STEP_HOOK


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def history_of(values: dict[int, torch.Tensor]) -> list[Computed]:
    """Computations at the given steps, newest (largest step) first."""
    return [Computed(s, float(1000 - s), values[s]) for s in sorted(values, reverse=True)]


def polynomial(coefficients: list[torch.Tensor], step: float) -> torch.Tensor:
    return sum(c * step**power for power, c in enumerate(coefficients))


# -- the rules on hand-made histories -------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [(6, 5, 4), (9, 5, 4), (7, 3, 2)])  # equal and unequal gaps
@pytest.mark.parametrize("order", [1, 2])
def test_lagrange_continues_a_polynomial_of_its_order_exactly(order, steps):
    generator = torch.Generator().manual_seed(order)
    coefficients = [torch.randn(2, 3, 4, generator=generator, dtype=torch.float64) for _ in range(order + 1)]
    history = history_of({s: polynomial(coefficients, s) for s in steps})
    for target in (steps[0] + 1, steps[0] + 3):
        predicted = forecast(history, lagrange_weights(target, [c.step for c in history], order))
        torch.testing.assert_close(predicted, polynomial(coefficients, target), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("steps", [(4, 3), (9, 5), (9, 5, 4)])
def test_taylor_order_one_continues_a_line_exactly_whatever_the_gaps(steps):
    coefficients = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(2)]
    history = history_of({s: polynomial(coefficients, s) for s in steps})
    for target in (steps[0] + 1, steps[0] + 4):
        predicted = forecast(history, taylor_weights(target, [c.step for c in history], 1))
        torch.testing.assert_close(predicted, polynomial(coefficients, target), rtol=1e-12, atol=1e-10)


def test_taylor_order_two_is_taylorseers_expansion_not_the_polynomial_through_the_points():
    # Equal gaps, one step ahead: h0 + Δ + Δ²/2 with backward differences = 2.5·h0 − 2·h1 + 0.5·h2.
    assert taylor_weights(3, [2, 1, 0], 2).tolist() == [2.5, -2.0, 0.5]
    # s² at 0, 1, 2 continues to 9; TaylorSeer's order 2 says 8, the polynomial rule 9.
    squares = history_of({s: torch.tensor([float(s * s)]) for s in (0, 1, 2)})
    assert forecast(squares, taylor_weights(3, [2, 1, 0], 2)).item() == 8.0
    assert forecast(squares, lagrange_weights(3, [2, 1, 0], 2)).item() == pytest.approx(9.0)


def taylorseer_state(steps: list[int], order: int, generator: torch.Generator):
    """diffusers' `TaylorSeerState` updated with random outputs computed at `steps`, and our kept history of them."""
    values = {s: torch.randn(2, 5, 3, generator=generator, dtype=torch.float64) for s in steps}
    state = TaylorSeerState(taylor_factors_dtype=torch.float64, max_order=order)
    kept: list[Computed] = []
    for s in steps:
        state.current_step = s
        state.update((values[s],))
        kept = [Computed(s, 0.0, values[s]), *kept][: order + 1]
    return state, kept


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_taylor_weights_equal_diffusers_taylorseer_state_on_unequal_gaps(order):
    """diffusers' own recursion (`TaylorSeerState.update` / `predict`) on the same computations and steps."""
    steps, generator = [0, 1, 2, 4, 9], torch.Generator().manual_seed(order)
    state, kept = taylorseer_state(steps, order, generator)
    for target in (10, 13):
        state.current_step = target
        expected = state.predict()[0]
        ours = forecast(kept, taylor_weights(target, [c.step for c in kept], order))
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_hermite_weights_of_known_expansions():
    # Equal gaps, one step ahead, σ 0.5: F0 + F1·σ·H1(σ) + F2·σ²·H2(σ)/2 = F0 + 0.5·F1 − 0.125·F2
    # with F1 = h0 − h1, F2 = h0 − 2h1 + h2: weights 1.375, −0.25, −0.125 (they sum to 1: a constant is kept).
    assert hermite_weights(3, [2, 1, 0], 2, 0.5).tolist() == [1.375, -0.25, -0.125]
    # σ = 1/√2 makes the first-order term TaylorSeer's: 2σ²·x = x.
    torch.testing.assert_close(hermite_weights(7, [4, 2], 1, 2**-0.5), taylor_weights(7, [4, 2], 1))
    assert hermite_weights(5, [3], 2).tolist() == [1.0]  # one computation: the value itself


@pytest.mark.parametrize("order", [1, 2, 3])
def test_hermite_weights_apply_hicaches_formula_to_diffusers_taylorseer_factors(order):
    """HiCache's forecast, F0 + Σ_k F_k · σ^k · H_k(σ·x) / k!, on the factors of diffusers' own `TaylorSeerState`,
    with H_k written out by its three-term recursion (an implementation apart from `physicists_hermite`)."""
    steps, scale, generator = [0, 1, 3, 4, 8], 0.6, torch.Generator().manual_seed(order)
    state, kept = taylorseer_state(steps, order, generator)
    for target in (9, 12):
        x = scale * (target - steps[-1])
        hermite = [1.0, 2 * x]
        while len(hermite) <= order:
            k = len(hermite) - 1
            hermite.append(2 * x * hermite[k] - 2 * k * hermite[k - 1])
        factors = state.taylor_factors[0]
        expected = sum(factors[k] * scale**k * hermite[k] / math.factorial(k) for k in range(order + 1))
        ours = forecast(kept, hermite_weights(target, [c.step for c in kept], order, scale))
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_short_history_truncates_the_order_and_reuse_is_one_weight():
    assert taylor_weights(5, [3], 2).tolist() == [1.0]  # one computation: the expansion is the value itself
    assert lagrange_weights(5, [3, 2], 3).tolist() == [3.0, -2.0]  # two points: a line
    assert PolynomialForecaster(order=0).weights(ForecastRequest(4, 0.0, 0, "ff", 0, (2,), (0.0,))).tolist() == [1.0]
    with pytest.raises(ValueError, match="2 weights for a history of 1"):  # fewer weights: the newest computations
        forecast(history_of({1: torch.ones(1)}), torch.ones(2))


# -- the runtime: what is kept, where ------------------------------------------------------------------------------
@dataclass
class ForecastingPolicy(FixedPlanPolicy):
    """A fixed plan with a forecaster (a rule, or a learned `WeightTable` saved in `policy.safetensors`)."""

    kind = "test-forecast"
    rule: str = "taylor"
    order: int = 1
    fill: bool = False
    table: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.forecaster = (
            PolynomialForecaster(self.rule, self.order, self.fill)
            if self.table is None
            else WeightTable(self.table, self.fill)
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.table is None else {"forecast.weights": self.table}


def states(runtime):
    return list(runtime.model._diffusers_hook.get_hook(STEP_HOOK).states._state_cache.values())


def every_third_forecasts_ff(num_steps: int = 10) -> dict[int, Action]:
    return {s: Action.FORECAST for s in range(num_steps) if s % 3 != 0}


def test_history_keeps_k_computations_and_only_on_forecasting_branches():
    model = tiny_dit(num_layers=2)
    policy = ForecastingPolicy(plan_maker(every_third_forecasts_ff(), branches=("ff",)), order=2)
    runtime = policy.apply(model, ddim_timesteps(10))
    ddim_sample(model, *dit_inputs(batch=2), 10)
    (state,) = states(runtime)
    timesteps = runtime.timesteps.tolist()
    for (_, name), store in state.stores.items():
        if name == "attn1":
            assert store.history == []  # never forecast: only the last output, as a reusing branch keeps
            continue
        assert [c.step for c in store.history] == [9, 6, 3]  # K = order + 1 = 3 of the computed 0, 3, 6, 9
        assert [c.timestep for c in store.history] == [timesteps[s] for s in (9, 6, 3)]
        assert store.history[0].output is store.output  # the newest entry is the stored output, not a copy
    assert runtime.executed[Action.FORECAST] == 6 * 2  # 6 steps × 2 blocks' ff
    runtime.remove()


def test_forecast_outputs_are_the_weighted_history_and_are_not_stored():
    model = tiny_dit(num_layers=1)
    policy = ForecastingPolicy(plan_maker({2: Action.FORECAST, 3: Action.REUSE}), rule="lagrange", order=1)
    recorder = BranchRecorder(model)
    runtime = policy.apply(model, ddim_timesteps(4))
    ddim_sample(model, *dit_inputs(batch=2), 4)
    for name in ("attn1", "ff"):
        outputs = [call["output"] for call in recorder.calls[(0, name)]]
        torch.testing.assert_close(outputs[2], 2 * outputs[1] - outputs[0], rtol=0, atol=1e-6)
        assert torch.equal(outputs[3], outputs[1])  # reuse after a forecast: the last computed output
    runtime.remove()
    recorder.remove()


def test_a_partial_step_can_fill_the_tokens_it_does_not_recompute_from_the_forecast():
    model = tiny_dit(num_layers=1)
    steps = {2: Action.PARTIAL}
    recorder = BranchRecorder(model, fresh=True)
    runtime = ForecastingPolicy(plan_maker(steps, ratio=0.25, branches=("ff",)), rule="lagrange", fill=True).apply(
        model, ddim_timesteps(3)
    )
    ddim_sample(model, *dit_inputs(batch=2), 3)
    calls = recorder.calls[(0, "ff")]
    out, fresh = calls[2]["output"], calls[2]["fresh"]
    predicted = 2 * calls[1]["output"] - calls[0]["output"]
    selected = out.shape[1] // 4  # all tokens are equally stale: the stalest selector takes the first ones
    torch.testing.assert_close(out[:, :selected], fresh[:, :selected], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, selected:], predicted[:, selected:], rtol=0, atol=1e-6)
    runtime.remove()
    # Without `fill`, the tokens not recomputed keep the stored output (today's partial step).
    runtime = ForecastingPolicy(plan_maker(steps, ratio=0.25, branches=("ff",)), rule="lagrange").apply(
        model, ddim_timesteps(3)
    )
    ddim_sample(model, *dit_inputs(batch=2), 3)
    out, previous = calls[5]["output"], calls[4]["output"]
    assert torch.equal(out[:, selected:], previous[:, selected:])
    (state,) = states(runtime)
    assert state.stores[(0, "ff")].history == []  # no forecast and no fill: nothing kept
    runtime.remove()
    recorder.remove()


@dataclass
class RowsOnAttn1(ForecastingPolicy):
    """Per-sample decisions on attn1 (row 0 computes, row 1 reuses, from step 1) beside a forecasting ff."""

    def decide(self, step, block, branch_index, state):
        if step == 0 or branch_index != 0:
            return None
        return torch.tensor([Action.COMPUTE, Action.REUSE]), 1.0


def test_per_sample_decisions_keep_working_beside_forecasting_branches():
    model, steps = tiny_dit(num_layers=1), 6
    recorder = BranchRecorder(model)
    runtime = RowsOnAttn1(plan_maker(every_third_forecasts_ff(steps), branches=("ff",))).apply(
        model, ddim_timesteps(steps)
    )
    ddim_sample(model, *dit_inputs(batch=2), steps)
    attn1 = [call["output"] for call in recorder.calls[(0, "attn1")]]
    assert all(torch.equal(out[1], attn1[0][1]) for out in attn1)  # row 1 kept its step-0 output
    (state,) = states(runtime)
    assert state.stores[(0, "attn1")].history == []
    assert [c.step for c in state.stores[(0, "ff")].history] == [3, 0]
    assert runtime.executed[Action.FORECAST] == 4
    runtime.remove()
    recorder.remove()


@dataclass
class ForecastsByDecision(FixedPlanPolicy):
    def decide(self, step, block, branch_index, state):
        return (Action.FORECAST, 1.0) if step == 1 and branch_index == 0 else None


def test_a_plan_forecasts_without_a_declared_forecaster_by_the_default_rule():
    model = tiny_dit(num_layers=1)
    recorder = BranchRecorder(model)
    with FixedPlanPolicy(plan_maker({3: Action.FORECAST})).apply(model, ddim_timesteps(4)) as runtime:
        ddim_sample(model, *dit_inputs(), 4)
        (state,) = states(runtime)
        assert [c.step for c in state.stores[(0, "ff")].history] == [2, 1, 0]  # K = DEFAULT_HISTORY = 3
    outputs = [call["output"] for call in recorder.calls[(0, "ff")]]
    torch.testing.assert_close(outputs[3], 2.5 * outputs[2] - 2 * outputs[1] + 0.5 * outputs[0], rtol=0, atol=1e-6)
    recorder.remove()


def test_forecasting_without_a_history_or_with_a_bad_forecaster_is_refused():
    model = tiny_dit(num_layers=1)
    runtime = ForecastsByDecision(plan_maker({})).apply(model, ddim_timesteps(3))
    with pytest.raises(RuntimeError, match="forecast block 0 attn1 at step 1, but it keeps no history"):
        ddim_sample(model, *dit_inputs(), 3)
    runtime.remove()
    policy = FixedPlanPolicy(plan_maker({}))
    policy.forecaster = "taylor"
    with pytest.raises(ValueError, match="field 'forecaster'"):
        policy.apply(model, ddim_timesteps(3))


# -- learned weights: a table, in the policy file, on a pipeline -----------------------------------------------------
def test_a_rule_as_a_weight_table_gives_the_rules_samples_and_is_differentiable():
    model, steps = tiny_dit(num_layers=2), 10
    make = plan_maker(every_third_forecasts_ff(steps), branches=("ff",))
    rule = ForecastingPolicy(make, order=2)
    with rule.apply(model, ddim_timesteps(steps)) as runtime:
        expected, _ = ddim_sample(model, *dit_inputs(batch=2), steps)
        spec, plan = runtime.spec, runtime.plan
    table = rule_table(rule.forecaster, plan, ddim_timesteps(steps).tolist(), spec.branches)
    assert table.shape == (steps, 2, 2, 3)
    torch.testing.assert_close(table[4, 0, 1], torch.cat([taylor_weights(4, [3, 0], 2).float(), torch.zeros(1)]))
    WeightTable(table).validate(plan)
    with ForecastingPolicy(make, table=table).apply(model, ddim_timesteps(steps)):
        learned, _ = ddim_sample(model, *dit_inputs(batch=2), steps)
    torch.testing.assert_close(learned, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        WeightTable(table[:, :1]).validate(plan)

    weights = table.clone().requires_grad_(True)
    with torch.enable_grad(), ForecastingPolicy(make, table=weights).apply(model, ddim_timesteps(steps)):
        latents, labels = dit_inputs(batch=2)
        out, _ = ddim_sample.__wrapped__(model, latents, labels, steps)
        out.square().sum().backward()
    assert weights.grad is not None and weights.grad[1:, :, 1].abs().sum() > 0
    assert weights.grad[:, :, 0].abs().sum() == 0  # attn1 never forecasts


@pytest.fixture
def forecast_kind(monkeypatch):
    monkeypatch.setitem(POLICY_KINDS, ForecastingPolicy.kind, ForecastingPolicy)


def learned_from_artifact(cls, params, tensors, target):
    return cls(plan_maker(every_third_forecasts_ff(4)), table=tensors["forecast.weights"], target=target)


def test_a_forecast_plan_and_its_weights_round_trip_and_run_the_same_on_an_unmodified_dit_pipeline(
    tmp_path, forecast_kind, monkeypatch
):
    monkeypatch.setattr(ForecastingPolicy, "params", lambda self: {})
    monkeypatch.setattr(ForecastingPolicy, "from_artifact", classmethod(learned_from_artifact))
    pipe = tiny_dit_pipeline()
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps.clone()
    make = plan_maker(every_third_forecasts_ff(4))
    rule = ForecastingPolicy(make, order=1)
    table = rule_table(rule.forecaster, make(l2c.model_spec(pipe.transformer), 4), timesteps.tolist(), ("attn1", "ff"))
    table[2] *= 0.5  # a "learned" table: not the rule's
    policy = ForecastingPolicy(make, table=table).bind(pipe.transformer, timesteps, "DDIMScheduler")
    directory = policy.save_pretrained(tmp_path / "policy")

    tensors = load_file(str(directory / "policy.safetensors"))
    assert Action.FORECAST in tensors["plan.actions"].unique().tolist()
    assert torch.equal(tensors["forecast.weights"], table)
    assert json.loads((directory / "config.json").read_text())["format_version"] == FORMAT_VERSION
    loaded = l2c.load_policy(directory)
    assert torch.equal(loaded.forecaster.table, table)

    with loaded.apply(pipe) as runtime:  # the step table follows the pipeline's scheduler
        images = run_dit(pipe)
        assert runtime.executed[Action.FORECAST] == 2 * 2 * 2  # steps 1, 2 × 2 blocks × 2 branches
    with loaded.apply(pipe.transformer, timesteps=timesteps):  # the bare transformer, called by the same pipeline
        expected = run_dit(pipe)
    with policy.apply(pipe):  # the policy before saving
        before = run_dit(pipe)
    assert torch.equal(images, expected) and torch.equal(images, before)
    assert (images - run_dit(pipe)).abs().max() > 1e-4  # the forecasts changed the samples


def run_dit(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 7], num_inference_steps=4, generator=generator, output_type="pt").images


def test_a_file_of_a_newer_format_is_refused_with_its_version(tmp_path):
    policy = l2c.load_policy("taylorseer:interval=2,order=1,warmup=1").bind(tiny_dit(), ddim_timesteps(4), None)
    directory = policy.save_pretrained(tmp_path / "policy")
    config = json.loads((directory / "config.json").read_text())
    assert config["format_version"] == 1  # FORECAST is an action code of format 1: old files need no conversion
    (directory / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(l2c.PolicyFormatError, match=f"'format_version' is {FORMAT_VERSION + 1}"):
        l2c.load_policy(directory)
