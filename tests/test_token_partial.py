"""Token-partial self-attention: exactly which keys and values the selected queries see, in each `partial_keys` mode.

`fresh`: the selected tokens are the queries; keys and values are projected from every token of this step's input.
`cached`: keys and values of the selected tokens are projected from this step's input; every other token's come
from the projections stored when that token was last computed. Checked against attention written out by hand
with the module's own weights, on a real tiny DiT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from l2c_testing import (
    BranchRecorder,
    ComputeCounter,
    FixedPlanPolicy,
    ddim_timesteps,
    dit_inputs,
    plan_maker,
    tiny_dit,
)

from l2c import Action
from l2c.forecast import PolynomialForecaster

NUM_TOKENS = 16  # tiny DiT: 8×8 latents, patch 2
SELECTED = {1: [[3, 0, 9, 15], [1, 2, 14, 7]], 2: [[3, 5, 6, 12], [0, 8, 9, 10]]}  # per step: [batch, 4] indices
ROOT = Path(__file__).resolve().parents[1]


def fixed_selection(request) -> torch.Tensor:
    return torch.tensor(SELECTED[request.step])


def attn1_partial_policy(mode: str, steps: int) -> FixedPlanPolicy:
    plan = plan_maker({s: Action.PARTIAL for s in range(1, steps)}, 0.25, ("attn1",))
    policy = FixedPlanPolicy(plan, fixed_selection)
    policy.partial_keys = mode
    return policy


def timestep_free_block0(model) -> None:
    """Zero block 0's adaLN weights: its attn1 input then depends on the latents only, not on the timestep."""
    with torch.no_grad():
        model.transformer_blocks[0].norm1.linear.weight.zero_()


def by_hand(attn, queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """to_out(softmax(q·kᵀ/√d)·v) with q = to_q(queries); `key`/`value` are already projected [B, N, inner]."""
    q = attn.to_q(queries)
    heads = attn.heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(key).transpose(-1, -2) * split(q).shape[-1] ** -0.5).softmax(-1)
    out = (weights @ split(value)).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


def take(tensor: torch.Tensor, index: list[list[int]]) -> torch.Tensor:
    index = torch.tensor(index)
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


def run(mode: str, latents_per_step: list[torch.Tensor], fresh: bool = False, policy: FixedPlanPolicy | None = None):
    """Call the model once per step with the given latents; return attn1 of block 0's recorded calls.

    `fresh` also records what a full computation would return (which calls the projections once more)."""
    model = tiny_dit()
    timestep_free_block0(model)
    steps = len(latents_per_step)
    timesteps = ddim_timesteps(steps)
    _, labels = dit_inputs(batch=2)
    recorder = BranchRecorder(model, fresh=fresh)
    counter = ComputeCounter(model)
    policy = attn1_partial_policy(mode, steps) if policy is None else policy
    with policy.apply(model, timesteps=timesteps), torch.no_grad():
        for step, latents in enumerate(latents_per_step):
            model(latents, timestep=timesteps[step].expand(2), class_labels=labels)
    recorder.remove()
    counter.remove()
    return model.transformer_blocks[0].attn1, recorder.calls[(0, "attn1")], counter


@pytest.mark.parametrize("mode", ["fresh", "cached"])
def test_unchanged_input_partial_equals_full_recomputation(mode):
    latents, _ = dit_inputs(batch=2)
    _, calls, _ = run(mode, [latents, latents], fresh=True)
    assert torch.equal(calls[1]["input"], calls[0]["input"])  # nothing changed between the two steps
    torch.testing.assert_close(calls[1]["output"], calls[1]["fresh"], rtol=1e-5, atol=1e-6)


def test_fresh_keys_are_every_token_of_this_step():
    first, _ = dit_inputs(batch=2, seed=1)
    second, _ = dit_inputs(batch=2, seed=2)
    attn, calls, counter = run("fresh", [first, second])
    x1 = calls[1]["input"]
    with torch.no_grad():
        expected = by_hand(attn, take(x1, SELECTED[1]), attn.to_k(x1), attn.to_v(x1))
    torch.testing.assert_close(take(calls[1]["output"], SELECTED[1]), expected, rtol=1e-5, atol=1e-6)
    assert [n for block, n in counter.keys if block == 0] == [NUM_TOKENS, NUM_TOKENS]


def test_cached_keys_mix_fresh_selected_and_stored_projections_over_steps():
    latents = [dit_inputs(batch=2, seed=s)[0] for s in (1, 2, 3)]
    attn, calls, counter = run("cached", latents)
    x0, x1, x2 = (call["input"] for call in calls)
    with torch.no_grad():
        key, value = attn.to_k(x0), attn.to_v(x0)  # step 0 computed every token
        for step, x in ((1, x1), (2, x2)):
            index = torch.tensor(SELECTED[step]).unsqueeze(-1).expand(-1, -1, key.shape[-1])
            selected = take(x, SELECTED[step])
            key = key.scatter(1, index, attn.to_k(selected))
            value = value.scatter(1, index, attn.to_v(selected))
            expected = by_hand(attn, selected, key, value)
            torch.testing.assert_close(take(calls[step]["output"], SELECTED[step]), expected, rtol=1e-5, atol=1e-6)
            previous = calls[step - 1]["output"]
            unselected = torch.ones(2, NUM_TOKENS, dtype=torch.bool)
            unselected[torch.arange(2).unsqueeze(1), torch.tensor(SELECTED[step])] = False
            assert torch.equal(calls[step]["output"][unselected], previous[unselected])  # reused rows untouched
    # The partial steps project only the 4 selected tokens of each sample into keys and values.
    assert [n for block, n in counter.keys if block == 0] == [NUM_TOKENS, 4, 4]


