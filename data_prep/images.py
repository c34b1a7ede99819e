"""Decode one image (grayscale, or colour when asked; 16-bit through a window) and resize it into PNG bytes
(runs in worker processes).

Kept free of TensorFlow/JAX imports so spawned decode workers start fast.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from data_prep import dicom
from mvlp_jax.data.records import IMAGE_UNREADABLE, MASK_ENCODING, MASK_UNREADABLE

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


# Windows in Hounsfield units that radiologists read CT with, (level, width); a preset names one or several (each
# then a channel, the usual practice for CT with image encoders: --channels=3)
CT_WINDOWS = {
    "ct_soft": "40,400",
    "ct_lung": "-600,1500",
    "ct_bone": "400,1800",
    "ct_brain": "40,80",
    "ct_soft_lung_bone": "40,400;-600,1500;400,1800",
}
Window = tuple[str, float, float]  # ("level_width", level, width) or ("percentile", low, high)


@dataclasses.dataclass(frozen=True)
class Windowing:
    """How a high-bit-depth file becomes 8 bits: `windows` (none: each image's used range; several: one channel
    each) applied to the stored values minus `offset` (a PNG holding HU + 32768 has offset 32768)."""

    windows: tuple[Window, ...] = ()
    offset: float = 0.0

    def describe(self) -> list[dict]:
        """The windows as the build report and the dataset's metadata record them."""
        return [
            {"level": a, "width": b} if kind == "level_width" else {"percentiles": [a, b]}
            for kind, a, b in self.windows
        ]


def _parse_one(text: str, given: str) -> Window:
    kind, numbers = ("percentile", text[1:]) if text.startswith("p") else ("level_width", text)
    try:
        a, b = (float(v) for v in numbers.split(","))
    except ValueError:
        raise ValueError(
            f"--window={given!r}: give L,W (level, width), pLO,HI (percentiles), several separated by ';', or a "
            f"preset ({', '.join(CT_WINDOWS)})"
        ) from None
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"--window={given!r}: both numbers must be finite")
    if kind == "level_width" and b <= 0:
        raise ValueError(f"--window={given!r}: the width must be > 0")
    if kind == "percentile" and not 0 <= a < b <= 100:
        raise ValueError(f"--window={given!r}: percentiles need 0 <= LO < HI <= 100")
    return kind, a, b


def parse_window(window: str, offset: float = 0.0) -> Windowing:
    """--window: '' (stretch each image's used range), 'L,W' (level and width in the file's units after
    --intensity_offset), 'pLO,HI' (each image's percentiles), several of those separated by ';' (one channel each),
    or a preset name (CT_WINDOWS); ValueError naming the bad text."""
    if not np.isfinite(offset):
        raise ValueError(f"--intensity_offset={offset}: must be finite")
    text = CT_WINDOWS.get(window, window)
    return Windowing(tuple(_parse_one(part.strip(), window) for part in text.split(";")) if text else (), offset)


