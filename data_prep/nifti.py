"""NIfTI volumes (.nii / .nii.gz: CT, MRI) as the slices and manifest the dataset builder reads.

  python -m data_prep.nifti --input_dir=DIR --output_dir=OUT [--manifest=volumes.csv]
  python -m data_prep.build_dataset --source=csv --input_dir=OUT --output_dir=TFDS --name=NAME \\
      --study_column=series --slice_position_column=z_mm --group_column=patient_id --intensity_offset=32768 \\
      --window=ct_soft_lung_bone --channels=3 [--mask_column=mask] [--split_column=split] --image_size=0

The manifest (relative to --input_dir) has a `volume` column (a NIfTI path relative to it) and optionally
`series` (default: the file's name), `patient_id` (default: the series), `mask` (a label volume of the same
grid: any non-zero voxel is foreground) and any others (labels, split), copied to every slice's row.

Each volume is turned to the closest RAS+ orientation (nibabel), so whatever its affine a slice is an axial image
in the radiological convention: anterior at the top, the patient's right on the image's left. Slice k is written
as a 16-bit PNG holding its values (scale slope and intercept applied: Hounsfield units for CT) plus
--intensity_offset, rounded and clipped to 0..65535 (clipped voxels are counted; NaN voxels, which some files
hold outside the field of view, become the volume's lowest value and are counted too); its mask as 0 / 255. OUT's
manifest.csv names each slice (image, mask, series, patient_id, slice_index, z_mm: the slice centre's position
along the scanner's inferior-superior axis, pixel spacing and slice thickness in mm) with the volume's own
columns. Pixels need not be square: the builder's resize does not correct for spacing.
"""

from __future__ import annotations