def test_cached_keys_differ_from_fresh_keys_when_inputs_change():
    latents = [dit_inputs(batch=2, seed=s)[0] for s in (1, 2)]
    _, fresh_calls, _ = run("fresh", latents)
    _, cached_calls, _ = run("cached", latents)
    assert not torch.allclose(fresh_calls[1]["output"], cached_calls[1]["output"])


FORECAST_SELECTED = {2: [[3, 0, 9, 15], [1, 2, 14, 7]], 3: [[3, 5, 6, 12], [0, 8, 9, 10]]}


def forecast_keys_policy() -> FixedPlanPolicy:
    """Steps 0 and 1 whole, 2 and 3 partial in attn1 with `partial_keys="forecast"` and Taylor order 1 filling them."""
    plan = plan_maker({2: Action.PARTIAL, 3: Action.PARTIAL}, 0.25, ("attn1",))
    policy = FixedPlanPolicy(plan, lambda request: torch.tensor(FORECAST_SELECTED[request.step]))
    policy.partial_keys = "forecast"
    policy.forecaster = PolynomialForecaster("taylor", 1, fill_partial=True)
    return policy


def test_forecast_keys_are_the_taylor_rule_on_whole_computations_with_the_selected_tokens_fresh():
    """Order 1 from the whole computations at steps 0 and 1: F_t = K1 + (t − 1)(K1 − K0). At step 2 the unselected
    tokens' keys/values are F_2; at step 3 a token step 2 recomputed is its step-2 projection plus F_3 − F_2, the
    others F_3; the selected tokens' are fresh. Only the selected tokens are projected, as under "cached"."""
    latents = [dit_inputs(batch=2, seed=s)[0] for s in (1, 2, 3, 4)]
    attn, calls, counter = run("forecast", latents, policy=forecast_keys_policy())
    x = [call["input"] for call in calls]
    with torch.no_grad():
        k0, k1, v0, v1 = attn.to_k(x[0]), attn.to_k(x[1]), attn.to_v(x[0]), attn.to_v(x[1])
        rule = lambda t, h0, h1: h1 + (t - 1) * (h1 - h0)  # noqa: E731
        key, value = k1.clone(), v1.clone()  # each token's last computed projection
        for step in (2, 3):
            index = torch.tensor(FORECAST_SELECTED[step]).unsqueeze(-1).expand(-1, -1, k0.shape[-1])
            selected = take(x[step], FORECAST_SELECTED[step])
            recomputed = torch.zeros(2, NUM_TOKENS, 1, dtype=torch.bool)
            if step == 3:
                recomputed = recomputed.scatter(1, torch.tensor(FORECAST_SELECTED[2]).unsqueeze(-1), True)
            change_k, change_v = rule(step, k0, k1) - rule(2, k0, k1), rule(step, v0, v1) - rule(2, v0, v1)
            forecast_k = torch.where(recomputed, key + change_k, rule(step, k0, k1))
            forecast_v = torch.where(recomputed, value + change_v, rule(step, v0, v1))
            fresh_k, fresh_v = attn.to_k(selected), attn.to_v(selected)
            expected = by_hand(
                attn, selected, forecast_k.scatter(1, index, fresh_k), forecast_v.scatter(1, index, fresh_v)
            )
            torch.testing.assert_close(
                take(calls[step]["output"], FORECAST_SELECTED[step]), expected, rtol=1e-5, atol=1e-5
            )
            key, value = key.scatter(1, index, fresh_k), value.scatter(1, index, fresh_v)
    assert [n for block, n in counter.keys if block == 0] == [NUM_TOKENS, NUM_TOKENS, 4, 4]
    stored_keys = forecast_keys_policy()
    stored_keys.partial_keys = "cached"  # the same forecast outputs, the stored keys/values: a different attention
    _, cached_calls, _ = run("cached", latents, policy=stored_keys)
    assert not torch.allclose(
        take(cached_calls[3]["output"], FORECAST_SELECTED[3]), take(calls[3]["output"], FORECAST_SELECTED[3])
    )


def test_forecast_keys_need_a_forecaster_that_fills_partial_steps():
    policy = attn1_partial_policy("forecast", 2)
    with pytest.raises(ValueError, match="partial_keys='forecast'.*fill_partial=True"):
        policy.apply(tiny_dit(), timesteps=ddim_timesteps(2))


def test_unknown_partial_keys_mode_is_refused():
    with pytest.raises(ValueError, match="partial_keys.*'stale'.*fresh.*cached"):
        attn1_partial_policy("stale", 2).apply(tiny_dit(), timesteps=ddim_timesteps(2))


def test_bench_script_writes_rows_for_every_branch(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "token_partial.py"), "--json", str(out), "--hidden", "32"]
    command += ["--heads", "2", "--tokens", "16", "--repeats", "2", "--ratios", "0.25", "0.5"]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    rows = json.loads(out.read_text())["rows"]
    found = sorted((r["branch"], r["partial_keys"] or "", r["token_ratio"]) for r in rows)
    assert found == [
        (branch, keys, ratio)
        for branch, keys in (("attn1", "cached"), ("attn1", "fresh"), ("attn2", ""), ("ff", ""))
        for ratio in (0.25, 0.5)
    ]
    # FLOPs are counted on what ran: the MLP at a quarter of the tokens does a quarter of the work.
    ff = {r["token_ratio"]: r["flops_ratio"] for r in rows if r["branch"] == "ff"}
    assert ff[0.25] == pytest.approx(0.25)
    assert all(r["wall_ratio"] > 0 for r in rows)
