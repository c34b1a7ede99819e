"""DICOM input, on files this test writes with pydicom: rescale slope/intercept give Hounsfield units that a CT
window reads, MONOCHROME1 comes out inverted, a compressed transfer syntax without its decoder is refused by
name, and a CSV of DICOM files (one without a suffix) builds a dataset that records its windows."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from data_prep import dicom, images  # noqa: E402


def write(
    path: str,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    syntax=ExplicitVRLittleEndian,
) -> str:
    """A single-frame DICOM file with `stored` (int16) as its pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "p1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # a JPEG 2000 codestream's start, then junk
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_rescale_gives_hounsfield_units_that_a_ct_window_reads(tmp_path):
    hu = np.linspace(-1000, 1000, 32 * 32).reshape(32, 32)
    stored = np.round((hu + 1024) / 2).astype(np.int16)  # slope 2, intercept -1024: a scanner's own units
    path = write(str(tmp_path / "ct.dcm"), stored, slope=2.0, intercept=-1024.0)
    read = np.asarray(dicom.read(path))
    np.testing.assert_allclose(read, stored * 2.0 - 1024.0)
    png, size = images.load_png(path, 0, window="40,400")  # soft tissue: -160..240 HU -> 0..255
    want = np.round(np.clip((read - (40 - 200)) / 400 * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(_png_pixels(png), want)
    assert size == (32, 32)
    three, _ = images.load_png(path, 0, channels=3, window="ct_soft_lung_bone")
    assert _png_pixels(three).shape == (32, 32, 3)


def test_monochrome1_is_inverted(tmp_path):
    stored = np.random.default_rng(0).integers(0, 4000, (16, 16)).astype(np.int16)
    plain, _ = images.load_png(write(str(tmp_path / "m2.dcm"), stored), 0)
    inverted, _ = images.load_png(write(str(tmp_path / "m1.dcm"), stored, photometric="MONOCHROME1"), 0)
    np.testing.assert_allclose(_png_pixels(inverted).astype(int), 255 - _png_pixels(plain).astype(int), atol=1)


def test_compressed_pixel_data_without_a_decoder_is_refused_by_name(tmp_path):
    path = write(str(tmp_path / "jls.dcm"), np.zeros((8, 8), np.int16), syntax=JPEGLSLossless)
    with pytest.raises(ValueError, match=r"jls.dcm: pixel data compressed as JPEG-LS.*no installed decoder.*pylibjpeg"):
        dicom.read(path)
    # a broken codestream for a decoder that is installed (Pillow's JPEG 2000, where Pillow has OpenJPEG): named too
    path = write(str(tmp_path / "j2k.dcm"), np.zeros((8, 8), np.int16), syntax=JPEG2000Lossless)
    available = pydicom.pixels.get_decoder(JPEG2000Lossless).is_available
    reason = "its pixel data, compressed as JPEG 2000.*cannot be decoded" if available else "no installed decoder"
    with pytest.raises(ValueError, match=rf"j2k.dcm: .*{reason}" if not available else rf"j2k.dcm: {reason}"):
        dicom.read(path)
    with pytest.raises(ValueError, match="not a DICOM file"):
        dicom.read(str(_text_file(tmp_path)))


def _text_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not an image")
    return path


def test_a_csv_of_dicom_files_builds_a_windowed_dataset(tmp_path):
    from data_prep.build_dataset import build

    root = tmp_path / "raw"
    root.mkdir()
    rows = ["image,patient"]
    rng = np.random.default_rng(1)
    for i in range(6):
        name = f"slice{i}" + (".dcm" if i else "")  # DICOM files often have no suffix: found by their marker
        write(str(root / name), rng.integers(0, 2000, (24, 24)).astype(np.int16), intercept=-1024.0)
        rows.append(f"{name},p{i % 3}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    assert dicom.is_dicom(str(root / "slice0")) and not dicom.is_dicom(str(root / "manifest.csv"))
    report = build(
        "csv", str(root), str(tmp_path / "tfds"), name="ct_dicom", window="ct_soft_lung_bone", channels=3, image_size=0
    )
    assert sum(report["records_written"].values()) == 6, report
    assert report["windows"] == [
        {"level": 40.0, "width": 400.0},
        {"level": -600.0, "width": 1500.0},
        {"level": 400.0, "width": 1800.0},
    ]
    assert os.path.isdir(report["dataset_dir"])
