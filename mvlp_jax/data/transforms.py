"""Per-image training transforms in NumPy/PIL: decode, RandomResizedCrop, intensity jitter, normalise.

Pure functions of (image, numpy Generator), so a grain `random_map` makes them deterministic per record
position: the same seed and step give the same pixels on any number of hosts or workers.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def decode_png(data: bytes, channels: int = 1) -> np.ndarray:
    """PNG bytes -> uint8 (H, W) grayscale, or (H, W, 3) colour for `channels=3` (a grayscale image replicated,
    a colour one kept; a colour image read with `channels=1` becomes its luminance)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def png_shape(data: bytes) -> tuple[int, int]:
    """(H, W) of PNG bytes from the header, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random `scale` fraction of the area with a random aspect
    `ratio` (torchvision's RandomResizedCrop); falls back to the largest centred crop of the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, resample: Image.Resampling = Image.BILINEAR
) -> np.ndarray:
    top, left, h, w = box
    crop = Image.fromarray(image[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), resample, reducing_gap=None))


def center_crop_resize(image: np.ndarray, size: int, resample: Image.Resampling = Image.BILINEAR) -> np.ndarray:
    """Evaluation view: the centred square, resized (masks: `resample=Image.NEAREST`, so labels stay labels)."""
    h, w = image.shape[:2]
    side = min(h, w)
    return crop_resize(image, ((h - side) // 2, (w - side) // 2, side, side), size, resample)


def intensity_jitter(pixels: np.ndarray, brightness: float, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """float pixels in [0, 255]: contrast around the image mean, then a brightness shift; clipped."""
    x = pixels.astype(np.float32)
    if contrast:
        mean = x.mean()
        x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    if brightness:
        x = x + 255.0 * rng.uniform(-brightness, brightness)
    return np.clip(x, 0.0, 255.0)


def normalise(pixels: np.ndarray, mean: float, std: float, channels: int = 1) -> np.ndarray:
    """Pixels in [0, 255], (..., H, W) grayscale or (..., H, W, 3) colour as `channels` says -> (..., H, W,
    channels) float32."""
    x = (pixels.astype(np.float32) / 255.0 - mean) / std
    return x[..., None] if channels == 1 else x
