"""Reference token selectors (l2c/policies/selectors.py): stalest, seeded random and the oracle, on hand-made
requests with known answers, the oracle on a real tiny DiT under ToCa's plan, and a TokenCache predictor's scores
selecting on ToCa's plan."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit
from test_dato import trajectory
from test_tokencache import tiny_policy

from l2c import Action
from l2c.extension import BranchStore, SelectionRequest, TrajectoryState
from l2c.policies.scores import top_tokens
from l2c.policies.selectors import (
    TRUE_OUTPUT,
    OracleTokenCache,
    SelectorPolicy,
    oracle_tokens,
    random_tokens,
    spearman,
)
from l2c.policies.tokencache import SIGNAL


def request(age=None, output=None, true_output=None, count=2, step=1, block=0, branch="ff") -> SelectionRequest:
    store = BranchStore(output=output, age=age)
    state = TrajectoryState()
    if true_output is not None:
        state.signals[(TRUE_OUTPUT, block, branch)] = true_output
    reference = age if age is not None else output
    inputs = torch.zeros(*reference.shape[:2], 3)
    return SelectionRequest(step, block, branch, inputs, store, count, state)


def test_stalest_picks_the_oldest_tokens():
    age = torch.tensor([[0, 3, 1, 5, 2], [4, 0, 0, 1, 4]])
    policy = SelectorPolicy(selector="stalest", ratio=0.1, bonus=0.0, grid=1, step_weight=0.0, layer_weight=0.0,
                            attn1_factor=0.0, attn2_factor=0.0, ff_factor=1.0)  # fmt: skip
    chosen = policy.token_selector()(request(age=age))
    assert chosen.tolist() == [[3, 1], [0, 4]]  # ties: the lowest index first


def test_random_is_seeded_reproducible_and_distinct():
    age = torch.zeros(2, 16, dtype=torch.long)
    first = random_tokens(0)(request(age=age, count=5))
    assert first.tolist() == random_tokens(0)(request(age=age, count=5)).tolist()
    assert first.shape == (2, 5) and all(len(set(row)) == 5 for row in first.tolist())
    assert first.tolist() != random_tokens(1)(request(age=age, count=5)).tolist()
    assert first.tolist() != random_tokens(0)(request(age=age, count=5, step=2)).tolist()


def test_oracle_picks_the_tokens_that_moved_most():
    cached = torch.zeros(1, 4, 2)
    true_output = torch.tensor([[[0.1, 0.0], [3.0, 4.0], [0.0, -2.0], [1.0, 1.0]]])  # moved 0.1, 5, 2, 1.41
    assert oracle_tokens(request(output=cached, true_output=true_output)).tolist() == [[1, 2]]
    with pytest.raises(RuntimeError, match="no true output of block 0 ff"):
        oracle_tokens(request(output=cached))


def test_oracle_on_a_joint_branch_ranks_the_image_tokens_of_its_first_stream():
    """Flux single blocks are [text; image] and the selector sees the image part: the true output's last tokens."""
    cached = torch.zeros(1, 3, 2)  # the store's image view
    text = torch.full((1, 2, 2), 100.0)  # text tokens moved most, but are not selectable
    image = torch.tensor([[[0.0, 1.0], [3.0, 4.0], [0.0, 0.5]]])  # moved 1, 5, 0.5
    other_stream = torch.zeros(1, 7, 2)
    chosen = oracle_tokens(request(output=cached, true_output=(torch.cat([text, image], 1), other_stream)))
    assert chosen.tolist() == [[1, 0]]


def test_bad_selector_is_refused():
    with pytest.raises(ValueError, match="field 'selector' must be one of"):
        SelectorPolicy(selector="best")


@torch.no_grad()
def test_oracle_runs_on_tocas_plan_and_beats_stalest():
    """Same plan (same partial executions), no signal left behind, and the oracle's final latents are closer."""
    model, steps = tiny_dit(), 8
    latents, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, latents, labels, steps)
    knobs = dict(interval=4, ratio=0.25, bonus=0.0, grid=1, step_weight=0.0, layer_weight=0.0, attn1_factor=0.0,
                 ff_factor=1.0)  # fmt: skip
    errors, executed = {}, {}
    for name in ("oracle", "stalest"):
        with SelectorPolicy(selector=name, **knobs).apply(model, timesteps=ddim_timesteps(steps)) as runtime:
            final, _ = ddim_sample(model, latents, labels, steps)
            executed[name] = dict(runtime.executed)
        errors[name] = float((final - reference).pow(2).mean())
    assert executed["oracle"] == executed["stalest"]
    assert executed["oracle"][Action.PARTIAL] == 6 * 2  # 6 partial steps × 2 blocks' ff
    assert errors["oracle"] < errors["stalest"]


@dataclass
class UnselectedLog(SelectorPolicy):
    """The oracle, logging what each partial call's request says its unselected tokens get."""

    kind = "oracle-unselected-log"
    log: list = field(default_factory=list, compare=False, repr=False)

    def token_selector(self):
        pick = super().token_selector()

        def select(request):
            index = pick(request)
            self.log.append((request.step, request.block, index, request.unselected_output(), request.store.output))
            return index

        return select


