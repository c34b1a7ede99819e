"""The views objectives train on, built from one decoded image: the augmented training image, DINO's
multi-crop, the query-box region with its target box. Pixels stay uint8 until augmented; every draw comes
from the caller's rng."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mvlp_jax.data import transforms


def channels(config: ml_collections.ConfigDict) -> int:
    """Channels of the encoder's images: data.channels as the run resolved it (0, never resolved: 1)."""
    return int(config.data.get("channels", 0)) or 1


def eval_image(png: bytes, config: ml_collections.ConfigDict) -> np.ndarray:
    """The evaluation view of a stored image: centre crop at the model's size, normalised, (S, S, channels)."""
    c = channels(config)
    pixels = transforms.center_crop_resize(transforms.decode_png(png, c), config.model.image_size)
    return transforms.normalise(pixels, config.data.mean, config.data.std, c)


def eval_volume(pngs: list[bytes], config: ml_collections.ConfigDict) -> np.ndarray:
    """A volume's evaluation view: its slices' (`pngs`, in order) evaluation views stacked, (D, S, S, channels)."""
    return np.stack([eval_image(png, config) for png in pngs])


def eval_study(records: list[dict], types: np.ndarray, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A study's evaluation views: {"image": (V, S, S, C) (padding zeros), "view_type": (V,), "view_mask": (V,)}
    for its `records` (at most V = len(types), frontal first)."""
    views = [eval_image(record["image"], config) for record in records]
    image = np.zeros((len(types), *views[0].shape), np.float32)
    image[: len(views)] = views
    mask = np.arange(len(types)) < len(views)
    return {"image": image, "view_type": np.asarray(types, np.int32), "view_mask": mask}


@dataclasses.dataclass
class ViewInputs:
    """What an objective's views are built from, per example: the decoded image (H, W) or (H, W, 3) uint8, and
    the training crop (the random resized crop before intensity jitter, (S, S[, 3]) uint8) made on first use."""

    decoded: np.ndarray
    config: ml_collections.ConfigDict
    rng: np.random.Generator
    _crop: np.ndarray | None = None

    @classmethod
    def of(cls, png: bytes, config: ml_collections.ConfigDict, rng: np.random.Generator) -> ViewInputs:
        """From a stored image, decoded to the channels the encoder reads."""
        return cls(transforms.decode_png(png, channels(config)), config, rng)

    @property
    def crop(self) -> np.ndarray:
        if self._crop is None:
            box = transforms.random_resized_crop_box(
                *self.decoded.shape[:2], tuple(self.config.data.crop_scale), self.rng
            )
            self._crop = transforms.crop_resize(self.decoded, box, self.config.model.image_size)
        return self._crop

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels in [0, 255] -> (..., H, W, channels) float32, the data config's normalisation."""
        return transforms.normalise(pixels, self.config.data.mean, self.config.data.std, channels(self.config))

    def jitter(self, pixels: np.ndarray) -> np.ndarray:
        return transforms.intensity_jitter(pixels, self.config.data.brightness, self.config.data.contrast, self.rng)


def training_image(inputs: ViewInputs) -> np.ndarray:
    """The augmented training image (S, S, channels) most objectives read: crop, intensity jitter, normalisation."""
    return inputs.normalise(inputs.jitter(inputs.crop))


def multi_crop(
    sources: list[np.ndarray],
    global_from: tuple[int, int],
    local_from: list[int],
    global_size: int,
    local_size: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    brightness: float,
    contrast: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(2, G, G[, C]) global and (len(local_from), L, L[, C]) local crops, crop i of `sources[global_from[i]]`
    (resp. `local_from`), each source (H, W[, C]) uint8 (one image, or a study's views), each crop with its own
    random resized crop and intensity jitter; float32 in [0, 255]."""

    def views(picks: list[int], size: int, scale: tuple[float, float]) -> np.ndarray:
        out = np.zeros((len(picks), size, size, *sources[0].shape[2:]), np.float32)
        for i, pick in enumerate(picks):
            pixels = sources[pick]
            box = transforms.random_resized_crop_box(*pixels.shape[:2], scale, rng)
            out[i] = transforms.intensity_jitter(transforms.crop_resize(pixels, box, size), brightness, contrast, rng)
        return out

    return views(list(global_from), global_size, global_scale), views(list(local_from), local_size, local_scale)


def query_region(
    image: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random region of `image` (S, S[, 3]) uint8 resized to (size, size), and its box (cx, cy, w, h) as
    fractions of the image: the target the model predicts from (image, region)."""
    height, width = image.shape[:2]
    top, left, h, w = transforms.random_resized_crop_box(height, width, scale, rng)
    box = np.array([(left + w / 2) / width, (top + h / 2) / height, w / width, h / height], np.float32)
    return transforms.crop_resize(image, (top, left, h, w), size), box