import csv
import os
import zlib
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from data_prep.sources.tables import read_csv
from mvlp_jax.data.records import InputError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the command only, so the module can be imported beside other absl programs."""
    flags.DEFINE_string("input_dir", None, "Folder of the NIfTI files and their manifest.")
    flags.DEFINE_string("output_dir", None, "Where the slices (images/, masks/) and manifest.csv go.")
    flags.DEFINE_string("manifest", "volumes.csv", "CSV (relative to --input_dir) with a `volume` column.")
    flags.DEFINE_float("intensity_offset", 32768.0, "Added to every value before it is stored (HU + 32768 for CT).")


OWN_COLUMNS = ("image", "mask", "series", "patient_id", "slice_index", "z_mm", "pixel_spacing_mm", "slice_thickness_mm")


def _load(path: str) -> tuple[Any, np.ndarray]:
    """(the NIfTI image at `path` in the closest RAS+ orientation, its values as float32 with scale slope and
    intercept applied; trailing dimensions of one dropped); InputError names an unreadable or truncated file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
        return image, image.get_fdata(dtype=np.float32)
    except (FileNotFoundError, ImageFileError, EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: not a readable NIfTI volume ({type(error).__name__}: {error})") from None


def axial_slices(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) in RAS+ -> (Z, Y, X) axial images, anterior at the top and the patient's right on the left."""
    return np.transpose(volume[::-1, ::-1, :], (2, 1, 0))


def convert_volume(path: str, mask_path: str, offset: float) -> dict:
    """One NIfTI volume -> {"slices" uint16 (Z, rows, cols), "masks" bool or None, "z_mm" (Z,), "spacing" (row,
    col, slice) mm, "clipped" voxels, "missing" voxels (NaN, stored as the volume's lowest value)}."""
    image, values = _load(path)
    if values.ndim != 3:
        raise InputError(f"{path}: a volume of shape {values.shape}; this reads 3D volumes (one channel, one time)")
    missing = ~np.isfinite(values)
    if missing.all():
        raise InputError(f"{path}: every voxel is NaN or infinite")
    values = np.rint(np.where(missing, values[~missing].min(), values) + offset)
    clipped = int(((values < 0) | (values > 65535)).sum())
    masks = None
    if mask_path:
        mask, labels = _load(mask_path)
        if labels.shape != values.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise InputError(
                f"{mask_path}: its grid {labels.shape} (affine {np.round(mask.affine, 3).tolist()}) is not its "
                f"volume's {values.shape} ({path}); resample the mask onto the volume first"
            )
        masks = axial_slices(np.nan_to_num(labels) != 0)
    centre = np.array([(values.shape[0] - 1) / 2, (values.shape[1] - 1) / 2])
    z_mm = image.affine[2, :2] @ centre + image.affine[2, 2] * np.arange(values.shape[2]) + image.affine[2, 3]
    spacing = image.header.get_zooms()[:3]
    return {
        "slices": axial_slices(np.clip(values, 0, 65535).astype(np.uint16)),
        "masks": masks,
        "z_mm": z_mm,
        "spacing": (float(spacing[1]), float(spacing[0]), float(spacing[2])),
        "clipped": clipped,
        "missing": int(missing.sum()),
    }


def convert(input_dir: str, output_dir: str, manifest: str = "volumes.csv", offset: float = 32768.0) -> dict:
    """Every volume of the manifest to slices and OUT/manifest.csv; returns counts (volumes, slices, clipped)."""
    rows = read_csv(os.path.join(input_dir, manifest), ("volume",))
    if not rows:
        raise InputError(f"{os.path.join(input_dir, manifest)} lists no volume")
    extra = [c for c in rows[0] if c not in ("volume",) + OWN_COLUMNS]
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    out, seen, clipped, missing = [], set(), 0, 0
    for row in tqdm(rows, desc="NIfTI volumes", unit="volume"):
        path = os.path.join(input_dir, row["volume"])
        name = os.path.basename(row["volume"])
        series = row.get("series") or name.removesuffix(".gz").removesuffix(".nii")
        if os.sep in series or series in ("", ".", ".."):
            raise InputError(f"{path}: series {series!r} cannot name a file; give a series without {os.sep!r}")
        if series in seen:
            raise InputError(f"{path}: series {series!r} is listed twice; give each volume its own series")
        seen.add(series)
        mask_path = os.path.join(input_dir, row["mask"]) if row.get("mask") else ""
        volume = convert_volume(path, mask_path, offset)
        clipped, missing = clipped + volume["clipped"], missing + volume["missing"]
        for k, pixels in enumerate(volume["slices"]):
            image = f"images/{series}_z{k:04d}.png"
            Image.fromarray(pixels).save(os.path.join(output_dir, image))
            mask = ""
            if volume["masks"] is not None:
                mask = f"masks/{series}_z{k:04d}.png"
                Image.fromarray(volume["masks"][k].astype(np.uint8) * 255).save(os.path.join(output_dir, mask))
            out.append(
                {
                    "image": image,
                    "mask": mask,
                    "series": series,
                    "patient_id": row.get("patient_id") or series,
                    "slice_index": k,
                    "z_mm": f"{volume['z_mm'][k]:.3f}",
                    "pixel_spacing_mm": f"{volume['spacing'][0]:.4f}x{volume['spacing'][1]:.4f}",
                    "slice_thickness_mm": f"{volume['spacing'][2]:.4f}",
                    **{c: row[c] for c in extra},
                }
            )
    with open(os.path.join(output_dir, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(OWN_COLUMNS) + extra)
        writer.writeheader()
        writer.writerows(out)
    return {"volumes": len(rows), "slices": len(out), "clipped": clipped, "missing": missing}


def main(argv: list[str]) -> None:
    del argv
    counts = convert(FLAGS.input_dir, FLAGS.output_dir, FLAGS.manifest, FLAGS.intensity_offset)
    print(
        f"{counts['volumes']} volumes -> {counts['slices']} slices in {FLAGS.output_dir} (manifest.csv)"
        + (f"; {counts['clipped']} voxels clipped to 0..65535 after the offset" if counts["clipped"] else "")
        + (f"; {counts['missing']} NaN voxels stored as their volume's lowest value" if counts["missing"] else "")
    )


def run_binary() -> None:
    define_flags()
    flags.mark_flags_as_required(["input_dir", "output_dir"])
    app.run(main)


if __name__ == "__main__":
    run_binary()
