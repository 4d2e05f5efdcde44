"""The digits training split (`l2c.digits`) as a LightningDataModule, for training the embedded teacher."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from l2c.digits import load_digits_split


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
