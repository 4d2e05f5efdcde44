"""`ImageFolderDataModule` on a temp folder of PNGs, and the DiT-XL/2 cluster recipes that use it: each YAML parses
and instantiates through `LightningCLI` (tiny teacher with a VAE, tiny folder, CPU), trains, and resumes from `last`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DiTTransformer2DModel
from l2c_testing import tiny_vae
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from torch.utils.data import DataLoader

from data.imagefolder import ImageFolder, ImageFolderDataModule, read_class_index

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"ddim20": (20, 5e-6), "ddim50": (50, 1e-6)}


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes (created out of order) × 2 PNGs of mixed sizes and modes (RGB, grayscale, RGBA)."""
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in ("n03", "n01", "n02"):
        write_image(root / name / "a.png", rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
        write_image(root / name / "b.PNG", rng.integers(0, 256, (33, 20), dtype=np.uint8))
    write_image(root / "n02" / "c.png", rng.integers(0, 256, (20, 20, 4), dtype=np.uint8))
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_items_and_batches_have_the_right_shape_labels_and_range(folder):
    dataset = ImageFolder(folder, image_size=16)
    assert dataset.class_to_index == {"n01": 0, "n02": 1, "n03": 2}
    assert [label for _, label in dataset.samples] == [0, 0, 1, 1, 1, 2, 2]
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert label.item() == 1 and Path(dataset.samples[4][0]).name == "c.png"

    module = ImageFolderDataModule(str(folder), image_size=16, batch_size=3, num_workers=0)
    module.setup("fit")
    batches = list(module.train_dataloader())
    assert len(batches) == 2, "7 images in batches of 3, remainder dropped"
    images, labels = batches[0]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (3,) and labels.dtype == torch.int64
    assert set(torch.cat([b[1] for b in batches]).tolist()) <= {0, 1, 2}
    everything = torch.cat([b[0] for b in batches])
    assert everything.min() >= -1.0 and everything.max() <= 1.0
    assert everything.min() < -0.9 and everything.max() > 0.9, "random pixels span the range"


def test_pixels_map_to_minus_one_one(tmp_path):
    write_image(tmp_path / "c" / "solid.png", np.tile(np.array([255, 0, 128], dtype=np.uint8), (20, 30, 1)))
    image, _ = ImageFolder(tmp_path, image_size=10, flip=False)[0]
    assert image.shape == (3, 10, 10)
    assert image[0].eq(1.0).all() and image[1].eq(-1.0).all()
    torch.testing.assert_close(image[2], torch.full((10, 10), 128 / 127.5 - 1.0), atol=1e-6, rtol=0)


def test_adm_center_crop_keeps_the_middle_and_flips_horizontally(tmp_path):
    # 64 wide × 32 high: black | white (middle half) | black. The short side halves once (box) to 16; the crop keeps
    # the middle 16 of 32 columns: all white. A red top-left pixel block shows which way a flip goes.
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, 16:48] = 255
    write_image(tmp_path / "c" / "x.png", array)
    dataset = ImageFolder(tmp_path, image_size=16, flip=False)
    image, _ = dataset[0]
    assert image.shape == (3, 16, 16) and image.eq(1.0).all()

    array = np.full((16, 16, 3), 255, dtype=np.uint8)
    array[:, :4] = (255, 0, 0)  # red left columns
    write_image(tmp_path / "c" / "x.png", array)
    plain = ImageFolder(tmp_path, image_size=16, flip=False)[0][0]
    assert plain[1, :, :4].eq(-1.0).all() and plain[1, :, 4:].eq(1.0).all()
    flipping = ImageFolder(tmp_path, image_size=16, flip=True)
    torch.manual_seed(0)
    seen = [flipping[0][0] for _ in range(32)]
    flipped = [x for x in seen if not torch.equal(x, plain)]
    assert 0 < len(flipped) < 32, "about half the draws flip"
    assert all(torch.equal(x, plain.flip(-1)) for x in flipped)


@pytest.mark.parametrize("kind", ["txt", "json", "keras"])
def test_a_class_index_file_sets_the_labels(folder, tmp_path, kind):
    order = {"n03": 7, "n01": 5, "n02": 9}
    if kind == "txt":
        names = [f"other{i}" for i in range(10)]
        for name, index in order.items():
            names[index] = name
        path = tmp_path / "classes.txt"
        path.write_text("\n".join(names) + "\n")
    elif kind == "json":
        path = tmp_path / "classes.json"
        path.write_text(json.dumps(order))
    else:
        path = tmp_path / "imagenet_class_index.json"
        path.write_text(json.dumps({str(i): [n, f"name of {n}"] for n, i in order.items()}))
    assert {k: v for k, v in read_class_index(path).items() if k in order} == order
    module = ImageFolderDataModule(str(folder), image_size=8, batch_size=7, num_workers=0, class_index_file=str(path))
    module.setup()
    assert [label for _, label in module.train_set.samples] == [5, 5, 9, 9, 9, 7, 7]
    _, labels = next(iter(module.train_dataloader()))
    assert sorted(labels.tolist()) == [5, 5, 7, 7, 9, 9, 9]


