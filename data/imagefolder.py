"""ImageNet-style image folders for the L2C trainer's real-image mode (no torchvision: PIL + numpy).

`root/<class>/<image>`: one sub-folder per class. Without a class index file, the sorted folder names
give the class indices — for ImageNet's `train/` (synset folders n01440764 … n15075141) that is the
standard 1000-class order DiT was trained with. With `class_index_file`, indices come from the file,
so a subset of ImageNet's classes keeps the teacher's label numbers.

Images follow DiT's training transform: ADM's center crop (repeated 2× box downsampling while the
short side is at least twice the target, one bicubic resize of the short side to the target, center
crop), a random horizontal flip, and pixels mapped to [-1, 1]. Batches are
(images [B, 3, H, W] float32, labels [B] int64); the trainer encodes them with the teacher's VAE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from l2c.images import IMAGE_EXTENSIONS, center_crop_arr


def read_class_index(path: str | Path) -> dict[str, int]:
    """Folder name → class index, from a text file (one folder name per line, line i = class i) or JSON:
    either {"n01440764": 0, ...} or Keras' `imagenet_class_index.json` ({"0": ["n01440764", "tench"], ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image folder: class_index_file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"image folder: {path}: expected a JSON object, got {type(raw).__name__}")
        mapping: dict[str, int] = {}
        for key, value in raw.items():
            if isinstance(value, int):
                mapping[key] = value
            elif isinstance(value, list) and value and isinstance(value[0], str) and key.isdigit():
                mapping[value[0]] = int(key)
            else:
                raise ValueError(
                    f"image folder: {path}: entry {key!r}: expected 'folder': index or 'index': [folder, name]"
                )
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        mapping = {name: i for i, name in enumerate(names)}
        if len(mapping) != len(names):
            raise ValueError(f"image folder: {path}: a folder name is listed twice")
    indices = sorted(mapping.values())
    if len(set(indices)) != len(indices):
        raise ValueError(f"image folder: {path}: two folders share a class index")
    if indices and indices[0] < 0:
        raise ValueError(f"image folder: {path}: negative class index {indices[0]}")
    return mapping


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_image_folder(
    root: str | Path, class_to_index: dict[str, int] | None = None
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) for every image under root/<class>/ (recursively, as torchvision), and the class map used."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder: root {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder: root {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder: {root} has no class sub-folders (expected root/<class>/<image>)")
    if class_to_index is None:
        class_to_index = {name: i for i, name in enumerate(classes)}
    else:
        unknown = [name for name in classes if name not in class_to_index]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
            raise ValueError(
                f"image folder: {len(unknown)} class folder(s) of {root} are not in the class index file: {shown}"
            )
    samples: list[tuple[str, int]] = []
    empty = []
    for name in classes:
        found = []
        for directory, subdirs, files in os.walk(root / name, followlinks=True):
            subdirs.sort()
            found.extend(os.path.join(directory, f) for f in sorted(files) if _is_image(f))
        if not found:
            empty.append(name)
        samples.extend((path, class_to_index[name]) for path in found)
    if empty:
        shown = ", ".join(empty[:5]) + (" …" if len(empty) > 5 else "")
        raise ValueError(
            f"image folder: {len(empty)} class folder(s) of {root} hold no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}): {shown}"
        )
    return samples, {name: class_to_index[name] for name in classes}


class ImageFolder(Dataset):
    """Item i: (image [3, S, S] float32 in [-1, 1], label int64). Flips use torch's RNG (seeded per worker)."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        flip: bool = True,
        class_to_index: dict[str, int] | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image folder: image_size must be ≥ 1, got {image_size}")
        self.root, self.image_size, self.flip = Path(root), image_size, flip
        self.samples, self.class_to_index = scan_image_folder(root, class_to_index)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return center_crop_arr(image.convert("RGB"), self.image_size)
        except Exception as error:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError …
            raise OSError(f"image folder: cannot read image {path}: {type(error).__name__}: {error}") from error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        arr = self.load(path)
        if self.flip and bool(torch.rand(()) < 0.5):
            arr = arr[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
        return image / 127.5 - 1.0, torch.tensor(label, dtype=torch.int64)


class ImageFolderDataModule(L.LightningDataModule):
    """Shuffled batches of (images, labels) from an ImageNet-style folder; under DDP Lightning's sampler
    gives each rank its own shard. The folder is scanned in `setup`, so parsing a config touches no files."""

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        class_index_file: str | None = None,
        flip: bool = True,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"image folder: batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size}, {num_workers}"
            )
        self.root, self.image_size, self.batch_size, self.num_workers = root, image_size, batch_size, num_workers
        self.class_index_file, self.flip, self.shuffle = class_index_file, flip, shuffle
        self.train_set: ImageFolder | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            mapping = read_class_index(self.class_index_file) if self.class_index_file else None
            self.train_set = ImageFolder(self.root, self.image_size, self.flip, mapping)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"image folder: {self.root} holds {len(self.train_set)} images, fewer than one batch of "
                f"{self.batch_size} (batches drop the remainder)"
            )
        trainer = getattr(self, "trainer", None)
        sampler = None
        if not self.shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning's automatic DistributedSampler always shuffles training data; one given to it is kept.
            sampler = DistributedSampler(
                self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=self.shuffle if sampler is None else False,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
