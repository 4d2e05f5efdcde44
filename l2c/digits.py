"""scikit-learn's 8×8 digits, upsampled to 16×16 pixels in [-1, 1]: the embedded teacher's world.

One fixed train / held-out split, shared by the teacher's training data (`data.digits`), the digits classifier and
the quality metrics, so the metrics' real digits are ones neither model trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


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
