"""Policies applied to unmodified diffusers pipelines (DiT and PixArt-α) built from tiny configs, fully offline."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from l2c_testing import partial_policy, tiny_dit_pipeline, tiny_pixart_pipeline

import l2c
from l2c import Action

# diffusers' DPMSolver trips a numpy 2 deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in these tests (scoped per test: the process-wide grad mode is left alone)."""
    with torch.no_grad():
        yield


def run_dit(pipe, steps=4, output_type="pt"):
    generator = torch.Generator().manual_seed(0)
    images = pipe(class_labels=[1, 7], num_inference_steps=steps, generator=generator, output_type=output_type).images
    return images


def run_pixart(pipe, steps=4):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a cat",
        num_inference_steps=steps,
        height=16,
        width=16,
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=8,
        output_type="pt",
        generator=generator,
    ).images


# -- DiT ------------------------------------------------------------------------------------------------------------
def test_dit_pipeline_full_is_identical_and_static_differs():
    pipe = tiny_dit_pipeline()
    reference = run_dit(pipe)
    reference_np = run_dit(pipe, output_type="np")

    runtime = l2c.load_policy("full").apply(pipe)
    assert torch.equal(run_dit(pipe), reference)
    assert np.array_equal(run_dit(pipe, output_type="np"), reference_np)
    assert runtime.plan.num_steps == 4  # the table came from pipe.scheduler.timesteps at the first call
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 4 * 2 * 2})
    runtime.remove()

    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    cached = run_dit(pipe)
    assert torch.isfinite(cached).all()
    assert (cached - reference).abs().max() > 1e-3
    assert torch.equal(run_dit(pipe), cached)  # a second run starts a fresh trajectory
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 2 * 4, Action.REUSE: 2 * 2 * 4})
    cached_np = run_dit(pipe, output_type="np")
    assert np.isfinite(cached_np).all() and not np.array_equal(cached_np, reference_np)
    runtime.remove()
    assert torch.equal(run_dit(pipe), reference)


def test_dit_pipeline_with_explicit_timesteps_and_a_saved_policy(tmp_path):
    pipe = tiny_dit_pipeline()
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps.clone()
    policy = l2c.load_policy("static:interval=2")
    runtime = policy.apply(pipe, timesteps=timesteps)
    expected = run_dit(pipe)
    runtime.remove()

    policy.bind(pipe, timesteps, "DDIMScheduler").save_pretrained(tmp_path / "policy")
    loaded = l2c.load_policy(tmp_path / "policy")
    runtime = loaded.apply(pipe)
    assert torch.equal(run_dit(pipe), expected)
    assert runtime.executed == Counter({Action.COMPUTE: 8, Action.REUSE: 8})
    runtime.remove()


def test_dit_pipeline_second_call_with_fewer_steps_uses_its_own_table():
    pipe = tiny_dit_pipeline()
    fresh = l2c.load_policy("static:interval=2").apply(pipe)
    expected = run_dit(pipe, steps=2)
    fresh.remove()

    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    run_dit(pipe, steps=4)
    assert torch.equal(run_dit(pipe, steps=2), expected)
    assert runtime.plan.num_steps == 2


# -- PixArt-α -------------------------------------------------------------------------------------------------------
def test_pixart_pipeline_hooks_attn1_attn2_ff_and_full_is_identical():
    pipe = tiny_pixart_pipeline()
    reference = run_pixart(pipe)
    assert reference.shape == (1, 3, 16, 16)

    runtime = l2c.load_policy("full").apply(pipe)
    assert runtime.branch_names == ("attn1", "attn2", "ff")
    for block in pipe.transformer.transformer_blocks:
        for name in ("attn1", "attn2", "ff"):
            assert getattr(block, name)._diffusers_hook.get_hook("l2c_branch") is not None, name
    assert torch.equal(run_pixart(pipe), reference)
    assert runtime.executed == Counter({Action.COMPUTE: 4 * 2 * 3})
    runtime.remove()
    assert torch.equal(run_pixart(pipe), reference)

    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    cached = run_pixart(pipe)
    assert torch.isfinite(cached).all()
    assert (cached - reference).abs().max() > 1e-3
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 2 * 3, Action.REUSE: 2 * 2 * 3})
    runtime.remove()
    assert torch.equal(run_pixart(pipe), reference)
    for _, module in pipe.transformer.named_modules():
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__


def test_pixart_partial_ratio_one_matches_full_including_masked_cross_attention():
    pipe = tiny_pixart_pipeline()
    reference = run_pixart(pipe)
    runtime = partial_policy(1.0, 4).apply(pipe)
    assert torch.allclose(run_pixart(pipe), reference, atol=1e-5, rtol=0)
    assert runtime.executed == Counter({Action.COMPUTE: 2 * 3, Action.PARTIAL: 3 * 2 * 3})
    runtime.remove()

    runtime = partial_policy(0.5, 4).apply(pipe)
    cached = run_pixart(pipe)
    assert torch.isfinite(cached).all() and (cached - reference).abs().max() > 1e-4
    runtime.remove()
