"""`embedded:digits-flux`: the shipped Flux digits teacher loads, samples the requested digits, and its trainer trains.

The packing, ids and timestep convention are checked against `FluxPipeline`'s own helpers, so the project calls
the transformer exactly as the diffusers pipeline does.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

from data.digits import DigitsDataModule
from l2c.digits import load_digits_split
from l2c.evaluate import SamplingSetup, SideBySide
from l2c.flux_digits import CLASS_TABLE_FILE, ClassTable, image_ids, pack, unpack
from l2c.metrics import DigitsQuality
from l2c.models import EMBEDDED, load_model, make_scheduler
from l2c.sampling import GuidedDenoiser
from predictors.flux_teacher import FluxDigitsTeacher
from predictors.teacher import DigitsTeacher

SHIPPED = EMBEDDED["embedded:digits-flux"]
TINY = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
        "axes_dims_rope": (4, 6, 6), "joint_attention_dim": 16, "pooled_projection_dim": 16}  # fmt: skip


@pytest.fixture(scope="module")
def bundle():
    return load_model("embedded:digits-flux")


def test_shipped_transformer_loads_with_diffusers_and_is_small():
    transformer = FluxTransformer2DModel.from_pretrained(SHIPPED / "transformer")
    config = transformer.config
    assert (config.num_layers, config.num_single_layers, config.in_channels, config.guidance_embeds) == (2, 4, 4, False)
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 4
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(SHIPPED / "scheduler")
    assert (scheduler.config.shift, scheduler.config.use_dynamic_shifting) == (1.0, False)
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 20e6


def test_class_table_layout(bundle):
    with safe_open(str(SHIPPED / CLASS_TABLE_FILE), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    config = bundle.transformer.config
    assert shapes == {"encoder_hidden_states": (11, 4, config.joint_attention_dim),
                      "pooled_projections": (11, config.pooled_projection_dim)}  # fmt: skip
    assert metadata["sample_size"] == "16"
    assert (bundle.num_classes, bundle.class_table.null_class, bundle.sample_shape, bundle.is_digits) == (
        10, 10, (1, 16, 16), True)  # fmt: skip


def test_class_table_refuses_a_bad_file(tmp_path, bundle):
    path = tmp_path / CLASS_TABLE_FILE
    save_file({"encoder_hidden_states": torch.zeros(11, 4, 8)}, str(path), metadata={"sample_size": "16"})
    with pytest.raises(ValueError, match="pooled_projections"):
        ClassTable.load(path)
    table = ClassTable(10, 4, 8, 8, sample_size=16)
    table.save(path)
    with pytest.raises(ValueError, match="joint_attention_dim is 64"):
        ClassTable.load(path, bundle.transformer)


def test_packing_and_ids_are_flux_pipelines():
    images = torch.randn(3, 1, 16, 16)
    tokens = pack(images)
    assert torch.equal(tokens, FluxPipeline._pack_latents(images, 3, 1, 16, 16))
    assert torch.equal(unpack(tokens, 16, 16), images)
    assert torch.equal(image_ids(16, 16, "cpu"), FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32))


def test_flow_model_samples_with_flow_match_euler(bundle):
    for name in ("ddim", "euler"):
        assert type(make_scheduler(name, bundle.scheduler_config)) is FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match="flow-matching"):
        make_scheduler("ddpm", bundle.scheduler_config)
    with pytest.raises(ValueError, match="class table"):
        GuidedDenoiser(bundle.transformer, 2.0)


def test_samples_read_as_the_requested_digits(bundle):
    setup = SamplingSetup(model="embedded:digits-flux", steps=20, scheduler="euler", num_samples=20, batch_size=20)
    bench = SideBySide(bundle, setup, progress=False)
    images = bench.uncached()
    assert images.shape == (20, 1, 16, 16)
    assert DigitsQuality().accuracy(images, bench.labels) >= 0.8


@pytest.mark.parametrize("teacher", [FluxDigitsTeacher, DigitsTeacher])
def test_embedded_teachers_train_and_export_what_load_model_loads(tmp_path, teacher):
    """Both share `EmaTeacher`: two optimizer steps move the EMA weights, and the export loads as a ModelBundle."""
    L.seed_everything(0)
    tiny = TINY if teacher is FluxDigitsTeacher else {"num_layers": 1, "num_attention_heads": 2}
    module = teacher(**tiny, warmup_steps=1, export_dir=str(tmp_path / "export"))
    before = [p.clone() for p in module.ema.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.ema.parameters()))
    bundle = load_model(str(tmp_path / "export"))
    assert bundle.sample_shape == (1, 16, 16) and bundle.num_classes == 10


def test_flux_loss_is_finite_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    module = FluxDigitsTeacher(**TINY)
    train = load_digits_split("train")
    images, labels = train.images[:16], train.labels[:16]
    optimizer = torch.optim.AdamW(module.trained.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # the same noise, times and dropout each time: only the weights change
            return module.loss(images, labels)

    first = loss()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    last = loss()
    assert torch.isfinite(first) and torch.isfinite(last)
    assert last < 0.8 * first


def test_the_forecast_trainer_takes_the_flux_teacher_and_its_export_samples_as_its_hard_gate_rollout(tmp_path):
    """The rollout trainer on the second architecture (tuple branch outputs, flow matching): gradients reach its
    gates, and the exported plan (compute / reuse / forecast) samples exactly as the trainer's hard-gate rollout."""
    import warnings

    import l2c
    from l2c import Action
    from l2c.sampling import denoise
    from predictors.frozen_teacher import make_scheduler_like
    from predictors.l2c_trainer import ForecastRouterTrainer

    steps = 5
    module = ForecastRouterTrainer(teacher="embedded:digits-flux", steps=steps, refresh_interval=steps,
                                   export_budget=0.5, lr=0.05, init="even")  # fmt: skip
    labels, seeds = torch.tensor([2, 8]), torch.tensor([5, 6])
    module.on_fit_start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.training_step((labels, seeds), 0).backward()
        assert bool((module.router.logits.grad[1:] != 0).any())
        with torch.no_grad():
            expected = module.rollout(labels, seeds, module.plan_gates())
    finally:
        module.on_fit_end()
    module.export(tmp_path / "policy")
    policy = l2c.load_policy(tmp_path / "policy")
    with torch.no_grad(), policy.apply(module.teacher, timesteps=module.timesteps) as runtime:
        images = denoise(module.guidance, make_scheduler_like(module.sampler), module.noise_for(seeds), labels, steps)
    assert runtime.executed[Action.REUSE] + runtime.executed[Action.FORECAST] > 0
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
