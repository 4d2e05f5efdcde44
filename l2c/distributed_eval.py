"""Sampling for quality metrics, sharded across ranks by Lightning, so a 50k-sample FID on a cluster is one command.

Sample i has label `setup.labels(C)[i]` and the noise of `initial_noise(N, …, seed)[i]` whatever rank draws it
and whatever its batch, so any number of processes produces the same samples as one. `trainer.predict` gives every
rank its own slice of the indices (Lightning's distributed sampler, no home-made launcher); each rank writes its
batches as uint8 shards, and rank 0 merges them in index order and computes the metrics: the digits classifier's
accuracy and Fréchet distance for the embedded teacher (offline), FID through torchmetrics otherwise.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .evaluate import SamplingSetup
from .models import ModelBundle
from .policies import CachePolicy
from .sampling import noise_from_seeds, sample, sample_seeds

SHARDS = "shards"


class SampleIndices(Dataset):
    """Item i is the index i: labels and noise are functions of it, so a rank needs nothing else."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> int:
        return index


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 [0, 255]: what FID reads, and a quarter of the bytes to gather."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


class ShardedSampling(L.LightningModule):
    """`predict_step` samples one batch of indices with the policy applied; the model stays frozen."""

    def __init__(self, bundle: ModelBundle, policy: CachePolicy, setup: SamplingSetup) -> None:
        super().__init__()
        if getattr(bundle, "text_conditioned", False):
            raise ValueError(f"--model {setup.model}: distributed evaluation samples class-conditional models only")
        self.transformer, self.vae, self.class_table = bundle.transformer, bundle.vae, bundle.class_table
        self.bundle, self.policy, self.eval_setup = bundle, policy, setup
        self.shape = bundle.sample_shape
        self.timesteps = setup.new_scheduler(bundle.scheduler_config).timesteps.clone()

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        setup = self.eval_setup
        indices = indices.cpu()
        noise = noise_from_seeds(sample_seeds(indices, setup.seed), self.shape)
        labels = setup.labels(self.bundle.num_classes)[indices]
        denoiser = self.bundle.denoiser(setup.guidance_scale)
        with self.policy.apply(self.transformer, timesteps=self.timesteps):
            latents = sample(denoiser, setup.new_scheduler(self.bundle.scheduler_config), noise, labels, setup.steps)
        if self.vae is not None:
            with torch.no_grad():
                latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return {"index": indices, "label": labels, "images": to_uint8(latents).cpu()}


class ShardWriter(BasePredictionWriter):
    """Each rank writes each of its batches to `<out>/shards/rank<r>-<batch>.safetensors` (nothing held in memory).

    Rank 0 first removes an earlier run's shards (they would be merged with this one's); barriers around the
    sampling make every rank wait for that, and rank 0 for every rank's last shard.
    """

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.directory = Path(out) / SHARDS

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for shard in self.directory.glob("rank*.safetensors"):
                shard.unlink()
        trainer.strategy.barrier("l2c-shards-cleared")

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("l2c-shards-written")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank:04d}-{batch_idx:06d}.safetensors"
        save_file({k: v.contiguous() for k, v in prediction.items()}, str(self.directory / name))


def load_samples(out: Path, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's shards merged in index order: (labels [N], uint8 images [N, C, H, W]); checks none is missing."""
    shards = [load_file(str(path)) for path in sorted((Path(out) / SHARDS).glob("rank*.safetensors"))]
    if not shards:
        raise FileNotFoundError(f"{Path(out) / SHARDS}: no sample shards")
    index = torch.cat([s["index"] for s in shards])
    if sorted(index.tolist()) != list(range(num_samples)):
        raise ValueError(
            f"{Path(out) / SHARDS}: shards hold {len(index)} samples, expected indices 0..{num_samples - 1}"
        )
    order = torch.argsort(index)
    return torch.cat([s["label"] for s in shards])[order], torch.cat([s["images"] for s in shards])[order]


def sharded_trainer(out: Path, accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1,
                    progress: bool = True) -> L.Trainer:  # fmt: skip
    """A Lightning Trainer for sampling; Lightning picks DDP for several processes (srun, torchrun or its launcher)."""
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=[ShardWriter(out)],
        default_root_dir=out,
    )


def sample_sharded(bundle: ModelBundle, policy: CachePolicy, setup: SamplingSetup, trainer: L.Trainer) -> bool:
    """Sample on every rank of `trainer`; returns True on global rank 0, once every rank's shards are written."""
    loader = DataLoader(SampleIndices(setup.num_samples), batch_size=setup.batch_size, shuffle=False)
    trainer.predict(ShardedSampling(bundle, policy, setup), loader, return_predictions=False)
    return trainer.is_global_zero


def quality_report(
    bundle: ModelBundle, setup: SamplingSetup, policy: str, out: Path, world_size: int, reference: Path | None
) -> dict:
    """Rank 0: the metrics of the merged samples, with what ran (the `fid` command's report.json)."""
    labels, images = load_samples(out, setup.num_samples)
    result = {**setup.describe(policy), "batch_size": setup.batch_size, "world_size": world_size}
    result["samples"] = str(Path(out) / SHARDS)
    if bundle.is_digits:
        from .metrics import DigitsQuality

        quality = DigitsQuality()
        result.update(digit_accuracy=quality.accuracy(from_uint8(images), labels), fd_digits=quality.fd_digits(
            from_uint8(images)))  # fmt: skip
    if reference is not None or not bundle.is_digits:
        result["fid"] = fid(images, reference_images(reference, images.shape[-1]))
    return result


class FIDUnavailable(RuntimeError):
    """torchmetrics' FID cannot run here (torch-fidelity or the Inception weights missing)."""


def fid_metric(device: torch.device | str = "cpu"):
    """torchmetrics' `FrechetInceptionDistance` (2048 Inception features), or a message saying what is missing."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048).to(device)
    except (ImportError, OSError, RuntimeError) as error:  # torch-fidelity absent; weights not downloadable
        raise FIDUnavailable(
            f"FID is unavailable here: {error}. torchmetrics' FrechetInceptionDistance needs `pip install "
            "torch-fidelity` and the Inception weights (downloaded once into $TORCH_HOME; on nodes without network "
            "run it once on a login node). For embedded:digits the offline substitute is fd_digits."
        ) from error


def reference_images(reference: Path | None, size: int) -> torch.Tensor:
    """Real images for FID: every image under `reference`, center-cropped to `size` (uint8 [N, 3, S, S])."""
    from PIL import Image

    from .images import IMAGE_EXTENSIONS, center_crop_arr

    if reference is None:
        raise ValueError("fid: --reference is required (a folder of real images) for models other than digits")
    files = sorted(p for p in Path(reference).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--reference {reference}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    arrays = [torch.from_numpy(center_crop_arr(Image.open(p).convert("RGB"), size).copy()) for p in files]
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


def fid(images: torch.Tensor, real: torch.Tensor, batch_size: int = 256) -> float:
    """FID between uint8 samples and uint8 real images (grayscale repeated to RGB, as Inception expects)."""
    metric = fid_metric()
    for tensor, is_real in ((real, True), (images, False)):
        for start in range(0, len(tensor), batch_size):
            batch = tensor[start : start + batch_size]
            metric.update(batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch, real=is_real)
    return float(metric.compute())
