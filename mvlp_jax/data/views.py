"""The views objectives train on, built from one decoded image: the augmented training image, DINO's
multi-crop, the query-box region with its target box. Pixels stay uint8 until augmented; every draw comes
from the caller's rng."""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mvlp_jax.data import transforms


@dataclasses.dataclass
class ViewInputs:
    """What an objective's views are built from, per example: the decoded image (H, W) uint8, and the training
    crop (the random resized crop before intensity jitter, (S, S) uint8) made on first use."""
    decoded: np.ndarray
    config: ml_collections.ConfigDict
    rng: np.random.Generator
    _crop: np.ndarray | None = None

    @property
    def crop(self) -> np.ndarray:
        if self._crop is None:
            box = transforms.random_resized_crop_box(*self.decoded.shape, tuple(self.config.data.crop_scale),
                                                     self.rng)
            self._crop = transforms.crop_resize(self.decoded, box, self.config.model.image_size)
        return self._crop

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(..., H, W) pixels in [0, 255] -> (..., H, W, 1) float32, the data config's normalisation."""
        return transforms.normalise(pixels, self.config.data.mean, self.config.data.std)

    def jitter(self, pixels: np.ndarray) -> np.ndarray:
        return transforms.intensity_jitter(pixels, self.config.data.brightness, self.config.data.contrast, self.rng)


def training_image(inputs: ViewInputs) -> np.ndarray:
    """The augmented training image (S, S, 1) most objectives read: crop, intensity jitter, normalisation."""
    return inputs.normalise(inputs.jitter(inputs.crop))


def multi_crop(pixels: np.ndarray, global_size: int, local_size: int, num_local: int,
               global_scale: tuple[float, float], local_scale: tuple[float, float], brightness: float,
               contrast: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(2, G, G) global and (num_local, L, L) local crops of `pixels` (H, W) uint8, each with its own random
    resized crop and intensity jitter; float32 in [0, 255]."""
    def views(n: int, size: int, scale: tuple[float, float]) -> np.ndarray:
        out = np.zeros((n, size, size), np.float32)
        for i in range(n):
            crop = transforms.crop_resize(pixels, transforms.random_resized_crop_box(*pixels.shape, scale, rng), size)
            out[i] = transforms.intensity_jitter(crop, brightness, contrast, rng)
        return out
    return views(2, global_size, global_scale), views(num_local, local_size, local_scale)


def query_region(image: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A random region of `image` (S, S) uint8 resized to (size, size), and its box (cx, cy, w, h) as
    fractions of the image: the target the model predicts from (image, region)."""
    top, left, h, w = transforms.random_resized_crop_box(*image.shape, scale, rng)
    height, width = image.shape
    box = np.array([(left + w / 2) / width, (top + h / 2) / height, w / width, h / height], np.float32)
    return transforms.crop_resize(image, (top, left, h, w), size), box
