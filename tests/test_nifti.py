"""NIfTI volumes to slices: the same anatomy stored under two orientations gives the same axial images in the
radiological convention, values keep their Hounsfield units through the offset, z positions follow the affine,
masks stay on their voxels, bad inputs are refused by name, and the built dataset stacks the slices in z order."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

nib = pytest.importorskip("nibabel")

from data_prep.nifti import convert  # noqa: E402
from mvlp_jax.data.records import InputError  # noqa: E402

SHAPE = (6, 5, 4)  # x (right), y (anterior), z (superior) voxels in RAS+


def _anatomy() -> tuple[np.ndarray, np.ndarray]:
    """HU values in RAS+ index order with one marked voxel per slice at the patient's right-anterior corner, and a
    mask of a block on slices 1-2."""
    hu = np.full(SHAPE, -1000.0, np.float32)
    for z in range(SHAPE[2]):
        hu[-1, -1, z] = 100.0 * z  # x largest = patient's right, y largest = anterior
    hu[1:3, 1:3, :] = 40.0
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    return hu, mask


def _save(folder, name: str, data: np.ndarray, affine: np.ndarray, scaled: bool = False) -> str:
    if scaled:  # stored as int16 with a slope and intercept, as scanners write CT: HU = 2 x stored - 1024
        image = nib.Nifti1Image(((data + 1024) / 2).astype(np.int16), affine)
        image.header.set_slope_inter(2.0, -1024.0)
    else:
        image = nib.Nifti1Image(data, affine)
    nib.save(image, os.path.join(folder, name))
    return name


def _write(folder, rows: list[dict]) -> None:
    with open(os.path.join(folder, "volumes.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_two_orientations_of_one_volume_give_the_same_slices_hu_and_z(tmp_path):
    hu, mask = _anatomy()
    ras = np.diag([0.8, 0.8, 2.5, 1.0])
    ras[:3, 3] = (-10.0, -20.0, -100.0)
    lps = ras.copy()  # the same anatomy stored with x and y reversed (DICOM's LPS order)
    lps[0, 0], lps[1, 1] = -0.8, -0.8
    lps[0, 3], lps[1, 3] = ras[0, 3] + 0.8 * (SHAPE[0] - 1), ras[1, 3] + 0.8 * (SHAPE[1] - 1)
    raw = tmp_path / "raw"
    raw.mkdir()
    _write(
        raw,
        [
            {"volume": _save(raw, "a.nii.gz", hu, ras, scaled=True), "mask": _save(raw, "a_mask.nii.gz", mask, ras),
             "patient_id": "p1", "split": "train", "tumor": "1"},
            {"volume": _save(raw, "b.nii", hu[::-1, ::-1], lps),
             "mask": _save(raw, "b_mask.nii", mask[::-1, ::-1], lps), "patient_id": "p2", "split": "test",
             "tumor": "1"},
        ],
    )  # fmt: skip
    counts = convert(str(raw), str(tmp_path / "out"))
    assert counts == {"volumes": 2, "slices": 8, "clipped": 0, "missing": 0}
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv")))
    assert [r["series"] for r in rows] == ["a"] * 4 + ["b"] * 4 and rows[4]["split"] == "test"
    assert [float(r["z_mm"]) for r in rows[:4]] == [-100.0, -97.5, -95.0, -92.5]  # slice k at the affine's z
    assert rows[0]["pixel_spacing_mm"] == "0.8000x0.8000" and rows[0]["slice_thickness_mm"] == "2.5000"
    read = lambda name: np.asarray(Image.open(tmp_path / "out" / name))
    for a, b in zip(rows[:4], rows[4:]):
        np.testing.assert_array_equal(read(a["image"]), read(b["image"]))  # orientation undone
        np.testing.assert_array_equal(read(a["mask"]), read(b["mask"]))
    for k, row in enumerate(rows[:4]):
        pixels = read(row["image"]).astype(np.int64) - 32768
        assert pixels.shape == (SHAPE[1], SHAPE[0])  # rows: anterior to posterior; columns: right to left
        assert pixels[0, 0] == 100 * k  # the right-anterior voxel at the top left (radiological convention)
        assert pixels[-1, -1] == -1000 and (pixels == 40).sum() == 4
        assert (read(row["mask"]) == 255).sum() == (4 if k in (1, 2) else 0)
        if k in (1, 2):
            np.testing.assert_array_equal(read(row["mask"]) == 255, pixels == 40)


def test_bad_volumes_are_refused_by_name(tmp_path):
    hu, mask = _anatomy()
    _save(tmp_path, "v.nii", hu, np.eye(4))
    _save(tmp_path, "m.nii", mask[:, :, :3], np.eye(4))
    _write(tmp_path, [{"volume": "v.nii", "mask": "m.nii"}])
    with pytest.raises(InputError, match=r"m.nii: its grid \(6, 5, 3\).*resample the mask"):
        convert(str(tmp_path), str(tmp_path / "out"))
    _write(tmp_path, [{"volume": "v.nii", "series": "s"}, {"volume": "v.nii", "series": "s"}])
    with pytest.raises(InputError, match="series 's' is listed twice"):
        convert(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "broken.nii").write_bytes(b"not a volume")
    whole = open(tmp_path / "v.nii", "rb").read()
    (tmp_path / "cut.nii").write_bytes(whole[: len(whole) // 2])  # a transfer that stopped half way
    for name in ("broken.nii", "cut.nii"):
        _write(tmp_path, [{"volume": name}])
        with pytest.raises(InputError, match=f"{name}: not a readable NIfTI volume"):
            convert(str(tmp_path), str(tmp_path / "out"))
    _write(tmp_path, [{"volume": "v.nii", "series": "a/b"}])
    with pytest.raises(InputError, match="series 'a/b' cannot name a file"):
        convert(str(tmp_path), str(tmp_path / "out"))


def test_nan_voxels_and_a_trailing_dimension_of_one_are_read(tmp_path):
    hu, _ = _anatomy()
    hu[0, 0, 0] = np.nan  # outside the field of view
    _save(tmp_path, "v.nii", hu[..., None], np.eye(4))  # (X, Y, Z, 1), as some converters write
    _write(tmp_path, [{"volume": "v.nii"}])
    counts = convert(str(tmp_path), str(tmp_path / "out"))
    assert counts["missing"] == 1 and counts["slices"] == SHAPE[2]
    first = np.asarray(Image.open(tmp_path / "out" / "images" / "v_z0000.png")).astype(np.int64) - 32768
    assert first[-1, -1] == -1000  # x 0, y 0 (left, posterior): the lowest value of the volume


def test_converted_volumes_build_and_stack_in_z_order(tmp_path):
    from data_prep.build_dataset import build
    from mvlp_jax.data import built, studies

    hu, _ = _anatomy()
    descending = np.diag([1.0, 1.0, -2.0, 1.0])  # stored superior to inferior: canonical order reverses it
    raw = tmp_path / "raw"
    raw.mkdir()
    _write(raw, [{"volume": _save(raw, "v.nii", hu, descending), "split": "train"}])
    convert(str(raw), str(tmp_path / "out"))
    build("csv", str(tmp_path / "out"), str(tmp_path / "tfds"), name="ct", split_column="split",
          study_column="series", slice_position_column="z_mm", intensity_offset=32768, window="0,2000",
          image_size=0)  # fmt: skip
    builder, _, _ = built.open_builder(str(tmp_path / "tfds"), "ct")
    source = built.open_split(builder, "train", decode_images=True)
    records = [source[i] for i in range(len(source))]
    (series,), _ = studies.volumes(
        [r["study_id"].decode() for r in records], [studies.slice_key(r) for r in records], depth=4
    )
    z = [float(records[i]["slice_position"]) for i in series]
    corner = [int(np.asarray(records[i]["image"])[0, 0, 0]) for i in series]
    assert z == [-6.0, -4.0, -2.0, 0.0]  # inferior to superior
    assert corner == [166, 153, 140, 128]  # stored slice 3 (HU 300, the most inferior) first: (HU + 1000) / 2000
