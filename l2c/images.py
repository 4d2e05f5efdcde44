"""Real images as DiT's training read them (no torchvision: PIL + numpy), for the image-folder data and for FID."""

from __future__ import annotations

import numpy as np
from PIL import Image

# The extensions torchvision's ImageFolder accepts, compared case-insensitively (ImageNet ships .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `image_datasets.py`, used by DiT's `train.py`) → uint8 [S, S, 3]."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]
