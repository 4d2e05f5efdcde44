"""The learned forecast (issue 13): `ForecastRouterTrainer`'s three-action rollout (compute / reuse / forecast with
learned weights) and its export, which an unmodified `DiTPipeline` samples exactly as the trainer's hard-gate rollout.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from l2c_testing import tiny_dit_pipeline
from safetensors.torch import load_file

import l2c
from l2c import Action
from l2c.forecast import Computed, soft_history, soft_push, soft_value
from l2c.models import make_scheduler
from predictors.l2c_trainer import ForecastRouterTrainer

STEPS = 6
KWARGS = dict(steps=STEPS, guidance_scale=2.0, refresh_interval=STEPS, export_budget=0.5, lr=0.05, init="even")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """An unmodified DiTPipeline (its null class 1000 is the teacher's), saved: the trainer's teacher."""
    root = tmp_path_factory.mktemp("pipeline") / "dit"
    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(root)
    return root


def direct_step(module: ForecastRouterTrainer, batch) -> torch.Tensor:
    """A training step and its backward (which recomputes checkpointed steps on the hooked teacher) outside a
    Trainer, between the fit start/end hooks."""
    module.on_fit_start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = module.training_step(batch, 0)
            loss.backward()
            return loss
    finally:
        module.on_fit_end()


def test_soft_push_at_hard_gates_is_the_inference_history():
    outputs = [torch.full((1, 2, 3), float(i)) for i in range(4)]
    history = soft_history([], outputs[0], keep=2)
    for step, gate in ((1, 1.0), (2, 0.0), (3, 1.0)):
        history = soft_push(history, Computed(step, 0.0, outputs[step]), torch.tensor(gate))
    # Computed at 0, 1, 3 (not 2): the newest two are the outputs of steps 3 and 1.
    assert torch.equal(soft_value(history, torch.tensor([1.0, 0.0])), outputs[3])
    assert torch.equal(soft_value(history, torch.tensor([0.0, 1.0])), outputs[1])
    half = soft_push(history, Computed(4, 0.0, torch.full((1, 2, 3), 10.0)), torch.tensor(0.5))
    assert torch.allclose(soft_value(half, torch.tensor([1.0, 0.0])), torch.full((1, 2, 3), 6.5))  # ½·10 + ½·3


def test_forecast_weights_start_at_the_taylor_rule_and_every_gate_trains(pipeline_dir):
    module = ForecastRouterTrainer(teacher=str(pipeline_dir), **KWARGS)
    # Even start at 0.5: steps 0, 2, 4 compute; step 3 forecasts from 2 and 0 (order 2 needs 3 computations).
    assert torch.allclose(module.forecast_weights[3, 0, 0], torch.tensor([1.5, -0.5, 0.0]))
    direct_step(module, (torch.tensor([3, 7]), torch.tensor([11, 12])))
    compute, forecast = module.router.logits.grad, module.router.forecast_logits.grad
    assert bool((compute[0] == 0).all()) and bool((forecast[0] == 0).all()), "step 0 computes: no gradient"
    assert bool((compute[1:] != 0).all()), "soft gates: every later compute logit gets a gradient"
    # Up to step 2 the starting plan's history holds one computation: the Taylor forecast is the reuse there.
    assert bool((forecast[1:3] == 0).all()) and bool((forecast[3:] != 0).all())
    assert bool((module.forecast_weights.grad[1:, :, :, :1] != 0).all()), "the newest computation's weights train"


def test_a_forecast_plan_saved_and_loaded_samples_in_a_dit_pipeline_as_the_hard_gate_rollout(pipeline_dir, tmp_path):
    module = ForecastRouterTrainer(teacher=str(pipeline_dir), **KWARGS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.router.logits.add_(torch.randn(module.router.logits.shape, generator=generator))
        module.router.forecast_logits.copy_(torch.randn(module.router.logits.shape, generator=generator))
        module.forecast_weights.mul_(1 + 0.3 * torch.randn(module.forecast_weights.shape, generator=generator))
    labels, seeds = torch.tensor([1, 7]), torch.tensor([5, 6])
    direct_step(module, (labels, seeds))  # measures the branch costs the budget weighs
    module.on_fit_start()
    with torch.no_grad():
        latents = module.rollout(labels, seeds, module.plan_gates())
    module.on_fit_end()
    policy = module.export(tmp_path / "policy")
    tensors = load_file(str(tmp_path / "policy" / "policy.safetensors"))
    actions = tensors["plan.actions"]
    assert {int(Action.COMPUTE), int(Action.REUSE), int(Action.FORECAST)} <= set(actions.unique().tolist())
    assert torch.equal(tensors["forecast.weights"], module.forecast_weights.detach())
    assert policy.provenance["objective"] == "rollout-forecast"
    assert not {"height", "width", "num_frames"} & set(policy.provenance)  # a family pipeline teacher's settings only

    pipe = type(tiny_dit_pipeline()).from_pretrained(pipeline_dir)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with l2c.load_policy(tmp_path / "policy").apply(pipe) as runtime:
        images = pipe(class_labels=labels.tolist(), guidance_scale=2.0, generator=generators,
                      num_inference_steps=STEPS, output_type="pt").images  # fmt: skip
        assert runtime.executed[Action.FORECAST] == int((actions == Action.FORECAST).sum()) * 1
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_the_forecast_recipe_builds_the_trainer_and_honours_teacher_budget_and_export_dir(pipeline_dir, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    recipe = Path(__file__).resolve().parents[1] / "configs/l2c/digits-ddim20-forecast.yaml"
    args = ["--config", str(recipe), "--model.teacher", str(pipeline_dir), "--model.export_budget", "0.35",
            "--model.export_dir", str(tmp_path / "policy"), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    assert type(cli.model) is ForecastRouterTrainer and cli.model.hparams.history == 3
    assert (cli.model.hparams.teacher, cli.model.hparams.export_budget) == (str(pipeline_dir), 0.35)
    assert cli.model.hparams.export_dir == str(tmp_path / "policy")


def test_checkpointed_rollout_gradients_equal_the_uncheckpointed_ones(pipeline_dir):
    grads = []
    for checkpointed in (False, True):
        module = ForecastRouterTrainer(teacher=str(pipeline_dir), **KWARGS, checkpoint_steps=checkpointed)
        direct_step(module, (torch.tensor([3, 7]), torch.tensor([11, 12])))
        grads.append([p.grad.clone() for p in (module.router.logits, module.router.forecast_logits,
                                               module.forecast_weights)])  # fmt: skip
    for plain, checkpointed in zip(*grads, strict=True):
        assert bool((plain != 0).any())
        torch.testing.assert_close(checkpointed, plain, atol=1e-7, rtol=1e-5)
