"""Class labels and noise seeds: all a class-conditional teacher trajectory needs, no data set required."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from l2c.options import ClassSpec, parse_classes
from l2c.sampling import balanced_labels


class ClassConditions(Dataset):
    """Item i is (the i-th of `balanced_labels(size, classes)`, seed base + i): balanced classes, noise fixed by
    index; the labels `infer.py --classes` samples with the same spec."""

    def __init__(self, classes: ClassSpec, size: int, base_seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"class conditions: size must be ≥ 1, got {size}")
        self.classes, self.size, self.base_seed = parse_classes(classes), size, base_seed
        self.labels = balanced_labels(size, self.classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels[index], torch.tensor(self.base_seed + index)


class ResumableSampler(DistributedSampler):
    """Lightning-independent index order: a pure function of (seed, epoch), each rank its own slice.

    After a mid-epoch resume the first epoch iterated skips the samples this rank had already trained on, so
    a fit killed at any step and resumed from its checkpoint sees exactly the batches of an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.resume_epoch, self.resume_skip = -1, 0

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices, self.resume_epoch = indices[self.resume_skip :], -1  # only the interrupted epoch is shortened
        return iter(indices)


class ClassConditionDataModule(L.LightningDataModule):
    """Batches of (labels, seeds); each rank its own slice; resumable mid-epoch from a Lightning checkpoint.

    The order is `ResumableSampler`'s: shuffled per epoch from `seed`, or index order with `shuffle=False`,
    also under DDP: N processes × batch B then see the same global batches as one process × batch N·B, the
    DDP equivalence test relies on it. The checkpoint records the epoch and the batches done in it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        samples_per_epoch: int = 2048,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        val_samples: int = 0,
        val_seed: int = 200_000,
        classes: str | None = None,
    ):
        """
        Args:
            num_classes: Class labels 0 … num_classes−1, every class equally often (the teacher's class count).
            samples_per_epoch: (label, noise seed) pairs per epoch: item i is label i mod C with seed `seed` + i.
            batch_size: Conditions per batch and process (the global batch: batch_size × processes).
            seed: The first noise seed, and the seed of the per-epoch shuffle.
            shuffle: Shuffle the conditions every epoch; false: index order (the DDP equivalence test's).
            val_samples: Held-out validation conditions (0: no validation), the same at every validation.
            val_seed: The first noise seed of the validation conditions (apart from the training seeds).
            classes: The class labels instead of 0 … num_classes−1, as `infer.py --classes` takes them: ranges and
                lists such as "0-4" or "1,3,5" (sample the trained policy with the same `--classes`).
        """
        super().__init__()
        if val_samples < 0:
            raise ValueError(f"class conditions: field 'val_samples' must be ≥ 0 (0: no validation), got {val_samples}")
        self.num_classes, self.samples_per_epoch, self.batch_size, self.seed = (
            num_classes,
            samples_per_epoch,
            batch_size,
            seed,
        )
        self.classes = parse_classes(num_classes if classes is None else classes)
        self.shuffle = shuffle
        self.val_samples, self.val_seed = val_samples, val_seed
        self.resume: dict[str, int] = {}

    def state_dict(self) -> dict[str, int]:
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # this rank's, this epoch
        return {"epoch": self.trainer.current_epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = dict(state)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ClassConditions(self.classes, self.samples_per_epoch, self.seed)
        self.val_set = ClassConditions(self.classes, self.val_samples, self.val_seed) if self.val_samples else None

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Lightning leaves a DistributedSampler it is given alone (and calls its `set_epoch`).
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed)
        if self.resume:
            sampler.resume_epoch, sampler.resume_skip = self.resume["epoch"], self.resume["batches"] * self.batch_size
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out conditions (`val_samples` from seed `val_seed`), the same every validation; none by default."""
        if self.val_set is None:
            return []
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = DistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler)
