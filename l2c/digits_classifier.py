"""A small CNN classifier for the 16×16 digits: the feature extractor behind the digit-quality metrics.

The shipped weights (`embedded/digits_classifier.safetensors`) are what the metrics use, so quality numbers are
comparable across runs; regenerate them with `python -m l2c.digits_classifier` (deterministic given the seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .digits import load_digits_split

CLASSIFIER_PATH = Path(__file__).parent / "embedded" / "digits_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """Three 3×3 ReLU convs with 2× max-pools between (16→8→4 pixels), a 64-d GELU feature layer, a linear head.

    Deliberately tiny (~48k parameters): it trains in seconds on one CPU core and ships as a ~190 kB file.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 64] of images [B, 1, 16, 16] in [-1, 1].

        GELU rather than ReLU here: with ReLU about a third of these units died in training, which would leave the
        Fréchet distance computed on fewer effective dimensions than it claims.
        """
        return F.gelu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10]."""
        return self.head(self.features(x))


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with background (-1), not wrapping."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]  # [n, 1, w]
    batch = torch.arange(n)[:, None, None]
    return padded[:, 0][batch, rows, cols][:, None]  # [n, 1, h, w]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` whose argmax logit equals `labels` (model put in eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)


def train_digits_classifier(
    seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 3e-3, num_threads: int | None = 1
) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split with ±1 pixel shifts; return the eval-mode model and its held-out accuracy.

    Initialisation, shuffling and augmentation all draw from `seed`, and the global RNG state is restored
    afterwards, so the result is reproducible and calling this does not perturb the caller's randomness.
    Training runs on `num_threads` intra-op threads (restored afterwards): the network is so small that extra
    threads only add synchronisation, which becomes very costly (~30× slower) when the cores are busy.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float) -> tuple[DigitsClassifier, float]:
    train = load_digits_split("train")
    test = load_digits_split("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(train.labels) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train.labels), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            images = _random_shift(train.images[index], generator)
            loss = F.cross_entropy(model(images), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    accuracy = evaluate_accuracy(model, test.images, test.labels)
    return model.eval(), accuracy


def load_digits_classifier(device: torch.device | str | None = None) -> DigitsClassifier:
    """The shipped classifier weights, frozen and in eval mode (safetensors only: no pickle is ever loaded)."""
    if not CLASSIFIER_PATH.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {CLASSIFIER_PATH}; regenerate them with "
            "`python -m l2c.digits_classifier` from the repository root"
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(CLASSIFIER_PATH)))
    if device is not None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits classifier used by l2c.metrics.")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH, help="where to write the safetensors weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    model, accuracy = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    print(f"held-out accuracy: {accuracy:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"seed": str(args.seed), "epochs": str(args.epochs), "held_out_accuracy": f"{accuracy:.4f}"}
    save_file(state, str(args.out), metadata=metadata)
    print(f"saved {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
