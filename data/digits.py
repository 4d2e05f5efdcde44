"""scikit-learn's 8×8 digits, upsampled to 16×16 pixels in [-1, 1]: the embedded teacher's world."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # [N, 1, 16, 16], float32 in [-1, 1]
    labels: torch.Tensor  # [N], int64


def load_digits_split(split: str, held_out_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """A fixed train / held-out split, the same for the teacher, the classifier and the metrics."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * held_out_fraction))
    index = order[:n_test] if split == "test" else order[n_test:]
    return DigitsSplit(images[index], labels[index])


class DigitsDataModule(L.LightningDataModule):
    """Batches of (image, label) from the digits training split, reshuffled each epoch."""

    def __init__(self, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        train = load_digits_split("train")
        self.train_set = TensorDataset(train.images, train.labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
