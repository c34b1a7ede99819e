"""Boxes around the connected parts of segmentation masks, as a boxes CSV for build_dataset --boxes_csv: a
detection task of the same images (e.g. one box per lung from lung masks).

  python -m data_prep.boxes_from_masks --input_dir=../shared/data/covid_lung_masks --manifest=metadata.csv \
      --image_column=filename --mask_column=mask --mask_dir=masks --label=lung --output=runs/lung_boxes.csv

One row per 8-connected foreground part of at least --min_fraction of the mask's pixels: `image` (the
manifest's image-column value), `label`, `x, y, w, h` in the mask's (= the image's) pixels.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from absl import app, flags
from PIL import Image
from scipy import ndimage

from data_prep.sources.tables import read_csv

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the command only, so the module can be imported beside other absl programs."""
    flags.DEFINE_string("input_dir", None, "Folder of the manifest.")
    flags.DEFINE_string("manifest", "manifest.csv", "Manifest CSV (relative to --input_dir).")
    flags.DEFINE_string("image_column", "image", "Column with the image path (copied to the boxes' `image`).")
    flags.DEFINE_string("mask_column", "mask", "Column with the mask path.")
    flags.DEFINE_string("mask_dir", "", "Folder (relative to the manifest's) the mask paths are relative to.")
    flags.DEFINE_string("label", "object", "Label of every box.")
    flags.DEFINE_float("min_fraction", 0.005, "Smallest part kept, as a fraction of the mask's pixels.")
    flags.DEFINE_string("output", None, "Boxes CSV to write.")


def part_boxes(mask: np.ndarray, min_fraction: float) -> list[tuple[float, float, float, float]]:
    """(x, y, w, h) of each 8-connected part of `mask` > 0 covering at least `min_fraction` of it, left to right."""
    parts, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    boxes = []
    for index, found in enumerate(ndimage.find_objects(parts), start=1):
        if found is not None and (parts[found] == index).sum() >= min_fraction * mask.size:
            rows, cols = found
            boxes.append(
                (float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start))
            )
    return sorted(boxes)


def write_boxes(
    input_dir: str,
    manifest: str,
    image_column: str,
    mask_column: str,
    mask_dir: str,
    label: str,
    min_fraction: float,
    output: str,
) -> int:
    """Writes the boxes CSV; returns the number of boxes."""
    path = os.path.join(input_dir, manifest)
    rows = []
    for row in read_csv(path, (image_column, mask_column)):
        with Image.open(os.path.join(os.path.dirname(path), mask_dir, row[mask_column])) as mask:
            for x, y, w, h in part_boxes(np.asarray(mask.convert("L")), min_fraction):
                rows.append({"image": row[image_column], "label": label, "x": x, "y": y, "w": w, "h": h})
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("image", "label", "x", "y", "w", "h"))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv: list[str]) -> None:
    del argv
    count = write_boxes(
        FLAGS.input_dir,
        FLAGS.manifest,
        FLAGS.image_column,
        FLAGS.mask_column,
        FLAGS.mask_dir,
        FLAGS.label,
        FLAGS.min_fraction,
        FLAGS.output,
    )
    print(f"{count} boxes -> {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["input_dir", "output"])
    app.run(main)
