"""DICOM input for the dataset builder: one file's pixels in its modality's units (Hounsfield units for CT), as the
PNG path hands high-bit-depth files to the windowing (data_prep/images.py).

- Rescale slope and intercept are applied (stored value x slope + intercept), so --window takes HU for CT and no
  --intensity_offset is needed.
- MONOCHROME1 (low values bright, common for computed radiography) is inverted within the image's value range, so
  that bright means dense as in MONOCHROME2.
- RGB files (e.g. secondary captures) are read as colour.
- Compressed pixel data (JPEG, JPEG 2000, RLE, ...) needs a decoder plugin; without one the error names the
  transfer syntax and what to install. Multi-frame files are refused (one image per file).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SUFFIXES = (".dcm", ".dicom")
MAGIC_OFFSET = 128  # a DICOM file's 128-byte preamble, then "DICM"


def is_dicom(path: str) -> bool:
    """By suffix, or by the 'DICM' marker after the preamble (DICOM files often have no suffix)."""
    if path.lower().endswith(SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read(path: str) -> Image.Image:
    """The file's image: 'F' (float32, modality units) for grayscale, 'RGB' for colour; ValueError naming the file
    and the reason when it cannot be read."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as error:
        raise ValueError(f"{path}: not a DICOM file ({error})") from None
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: a DICOM file without pixel data (a report or structured document?)")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(syntax)
        if not decoder.is_available:
            raise ValueError(
                f"{path}: pixel data compressed as {syntax.name} ({syntax}), which no installed decoder reads; "
                f"any one of: {'; '.join(decoder.missing_dependencies)} (pip install it), or convert the files to "
                "uncompressed DICOM"
            )
    try:
        pixels = dataset.pixel_array
    except (RuntimeError, NotImplementedError, ValueError) as error:
        kind = f"compressed as {syntax.name}" if syntax is not None and syntax.is_compressed else "stored"
        raise ValueError(f"{path}: its pixel data, {kind}, cannot be decoded ({str(error).splitlines()[0]})") from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1:
        raise ValueError(f"{path}: {frames} frames in one file; the builder reads one image per file")
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        return Image.fromarray(np.asarray(pixels, np.uint8), mode="RGB")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: photometric interpretation {photometric} is not read here")
    values = pixels.astype(np.float64) * float(dataset.get("RescaleSlope", 1) or 1) + float(
        dataset.get("RescaleIntercept", 0) or 0
    )
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return Image.fromarray(values.astype(np.float32), mode="F")
