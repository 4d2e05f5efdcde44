"""The cluster recipes of the model families parse and train one step through LightningCLI, the real teacher swapped
for a tiny pipeline directory of its family (`save_pretrained`), with prompts encoded by that pipeline's encoders."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from test_family_training import BUILDERS, FRAMES, PROMPTS, SIZE

import l2c

ROOT = Path(__file__).resolve().parents[1]
# recipe → (family, hub id, sharded teacher, steps)
RECIPES = {
    "flux1-dev-1024": ("flux", "black-forest-labs/FLUX.1-dev", True, 28),
    "flux2-dev-1024": ("flux2", "black-forest-labs/FLUX.2-dev", True, 50),
    "sd35-medium-1024": ("sd3", "stabilityai/stable-diffusion-3.5-medium", False, 40),
    "wan21-t2v-1.3b-480p": ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", False, 50),
    "qwen-image-1024": ("qwenimage", "Qwen/Qwen-Image", True, 50),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_family_recipe_trains_one_step_through_lightning_cli_with_a_tiny_teacher(recipe, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    family, hub_id, sharded, steps = RECIPES[recipe]
    path = ROOT / f"configs/l2c/{recipe}.yaml"
    config = yaml.safe_load(path.read_text())
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert config["model"]["class_path"] == "predictors.l2c_trainer.RolloutRouterTrainer"
    assert (model["teacher"], data["text_encoder"], model["shard_teacher"], model["steps"]) == (
        hub_id, hub_id, sharded, steps)  # fmt: skip
    assert (trainer["precision"], trainer["strategy"], trainer["devices"]) == ("bf16-mixed", "ddp", 8)
    assert model["checkpoint_steps"] and model["export_budget"] == 0.5

    teacher = tmp_path / "teacher"
    BUILDERS[family]().save_pretrained(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(path),
        "--model.teacher", str(teacher), "--model.steps", "2", "--model.refresh_interval", "2",
        "--model.height", str(SIZE), "--model.width", str(SIZE),
        *(["--model.num_frames", str(FRAMES)] if family == "wan" else []),
        "--data.init_args.dataset", str(prompts), "--data.init_args.column", "text",
        "--data.init_args.text_encoder", str(teacher), "--data.init_args.max_length", "8",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args,
                     save_config_kwargs={"overwrite": True})  # fmt: skip
    policy = l2c.load_policy(str(tmp_path / f"runs/l2c-{recipe}/policy"))
    assert policy.target.model.family == family and policy.target.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert len(policy.timesteps) == 2 and policy.provenance["global_steps"] == 1
    assert list((tmp_path / "cache/prompts").glob("prompts-*.safetensors"))