def bit_depth(image: Image.Image) -> int:
    """Bits per sample of a decoded file: 16 for 16-bit grayscale, 32 for int/float images, else 8."""
    return {"I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(image.mode, 8)


SATURATED = 0.95  # an image with more of its pixels at one end of the window is counted (and warned about)


def saturated(image: Image.Image) -> bool:
    """Whether more than SATURATED of an 8-bit image's pixels sit at 0, or at 255: a window in the wrong units (a
    CT's Hounsfield window on stored values offset by 32768 turns every pixel white)."""
    pixels = np.asarray(image.convert("L"))
    return bool(max(np.mean(pixels == 0), np.mean(pixels == 255)) > SATURATED)


def _window_to_uint8(pixels: np.ndarray, window: Window | None, full: float) -> np.ndarray:
    """Stored values (offset removed) -> uint8 by one window (level/width or percentiles) mapped to 0..255 and
    clipped; without one, the image's used range (bit depths vary by vendor, so no fixed range fits all)."""
    if window is None:
        low, high = float(pixels.min()), float(pixels.max())
    elif window[0] == "level_width":
        low, high = window[1] - window[2] / 2, window[1] + window[2] / 2
    else:
        low, high = (float(v) for v in np.percentile(pixels, window[1:]))
    if high > low:
        scaled = (pixels - low) / (high - low) * 255.0
    else:  # a constant image has no range to stretch: scale by its type's (16 bits, or [0, 1] floats)
        scaled = pixels * (255.0 / full)
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def to_uint8(image: Image.Image, channels: int = 1, windowing: Windowing = Windowing()) -> Image.Image:
    """Any decoded file -> uint8 grayscale ('L', channels=1) or colour ('RGB', channels=3); high-bit-depth
    files go through the windowing first: one window (a scan kept in colour is its grey replicated), or one per
    channel."""
    if image.mode in HIGH_BIT_MODES:
        full = 1.0 if image.mode == "F" and float(np.asarray(image).max()) <= 1.0 else 65535.0
        pixels = np.asarray(image, dtype=np.float64) - windowing.offset
        planes = [_window_to_uint8(pixels, w, full) for w in windowing.windows or (None,)]
        if len(planes) > 1:
            if len(planes) != channels:
                raise ValueError(f"{len(planes)} windows make {len(planes)} channels; --channels={channels}")
            return Image.fromarray(np.stack(planes, axis=-1), mode="RGB")
        image = Image.fromarray(planes[0], mode="L")
    return image.convert("L" if channels == 1 else "RGB")


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """Target (width, height) with the shorter side at `shorter_side`; never upsamples; 0 keeps size."""
    shorter = min(width, height)
    if shorter_side <= 0 or shorter <= shorter_side:
        return width, height
    scale = shorter_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load(
    path: str, shorter_side: int, channels: int = 1, windowing: Windowing = Windowing()
) -> tuple[Image.Image, tuple[int, int], int, bool]:
    """(uint8 image of `channels` resized to the shorter side, the file's own (width, height), its bit depth,
    whether the window put nearly all its pixels at one end: `saturated`). DICOM files are read in their
    modality's units (data_prep/dicom.py)."""
    with dicom.read(path) if dicom.is_dicom(path) else Image.open(path) as image:
        source_size = image.size
        target = resized_size(image.width, image.height, shorter_side)
        if image.format == "JPEG" and target != image.size:
            # Let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) no smaller than the target:
            # several times faster on full-size MIMIC JPEGs, and deterministic.
            image.draft("L" if channels == 1 else "RGB", target)
        image.load()  # forces a full decode, so truncated files fail here, not later
        bits = bit_depth(image)
        out = to_uint8(image, channels, windowing)
        washed_out = bool(windowing.windows) and bits > 8 and saturated(out.convert("L"))
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out, source_size, bits, washed_out


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def load_png(
    path: str, shorter_side: int, channels: int = 1, window: str = "", offset: float = 0.0
) -> tuple[bytes, tuple[int, int]]:
    """Reads an image file, returns (PNG bytes of the uint8 resized image of `channels`, (height, width)).

    Raises OSError/ValueError on unreadable or truncated files (the caller counts them).
    """
    image, _, _, _ = _load(path, shorter_side, channels, parse_window(window, offset))
    return _png(image), (image.height, image.width)


class MaskEncodingError(ValueError):
    """A mask whose values do not say which pixels are foreground under the chosen --mask_values."""


def parse_mask_values(spec: str) -> tuple[str, tuple[float, ...]]:
    """--mask_values: 'auto' (a mask's one non-zero value is foreground: 0/1, 0/255, 0/127 alike), 'nonzero',
    '>T' (values above T, e.g. '>127' for anti-aliased or JPEG masks), or 'V,V,...' (those label values, e.g. the
    classes of a label map) -> (kind, values); ValueError naming the bad text."""
    if spec in ("auto", "nonzero"):
        return spec, ()
    try:
        if spec.startswith(">"):
            return "above", (float(spec[1:]),)
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(
            f"--mask_values={spec!r}: give auto, nonzero, >T (e.g. >127) or label values (e.g. 1,2)"
        ) from None
    if not values or 0 in values:
        raise ValueError(f"--mask_values={spec!r}: list the foreground values (0 is the background)")
    return "values", values


def mask_foreground(values: np.ndarray, rule: tuple[str, tuple[float, ...]]) -> np.ndarray:
    """The foreground (bool) of a mask's stored values under `rule` (parse_mask_values); MaskEncodingError when
    'auto' meets several non-zero values."""
    kind, given = rule
    if kind == "nonzero":
        return values != 0
    if kind == "above":
        return values > given[0]
    if kind == "values":
        return np.isin(values, given)
    present = np.unique(values[values != 0])
    if len(present) > 1:
        shown = ", ".join(f"{v:g}" for v in present[:8]) + (", ..." if len(present) > 8 else "")
        raise MaskEncodingError(
            f"mask values {shown} besides 0: a label map of several classes, or an anti-aliased "
            f"mask? Say which pixels are foreground with --mask_values (e.g. --mask_values=1 or "
            f"1,2 for label values, >127 for a blurred 0/255 mask, nonzero for any label)"
        )
    return values != 0


def load_mask_png(
    path: str, source_size: tuple[int, int], target: tuple[int, int], rule: tuple[str, tuple[float, ...]] = ("auto", ())
) -> tuple[bytes, tuple[float, ...], bool]:
    """A mask file of the image's (width, height) `source_size` -> (PNG bytes of 0/1 uint8 at `target` (width,
    height), resized nearest-neighbour so every pixel stays a label; the non-zero values the file holds; whether
    its foreground is empty). Label
    maps are read as stored (palette indices stay indices); colour masks as their luminance. ValueError when the
    sizes differ, MaskEncodingError when `rule` cannot tell the foreground."""
    with Image.open(path) as mask:
        mask.load()
        if mask.size != source_size:
            raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} px, its image {source_size[0]}x{source_size[1]}")
        stored = mask if mask.mode in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "F") else mask.convert("L")
        values = np.asarray(stored).astype(np.float64)
    foreground = mask_foreground(values, rule)
    binary = Image.fromarray(foreground.astype(np.uint8))
    if binary.size != target:
        binary = binary.resize(target, Image.Resampling.NEAREST)
    return _png(binary), tuple(float(v) for v in np.unique(values[values != 0])[:16]), not foreground.any()


