"""Training-free policies (ToCa, DuCa, Block Caching, AdaCache): scoring on hand-made tensors, end to end on tiny
real diffusers models (DiT; PixArt for cross-attention), exact token counts, FLOPs of scoring, batch independence."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from l2c_testing import (
    BranchRecorder,
    ComputeCounter,
    ddim_sample,
    ddim_timesteps,
    dit_inputs,
    tiny_dit,
    tiny_dit_pipeline,
    tiny_pixart,
)

import infer
import l2c
from l2c import Action
from l2c.extension import BranchStore, SelectionRequest, TrajectoryState
from l2c.metrics import count_flops
from l2c.policies import AdaCachePolicy, BlockCachePolicy, DuCaPolicy, ToCaPolicy
from l2c.policies.adacache import parse_codebook, relative_change, steps_until_next
from l2c.policies.blockcache import schedule_from_change
from l2c.policies.scores import (
    attention_bias,
    attention_received,
    capture_projections,
    cross_attention_entropy,
    entropy_score,
    frequency_term,
    received_from_map,
    spatial_bonus,
    split_heads,
    top_tokens,
    value_norm_score,
)
from l2c.policies.toca import SIGNAL


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


N = 16  # tokens of the tiny models: (8 / 2) ** 2


def trajectory(model) -> TrajectoryState:
    """The (single, default-context) trajectory state of a hooked model."""
    states = model._diffusers_hook.get_hook("l2c_step").states._state_cache
    assert len(states) == 1
    return next(iter(states.values()))


def row_counter(model):
    """Rows each attn1 computation processed, per call (hooks on attn1.to_q, which l2c never hooks)."""
    rows = []
    handles = [
        b.attn1.to_q.register_forward_hook(lambda m, a, o: rows.append(int(a[0].shape[0])))
        for b in model.transformer_blocks
    ]
    return rows, handles


# == scores on hand-made tensors ===================================================================================
def test_attention_received_ranks_the_most_attended_tokens_first():
    # Keys are the identity, so q·kᵀ is q itself: every query's logits are chosen by hand.
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [1.0, 0.0, 4.0, 2.0], [0.0, 0.0, 5.0, 1.0], [2.0, 0.0, 3.0, 0.0]])
    query, key = logits.view(1, 1, 4, 4), torch.eye(4).view(1, 1, 4, 4)
    score = attention_received(query, key, scale=1.0)
    expected = F.normalize(logits.softmax(-1).sum(0, keepdim=True), dim=1)
    assert torch.allclose(score, expected, atol=1e-6)
    assert top_tokens(score, 4).tolist() == [[2, 3, 0, 1]]
    assert torch.allclose(score.norm(dim=1), torch.ones(1))
    # Two heads: the map is averaged over heads before summing over queries.
    other = torch.tensor([[9.0, 0, 0, 0]] * 4)
    two = attention_received(torch.stack([logits, other]).unsqueeze(0), torch.eye(4).expand(1, 2, 4, 4), scale=1.0)
    mean_map = (logits.softmax(-1) + other.softmax(-1)) / 2
    assert torch.allclose(two, received_from_map(mean_map.unsqueeze(0)), atol=1e-6)
    assert top_tokens(two, 1).tolist() == [[0]]


def test_cross_attention_entropy_scores_diffuse_tokens_first_and_ignores_masked_text():
    # Image token 0 attends uniformly to the 3 valid text tokens, token 1 almost only to text token 0,
    # token 2 to two text tokens equally. Text token 3 is padding: its bias removes it.
    logits = torch.tensor([[0.0, 0.0, 0.0, 50.0], [30.0, 0.0, 0.0, 0.0], [20.0, 20.0, -20.0, 0.0]])
    query, key = logits.view(1, 1, 3, 4), torch.eye(4).view(1, 1, 4, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, -10000.0]).view(1, 1, 1, 4)
    score = cross_attention_entropy(query, key, bias, scale=1.0)
    entropy = torch.tensor([math.log(3), 0.0, math.log(2)])
    assert torch.allclose(score, F.normalize((1 + entropy).unsqueeze(0), dim=1), atol=1e-4)
    assert top_tokens(score, 3).tolist() == [[0, 2, 1]]
    # Without the mask, token 0 would put all its weight on the padding token and rank last.
    assert top_tokens(cross_attention_entropy(query, key, None, scale=1.0), 1).tolist() == [[2]]
    assert torch.allclose(entropy_score(torch.full((1, 2, 4), 0.25)), torch.full((1, 2), 2**-0.5))


def test_value_norm_score_selects_the_smallest_value_norms():
    # [B=1, H=2, N=4, d=2]: total norms per token 3, 1, 5, 2 → DuCa order 1, 3, 0, 2.
    value = torch.zeros(1, 2, 4, 2)
    value[0, 0, :, 0] = torch.tensor([1.0, 0.5, 3.0, 1.0])
    value[0, 1, :, 1] = torch.tensor([2.0, 0.5, 2.0, 1.0])
    score = value_norm_score(value)
    assert torch.allclose(score, F.normalize(torch.tensor([[-1.0, 1.0, -3.0, 0.0]]), dim=1))
    assert top_tokens(score, 2).tolist() == [[1, 3]]


def test_spatial_bonus_raises_the_best_token_of_every_cell():
    score = torch.arange(16, dtype=torch.float32).flip(0).view(1, 16) / 16  # token 0 best overall
    boosted = spatial_bonus(score, 0.5, 2)
    best = [0, 2, 8, 10]  # the first (highest) token of each 2×2 cell of the 4×4 image
    expected = score.clone()
    expected[0, best] *= 1.5
    assert torch.allclose(boosted, expected)
    # With a big bonus the selection spreads one token per cell instead of taking the top rows.
    assert top_tokens(score, 4).tolist() == [[0, 1, 2, 3]]
    assert sorted(top_tokens(spatial_bonus(score, 2.0, 2), 4)[0].tolist()) == best
    # Ragged 3×3 image with 2×2 cells (cells of 4, 2, 2, 1 tokens); ties go to the lowest index.
    nine = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 3.0, 5.0, 0.0, 4.0]])
    assert torch.allclose(spatial_bonus(nine, 1.0, 2), torch.tensor([[1.0, 1.0, 0.0, 0.0, 4.0, 6.0, 10.0, 0.0, 8.0]]))
    ties = spatial_bonus(torch.ones(1, 4), 1.0, 2)
    assert ties.tolist() == [[2.0, 1.0, 1.0, 1.0]]
    line = torch.rand(2, 15)
    assert torch.equal(spatial_bonus(line, 1.0, 2), line)  # not a square image: unchanged


def test_frequency_term_and_stable_top_tokens():
    age = torch.tensor([[0, 3, 3, 6]])
    assert torch.allclose(frequency_term(age, 3, 0.25), torch.tensor([[0.0, 0.25, 0.25, 0.5]]))
    assert top_tokens(frequency_term(age, 3, 0.25), 3).tolist() == [[3, 1, 2]]


def test_toca_selector_adds_score_frequency_and_bonus_per_sample():
    policy = ToCaPolicy(score="attention", freq_weight=0.25, bonus=0.0, grid=2).resolved(tiny_spec())
    selector = policy.token_selector()
    state = TrajectoryState()
    state.signals[(SIGNAL, 0)] = torch.tensor([[0.5, 0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.1]])
    store = BranchStore(torch.zeros(2, 4, 3), torch.tensor([[0, 3, 0, 0], [0, 0, 3, 0]]))
    request = SelectionRequest(1, 0, "ff", torch.zeros(2, 4, 3), store, 2, state)
    # Row 0: 0.5, 0.1+0.25, 0.2, 0 → tokens 0, 1. Row 1: 0, 0, 0.25, 0.1 → tokens 2, 3.
    assert selector(request).tolist() == [[0, 1], [2, 3]]
    # No score measured for block 1: the stalest tokens first.
    assert selector(SelectionRequest(1, 1, "ff", torch.zeros(2, 4, 3), store, 1, state)).tolist() == [[1], [2]]


def tiny_spec():
    return l2c.model_spec(tiny_dit())


# == capture from real attention modules ============================================================================
def test_captured_projections_give_the_processor_attention_map():
    model = tiny_dit()
    attn = model.transformer_blocks[0].attn1
    hidden = torch.randn(2, N, 16, generator=torch.Generator().manual_seed(0))
    with capture_projections(attn, ("to_q", "to_k", "to_v")) as got:
        out = attn(hidden)
    assert torch.equal(out, attn(hidden))  # capturing changes nothing
    query, key = split_heads(attn, got["to_q"], "norm_q"), split_heads(attn, got["to_k"], "norm_k")
    probs = attn.get_attention_scores(
        attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(hidden))
    )
    mean_map = probs.view(2, attn.heads, N, N).mean(1)
    assert torch.allclose(attention_received(query, key, attn.scale), received_from_map(mean_map), atol=1e-5)
    assert got["to_v"].shape == (2, N, 16)
    assert not attn.to_q._forward_hooks  # hooks are gone after the call


def test_cross_attention_capture_applies_the_text_mask():
    model = tiny_pixart()
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, N, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = (1 - torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])) * -10000.0
    mask = mask.unsqueeze(1)  # [B, 1, L] additive, as PixArt passes encoder_attention_mask
    with capture_projections(attn, ("to_q", "to_k")) as got:
        attn(image, encoder_hidden_states=text, attention_mask=mask)
    query, key = split_heads(attn, got["to_q"], "norm_q"), split_heads(attn, got["to_k"], "norm_k")
    score = cross_attention_entropy(query, key, attention_bias(attn, mask, 2, 5), attn.scale)
    bias = attn.prepare_attention_mask(mask, 5, 2)
    probs = attn.get_attention_scores(
        attn.head_to_batch_dim(attn.to_q(image)), attn.head_to_batch_dim(attn.to_k(text)), bias
    )
    mean_map = probs.view(2, attn.heads, N, 5).mean(1)
    assert torch.allclose(score, entropy_score(mean_map), atol=1e-5)
    assert mean_map[0, :, 3:].abs().max() < 1e-6  # padding text tokens get no attention


# == ToCa ==========================================================================================================
def test_toca_published_schedule_and_plan():
    spec = tiny_spec()
    policy = ToCaPolicy().resolved(spec)
    assert (policy.ratio, policy.score, policy.bonus, policy.grid) == (0.07, "attention", 0.6, 2)
    # `score=none` keeps the paper's schedule and ranks by staleness alone.
    stalest = ToCaPolicy(score="none").resolved(spec)
    assert dataclasses.replace(stalest, score="attention") == policy
    table = policy.ratio_table(spec, 50)
    # ratio · (1 − w + 2w·s/S) · (1 + w' − 2w'·b/(B−1)) · branch factor, clamped to [0, 1]
    for step, block in ((40, 0), (49, 1), (30, 1)):
        expected = 0.07 * (1 - 2 + 4 * step / 50) * (1 - 0.2 + 0.4 * block) * 2.5
        assert table[step, block, 1].item() == pytest.approx(min(max(expected, 0), 1))
    assert (table[:, :, 0] == 0).all()  # attn1 factor 0: self-attention reused on partial steps
    plan = policy.build_plan(spec, 50)
    full = (plan.actions == Action.COMPUTE).all(dim=(1, 2)).nonzero().flatten().tolist()
    assert full == list(range(0, 50, 3))
    partial = plan.actions == Action.PARTIAL
    counts = torch.floor(table * N + 1e-9)
    assert torch.equal(partial, (counts > 0) & (counts < N) & (torch.arange(50) % 3 != 0).view(-1, 1, 1))
    assert torch.allclose(plan.token_ratio[partial] * N, counts[partial].float())
    pixart = ToCaPolicy().resolved(l2c.model_spec(tiny_pixart()))
    assert (pixart.ratio, pixart.score, pixart.grid, pixart.attn2_factor) == (0.3, "cross_entropy", 4, 0.6)


def toca_fixed(**overrides):
    """ToCa with a flat schedule on the tiny DiT: ff recomputes 4 of 16 tokens, attn1 reuses."""
    params = dict(interval=3, ratio=0.1, score="attention", step_weight=0.0, layer_weight=0.0, ff_factor=2.5, bonus=0.6)
    return ToCaPolicy(**{**params, **overrides})


def test_toca_on_dit_recomputes_exactly_the_scored_tokens():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, x, labels, 7)
    runtime = toca_fixed().apply(model, timesteps=ddim_timesteps(7))
    recorder, counter = BranchRecorder(model), ComputeCounter(model)
    final, outputs = ddim_sample(model, x, labels, 7)
    assert torch.isfinite(final).all() and (final - reference).abs().max() > 1e-4
    # Steps 0, 3, 6 full; 1, 2, 4, 5 reuse attn1 and recompute floor(0.25 · 16) = 4 ff tokens.
    assert runtime.executed == Counter({Action.COMPUTE: 3 * 4, Action.REUSE: 4 * 2, Action.PARTIAL: 4 * 2})
    ff_tokens = [n for _, name, n in counter.tokens if name == "ff" and n != N]
    assert ff_tokens == [4] * 8
    assert [n for _, name, n in counter.tokens if name == "attn1"] == [N] * 6
    # Step 1's tokens are the top 4 of the score measured at step 0 from attn1's q and k (+ bonus; ages all 0).
    state = trajectory(model)
    for block in range(2):
        attn = model.transformer_blocks[block].attn1
        hidden = recorder.calls[(block, "attn1")][0]["input"]
        query = split_heads(attn, attn.to_q(hidden), "norm_q")
        key = split_heads(attn, attn.to_k(hidden), "norm_k")
        score = attention_received(query, key, attn.scale)
        expected = top_tokens(spatial_bonus(score, 0.6, 2), 4).sort(dim=1).values
        before, after = (recorder.calls[(block, "ff")][s]["output"] for s in (0, 1))
        changed = ((after - before).abs().amax(-1) > 0).nonzero()[:, 1].view(2, 4)
        assert torch.equal(changed, expected), block
        # The score held now was re-measured at step 3 (step 6 is full too, but no partial step follows it).
        hidden = recorder.calls[(block, "attn1")][3]["input"]
        query = split_heads(attn, attn.to_q(hidden), "norm_q")
        key = split_heads(attn, attn.to_k(hidden), "norm_k")
        assert torch.allclose(state.signals[(SIGNAL, block)], attention_received(query, key, attn.scale), atol=1e-6)
    runtime.remove()


def test_toca_scoring_flops_are_counted_and_paid_only_where_needed():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    t = ddim_timesteps(7)

    def step(index):
        return lambda: model(x, timestep=t[index].expand(2), class_labels=labels)

    _, uncached = count_flops(step(0))
    runtime = toca_fixed().apply(model, timesteps=t)
    _, full_step = count_flops(step(0))
    # q·kᵀ for the map: 2 · batch · tokens² · (heads · head_dim) per block, nothing else (q and k are reused).
    assert full_step - uncached == 2 * (2 * 2 * N * N * 16)
    for index in range(1, 6):
        model(x, timestep=t[index].expand(2), class_labels=labels)
    _, last_full = count_flops(step(6))  # the last full step: no partial step follows, no map
    assert last_full == uncached
    runtime.remove()


def test_toca_settings_equivalent_to_full_equal_the_uncached_output():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, x, labels, 5)
    for policy in (ToCaPolicy(interval=1), toca_fixed(ratio=1.0, attn1_factor=1.0, ff_factor=1.0)):
        runtime = policy.apply(model, timesteps=ddim_timesteps(5))
        final, _ = ddim_sample(model, x, labels, 5)
        assert torch.equal(final, reference), policy
        assert runtime.executed == Counter({Action.COMPUTE: 5 * 4})
        runtime.remove()


def test_toca_sample_alone_equals_sample_in_a_batch():
    model = tiny_dit()
    x, labels = dit_inputs(batch=3, seed=5)
    runtime = toca_fixed().apply(model, timesteps=ddim_timesteps(5))
    alone, _ = ddim_sample(model, x[1:2], labels[1:2], 5)
    batch, _ = ddim_sample(model, x, labels, 5)
    assert (alone[0] - batch[1]).abs().max() <= 1e-5
    runtime.remove()


def pixart_run(model, steps: int, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = model(
            x,
            encoder_hidden_states=text,
            timestep=t.expand(batch),
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        x = scheduler.step(out[:, :4], t, x).prev_sample
    return x


def test_toca_on_pixart_scores_by_cross_attention_entropy():
    model = tiny_pixart()
    reference = pixart_run(model, 4)
    policy = ToCaPolicy(interval=3, step_weight=0.0, layer_weight=0.0)  # PixArt-α defaults otherwise
    runtime = policy.apply(model, timesteps=ddim_timesteps(4))
    recorder = BranchRecorder(model)
    counts = []
    handles = [
        b.ff.net[0].register_forward_hook(lambda m, a, o: counts.append(a[0].shape[1]))
        for b in model.transformer_blocks
    ]
    final = pixart_run(model, 4)
    assert torch.isfinite(final).all() and (final - reference).abs().max() > 1e-4
    # Steps 0, 3 full; on 1, 2 attn1 reuses, attn2 recomputes floor(0.3·0.6·16) = 2 tokens, ff floor(0.3·1.6·16) = 7.
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 2 * 3, Action.REUSE: 2 * 2, Action.PARTIAL: 2 * 2 * 2})
    assert counts == [N, N, 7, 7, 7, 7, N, N]
    attn2_partial = recorder.calls[(0, "attn2")][1]["output"] - recorder.calls[(0, "attn2")][0]["output"]
    assert ((attn2_partial.abs().amax(-1) > 0).sum(1) == 2).all()
    score = trajectory(model).signals[(SIGNAL, 0)]
    assert score.shape == (2, N) and torch.allclose(score.norm(dim=1), torch.ones(2))
    for h in handles:
        h.remove()
    runtime.remove()


# == DuCa ==========================================================================================================
def test_duca_alternates_conservative_and_aggressive_steps():
    kinds = DuCaPolicy(interval=4).step_kinds(9)
    assert kinds == ["full", "partial", "reuse", "partial", "full", "partial", "reuse", "partial", "full"]
    assert DuCaPolicy(interval=3).step_kinds(4) == ["full", "reuse", "partial", "full"]
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    t = ddim_timesteps(5)
    runtime = DuCaPolicy(interval=4, ratio=0.1, step_weight=0.0, layer_weight=0.0).apply(model, timesteps=t)
    counter = ComputeCounter(model)
    per_step = []
    for index in range(5):
        before = Counter(runtime.executed)
        model(x, timestep=t[index].expand(2), class_labels=labels)
        per_step.append(runtime.executed - before)
    full, conservative, aggressive = (
        Counter({Action.COMPUTE: 4}),
        Counter({Action.REUSE: 2, Action.PARTIAL: 2}),
        Counter({Action.REUSE: 4}),
    )
    assert per_step == [full, conservative, aggressive, conservative, full]
    assert [n for _, name, n in counter.tokens if name == "ff" and n != N] == [4] * 4  # floor(0.1 · 2.5 · 16)
    assert runtime.policy.describe().startswith("duca:interval=4,ratio=0.1,score=value_norm")


def test_duca_value_caching_selects_by_value_norm_and_adds_no_matmul():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    t = ddim_timesteps(4)
    _, uncached = count_flops(lambda: model(x, timestep=t[0].expand(2), class_labels=labels))
    policy = DuCaPolicy(interval=3, ratio=0.1, step_weight=0.0, layer_weight=0.0, bonus=0.0)
    runtime = policy.apply(model, timesteps=t)
    recorder = BranchRecorder(model)
    _, full_step = count_flops(lambda: model(x, timestep=t[0].expand(2), class_labels=labels))
    assert full_step == uncached  # V-caching reads the value projection: fused attention kept, no extra product
    for index in (1, 2):
        model(x, timestep=t[index].expand(2), class_labels=labels)
    for block in range(2):
        attn = model.transformer_blocks[block].attn1
        value = split_heads(attn, attn.to_v(recorder.calls[(block, "attn1")][0]["input"]))
        expected = top_tokens(value_norm_score(value), 4).sort(dim=1).values  # step 2 (conservative): ages all 1
        before, after = (recorder.calls[(block, "ff")][s]["output"] for s in (1, 2))
        changed = ((after - before).abs().amax(-1) > 0).nonzero()[:, 1].view(2, 4)
        assert torch.equal(changed, expected), block
    runtime.remove()


# == Block Caching =================================================================================================
def test_schedule_from_crafted_changes():
    change = torch.tensor([[0.0, 0.0], [0.05, 0.5], [0.05, 0.0], [0.2, 0.01], [0.01, 0.01]])
    computed = schedule_from_change(change, 0.08)
    assert computed[:, 0].tolist() == [True, False, True, True, False]  # 0.05, 0.10 > 0.08 → compute, 0.2, 0.01
    assert computed[:, 1].tolist() == [True, True, False, False, False]
    assert schedule_from_change(change, 0.0)[1:, 0].all()


def test_blockcache_calibration_measures_each_branch_relative_change():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    recorder = BranchRecorder(model)
    ddim_sample(model, x, labels, 5)
    recorder.remove()
    policy = BlockCachePolicy(threshold=0.5).calibrate(model, lambda: ddim_sample(model, x, labels, 5))
    assert policy.change.shape == (5, 2, 2)
    assert policy.timesteps == tuple(ddim_timesteps(5).tolist())
    assert policy.target.model == l2c.model_spec(model)
    for (block, name), calls in recorder.calls.items():
        branch = ("attn1", "ff").index(name)
        for step in range(1, 5):
            new, old = calls[step]["output"], calls[step - 1]["output"]
            expected = (new - old).abs().sum() / new.abs().sum()
            assert policy.change[step, block, branch].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (policy.change[0] == 0).all()
    # Two runs: the same changes (summed deltas over summed norms of identical runs).
    twice = BlockCachePolicy(threshold=0.5).calibrate(
        model, lambda: [ddim_sample(model, x, labels, 5) for _ in range(2)]
    )
    assert torch.allclose(twice.change, policy.change, atol=1e-6)
    assert twice.provenance["calibration"]["runs"] == 2


def test_blockcache_end_to_end_round_trip_and_errors(tmp_path):
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, x, labels, 6)
    with pytest.raises(ValueError, match="not calibrated.*calibrate"):
        l2c.load_policy("blockcache:threshold=0.3").apply(model, timesteps=ddim_timesteps(6))
    calibrated = BlockCachePolicy(threshold=0.3).calibrate(model, lambda: ddim_sample(model, x, labels, 6))
    expected = schedule_from_change(calibrated.change, 0.3)
    assert not expected.all()  # the threshold skips some branch computations
    runtime = calibrated.apply(model)  # timesteps come from the calibration run
    final, _ = ddim_sample(model, x, labels, 6)
    assert torch.isfinite(final).all() and (final - reference).abs().max() > 1e-5
    computed = int(expected.sum())
    assert runtime.executed == Counter({Action.COMPUTE: computed, Action.REUSE: expected.numel() - computed})
    with pytest.raises(RuntimeError, match="uncached run"):
        BlockCachePolicy().calibrate(model, lambda: None)
    runtime.remove()

    loaded = l2c.load_policy(calibrated.save_pretrained(tmp_path / "bc"))
    assert isinstance(loaded, BlockCachePolicy) and torch.equal(loaded.change, calibrated.change)
    runtime = loaded.apply(model)
    assert torch.equal(runtime.plan.actions, calibrated.plan_for(loaded.target.model, ddim_timesteps(6)).actions)
    again, _ = ddim_sample(model, x, labels, 6)
    assert torch.equal(again, final)
    runtime.remove()

    runtime = BlockCachePolicy(threshold=0.0, change=calibrated.change, target=calibrated.target).apply(model)
    exact, _ = ddim_sample(model, x, labels, 6)
    assert torch.equal(exact, reference)  # every change > 0: threshold 0 computes everything
    runtime.remove()


def test_blockcache_calibrates_on_an_unmodified_dit_pipeline():
    pipe = tiny_dit_pipeline()

    def run():
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1, 7], num_inference_steps=4, generator=generator, output_type="pt").images

    reference = run()
    policy = BlockCachePolicy(threshold=0.4).calibrate(pipe, run)
    assert policy.target.scheduler == "DDIMScheduler" and len(policy.timesteps) == 4
    assert policy.provenance["calibration"] == {"runs": 1, "model_calls": 4}  # guidance batches cond and uncond
    computed = schedule_from_change(policy.change, 0.4)
    runtime = policy.apply(pipe)
    images = run()
    assert torch.isfinite(images).all()
    assert runtime.executed == Counter({Action.COMPUTE: int(computed.sum()), Action.REUSE: int((~computed).sum())})
    runtime.remove()
    assert torch.equal(run(), reference)


# == AdaCache ======================================================================================================
def test_codebook_lookup_and_relative_change():
    thresholds, rates = parse_codebook("0.05:4+0.1:3+0.2:2")
    change = torch.tensor([0.0, 0.049, 0.05, 0.15, 0.2, 7.0])
    assert steps_until_next(change, thresholds, rates).tolist() == [4, 4, 3, 2, 1, 1]
    for bad in ("0.1:3+0.05:4", "0.1", "0.1:0", "x:2", ""):
        with pytest.raises(ValueError, match="codebook"):
            parse_codebook(bad)
    old = torch.ones(2, 3, 4)
    new = old.clone()
    new[1] += 0.5
    assert torch.allclose(relative_change(new, old), torch.tensor([0.0, 0.5]))


def adacache_run(model, x, labels, policy, steps=7):
    runtime = policy.apply(model, timesteps=ddim_timesteps(steps))
    rows, handles = row_counter(model)
    final, _ = ddim_sample(model, x, labels, steps)
    ada = trajectory(model).signals["adacache"]
    for h in handles:
        h.remove()
    runtime.remove()
    return final, ada, rows, runtime


def test_adacache_decides_per_sample_from_the_probe_change():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2, seed=4)
    reference, _ = ddim_sample(model, x, labels, 7)
    # Measure both samples' change at step 1, then put a codebook threshold between them.
    _, probe, _, _ = adacache_run(model, x, labels, AdaCachePolicy(codebook="1000:1"))
    step, rows, change = probe.changes[0]
    assert (step, rows) == (1, [0, 1]) and change[0] != change[1]
    slow = min(range(2), key=lambda r: change[r])
    split = (change[0] + change[1]) / 2
    final, ada, computed_rows, runtime = adacache_run(model, x, labels, AdaCachePolicy(codebook=f"{split}:3"))
    assert torch.isfinite(final).all()
    codes = dict(ada.history)
    assert codes[0] == codes[1] == [0, 0]  # steps 0 and 1 always compute
    # The slow sample computes again 3 steps after step 1; the other one at step 2.
    assert codes[2][slow] == Action.REUSE and codes[2][1 - slow] == Action.COMPUTE
    assert codes[3][slow] == Action.REUSE and codes[4][slow] == Action.COMPUTE
    # Rows processed by attn1 per block call equal the computing samples of that step; reuse-all steps run nothing.
    per_step = [sum(1 for c in codes[s] if c == Action.COMPUTE) for s in range(7)]
    assert computed_rows == [n for n in per_step if n for _ in range(2)]
    mixed = sum(1 for s in range(7) if 0 < per_step[s] < 2)
    assert mixed >= 1
    reuse_all = sum(1 for s in range(7) if per_step[s] == 0)
    assert runtime.executed[Action.REUSE] == 4 * reuse_all
    # Batch independence: each sample alone takes the same decisions and gives the same output.
    for row in range(2):
        alone, ada_alone, _, _ = adacache_run(
            model, x[row : row + 1], labels[row : row + 1], AdaCachePolicy(codebook=f"{split}:3")
        )
        assert [c[row] for _, c in ada.history] == [c[0] for _, c in ada_alone.history]
        # Float round-off only (batched matmuls of 1 vs 2 rows, amplified over 7 DDIM steps); cross-talk between
        # samples would show as differences of order 1e-1.
        assert (alone[0] - final[row]).abs().max() <= 1e-4
    assert (final - reference).abs().max() > 1e-5


def test_adacache_flops_count_only_the_computing_rows():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2, seed=4)
    t = ddim_timesteps(4)

    def step(index):
        return count_flops(lambda: model(x, timestep=t[index].expand(2), class_labels=labels))[1]

    uncached = step(0)
    runtime = l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    step(0)
    branch_flops = uncached - step(1)  # what a reuse step saves: every branch of both samples
    runtime.remove()

    runtime = AdaCachePolicy(codebook="1000:1").apply(model, timesteps=t)
    assert step(0) == uncached  # measuring the probe's change adds no counted work
    trajectory(model).signals["adacache"].next_compute[0] = 99  # sample 0 reuses from now on, sample 1 computes
    assert step(1) == uncached - branch_flops // 2
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 4})  # a step with some rows computing counts as compute
    runtime.remove()


def test_adacache_never_reusing_equals_the_uncached_output():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    reference, _ = ddim_sample(model, x, labels, 5)
    final, ada, _, runtime = adacache_run(model, x, labels, AdaCachePolicy(codebook="1e-9:2"), steps=5)
    assert torch.equal(final, reference)
    assert runtime.executed == Counter({Action.COMPUTE: 5 * 4})
    assert all(c == [0, 0] for _, c in ada.history)


def test_adacache_computes_only_some_rows_of_masked_cross_attention_exactly():
    model = tiny_pixart()
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # different text masks per sample
    t = ddim_timesteps(3)

    def call(step):
        return model(
            x,
            encoder_hidden_states=text,
            timestep=t[step].expand(2),
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    uncached = [call(0), call(1)]
    runtime = AdaCachePolicy(codebook="1000:1").apply(model, timesteps=t)
    assert torch.equal(call(0), uncached[0])
    trajectory(model).signals["adacache"].next_compute[0] = 99  # sample 0 reuses, sample 1 computes alone
    out = call(1)
    # Sample 1 ran every branch on its own row (its own text and mask): the uncached result up to round-off.
    assert (out[1] - uncached[1][1]).abs().max() < 1e-5
    assert (out[0] - uncached[1][0]).abs().max() > 1e-3  # sample 0 reused its step-0 branch outputs
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 2 * 3})
    runtime.remove()


# == presets, loading, saving ======================================================================================
@pytest.mark.parametrize(
    ("preset", "cls", "params"),
    [
        ("toca", ToCaPolicy, {"interval": 3, "ratio": None}),
        (
            "toca:interval=4,ratio=0.2,score=value_norm",
            ToCaPolicy,
            {"interval": 4, "ratio": 0.2, "score": "value_norm"},
        ),
        ("duca:ratio=0.05", DuCaPolicy, {"interval": 3, "ratio": 0.05}),
        ("blockcache:threshold=0.25", BlockCachePolicy, {"threshold": 0.25}),
        ("adacache:codebook=0.1:2+0.3:1,probe_block=0", AdaCachePolicy, {"codebook": "0.1:2+0.3:1", "probe_block": 0}),
    ],
)
def test_presets_load_through_load_policy(preset, cls, params):
    policy = l2c.load_policy(preset)
    assert type(policy) is cls
    assert {k: policy.params()[k] for k in params} == params


@pytest.mark.parametrize(
    ("preset", "word"),
    [
        ("toca:score=bogus", "score"),
        (
            "toca:preset=dit-xl",
            r"field 'preset' must be one of \['dit', 'flux', 'flux2', 'pixart', 'qwenimage', 'sd3', 'wan'\]",
        ),
        ("toca:interval=0", "interval"),
        ("duca:ratio=-1", "ratio"),
        ("toca:bogus=1", "unknown option"),
        ("adacache:codebook=0.1", "codebook"),
        ("blockcache:threshold=-1", "threshold"),
    ],
)
def test_bad_presets_raise_value_error(preset, word):
    with pytest.raises(ValueError, match=word):
        l2c.load_policy(preset)


def test_toca_score_needs_its_branch():
    with pytest.raises(ValueError, match="attn2"):
        ToCaPolicy(score="cross_entropy").apply(tiny_dit(), timesteps=ddim_timesteps(4))


@pytest.mark.parametrize("preset", ["toca", "duca:interval=2", "adacache"])
def test_save_and_load_keep_the_resolved_settings(tmp_path, preset):
    model = tiny_dit()
    bound = l2c.load_policy(preset).bind(model, ddim_timesteps(6), "DDIMScheduler")
    loaded = l2c.load_policy(bound.save_pretrained(tmp_path / "p"))
    assert type(loaded) is type(bound) and loaded.params() == bound.params()
    if isinstance(bound, ToCaPolicy):
        assert loaded.ratio is not None  # saved with the family's published numbers filled in


@pytest.mark.parametrize("preset", ["toca", "duca", "adacache:codebook=10:2"])
def test_infer_samples_with_each_preset_and_counts_the_flops(tmp_path, preset):
    out = tmp_path / "out"
    argv = ["sample", "--model", "embedded:digits", "--steps", "6", "--scheduler", "ddim", "--num-samples", "2"]
    assert infer.main([*argv, "--seed", "0", "--out", str(out), "--no-progress", "--policy", preset]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.2 < report["flops_ratio"] < 0.9
    assert sum(report["executed"].values()) == 6 * 6 * 2  # steps × blocks × (attn1, ff), one batch


def test_infer_explains_how_to_calibrate_blockcache(tmp_path, capsys):
    argv = ["sample", "--model", "embedded:digits", "--steps", "4", "--num-samples", "2", "--no-progress"]
    assert infer.main([*argv, "--out", str(tmp_path / "out"), "--policy", "blockcache:threshold=0.1"]) == 2
    assert "calibrate" in capsys.readouterr().err


def test_toca_varying_interval_follows_the_force_scheduler_rule():
    # gap after a full step s of S: round(N / (1 − w + 2w·s/S)); 60–80% of the steps: gap 2.
    policy = ToCaPolicy(interval=3, interval_weight=0.4, sensitive_gap=2)
    segments = policy.full_steps(50)
    assert segments[:3] == [(0, 5), (5, 4), (9, 4)]  # round(3 / 0.6) = 5; round(3 / 0.68) = 4; round(3 / 0.744) = 4
    assert [(s, g) for s, g in segments if 30 <= s < 40] == [(32, 2), (34, 2), (36, 2), (38, 2)]
    assert ToCaPolicy(interval=3).full_steps(7) == [(0, 3), (3, 3), (6, 3)]  # weight 0: every N
    kinds = DuCaPolicy(interval=3, interval_weight=0.4).step_kinds(10)
    # gaps 5, 3, 2 (factors 0.6, 1.0, 1.24); DuCa counts back from the next full step: the last one is partial.
    assert kinds == ["full", "reuse", "partial", "reuse", "partial", "full", "reuse", "partial", "full", "partial"]
    with pytest.raises(ValueError, match="interval_weight"):
        ToCaPolicy(interval_weight=1.0)
