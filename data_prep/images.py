"""Decode, grayscale and resize one chest X-ray into PNG bytes (runs in worker processes).

Kept free of TensorFlow/JAX imports so spawned decode workers start fast.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


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


def load_gray_png(path: str, shorter_side: int) -> tuple[bytes, tuple[int, int]]:
    """Reads an image file, returns (PNG bytes of the uint8 grayscale resized image, (height, width)).

    Raises OSError/ValueError on unreadable or truncated files (the caller counts them).
    """
    with Image.open(path) as image:
        target = resized_size(image.width, image.height, shorter_side)
        if image.format == "JPEG" and target != image.size:
            # Let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) no smaller than the target:
            # several times faster on full-size MIMIC JPEGs, and deterministic.
            image.draft("L", target)
        image.load()  # forces a full decode, so truncated files fail here, not later
        gray = _to_uint8_gray(image)
    if gray.size != target:
        gray = gray.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), (gray.height, gray.width)


def decode_task(args: tuple[int, str, int]) -> tuple[int, bytes | None, str]:
    """Pool-friendly wrapper: (index, path, size) -> (index, png or None, error message)."""
    index, path, shorter_side = args
    try:
        png, _ = load_gray_png(path, shorter_side)
        return index, png, ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return index, None, f"{type(e).__name__}: {e}"
