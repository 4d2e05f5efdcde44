"""torch.compile and the cache runtime: every way users compile gives the eager result, with a bounded graph count.

The runtime keeps its per-step decisions out of the graph (`torch.compiler.disable`), so the compiled graphs are
one per branch action and shape, shared by every block, and their number does not grow with the step count.
Tests compile with a counting backend that runs the captured graphs as they are (fast on the CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit, tiny_unet
from test_tokencache import tiny_policy as tiny_tokencache

import l2c
from l2c.policies import BlockCachePolicy, LayerRouterPolicy

STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own graphs: nothing compiled by an earlier test is reused.

    A frame that recompiles past dynamo's `recompile_limit` fails the test instead of silently running eagerly: a
    graph count capped by the limit would hide the per-step recompilation these tests are about.
    """
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


class CountingBackend:
    """A `torch.compile` backend that records each graph dynamo hands it and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs += 1
        return graph.forward


def router_policy(model, steps: int) -> LayerRouterPolicy:
    """An L2C-style plan: reuse steps between full ones, where a learned router's scores pick the computed slots."""
    blocks = model.config.num_layers
    logits = torch.linspace(-3, 3, steps * blocks * 2).reshape(steps, blocks, 2)
    return LayerRouterPolicy(refresh_interval=3, threshold=0.5, logits=logits)


POLICIES = {
    "full": lambda model, steps: l2c.load_policy("full"),
    "static": lambda model, steps: l2c.load_policy("static:interval=2"),
    "l2c plan": router_policy,
    "toca": lambda model, steps: l2c.load_policy("toca"),
    "toca forecast": lambda model, steps: l2c.load_policy("toca:taylor_order=2"),
    "duca": lambda model, steps: l2c.load_policy("duca"),
    "dato": lambda model, steps: l2c.load_policy("dato:interval=2,prune=0.4"),
    "adacache": lambda model, steps: l2c.load_policy("adacache"),
    "blockcache": lambda model, steps: BlockCachePolicy(threshold=0.3).calibrate(
        model, lambda: ddim_sample(model, *dit_inputs(batch=2), steps)
    ),
    "tokencache": lambda model, steps: tiny_tokencache(model, steps),
    "taylorseer": lambda model, steps: l2c.load_policy("taylorseer:interval=3,order=2,warmup=1"),
}


def eager_reference(policy_name: str, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    model = tiny_dit(seed)
    x, labels = dit_inputs(batch=2)
    with POLICIES[policy_name](model, steps).apply(model, timesteps=ddim_timesteps(steps)):
        return ddim_sample(model, x, labels, steps)[0]


def compiled_run(
    policy_name: str, how: str, backend, steps: int = STEPS, blocks: int = 2
) -> tuple[torch.Tensor, l2c.CacheRuntime]:
    """Sample with the policy applied and the model compiled the way `how` names."""
    model = tiny_dit(num_layers=blocks)
    x, labels = dit_inputs(batch=2)
    policy = POLICIES[policy_name](model, steps)
    timesteps = ddim_timesteps(steps)
    if how == "compile after apply":
        runtime = policy.apply(model, timesteps=timesteps)
        called = torch.compile(model, backend=backend)
    elif how == "torch.compile before apply":
        called = torch.compile(model, backend=backend)
        runtime = policy.apply(called, timesteps=timesteps)  # the OptimizedModule: hooks go on its `_orig_mod`
    elif how == "model.compile()":
        model.compile(backend=backend)
        called, runtime = model, policy.apply(model, timesteps=timesteps)
    elif how == "regional":  # DiTTransformer2DModel declares no `_repeated_blocks`: name its block class here
        model._repeated_blocks = ["BasicTransformerBlock"]
        model.compile_repeated_blocks(backend=backend)
        called, runtime = model, policy.apply(model, timesteps=timesteps)
    else:
        raise ValueError(how)
    return ddim_sample(called, x, labels, steps)[0], runtime


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_policy_compiled_after_apply_gives_the_eager_result(policy_name):
    backend = CountingBackend()
    out, runtime = compiled_run(policy_name, "compile after apply", backend)
    torch.testing.assert_close(out, eager_reference(policy_name), rtol=0, atol=1e-5)
    assert backend.graphs > 0  # something was compiled: the hooks did not push the whole model to eager
    runtime.remove()


@pytest.mark.parametrize("how", ["torch.compile before apply", "model.compile()", "regional"])
@pytest.mark.parametrize("policy_name", ["static", "toca"])
def test_every_way_of_compiling_gives_the_eager_result(how, policy_name):
    backend = CountingBackend()
    out, runtime = compiled_run(policy_name, how, backend)
    torch.testing.assert_close(out, eager_reference(policy_name), rtol=0, atol=1e-5)
    assert backend.graphs > 0
    assert runtime.executed[l2c.Action.REUSE] > 0  # the policy really ran under the compiled model


def test_torch_compile_before_apply_hooks_the_wrapped_model_and_remove_restores_it():
    model = tiny_dit()
    compiled = torch.compile(model, backend=CountingBackend())
    before = {name: set(module.__dict__) for name, module in model.named_modules()}  # compile adds its own
    runtime = l2c.load_policy("static:interval=2").apply(compiled, timesteps=ddim_timesteps(STEPS))
    assert runtime.model is model and model._diffusers_hook.get_hook("l2c_step") is not None
    runtime.remove()
    assert {name: set(module.__dict__) for name, module in model.named_modules()} == before


def test_regional_compilation_of_a_unet_that_declares_its_repeated_blocks():
    assert "BasicTransformerBlock" in type(tiny_unet())._repeated_blocks

    def run(compile_blocks: bool) -> torch.Tensor:
        unet = tiny_unet()
        if compile_blocks:
            unet.compile_repeated_blocks(backend=CountingBackend())
        torch.manual_seed(3)
        x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
        with l2c.load_policy("static:interval=2").apply(unet, timesteps=ddim_timesteps(4)):
            return torch.stack([unet(x, t, encoder_hidden_states=text).sample for t in ddim_timesteps(4)])

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy_name", ["static", "l2c plan", "toca", "taylorseer"])
def test_the_number_of_compiled_graphs_does_not_grow_with_the_step_count(policy_name):
    counts = {}
    for steps in (20, 50):
        torch._dynamo.reset()
        backend = CountingBackend()
        out, runtime = compiled_run(policy_name, "compile after apply", backend, steps=steps)
        counts[steps] = backend.graphs
        runtime.remove()
    assert counts[20] == counts[50] <= 24, counts  # per branch action and block segment, never per step


@pytest.mark.parametrize("policy_name", ["static", "l2c plan", "toca", "toca forecast", "taylorseer"])
def test_the_number_of_compiled_graphs_does_not_grow_with_the_block_count(policy_name):
    """Decisions differ per block, graphs do not: six blocks compile exactly the graphs two blocks compile."""
    counts = {}
    for blocks in (2, 6):
        torch._dynamo.reset()
        backend = CountingBackend()
        _, runtime = compiled_run(policy_name, "compile after apply", backend, steps=20, blocks=blocks)
        counts[blocks] = backend.graphs
        runtime.remove()
    assert counts[2] == counts[6], counts


@pytest.mark.slow  # about 150 s on a shared 2-core CPU
def test_the_default_inductor_backend_gives_the_eager_result():
    out, _ = compiled_run("static", "compile after apply", "inductor")
    # Inductor fuses and reorders float arithmetic (the unhooked model compiled differs from eager as much).
    torch.testing.assert_close(out, eager_reference("static"), rtol=1e-5, atol=1e-5)
