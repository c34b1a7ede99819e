"""NIH ChestX-ray14: Data_Entry_2017*.csv, train_val_list.txt / test_list.txt and images/.

Labels are the 14 NIH findings (1 present / 0 absent; no uncertain class). There are no reports,
so the dataset serves probing, not text pretraining. A validation split is carved out of
train_val_list by a seeded patient-level hash (`--val_fraction`).
"""

from __future__ import annotations

import glob
import hashlib
import os

from data_prep.sources.tables import read_csv
from mvlp_jax.data import records as R

SOURCE_VERSION = "NIH ChestX-ray14 (Data_Entry_2017)"
DESCRIPTION = "NIH Clinical Center ChestX-ray14 with the 14 NIH labels (no reports)."


def _read_list(path: str) -> set[str]:
    if not os.path.exists(path):
        raise R.InputError(f"required file not found: {path}")
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def _is_validation(patient: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:val:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def scan(
    input_dir: str, *, views: str = "frontal", strict: bool = False, seed: int = 0, val_fraction: float = 0.1, **_
) -> R.SourceScan:
    skips = R.SkipLog(strict)
    entries = sorted(glob.glob(os.path.join(input_dir, "Data_Entry_2017*.csv")))
    if not entries:
        raise R.InputError(f"{input_dir}: no Data_Entry_2017*.csv found")
    rows = read_csv(entries[0], ("Image Index", "Finding Labels", "Patient ID", "View Position"))
    train_val = _read_list(os.path.join(input_dir, "train_val_list.txt"))
    test = _read_list(os.path.join(input_dir, "test_list.txt"))
    images = {os.path.basename(p): p for p in glob.glob(os.path.join(input_dir, "**", "*.png"), recursive=True)}
    out: list[R.RawRecord] = []
    for row in rows:
        name, patient, view = row["Image Index"], row["Patient ID"], row["View Position"]
        path = images.get(name, os.path.join(input_dir, "images", name))
        if not R.view_selected(view, views):
            skips.skip(R.VIEW_NOT_SELECTED, path, f"View Position={view!r}")
            continue
        if name in test:
            split = "test"
        elif name in train_val:
            split = "validate" if _is_validation(patient, seed, val_fraction) else "train"
        else:
            skips.skip(R.NO_SPLIT, path, "in neither train_val_list.txt nor test_list.txt")
            continue
        if name not in images:
            skips.skip(R.IMAGE_MISSING, path)
            continue
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in R.NIH14_LABELS and f != "No Finding"]
        if unknown:
            skips.skip(R.BAD_LABEL_VALUE, path, f"unknown finding(s) {unknown}")
            continue
        labels = tuple(R.POSITIVE if label in findings else R.NEGATIVE for label in R.NIH14_LABELS)
        out.append(
            R.RawRecord(
                split=split,
                image_path=path,
                image_id=name[:-4],
                study_id=name[:-4],
                subject_id=patient,
                view=view,
                labels=labels,
            )
        )
    return R.SourceScan("nih14", SOURCE_VERSION, R.NIH14_LABELS, out, len(rows), skips, DESCRIPTION)
