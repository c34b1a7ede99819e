"""Anyone's own data: a CSV manifest with an image column and optional text, labels, split, ids.

`--manifest` is one CSV path, or `SPLIT=PATH,SPLIT=PATH` to take each split from its own file.
A relative manifest path resolves against --input_dir; image paths against the manifest's own
folder joined with --image_dir.
Labels use the project coding: 1 / 0 / -1 (uncertain) / blank (not mentioned).
Without --split_column (and a single manifest), a seeded split by --group_column (patient) is used.
Dense annotations: --mask_column names a mask file per row (relative to the manifest's folder joined with
--mask_dir; same size as the image; 0 background, 255 foreground); --boxes_csv (relative to --input_dir) holds
one row per box: `image` (the manifest's image-column value), `label`, and `x, y, w, h` in the image file's
pixels. Every record of a dataset built with --boxes_csv carries boxes (none for an image without rows).
Volumes: --slice_position_column names a number per row (a CT slice's z in mm, or its index) that orders the
slices of a series (--study_column) when the 3D encoder stacks them; a row without one is refused.
"""

from __future__ import annotations

import math
import os

from data_prep.sources.tables import read_csv
from mvlp_jax.data import records as R

BOX_COLUMNS = ("image", "label", "x", "y", "w", "h")

DESCRIPTION = "Chest X-rays from a CSV manifest."


def _parse_manifests(spec: str, input_dir: str) -> list[tuple[str | None, str]]:
    if not spec:
        return [(None, os.path.join(input_dir, "manifest.csv"))]
    parts = []
    for item in spec.split(","):
        split, _, path = item.rpartition("=")
        parts.append((split or None, os.path.join(input_dir, path)))
    return parts


def read_boxes(path: str) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """{image-column value: [(label, (x0, y0, x1, y1)), ...]} from a boxes CSV; InputError names a bad row."""
    out: dict[str, list] = {}
    for row_number, row in enumerate(read_csv(path, BOX_COLUMNS), start=2):
        try:
            x, y, w, h = (float(row[c]) for c in "xywh")
        except ValueError:
            raise R.InputError(
                f"{path}:{row_number}: x, y, w, h must be numbers, got {[row[c] for c in 'xywh']}"
            ) from None
        if not row["label"].strip():
            raise R.InputError(
                f"{path}:{row_number}: the box has no label: name its class (a blank one would "
                f"become a class of its own)"
            )
        out.setdefault(row["image"], []).append((row["label"].strip(), (x, y, x + w, y + h)))
    return out


def scan(
    input_dir: str,
    *,
    manifest: str = "",
    image_column: str = "image",
    image_dir: str = "",
    text_column: str = "",
    label_columns: str = "",
    split_column: str = "",
    id_column: str = "",
    group_column: str = "",
    study_column: str = "",
    view_column: str = "",
    mask_column: str = "",
    mask_dir: str = "",
    boxes_csv: str = "",
    slice_position_column: str = "",
    views: str = "frontal",
    seed: int = 0,
    strict: bool = False,
    **_,
) -> R.SourceScan:
    skips = R.SkipLog(strict)
    labels = tuple(c.strip() for c in label_columns.split(",") if c.strip())
    manifests = _parse_manifests(manifest, input_dir)
    required = (
        tuple(
            c
            for c in (
                image_column,
                text_column,
                split_column,
                id_column,
                group_column,
                study_column,
                view_column,
                mask_column,
                slice_position_column,
            )
            if c
        )
        + labels
    )
    boxes = read_boxes(os.path.join(input_dir, boxes_csv)) if boxes_csv else {}
    unmatched_boxes, manifest_values = set(boxes), []
    out: list[R.RawRecord] = []
    read = 0
    for fixed_split, path in manifests:
        for row_number, row in enumerate(read_csv(path, required), start=2):
            read += 1
            image_path = os.path.join(os.path.dirname(path), image_dir, row[image_column])
            where = f"{path}:{row_number} {image_path}"
            if view_column and not R.view_selected(row[view_column], views):
                skips.skip(R.VIEW_NOT_SELECTED, where, f"{view_column}={row[view_column]!r}")
                continue
            if not os.path.exists(image_path):
                skips.skip(R.IMAGE_MISSING, where)
                continue
            try:
                coded = R.code_labels(row, labels)
            except ValueError as e:
                skips.skip(R.BAD_LABEL_VALUE, where, str(e))
                continue
            image_id = row[id_column] if id_column else os.path.splitext(os.path.basename(image_path))[0]
            group = row[group_column] if group_column else image_id
            split = fixed_split or (row[split_column] if split_column else R.seeded_split(group, seed))
            if not split:
                skips.skip(R.NO_SPLIT, where, f"empty {split_column!r}")
                continue
            mask_path = os.path.join(os.path.dirname(path), mask_dir, row[mask_column]) if mask_column else ""
            if mask_column and not (row[mask_column] and os.path.exists(mask_path)):
                skips.skip(R.MASK_MISSING, where, f"{mask_column}={row[mask_column]!r} -> {mask_path}")
                continue
            try:
                position = float(row[slice_position_column]) if slice_position_column else float("nan")
                if slice_position_column and not math.isfinite(position):
                    raise ValueError
            except ValueError:
                raise R.InputError(
                    f"{where}: {slice_position_column}={row[slice_position_column]!r} is not a finite number (a "
                    f"slice's z position or index)"
                ) from None
            image_boxes = boxes.get(row[image_column], [])
            unmatched_boxes.discard(row[image_column])
            manifest_values.append(row[image_column])
            text = " ".join(row[text_column].split()) if text_column else ""
            if text_column and not text:
                skips.skip(R.REPORT_MISSING, where, f"empty {text_column!r}")
                continue
            out.append(
                R.RawRecord(
                    split=split,
                    image_path=image_path,
                    image_id=image_id,
                    study_id=row[study_column] if study_column else image_id,
                    subject_id=group,
                    view=row[view_column] if view_column else "",
                    report=text,
                    labels=coded,
                    mask_path=mask_path,
                    boxes=tuple(b for _, b in image_boxes),
                    box_labels=tuple(label for label, _ in image_boxes),
                    slice_position=position,
                )
            )
    notes = []
    if boxes and len(unmatched_boxes) == len(boxes):
        shown = sorted(boxes)[:3]
        raise R.InputError(
            f"none of the {len(boxes)} images of {boxes_csv} is a value of the manifest's "
            f"{image_column!r} column (e.g. {', '.join(map(repr, shown))}; the manifest has values "
            f"like {', '.join(map(repr, manifest_values[:3]))}): name images in the boxes CSV exactly "
            f"as the manifest does"
        )
    if unmatched_boxes:
        notes.append(
            f"{len(unmatched_boxes)} image(s) of {boxes_csv} match no manifest row, e.g. "
            f"{', '.join(sorted(unmatched_boxes)[:5])}"
        )
    annotations = (
        (("mask",) if mask_column else ())
        + (("boxes",) if boxes_csv else ())
        + (("slice_position",) if slice_position_column else ())
    )
    return R.SourceScan(
        "csv",
        os.path.basename(manifests[0][1]),
        labels,
        out,
        read,
        skips,
        DESCRIPTION,
        notes=notes,
        annotations=annotations,
    )
