"""DaTo's per-step schedule and its search: ratio 0 is the caching schedule bit for bit; the search never loses to
that schedule at its FLOPs on the calibration samples (its FLOPs exact); a pruned step keeps the cached keys/values
that later cached-key partial steps read in step with its restored output."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit
from test_dato import trajectory

import l2c
from l2c.adapters import ModelSpec
from l2c.evaluate import SamplingSetup
from l2c.metrics import count_flops
from l2c.models import load_model
from l2c.plan import Action, Plan
from l2c.policies import DaToPolicy, StaticPolicy
from l2c.policies.dato import PRUNING, format_schedule, parse_schedule
from l2c.policies.search import Calibration, SearchConfig, search_schedule, static_schedule


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def run(model, policy, x, labels, steps):
    with policy.apply(model, timesteps=ddim_timesteps(steps)) as runtime:
        (final, _), flops = count_flops(lambda: ddim_sample(model, x, labels, steps))
        return final, flops, dict(runtime.executed)


def test_schedule_strings_round_trip_and_refuse_bad_entries():
    assert parse_schedule("0+-+0.4+-") == (0.0, None, 0.4, None)
    assert format_schedule((0.0, None, 0.4, None)) == "0+-+0.4+-"
    with pytest.raises(ValueError, match=r"entry 2 is '1'.*\[0, 1\)"):
        DaToPolicy(schedule="0+-+1")
    with pytest.raises(ValueError, match="step 0 must compute"):
        DaToPolicy(schedule="-+0")
    with pytest.raises(ValueError, match=r"\['interval'\] must keep their defaults"):
        DaToPolicy(schedule="0+0", interval=3)
    with pytest.raises(ValueError, match="3 entries, but the run has 6 steps"):
        DaToPolicy(schedule="0+-+0").apply(tiny_dit(), timesteps=ddim_timesteps(6))


def test_schedule_of_ratio_zero_is_its_caching_schedule_bit_for_bit():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    static = run(model, StaticPolicy(interval=3), x, labels, 7)
    scheduled = run(model, DaToPolicy().with_schedule(static_schedule(3, 7)), x, labels, 7)
    assert torch.equal(static[0], scheduled[0])
    assert static[1:] == scheduled[1:]


def test_schedule_prunes_by_each_steps_ratio():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    queries: list[int] = []
    handle = model.transformer_blocks[0].attn1.to_q.register_forward_hook(lambda m, a, o: queries.append(a[0].shape[1]))
    # 16 tokens, 4 base tokens: ratio 0.25 prunes 4, 0.5 prunes 8; steps 0 and 1 never prune (no dynamics yet).
    run(model, DaToPolicy(schedule="0.5+0.5+0.25+-+0.5+0"), x, labels, 6)
    handle.remove()
    assert queries == [16, 16, 12, 8, 16]


def test_saved_searched_schedule_loads_back(tmp_path):
    policy = DaToPolicy(cell=2, schedule="0+-+0.2+0.4").bind(tiny_dit(), ddim_timesteps(4), "DDIMScheduler")
    loaded = l2c.load_policy(policy.save_pretrained(tmp_path / "p", model_card=False))
    assert loaded.params() == policy.params() and loaded.step_ratios == (0.0, None, 0.2, 0.4)


def test_search_is_never_worse_than_the_static_schedule_at_its_flops():
    bundle = load_model("embedded:digits")
    setup = SamplingSetup(steps=8, num_samples=4, batch_size=4)
    config = SearchConfig(interval=2, generations=2, offspring=3, calibration_samples=4, flops_samples=1)
    result = search_schedule(bundle, setup, config)
    assert result.baseline.text == "0+-+0+-+0+-+0+-"
    assert result.best.flops <= result.budget_flops == result.baseline.flops
    assert result.best.psnr_db >= result.baseline.psnr_db
    assert result.sampling_runs == 1 + len(result.history)  # the uncached reference, then each candidate once
    # The budget is static every-2's FLOPs as counted, and the best schedule's predicted FLOPs are its counted ones.
    calibration = Calibration(bundle, replace(setup, seed=config.calibration_seed))
    assert calibration.flops(StaticPolicy(interval=2), 1) == result.baseline.flops
    assert calibration.flops(result.policy(config), 1) == result.best.flops
    # The baseline candidate is static every-2's samples on the calibration noise (ratio 0: the same run).
    assert calibration.psnr(StaticPolicy(interval=2)) == result.baseline.psnr_db


@dataclass
class PrunedThenPartial(DaToPolicy):
    """DaTo's pruning on full steps, cached-key partial self-attention (25% of the tokens) on the others."""

    kind = "dato-then-partial"
    partial_keys = "cached"

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        plan = super().build_plan(spec, num_steps)
        attn1 = spec.branches.index("attn1")
        reused = plan.actions[:, 0, attn1] == Action.REUSE
        plan.actions[reused, :, attn1] = Action.PARTIAL
        plan.token_ratio[reused, :, attn1] = 0.25
        return plan


def test_pruned_step_stores_the_keys_values_of_its_restored_tokens():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    inputs: list[torch.Tensor] = []
    attn = model.transformer_blocks[1].attn1
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: inputs.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    policy = PrunedThenPartial(interval=2, prune=0.5)
    with policy.apply(model, timesteps=ddim_timesteps(3)) as runtime:
        ddim_sample(model, x, labels, 3)  # full, partial, pruned full: the store as step 3's partial would read it
        state = trajectory(model)
        step, pruning = state.signals[(PRUNING, 1)]
        store = state.stores[(1, "attn1")]
        assert step == 2 and pruning is not None and runtime.executed[Action.PARTIAL] == 2  # step 1, two blocks
    handle.remove()
    hidden = inputs[-1]  # the pruned step's input, all 16 tokens
    kept = hidden.gather(1, pruning.kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    for name in ("to_k", "to_v"):
        projected = getattr(attn, name)(kept)
        expected = projected.gather(1, pruning.source.unsqueeze(-1).expand(-1, -1, projected.shape[-1]))
        assert torch.equal(store.keys_values[name], expected)
