"""Class labels and noise seeds: all a class-conditional teacher trajectory needs, no data set required."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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
    """Batches of (labels, seeds); under DDP Lightning's sampler gives each rank its own slice.

    `shuffle=False` keeps index order, also under DDP (where Lightning's automatic sampler would always
    shuffle training data): N processes × batch B then see the same global batches as one process × batch
    N·B, the DDP equivalence test relies on it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        samples_per_epoch: int = 2048,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        self.num_classes, self.samples_per_epoch, self.batch_size, self.seed = (
            num_classes,
            samples_per_epoch,
            batch_size,
            seed,
        )
        self.shuffle = shuffle

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ClassConditions(self.num_classes, self.samples_per_epoch, self.seed)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if not self.shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning leaves a DistributedSampler it is given alone; its own one would shuffle.
            sampler = DistributedSampler(
                self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True)
