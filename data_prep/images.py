"""Decode, grayscale and resize one chest X-ray into PNG bytes (runs in worker processes).

Kept free of TensorFlow/JAX imports so spawned decode workers start fast.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_prep.records import BAD_BOX, IMAGE_UNREADABLE, MASK_UNREADABLE


def _to_uint8_gray(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High-bit-depth scans: rescale the used range to 8 bits (their bit depth varies by vendor).
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        if high > low:
            scaled = (pixels - low) * (255.0 / (high - low))
        else:  # a constant image has no range to stretch: scale by its type's (16 bits, or [0, 1] floats)
            full = 1.0 if image.mode == "F" and high <= 1.0 else 65535.0
            scaled = np.clip(pixels * (255.0 / full), 0, 255)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    return image.convert("L")


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """Target (width, height) with the shorter side at `shorter_side`; never upsamples; 0 keeps size."""
    shorter = min(width, height)
    if shorter_side <= 0 or shorter <= shorter_side:
        return width, height
    scale = shorter_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load_gray(path: str, shorter_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """(uint8 grayscale image resized to the shorter side, the file's own (width, height))."""
    with Image.open(path) as image:
        source_size = image.size
        target = resized_size(image.width, image.height, shorter_side)
        if image.format == "JPEG" and target != image.size:
            # Let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) no smaller than the target:
            # several times faster on full-size MIMIC JPEGs, and deterministic.
            image.draft("L", target)
        image.load()  # forces a full decode, so truncated files fail here, not later
        gray = _to_uint8_gray(image)
    if gray.size != target:
        gray = gray.resize(target, Image.Resampling.LANCZOS)
    return gray, source_size


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def load_gray_png(path: str, shorter_side: int) -> tuple[bytes, tuple[int, int]]:
    """Reads an image file, returns (PNG bytes of the uint8 grayscale resized image, (height, width)).

    Raises OSError/ValueError on unreadable or truncated files (the caller counts them).
    """
    gray, _ = _load_gray(path, shorter_side)
    return _png(gray), (gray.height, gray.width)


def load_mask_png(path: str, source_size: tuple[int, int], target: tuple[int, int]) -> bytes:
    """A mask file of the image's (width, height) `source_size` -> PNG bytes of 0/1 uint8 at `target` (width,
    height), resized nearest-neighbour so every pixel stays a label. ValueError when the sizes differ."""
    with Image.open(path) as mask:
        mask.load()
        if mask.size != source_size:
            raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} px, its image {source_size[0]}x{source_size[1]}")
        binary = Image.fromarray((np.asarray(mask.convert("L")) > 127).astype(np.uint8))
    if binary.size != target:
        binary = binary.resize(target, Image.Resampling.NEAREST)
    return _png(binary)


def scale_boxes(boxes, source_size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 in source pixels -> float32 in target pixels; ValueError for a box that is empty
    or leaves the image (by more than half a pixel)."""
    out = np.asarray(boxes, np.float64).reshape(-1, 4)
    (w, h), (tw, th) = source_size, target
    for box in out:
        x0, y0, x1, y1 = box
        if not (-0.5 <= x0 < x1 <= w + 0.5 and -0.5 <= y0 < y1 <= h + 0.5):
            raise ValueError(f"box {box.round(1).tolist()} is empty or outside the {w}x{h} px image")
    return (out * np.array([tw / w, th / h, tw / w, th / h])).astype(np.float32)


def decode_task(args: tuple) -> tuple[int, dict | None, str, str]:
    """Pool-friendly: (index, path, size, mask path or '', boxes) -> (index, {"image": png[, "mask": png],
    "boxes": float32 (N, 4)} or None, skip reason, error message)."""
    index, path, shorter_side, mask_path, boxes = args
    try:
        gray, source_size = _load_gray(path, shorter_side)
        out = {"image": _png(gray)}
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return index, None, IMAGE_UNREADABLE, f"{type(e).__name__}: {e}"
    if mask_path:
        try:
            out["mask"] = load_mask_png(mask_path, source_size, gray.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return index, None, MASK_UNREADABLE, f"{mask_path}: {type(e).__name__}: {e}"
    try:
        out["boxes"] = scale_boxes(boxes, source_size, gray.size)
    except ValueError as e:
        return index, None, BAD_BOX, str(e)
    return index, out, "", ""