def test_a_folder_missing_from_the_class_index_file_is_named(folder, tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("n01\nn02\n")
    with pytest.raises(ValueError, match="n03"):
        ImageFolderDataModule(str(folder), class_index_file=str(path)).setup()
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        ImageFolderDataModule(str(folder), class_index_file=str(tmp_path / "nowhere.txt")).setup()


def test_missing_root_empty_class_and_no_classes_are_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageFolderDataModule(str(tmp_path / "does-not-exist")).setup()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path / "flat")
    (folder / "n04").mkdir()
    (folder / "n04" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="n04") as error:
        ImageFolder(folder)
    assert "hold no images" in str(error.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_names_the_file(folder, num_workers):
    (folder / "n02" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    dataset = ImageFolder(folder, image_size=8)
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.png"))
    with pytest.raises(OSError, match=r"cannot read image .*n02.broken\.png"):
        dataset[index]
    batches = iter(DataLoader(dataset, batch_size=len(dataset), num_workers=num_workers))
    try:
        next(batches)
        message = "no error"
    except Exception as error:
        message = str(error)
        # The traceback holds the iterator in a reference cycle: left to the garbage collector, its worker shutdown
        # stalls a later test for 5 s. Dropped, `del batches` stops the worker at once.
        error.__traceback__ = None
    del batches
    assert "broken.png" in message, message


# ------------------------------------------------------------------------------------------------------------------
# The DiT-XL/2 cluster recipes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_yaml_holds_the_paper_settings(recipe):
    steps, l1 = RECIPES[recipe]
    config = yaml.safe_load((ROOT / f"configs/l2c/dit-xl-2-256-{recipe}.yaml").read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", 8, 1)
    assert trainer["strategy"] == "ddp" and trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 64
    assert config["data"]["class_path"] == "data.imagefolder.ImageFolderDataModule" and data["image_size"] == 256
    assert model["teacher"] == "facebook/DiT-XL-2-256" and model["scheduler"] == "ddim"
    assert (model["steps"], model["l1"], model["lr"]) == (steps, l1, 1e-3)
    assert model["guidance_scale"] == 1.5 and model["export_threshold"] == 0.1 and model["refresh_interval"] == 2
    assert trainer["max_steps"] == 20000
    (checkpoint,) = trainer["callbacks"]
    assert checkpoint["init_args"]["save_last"] is True
    assert checkpoint["init_args"]["dirpath"] == f"{trainer['default_root_dir']}/checkpoints"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_print_config_needs_no_teacher_and_no_data(recipe, capsys):
    """`train.py fit --config ... --print_config`, in process: parses the YAML without instantiating anything."""
    args = ["fit", "--config", str(ROOT / f"configs/l2c/dit-xl-2-256-{recipe}.yaml"), "--trainer.num_nodes", "2",
            "--ckpt_path", "last", "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args)
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 2 and printed["ckpt_path"] == "last"
    assert printed["model"]["init_args"]["steps"] == RECIPES[recipe][0]
    assert printed["data"]["init_args"]["root"] == "/path/to/imagenet/train"


@pytest.fixture
def vae_teacher(tmp_path) -> Path:
    """A tiny DiT-XL/2-shaped teacher directory: learned sigma, a VAE (16 px → 8×8×4 latents), a DDIM scheduler."""
    root = tmp_path / "teacher"
    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(root / "transformer")  # fmt: skip
    tiny_vae().save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root


def cli(recipe: str, teacher: Path, folder: Path, *extra: str) -> LightningCLI:
    args = [
        "--config", str(ROOT / f"configs/l2c/dit-xl-2-256-{recipe}.yaml"),
        "--model.teacher", str(teacher),
        "--data.init_args.root", str(folder), "--data.init_args.image_size", "16",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *extra,
    ]  # fmt: skip
    return LightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, args=args, save_config_kwargs={"overwrite": True}
    )


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_parses_and_instantiates_through_lightning_cli(recipe, vae_teacher, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative run directories land in tmp_path
    steps, l1 = RECIPES[recipe]
    parsed = cli(recipe, vae_teacher, folder)
    hp = parsed.model.hparams
    assert (hp.steps, hp.l1, hp.lr, hp.guidance_scale, hp.export_threshold) == (steps, l1, 1e-3, 1.5, 0.1)
    assert len(parsed.model.timesteps) == steps and type(parsed.model.sampler).__name__ == "DDIMScheduler"
    assert parsed.model.bundle.vae is not None
    assert isinstance(parsed.datamodule, ImageFolderDataModule) and parsed.datamodule.batch_size == 2
    assert parsed.trainer.max_steps == 20000
    assert parsed.trainer.precision == "bf16-mixed"
    assert parsed.trainer.checkpoint_callback.dirpath.endswith(f"runs/l2c-dit-xl-2-256-{recipe}/checkpoints")


def test_recipe_trains_on_images_through_the_vae_and_resumes_from_last(vae_teacher, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/l2c-dit-xl-2-256-ddim20")
    first = cli("ddim20", vae_teacher, folder, "--trainer.max_steps", "2")
    before = first.model.router.logits.detach().clone()
    first.trainer.fit(first.model, first.datamodule)
    assert first.trainer.global_step == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not torch.equal(first.model.router.logits.detach(), before), "the router trained on VAE latents"
    policy = json.loads((run / "policy" / "config.json").read_text())
    assert policy["provenance"]["l1"] == 5e-6 and policy["provenance"]["global_steps"] == 2

    second = cli("ddim20", vae_teacher, folder, "--trainer.max_steps", "3")
    second.trainer.fit(second.model, second.datamodule, ckpt_path="last")  # what `--ckpt_path last` does
    assert second.trainer.global_step == 3, "resumed at step 2, trained one more"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and list(saved["state_dict"]) == ["router.logits"]
