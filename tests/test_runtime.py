"""The cache runtime on a real tiny DiT: exactness of full/reuse/partial, counts, isolation, removal, errors."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from l2c_testing import (
    BranchRecorder,
    ComputeCounter,
    FixedPlanPolicy,
    ddim_sample,
    ddim_timesteps,
    dit_inputs,
    partial_policy,
    plan_maker,
    tiny_dit,
)

import l2c
import l2c.hooks
from l2c import Action


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in these tests (scoped per test: the process-wide grad mode is left alone)."""
    with torch.no_grad():
        yield


NUM_TOKENS = 16  # (sample_size 8 / patch_size 2) ** 2
BRANCHES = ("attn1", "ff")  # DiT blocks have no cross-attention


def at(t, x):
    """A scalar timestep as the 1-d batch tensor the DiT expects."""
    return t.reshape(1).expand(x.shape[0])


def module_snapshot(model):
    return {name: set(module.__dict__) for name, module in model.named_modules()}


def manual_dit(model, x, t, labels, attn1=None, ff=None):
    """DiTTransformer2DModel.forward with BasicTransformerBlock (ada_norm_zero) written out by hand; the attn1 / ff
    outputs of block i are replaced by `attn1[i]` / `ff[i]` when given. Call it on an unhooked model."""
    h = model.pos_embed(x)
    for i, block in enumerate(model.transformer_blocks):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, t, labels, hidden_dtype=h.dtype)
        attn = attn1[i] if attn1 is not None else block.attn1(norm)
        h = gate_msa.unsqueeze(1) * attn + h
        norm = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        mlp = ff[i] if ff is not None else block.ff(norm)
        h = gate_mlp.unsqueeze(1) * mlp + h
    conditioning = model.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    h = model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    side, patch, channels = int(h.shape[1] ** 0.5), model.config.patch_size, model.out_channels
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, side, side, patch, patch, channels))
    return h.reshape(-1, channels, side * patch, side * patch)


