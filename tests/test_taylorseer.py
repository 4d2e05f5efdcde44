"""Native TaylorSeer (`taylorseer:interval=N,order=m,warmup=w`) against diffusers' `apply_taylorseer_cache`, configured
the same, on the embedded teacher and a tiny DiT (fp32): the samples agree within 1e-5."""

from __future__ import annotations

import pytest
import torch
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit

import l2c
from l2c import Action
from l2c.models import load_model, make_scheduler
from l2c.peers import TaylorSeer
from l2c.policies.taylorseer import DIT_XL_2_DDIM50, TaylorSeerPolicy, compute_steps
from l2c.sampling import GuidedDenoiser, initial_noise, sample

# (interval, order, warmup): orders 0-4, unequal gaps after the warm-up, a warm-up of one.
SETTINGS = [(2, 1, 3), (3, 2, 2), (4, 4, 2), (6, 2, 1), (5, 0, 3)]


@pytest.fixture(scope="module")
def teacher():
    return load_model("embedded:digits")


def digits_samples(bundle, method, steps: int = 20) -> torch.Tensor:
    """The benchmark's setting: DDIM 20, guidance 1.5, the same noise and labels every call."""
    scheduler = make_scheduler("ddim", bundle.scheduler_config)
    scheduler.set_timesteps(steps)
    denoiser = GuidedDenoiser(bundle.transformer, 1.5)
    noise, labels = initial_noise(6, (1, 16, 16), seed=0), torch.arange(6)
    with method.apply(bundle.transformer, scheduler.timesteps.clone()) as run:
        out = sample(denoiser, make_scheduler("ddim", bundle.scheduler_config), noise, labels, steps)
    return out, run.executed


@pytest.mark.parametrize(("interval", "order", "warmup"), SETTINGS)
def test_native_taylorseer_equals_diffusers_on_the_embedded_teacher(teacher, interval, order, warmup):
    expected, peer_executed = digits_samples(teacher, TaylorSeer(interval=interval, warmup=warmup, order=order))
    policy = l2c.load_policy(f"taylorseer:interval={interval},order={order},warmup={warmup}")
    ours, executed = digits_samples(teacher, policy)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert executed[Action.COMPUTE] == peer_executed[Action.COMPUTE]
    assert executed[Action.FORECAST] == peer_executed[Action.REUSE]  # what the peer predicted, we forecast


@pytest.mark.parametrize(("interval", "order", "warmup"), SETTINGS[:3])
def test_native_taylorseer_equals_diffusers_on_a_tiny_dit(interval, order, warmup):
    model, steps = tiny_dit(num_layers=3), 10
    latents, labels = dit_inputs(batch=2)
    with TaylorSeer(interval=interval, warmup=warmup, order=order).apply(model, ddim_timesteps(steps)):
        expected, _ = ddim_sample(model, latents, labels, steps)
    with TaylorSeerPolicy(interval=interval, order=order, warmup=warmup).apply(model, ddim_timesteps(steps)):
        ours, _ = ddim_sample(model, latents, labels, steps)
    uncached, _ = ddim_sample(model, latents, labels, steps)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert (ours - uncached).abs().max() > 1e-3  # the forecasts are really used


@pytest.mark.parametrize(("interval", "warmup"), [(1, 1), (2, 3), (3, 1), (4, 2), (5, 3)])
def test_the_schedule_is_diffusers_and_forecasts_everything_else(interval, warmup):
    expected = {(1, 1): list(range(20)), (2, 3): [0, 1, 2, *range(4, 20, 2)], (3, 1): [0, *range(2, 20, 3)],
                (4, 2): [0, 1, *range(3, 20, 4)], (5, 3): [0, 1, 2, *range(4, 20, 5)]}  # fmt: skip
    assert compute_steps(20, interval, warmup) == expected[(interval, warmup)]
    spec = l2c.model_spec(tiny_dit())
    plan = TaylorSeerPolicy(interval=interval, warmup=warmup).build_plan(spec, 20)
    computed = set(compute_steps(20, interval, warmup))
    for step in range(20):
        expected = Action.COMPUTE if step in computed else Action.FORECAST
        assert (plan.actions[step] == expected).all()
    assert plan.compute_fraction() == pytest.approx(len(computed) / 20)


def test_lagrange_and_hermite_rules_keep_the_schedule_and_agree_with_taylor_where_they_should():
    model, steps = tiny_dit(num_layers=2), 10
    latents, labels = dit_inputs(batch=2)
    runs, executed = {}, {}
    for preset in (
        "interval=3,order=1,warmup=2",
        "interval=3,order=1,warmup=2,rule=lagrange",
        "interval=3,order=2,warmup=2",
        "interval=3,order=2,warmup=2,rule=lagrange",
        f"interval=3,order=1,warmup=2,rule=hermite,scale={2**-0.5}",  # σ = 1/√2: TaylorSeer's first order
        "interval=3,order=2,warmup=2,rule=hermite",
    ):
        with l2c.load_policy(f"taylorseer:{preset}").apply(model, ddim_timesteps(steps)) as runtime:
            runs[preset], _ = ddim_sample(model, latents, labels, steps)
            executed[preset] = dict(runtime.executed)
    torch.testing.assert_close(runs["interval=3,order=1,warmup=2,rule=lagrange"], runs["interval=3,order=1,warmup=2"])
    assert (runs["interval=3,order=2,warmup=2,rule=lagrange"] - runs["interval=3,order=2,warmup=2"]).abs().max() > 1e-4
    torch.testing.assert_close(
        runs[f"interval=3,order=1,warmup=2,rule=hermite,scale={2**-0.5}"], runs["interval=3,order=1,warmup=2"]
    )
    assert (runs["interval=3,order=2,warmup=2,rule=hermite"] - runs["interval=3,order=2,warmup=2"]).abs().max() > 1e-4
    assert len({tuple(sorted(e.items())) for e in executed.values()}) == 1  # the same schedule for every rule


def test_knobs_are_checked_and_the_published_settings_are_presets():
    assert DIT_XL_2_DDIM50.describe() == "taylorseer:interval=4,order=4,warmup=2,rule=taylor"
    assert len(compute_steps(50, DIT_XL_2_DDIM50.interval, DIT_XL_2_DDIM50.warmup)) == 14  # 50/14 = 3.57×
    assert DIT_XL_2_DDIM50.forecaster.history == 5
    hicache = l2c.load_policy("taylorseer:interval=3,order=2,warmup=1,rule=hermite,scale=0.7")
    assert l2c.load_policy(hicache.describe()) == hicache and hicache.forecaster.scale == 0.7
    for bad in ("interval=0", "order=-1", "warmup=0", "rule=bessel", "scale=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            l2c.load_policy(f"taylorseer:{bad}")
