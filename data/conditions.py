"""Class labels and noise seeds: all a class-conditional teacher trajectory needs, no data set required."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class ClassConditions(Dataset):
    """Item i is (label i mod C, seed base + i): balanced classes, noise fixed by index."""

    def __init__(self, num_classes: int, size: int, base_seed: int = 0) -> None:
        if num_classes < 1 or size < 1:
            raise ValueError(f"class conditions: num_classes and size must be ≥ 1, got {num_classes}, {size}")
        self.num_classes, self.size, self.base_seed = num_classes, size, base_seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(index % self.num_classes), torch.tensor(self.base_seed + index)


class ClassConditionDataModule(L.LightningDataModule):
    """Batches of (labels, seeds); under DDP Lightning's sampler gives each rank its own slice."""

    def __init__(self, num_classes: int = 10, samples_per_epoch: int = 2048, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.num_classes, self.samples_per_epoch, self.batch_size, self.seed = (
            num_classes,
            samples_per_epoch,
            batch_size,
            seed,
        )

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ClassConditions(self.num_classes, self.samples_per_epoch, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)
