"""Text-conditioned teachers: prompts through `datasets`, cached embeddings, L2C on a saved PixArt pipeline."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from l2c_testing import tiny_pixart_pipeline

import l2c
from data.prompts import PromptDataModule, load_prompts
from l2c.models import load_model
from l2c.sampling import GuidedDenoiser, TextCondition
from predictors.l2c_trainer import SegmentRouterTrainer

PROMPTS = ["A photo of a cat", "a red dog on the green grass", "  an astronaut riding a horse on the moon "]


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    """A whole PixArtAlphaPipeline saved by diffusers: transformer, VAE, scheduler, T5 encoder, tokenizer."""
    path = tmp_path_factory.mktemp("pixart")
    tiny_pixart_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def make_data(pixart_dir, prompt_file, tmp_path, **overrides) -> PromptDataModule:
    settings = dict(
        dataset=str(prompt_file),
        text_encoder=str(pixart_dir),
        column="text",
        max_length=8,
        cache_dir=str(tmp_path / "cache"),
        embeds_dtype="float32",
        samples_per_epoch=6,
        batch_size=2,
        shuffle=False,
    )
    return PromptDataModule(**{**settings, **overrides})


def test_prompts_are_read_like_the_pipeline_reads_them(prompt_file):
    assert load_prompts(str(prompt_file), "text", "train", None) == [p.lower().strip() for p in PROMPTS]
    assert load_prompts(str(prompt_file), "text", "train", 2) == ["a photo of a cat", "a red dog on the green grass"]
    with pytest.raises(ValueError, match="no column 'prompt'.*'text'"):
        load_prompts(str(prompt_file), "prompt", "train", None)


def test_cached_embeddings_equal_the_pipelines_own_encoding(pixart_dir, prompt_file, tmp_path):
    data = make_data(pixart_dir, prompt_file, tmp_path)
    data.prepare_data()
    assert data.cache_file.is_file()
    stamp = data.cache_file.stat().st_mtime_ns
    data.prepare_data()  # a second call reads the cache, never re-encodes
    assert data.cache_file.stat().st_mtime_ns == stamp
    assert make_data(pixart_dir, prompt_file, tmp_path, max_length=9).cache_file != data.cache_file
    data.setup("fit")
    condition, seeds = next(iter(data.train_dataloader()))
    assert isinstance(condition, TextCondition)
    assert condition.index.tolist() == [0, 1] and seeds.tolist() == [0, 1]

    pipe = load_pipeline(pixart_dir)
    embeds, mask, null_embeds, null_mask = pipe.encode_prompt(
        PROMPTS[:2], do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=8, device="cpu"
    )
    torch.testing.assert_close(condition.embeds, embeds)
    torch.testing.assert_close(condition.mask, mask)
    torch.testing.assert_close(condition.null_embeds, null_embeds[:1])
    torch.testing.assert_close(condition.null_mask, null_mask[:1])


def load_pipeline(path):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guided_denoiser_matches_the_pipelines_guidance(pixart_dir, prompt_file, tmp_path):
    """Our [cond; null] batch and guidance give the pipeline's noise prediction (it orders [null; cond])."""
    data = make_data(pixart_dir, prompt_file, tmp_path)
    data.prepare_data()
    data.setup("fit")
    condition, _ = next(iter(data.train_dataloader()))
    model = load_model(str(pixart_dir)).transformer
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500.0)
    eps = GuidedDenoiser(model, 4.5)(x, t, condition)

    both = torch.cat([condition.null_embeds.expand_as(condition.embeds), condition.embeds])
    masks = torch.cat([condition.null_mask.expand_as(condition.mask), condition.mask])
    out = model(
        torch.cat([x, x]),
        encoder_hidden_states=both,
        encoder_attention_mask=masks,
        timestep=t.expand(4),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample[:, :4]
    null, cond = out.chunk(2)
    torch.testing.assert_close(eps, null + 4.5 * (cond - null))


def test_l2c_trains_on_a_pixart_teacher_and_runs_in_its_pipeline(pixart_dir, prompt_file, tmp_path):
    L.seed_everything(0)
    trainer_module = SegmentRouterTrainer(
        teacher=str(pixart_dir),
        steps=4,
        scheduler="dpm",
        guidance_scale=4.5,
        lr=0.1,
        init_logit=0.0,
        export_dir=str(tmp_path / "policy"),
        export_budget=0.75,
    )
    data = make_data(pixart_dir, prompt_file, tmp_path)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = trainer_module.router.logits.detach().clone()
    trainer.fit(trainer_module, datamodule=data)
    assert not torch.equal(before, trainer_module.router.logits.detach())
    assert len(trainer_module.trajectories) == 6  # one per (prompt, seed) pair: 3 batches of 2, all distinct

    policy = l2c.load_policy(str(tmp_path / "policy"))
    assert policy.target.model.family == "pixart" and policy.target.scheduler == "DPMSolverMultistepScheduler"
    assert policy.provenance["teacher"] == str(pixart_dir)
    pipe = load_pipeline(pixart_dir)
    reference = run_pipeline(pipe)
    with policy.apply(pipe) as runtime:
        cached = run_pipeline(pipe)
    plan = runtime.plan
    assert plan.compute_fraction() == pytest.approx(0.75, abs=1 / plan.actions.numel())
    assert runtime.executed[l2c.Action.REUSE] > 0
    assert reference.shape == cached.shape == (1, 3, 16, 16)
    assert not torch.equal(reference, cached)


def run_pipeline(pipe) -> torch.Tensor:
    return pipe(
        PROMPTS[0],
        num_inference_steps=4,
        height=16,
        width=16,
        use_resolution_binning=False,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_pixart_recipe_trains_through_lightning_cli(pixart_dir, prompt_file, tmp_path, monkeypatch):
    """`configs/l2c/pixart-alpha-512.yaml` with the tiny teacher and a local prompt file: one bf16 step, export."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    root = Path(__file__).resolve().parents[1]
    recipe = root / "configs/l2c/pixart-alpha-512.yaml"
    config = yaml.safe_load(recipe.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert (model["scheduler"], model["steps"], model["guidance_scale"]) == ("dpm", 20, 4.5)
    assert config["data"]["class_path"] == "data.prompts.PromptDataModule" and data["column"] == "Prompt"
    assert data["batch_size"] * config["trainer"]["devices"] == 64

    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(recipe),
        "--model.teacher", str(pixart_dir), "--model.steps", "4",
        "--data.init_args.dataset", str(prompt_file), "--data.init_args.column", "text",
        "--data.init_args.text_encoder", str(pixart_dir), "--data.init_args.max_length", "8",
        "--data.init_args.batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True})
    policy = l2c.load_policy(str(tmp_path / "runs/l2c-pixart-alpha-512/policy"))
    assert policy.target.model.branches == ("attn1", "attn2", "ff")
    assert len(policy.timesteps) == 4 and policy.provenance["global_steps"] == 1
    assert list((tmp_path / "cache/prompts").glob("prompts-*.safetensors"))