# -- full policy and removal ----------------------------------------------------------------------------------------
def test_full_policy_is_bit_identical_and_remove_restores_the_model():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    before_dict = module_snapshot(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    ref_final, ref_outputs = ddim_sample(model, x, labels, 5)

    runtime = l2c.load_policy("full").apply(model, timesteps=ddim_timesteps(5))
    assert model._diffusers_hook.get_hook("l2c_step") is not None
    for block in model.transformer_blocks:
        for name in BRANCHES:
            assert getattr(block, name)._diffusers_hook.get_hook("l2c_branch") is not None
    final, outputs = ddim_sample(model, x, labels, 5)
    assert torch.equal(final, ref_final)
    assert all(torch.equal(a, b) for a, b in zip(outputs, ref_outputs, strict=True))
    assert runtime.executed == Counter({Action.COMPUTE: 5 * 2 * 2})

    runtime.remove()
    final, outputs = ddim_sample(model, x, labels, 5)
    assert torch.equal(final, ref_final)
    assert all(torch.equal(a, b) for a, b in zip(outputs, ref_outputs, strict=True))
    assert module_snapshot(model) == before_dict
    for _, module in model.named_modules():
        assert "forward" not in module.__dict__ and "_diffusers_hook" not in module.__dict__
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    runtime.remove()  # a second remove is harmless
    assert module_snapshot(model) == before_dict


def test_remove_keeps_foreign_diffusers_hooks_working():
    class Counting(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    model = tiny_dit()
    x, labels = dit_inputs()
    t = ddim_timesteps(2)
    reference = model(x, timestep=at(t[0], x), class_labels=labels).sample
    before, after = Counting(), Counting()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(before, "user_before")
    runtime = l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(after, "user_after")
    model(x, timestep=at(t[0], x), class_labels=labels)
    runtime.remove()
    assert model._diffusers_hook.get_hook("l2c_step") is None
    assert model._diffusers_hook.get_hook("user_before") is before and model._diffusers_hook.get_hook("user_after")
    assert torch.equal(model(x, timestep=at(t[0], x), class_labels=labels).sample, reference)
    assert (before.calls, after.calls) == (2, 2)
    for block in model.transformer_blocks:
        assert "_diffusers_hook" not in block.attn1.__dict__ and "forward" not in block.ff.__dict__


# -- reuse ----------------------------------------------------------------------------------------------------------
def test_reuse_returns_the_object_stored_at_the_last_computing_step():
    model = tiny_dit()
    reference = copy.deepcopy(model)
    t = ddim_timesteps(4)
    policy = FixedPlanPolicy(plan_maker({1: Action.REUSE, 2: Action.REUSE, 3: Action.COMPUTE}))
    runtime = policy.apply(model, timesteps=t)
    recorder, counter = BranchRecorder(model), ComputeCounter(model)
    ref_recorder = BranchRecorder(reference)
    for step in range(4):
        x, labels = dit_inputs(seed=step)
        model(x, timestep=at(t[step], x), class_labels=labels)
        reference(x, timestep=at(t[step], x), class_labels=labels)
    for key, calls in recorder.calls.items():
        outputs = [c["output"] for c in calls]
        assert outputs[1] is outputs[0] and outputs[2] is outputs[0], key
        assert outputs[3] is not outputs[0]
        ref_outputs = [c["output"] for c in ref_recorder.calls[key]]
        assert torch.equal(outputs[0], ref_outputs[0]) and torch.equal(outputs[3], ref_outputs[3])
        assert not torch.allclose(outputs[1], ref_outputs[1], atol=1e-4)  # the reuse is not a no-op
    assert runtime.executed == Counter({Action.COMPUTE: 8, Action.REUSE: 8})
    assert len(counter.tokens) == 2 * 2 * 2  # only steps 0 and 3 ran the branches


def test_reuse_matches_hand_written_block_math_with_step0_branch_outputs():
    model = tiny_dit()
    reference = copy.deepcopy(model)  # never hooked by l2c
    t = ddim_timesteps(2)
    t0, t1 = t[0].reshape(1), t[1].reshape(1)
    x0, labels = dit_inputs(seed=3)
    x1, _ = dit_inputs(seed=4)

    # The hand-written forward is the model's forward.
    assert torch.allclose(manual_dit(reference, x1, t1, labels), reference(x1, t1, labels).sample, atol=1e-6, rtol=0)

    # Branch outputs at step 0, captured by plain torch hooks on the unhooked copy.
    recorder = BranchRecorder(reference)
    reference(x0, timestep=t0, class_labels=labels)
    recorder.remove()
    attn_0 = [recorder.calls[(i, "attn1")][0]["output"] for i in range(2)]
    ff_0 = [recorder.calls[(i, "ff")][0]["output"] for i in range(2)]

    runtime = FixedPlanPolicy(plan_maker({1: Action.REUSE})).apply(model, timesteps=t)
    out0 = model(x0, timestep=t0, class_labels=labels).sample
    out1 = model(x1, timestep=t1, class_labels=labels).sample
    assert torch.equal(out0, reference(x0, t0, labels).sample)
    expected = manual_dit(reference, x1, t1, labels, attn1=attn_0, ff=ff_0)
    assert torch.allclose(out1, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out1, reference(x1, t1, labels).sample, atol=1e-3)
    assert runtime.executed == Counter({Action.COMPUTE: 4, Action.REUSE: 4})


# -- partial --------------------------------------------------------------------------------------------------------
def test_partial_with_ratio_one_equals_compute():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    ref_final, ref_outputs = ddim_sample(model, x, labels, 4)
    runtime = partial_policy(1.0, 4).apply(model, timesteps=ddim_timesteps(4))
    recorder, counter = BranchRecorder(model, fresh=True), ComputeCounter(model)
    final, outputs = ddim_sample(model, x, labels, 4)
    for a, b in zip(outputs, ref_outputs, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert torch.allclose(final, ref_final, atol=1e-6, rtol=0)
    for key, calls in recorder.calls.items():
        for step, call in enumerate(calls):
            assert torch.allclose(call["output"], call["fresh"], atol=1e-6, rtol=0), (key, step)
    assert runtime.executed == Counter({Action.COMPUTE: 4, Action.PARTIAL: 12})
    assert all(tokens == NUM_TOKENS for _, _, tokens in counter.tokens)


@pytest.mark.parametrize("branch", BRANCHES)
def test_partial_quarter_rewrites_only_the_stalest_rows(branch):
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    runtime = partial_policy(0.25, 4, branches=(branch,)).apply(model, timesteps=ddim_timesteps(4))
    recorder, counter = BranchRecorder(model, fresh=True), ComputeCounter(model)
    ddim_sample(model, x, labels, 4)
    for block in range(2):
        calls = recorder.calls[(block, branch)]
        for step in (1, 2, 3):
            # Stalest first, ties by lowest index: after a full step 0, steps 1, 2, 3 take tokens 0-3, 4-7, 8-11.
            selected = torch.zeros(NUM_TOKENS, dtype=torch.bool)
            selected[4 * (step - 1) : 4 * step] = True
            out, fresh, previous = calls[step]["output"], calls[step]["fresh"], calls[step - 1]["output"]
            assert torch.allclose(out[:, selected], fresh[:, selected], atol=1e-6, rtol=0), (block, step)
            assert torch.equal(out[:, ~selected], previous[:, ~selected]), (block, step)
            assert (fresh[:, ~selected] - previous[:, ~selected]).abs().max() > 1e-4  # stale rows really are stale
    assert runtime.executed == Counter({Action.COMPUTE: 4 + 6, Action.PARTIAL: 6})
    partial_tokens = [n for _, name, n in counter.tokens if name == branch and n != NUM_TOKENS]
    assert partial_tokens == [4] * 6
    if branch == "attn1":  # the selected queries attend to the keys of every token
        assert {n for _, n in counter.keys} == {NUM_TOKENS}  # (the recorder's fresh recomputations add calls too)


def test_partial_uses_the_policy_token_selector_per_sample():
    chosen = torch.tensor([[15, 3, 7, 0], [1, 2, 9, 10]])
    requests = []

    def selector(request):
        requests.append((request.step, request.block, request.branch, request.num_selected))
        return chosen

    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    policy = partial_policy(0.25, 2, selector=selector)
    policy.apply(model, timesteps=ddim_timesteps(2))
    recorder = BranchRecorder(model, fresh=True)
    ddim_sample(model, x, labels, 2)
    assert sorted(requests) == sorted((1, b, n, 4) for b in range(2) for n in BRANCHES)
    for key, (first, second) in recorder.calls.items():
        for sample in range(2):
            mask = torch.zeros(NUM_TOKENS, dtype=torch.bool)
            mask[chosen[sample]] = True
            out, fresh, prev = second["output"][sample], second["fresh"][sample], first["output"][sample]
            assert torch.allclose(out[mask], fresh[mask], atol=1e-6, rtol=0), key
            assert torch.equal(out[~mask], prev[~mask]), key


# -- counts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "full_steps"),
    [("static:interval=3", [0, 3, 6, 9]), ("static:interval=3,first_full=2,last_full=2", [0, 1, 3, 6, 8, 9])],
)
def test_static_executes_the_exact_counts(preset, full_steps):
    model = tiny_dit()
    x, labels = dit_inputs()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    runtime = l2c.load_policy(preset).apply(model, timesteps=scheduler.timesteps)
    counter = ComputeCounter(model)
    per_step = []
    for t in scheduler.timesteps:
        before = Counter(runtime.executed)
        x = scheduler.step(model(x, timestep=at(t, x), class_labels=labels).sample, t, x).prev_sample
        per_step.append(runtime.executed - before)
    computed = [s for s, counts in enumerate(per_step) if counts == Counter({Action.COMPUTE: 4})]
    reused = [s for s, counts in enumerate(per_step) if counts == Counter({Action.REUSE: 4})]
    assert computed == full_steps
    assert sorted(computed + reused) == list(range(10))
    assert runtime.executed == Counter({Action.COMPUTE: 4 * len(full_steps), Action.REUSE: 4 * (10 - len(full_steps))})
    assert len(counter.tokens) == 4 * len(full_steps)
    assert runtime.plan.actions.shape == (10, 2, 2)
    assert (runtime.plan.actions == Action.COMPUTE).all(dim=(1, 2)).nonzero().flatten().tolist() == full_steps


# -- batch independence and isolation --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["static:interval=2", "partial:0.5"])
def test_sample_alone_equals_sample_in_a_batch(policy):
    model = tiny_dit()
    x, labels = dit_inputs(batch=4, seed=7)
    uncached, _ = ddim_sample(model, x[:1], labels[:1], 4)
    if policy.startswith("partial"):
        policy_obj = partial_policy(0.5, 4)
    else:
        policy_obj = l2c.load_policy(policy)
    runtime = policy_obj.apply(model, timesteps=ddim_timesteps(4))
    alone, _ = ddim_sample(model, x[:1], labels[:1], 4)
    batch, _ = ddim_sample(model, x, labels, 4)
    assert (alone[0] - batch[0]).abs().max() <= 1e-5
    assert (alone - uncached).abs().max() > 1e-4  # the policy really changed the result
    assert sum(runtime.executed.values()) == 2 * 4 * 4


def test_two_models_with_different_policies_do_not_share_state():
    model_a, model_b = tiny_dit(seed=0), tiny_dit(seed=1)
    xa, la = dit_inputs(batch=1, seed=11)
    xb, lb = dit_inputs(batch=3, seed=12)
    runtime_a = l2c.load_policy("static:interval=2").apply(model_a, timesteps=ddim_timesteps(4))
    runtime_b = partial_policy(0.5, 6).apply(model_b, timesteps=ddim_timesteps(6))
    solo_a, _ = ddim_sample(model_a, xa, la, 4)
    solo_b, _ = ddim_sample(model_b, xb, lb, 6)

    sched_a, sched_b = DDIMScheduler(), DDIMScheduler()
    sched_a.set_timesteps(4)
    sched_b.set_timesteps(6)
    a, b = xa.clone(), xb.clone()
    steps_a, steps_b = list(sched_a.timesteps), list(sched_b.timesteps)
    for i in range(6):  # interleave: a, b, a, b, ... then b alone
        if i < len(steps_a):
            t = steps_a[i]
            a = sched_a.step(model_a(a, timestep=at(t, a), class_labels=la).sample, t, a).prev_sample
        t = steps_b[i]
        b = sched_b.step(model_b(b, timestep=at(t, b), class_labels=lb).sample, t, b).prev_sample
    assert torch.equal(a, solo_a)
    assert torch.equal(b, solo_b)
    assert runtime_a.executed == Counter({Action.COMPUTE: 16, Action.REUSE: 16})
    assert runtime_b.executed == Counter({Action.COMPUTE: 8, Action.PARTIAL: 40})


def test_cache_contexts_keep_separate_trajectories():
    model = tiny_dit()
    t = ddim_timesteps(4)
    (xc, lc), (xu, lu) = dit_inputs(batch=1, seed=21), dit_inputs(batch=2, seed=22)
    runtime = l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    solo_c = [model(xc, timestep=at(s, xc), class_labels=lc).sample for s in t]
    solo_u = [model(xu, timestep=at(s, xu), class_labels=lu).sample for s in t]
    for step, s in enumerate(t):
        _set_cache_context(model, CacheContext("cond"))
        out_c = model(xc, timestep=at(s, xc), class_labels=lc).sample
        _set_cache_context(model, CacheContext("uncond"))
        out_u = model(xu, timestep=at(s, xu), class_labels=lu).sample
        _set_cache_context(model, None)
        assert torch.equal(out_c, solo_c[step]) and torch.equal(out_u, solo_u[step]), step
    runtime.remove()


# -- errors ---------------------------------------------------------------------------------------------------------
def test_applying_twice_raises_and_leaves_the_first_runtime_intact():
    class Pipe:  # the minimum `apply` needs from a pipeline
        def __init__(self, transformer):
            self.transformer = transformer
            self.scheduler = DDIMScheduler()

    model = tiny_dit()
    x, labels = dit_inputs()
    t = ddim_timesteps(2)
    reference = model(x, timestep=at(t[0], x), class_labels=labels).sample
    runtime = l2c.load_policy("full").apply(model, timesteps=t)
    with pytest.raises(RuntimeError, match="already"):
        l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    with pytest.raises(RuntimeError, match="already"):
        l2c.load_policy("full").apply(Pipe(model))
    assert torch.equal(model(x, timestep=at(t[0], x), class_labels=labels).sample, reference)
    assert runtime.executed == Counter({Action.COMPUTE: 4})
    runtime.remove()
    again = l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    model(x, timestep=at(t[0], x), class_labels=labels)
    assert again.executed == Counter({Action.COMPUTE: 4})
    again.remove()


def test_timestep_not_in_the_table_raises_value_error():
    model = tiny_dit()
    x, labels = dit_inputs()
    l2c.load_policy("full").apply(model, timesteps=ddim_timesteps(4))
    with pytest.raises(ValueError, match="timesteps") as error:
        model(x, timestep=torch.tensor([123]), class_labels=labels)
    assert "123" in str(error.value)


def test_bare_model_without_a_timestep_table_raises_value_error():
    model = tiny_dit()
    x, labels = dit_inputs()
    l2c.load_policy("full").apply(model)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, timestep=torch.tensor([500]), class_labels=labels)


def test_run_inconsistencies_raise():
    model = tiny_dit()
    t = ddim_timesteps(4)
    l2c.load_policy("static:interval=2").apply(model, timesteps=t)
    x, labels = dit_inputs(batch=2)
    with pytest.raises(ValueError, match="different timesteps"):
        model(x, timestep=torch.stack([t[0], t[1]]), class_labels=labels)
    model(x, timestep=at(t[0], x), class_labels=labels)
    with pytest.raises(ValueError, match="batch size"):
        model(x[:1], timestep=at(t[1], x[:1]), class_labels=labels[:1])


def test_invalid_plans_are_refused():
    model = tiny_dit()
    t = ddim_timesteps(3)
    with pytest.raises(ValueError, match="actions"):
        FixedPlanPolicy(plan_maker({0: Action.REUSE})).apply(model, timesteps=t)
    with pytest.raises(ValueError, match="token_ratio"):
        FixedPlanPolicy(plan_maker({1: Action.PARTIAL}, ratio=0.0)).apply(model, timesteps=t)
    # A run that starts mid-table cannot reuse what it never computed.
    FixedPlanPolicy(plan_maker({1: Action.REUSE})).apply(model, timesteps=t)
    x, labels = dit_inputs()
    with pytest.raises(RuntimeError, match="no step of this run computed it"):
        model(x, timestep=at(t[1], x), class_labels=labels)


# -- the extension surface -------------------------------------------------------------------------------------------
@dataclass
class MisspeltPolicy(l2c.FullPolicy):
    kind = "test-misspelt"

    def observe_ouput(self, out):  # meant: observe_output
        raise AssertionError("never called")


@dataclass
class WrongSignaturePolicy(l2c.FullPolicy):
    kind = "test-signature"

    def decide(self, step, block):  # the runtime calls decide(step, block, branch_index, state)
        return None


@pytest.mark.parametrize(
    ("policy", "method"), [(MisspeltPolicy(), "observe_ouput"), (WrongSignaturePolicy(), "decide")]
)
def test_an_extension_point_that_the_runtime_cannot_call_is_refused_at_apply(policy, method):
    model = tiny_dit()
    before = module_snapshot(model)
    with pytest.raises(TypeError, match=rf"{type(policy).__name__}\.{method}.*observe_output.*before_blocks"):
        policy.apply(model, timesteps=ddim_timesteps(2))
    assert module_snapshot(model) == before and not hasattr(model, "_diffusers_hook")


@dataclass
class FirstBlockWatcher(l2c.FullPolicy):
    kind = "test-before-blocks"
    seen: list = field(default_factory=list)

    def before_blocks(self, point):
        self.seen.append((point.step, point.args[0].shape, sorted(point.kwargs)))


def test_before_blocks_sees_each_call_once_with_the_first_blocks_input():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    grab = {}
    handle = l2c.hooks.on_first_block(model, lambda a, k: grab.setdefault("call", (a, k)))
    model(x, timestep=at(ddim_timesteps(3)[0], x), class_labels=labels)
    handle.remove()
    policy = FirstBlockWatcher()
    with policy.apply(model, timesteps=ddim_timesteps(3)):
        ddim_sample(model, x, labels, 3)
    args, kwargs = grab["call"]
    assert policy.seen == [(step, args[0].shape, sorted(kwargs)) for step in range(3)]


def test_blending_gates_may_come_from_the_first_blocks_input():
    """A callable source is evaluated at the before-blocks point: here it is 1 (compute) at every branch."""
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    timesteps = ddim_timesteps(3)
    reference, _ = ddim_sample(model, x, labels, 3)
    steps = []

    def gates(point):
        steps.append(point.step)
        return torch.ones(2, 2)

    with FixedPlanPolicy(plan_maker({1: Action.REUSE, 2: Action.REUSE})).apply(model, timesteps=timesteps) as runtime:
        with runtime.blending(gates):
            blended, _ = ddim_sample(model, x, labels, 3)
        assert runtime.executed == Counter({Action.COMPUTE: 3 * 2 * 2})  # the blend computes: no plan REUSE ran
    assert steps == [0, 1, 2]
    torch.testing.assert_close(blended, reference, atol=1e-6, rtol=0)


# -- an apply that fails leaves nothing behind ----------------------------------------------------------------------
class Injected(Exception):
    """The failure a test forces into one stage of `apply`."""


def _raise(*args, **kwargs):
    raise Injected


def _registration_failing_at(number: int):
    """`HookRegistry.register_hook` that fails at its `number`-th call (counting from 1) of this apply."""
    register = HookRegistry.register_hook
    calls = []

    def failing(self, hook, name):
        calls.append(name)
        if len(calls) == number:
            raise Injected
        return register(self, hook, name)

    return failing


STAGES = {  # (object, attribute) the stage calls, replaced to raise
    "policy check": lambda policy: (policy, "check_extensions"),
    "prepare": lambda policy: (policy, "prepare"),
    "model check": lambda policy: (policy, "check_model"),
    "timestep check": lambda policy: (policy, "check_timesteps"),
    "plan building": lambda policy: (policy, "build_plan"),
    "token selector": lambda policy: (policy, "token_selector"),
    "step hook": lambda policy: (l2c.runtime.StepTrackerHook, "__init__"),
}
NUM_REGISTRATIONS = 2 + 2 * len(BRANCHES)  # step hook, blocks hook, one per branch of the 2 blocks


@pytest.mark.parametrize("stage", [*STAGES, *(f"registration {i}" for i in range(1, NUM_REGISTRATIONS + 1))])
def test_a_failed_apply_leaves_the_model_exactly_as_it_was(stage, monkeypatch):
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    before = module_snapshot(model)
    reference = ddim_sample(model, x, labels, 4)[0]
    policy = l2c.load_policy("static:interval=2")
    with monkeypatch.context() as patch:
        if stage.startswith("registration"):
            patch.setattr(HookRegistry, "register_hook", _registration_failing_at(int(stage.split()[1])))
        else:
            patch.setattr(*STAGES[stage](policy), _raise)
        with pytest.raises(Injected):
            policy.apply(model, timesteps=ddim_timesteps(4))
    assert module_snapshot(model) == before
    assert not any("_diffusers_hook" in module.__dict__ for module in model.modules())
    assert torch.equal(ddim_sample(model, x, labels, 4)[0], reference)
    with policy.apply(model, timesteps=ddim_timesteps(4)) as runtime:  # a later apply works and caches
        cached = ddim_sample(model, x, labels, 4)[0]
    assert runtime.executed[Action.REUSE] > 0 and not torch.equal(cached, reference)


def test_a_failed_apply_keeps_foreign_hooks_and_their_registry(monkeypatch):
    model = tiny_dit()
    foreign = ModelHook()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(foreign, "user")
    before = module_snapshot(model)
    monkeypatch.setattr(HookRegistry, "register_hook", _registration_failing_at(3))
    with pytest.raises(Injected):
        l2c.load_policy("full").apply(model, timesteps=ddim_timesteps(2))
    assert module_snapshot(model) == before
    assert model._diffusers_hook.hooks == {"user": foreign}