@torch.no_grad()
def test_under_the_forecast_the_oracle_ranks_against_the_forecast_the_branch_returns():
    """With `taylor_order` the tokens a partial step leaves are forecast: the request's `unselected_output` is that
    forecast (the branch returns it for every unselected token, bit for bit), it is not the stored output once two
    whole computations exist, and the oracle picks the tokens farthest from it."""
    model, steps = tiny_dit(), 8
    latents, labels = dit_inputs(batch=2)
    knobs = dict(interval=4, ratio=0.25, bonus=0.0, grid=1, step_weight=0.0, layer_weight=0.0, attn1_factor=0.0,
                 ff_factor=1.0)  # fmt: skip
    policy = UnselectedLog(selector="oracle", taylor_order=1, **knobs)
    returned = []
    handles = [
        block.ff.register_forward_hook(lambda module, args, out, b=b: returned.append((b, out.clone())))
        for b, block in enumerate(model.transformer_blocks)
    ]
    try:
        with policy.apply(model, timesteps=ddim_timesteps(steps)) as runtime:
            ddim_sample(model, latents, labels, steps)
    finally:
        for handle in handles:
            handle.remove()
    assert runtime.executed[Action.PARTIAL] == 6 * 2 and len(policy.log) == 12
    # call order: step by step, block by block; a partial call is the oracle's probe (the true output), then the call
    calls, branch_returned = iter(out for b, out in returned), []
    for step in range(steps):
        for _ in range(2):
            next(calls)  # a full step's call, or a partial step's probe
            if step % 4:
                branch_returned.append(next(calls))
    assert next(calls, None) is None
    forecast_differs = 0
    for (step, _block, index, unselected, stored), out in zip(policy.log, branch_returned, strict=True):
        mask = torch.ones(out.shape[:2], dtype=torch.bool).scatter(1, index, False)
        assert torch.equal(out[mask], unselected[mask])
        forecast_differs += step > 4 and not torch.allclose(unselected, stored)
    assert forecast_differs == 6  # steps 5, 6, 7 × 2 blocks: an order-1 forecast from steps 0 and 4


@torch.no_grad()
def test_predictor_selects_its_highest_scores_on_tocas_plan():
    model, steps = tiny_dit(), 8
    latents, labels = dit_inputs(batch=2)
    knobs = dict(interval=4, ratio=0.25, bonus=0.0, grid=1, step_weight=0.0, layer_weight=0.0, attn1_factor=0.0,
                 ff_factor=1.0)  # fmt: skip
    policy = SelectorPolicy(selector="predictor", predictor=tiny_policy(model, staleness="none"), **knobs)
    with policy.apply(model, timesteps=ddim_timesteps(steps)) as runtime:
        ddim_sample(model, latents, labels, steps)
        state = trajectory(model)
        assert runtime.executed[Action.PARTIAL] == 6 * 2
    scores = state.signals[SIGNAL]  # the last step's (7, partial): [batch, blocks, tokens]
    for block in range(2):
        fresh = (state.stores[(block, "ff")].age == 0).nonzero()[:, 1].view(2, -1)  # tokens computed at step 7
        assert fresh.tolist() == top_tokens(scores[:, block], 4).sort(dim=1).values.tolist()  # round(0.25 · 16)


def test_predictor_selector_needs_a_tokencache_policy():
    with pytest.raises(ValueError, match="field 'predictor' must be a TokenCachePolicy"):
        SelectorPolicy(selector="predictor")
    with pytest.raises(ValueError, match="field 'predictor'"):
        SelectorPolicy(selector="stalest", predictor=tiny_policy(tiny_dit()))


def test_spearman_of_known_orders():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    assert spearman(a, b).tolist() == pytest.approx([1.0, -1.0])
    assert float(spearman(a[:1], torch.tensor([[2.0, 1.0, 4.0, 3.0]]))) == pytest.approx(0.6)


@torch.no_grad()
def test_oracle_tokencache_runs_tokencaches_plan_without_its_predictor_and_beats_random_tokens():
    """`OracleTokenCache`: TokenCache's own tables (the same partial and reuse executions as its random-token
    ablation), no predictor scores, the oracle's tokens; its final latents are closer to the uncached ones."""
    model, steps = tiny_dit(), 6
    latents, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, latents, labels, steps)
    policy = tiny_policy(model, steps)
    errors, executed = {}, {}
    for name, variant in (("oracle", OracleTokenCache.of(policy)), ("random", replace(policy, tokens="random"))):
        with variant.apply(model, timesteps=ddim_timesteps(steps)) as runtime:
            final, _ = ddim_sample(model, latents, labels, steps)
            executed[name] = dict(runtime.executed)
            assert SIGNAL not in trajectory(model).signals  # no predictor ran
        errors[name] = float((final - reference).pow(2).mean())
    assert executed["oracle"] == executed["random"] and executed["oracle"][Action.PARTIAL] == 3 * 2  # 3 cache steps
    assert errors["oracle"] < errors["random"]