def scale_boxes(
    boxes, source_size: tuple[int, int], target: tuple[int, int]
) -> tuple[np.ndarray, dict[str, int], list[int]]:
    """(N, 4) x0, y0, x1, y1 in source pixels -> (float32 boxes in target pixels, what was fixed, the indices of
    the boxes kept): swapped corners
    (a negative width or height) are put in order, a box crossing the image's edge is clipped to it, and a box
    with no area left (zero-sized, or wholly outside the image) is dropped; each is counted by kind."""
    out = np.asarray(boxes, np.float64).reshape(-1, 4)
    (w, h), (tw, th) = source_size, target
    fixes = {"corners_swapped": 0, "clipped": 0, "dropped": 0}
    kept, indices = [], []
    for index, box in enumerate(out):
        ordered = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        fixes["corners_swapped"] += bool((ordered != box).any())
        clipped = np.clip(ordered, 0, [w, h, w, h])
        if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
            fixes["dropped"] += 1
            continue
        fixes["clipped"] += bool(np.abs(clipped - ordered).max() > 0.5)  # half a pixel over is rounding
        kept.append(clipped)
        indices.append(index)
    scaled = np.asarray(kept, np.float64).reshape(-1, 4) * np.array([tw / w, th / h, tw / w, th / h])
    return scaled.astype(np.float32), {k: v for k, v in fixes.items() if v}, indices


def decode_task(args: tuple) -> tuple[int, dict | None, str, str]:
    """Pool-friendly: (index, path, size, mask path or '', boxes, channels, window, intensity offset, mask values)
    -> (index, {"image": png[, "mask": png, "mask_values": the file's non-zero values, "mask_empty"], "boxes":
    float32 (N, 4), "box_fixes", "box_kept": scale_boxes's counts and kept boxes, "bit_depth": the file's,
    "saturated": by the window} or None, skip reason,
    error message)."""
    index, path, shorter_side, mask_path, boxes, channels, window, offset, mask_values = args
    try:
        image, source_size, bits, washed_out = _load(path, shorter_side, channels, parse_window(window, offset))
        out = {"image": _png(image), "bit_depth": bits, "saturated": washed_out}
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return index, None, IMAGE_UNREADABLE, f"{type(e).__name__}: {e}"
    if mask_path:
        try:
            out["mask"], out["mask_values"], out["mask_empty"] = load_mask_png(
                mask_path, source_size, image.size, parse_mask_values(mask_values)
            )
        except MaskEncodingError as e:
            return index, None, MASK_ENCODING, f"{mask_path}: {e}"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return index, None, MASK_UNREADABLE, f"{mask_path}: {type(e).__name__}: {e}"
    out["boxes"], out["box_fixes"], out["box_kept"] = scale_boxes(boxes, source_size, image.size)
    return index, out, "", ""
