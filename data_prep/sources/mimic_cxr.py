"""MIMIC-CXR-JPG 2.1.0 images + labels + official split, with the MIMIC-CXR 2.0.0 reports.

Layout (PhysioNet):
  files/pNN/pSUBJECT/sSTUDY/<dicom_id>.jpg
  mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
  mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train/validate/test)
  mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 labels (1.0 / 0.0 / -1.0 / blank)
  mimic-cxr-reports.zip             files/pNN/pSUBJECT/sSTUDY.txt   (or the same tree unpacked)
"""

from __future__ import annotations

import os
import zipfile

from data_prep.report_sections import extract_findings_impression, join_report
from data_prep.sources.tables import read_csv, read_text
from mvlp_jax.data import records as R

SOURCE_VERSION = "MIMIC-CXR-JPG 2.1.0 / MIMIC-CXR 2.0.0 reports"
DESCRIPTION = "MIMIC-CXR chest radiographs (JPG) with free-text reports and CheXpert labels."


def _study_relpath(subject_id: str, study_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


class _Reports:
    """Reads reports from mimic-cxr-reports.zip or from an unpacked files/ tree."""

    def __init__(self, input_dir: str):
        zip_path = os.path.join(input_dir, "mimic-cxr-reports.zip")
        self._zip = None
        self._names: dict[str, str] = {}
        self._dir = input_dir
        if os.path.exists(zip_path):
            self._zip = zipfile.ZipFile(zip_path)
            for name in self._zip.namelist():
                if name.endswith(".txt"):
                    # Tolerate a leading folder inside the zip (e.g. 'mimic-cxr-reports/files/...').
                    key = name[name.find("files/") :] if "files/" in name else name
                    self._names[key] = name

    def read(self, subject_id: str, study_id: str) -> str | None:
        relpath = _study_relpath(subject_id, study_id) + ".txt"
        if self._zip is not None:
            name = self._names.get(relpath)
            return None if name is None else read_text(self._zip.read(name))
        path = os.path.join(self._dir, relpath)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def scan(input_dir: str, *, views: str = "frontal", strict: bool = False, **_) -> R.SourceScan:
    skips = R.SkipLog(strict)
    meta = read_csv(
        os.path.join(input_dir, "mimic-cxr-2.0.0-metadata.csv.gz"),
        ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    )
    split_rows = read_csv(os.path.join(input_dir, "mimic-cxr-2.0.0-split.csv.gz"), ("dicom_id", "split"))
    label_rows = read_csv(
        os.path.join(input_dir, "mimic-cxr-2.0.0-chexpert.csv.gz"), ("subject_id", "study_id") + R.CHEXPERT_LABELS
    )
    split_of = {row["dicom_id"]: row["split"] for row in split_rows}
    labels_of = {row["study_id"]: row for row in label_rows}
    reports = _Reports(input_dir)
    sections_of: dict[str, tuple[str, str] | None] = {}

    out: list[R.RawRecord] = []
    for row in meta:
        dicom_id, subject_id, study_id = row["dicom_id"], row["subject_id"], row["study_id"]
        study_dir = os.path.join(input_dir, _study_relpath(subject_id, study_id))
        image_path = os.path.join(study_dir, f"{dicom_id}.jpg")
        view = row["ViewPosition"]
        if not R.view_selected(view, views):
            skips.skip(R.VIEW_NOT_SELECTED, image_path, f"ViewPosition={view!r}")
            continue
        split = split_of.get(dicom_id)
        if split is None:
            skips.skip(R.NO_SPLIT, image_path, "dicom_id not in the split file")
            continue
        if not os.path.exists(image_path):
            skips.skip(R.IMAGE_MISSING, image_path)
            continue
        if study_id not in sections_of:
            text = reports.read(subject_id, study_id)
            sections_of[study_id] = None if text is None else extract_findings_impression(text)
        sections = sections_of[study_id]
        if sections is None:
            skips.skip(R.REPORT_MISSING, image_path, f"no report {_study_relpath(subject_id, study_id)}.txt")
            continue
        label_row = labels_of.get(study_id)
        try:
            labels = (
                R.code_labels(label_row, R.CHEXPERT_LABELS)
                if label_row
                else (R.NOT_MENTIONED,) * len(R.CHEXPERT_LABELS)
            )
        except ValueError as e:
            skips.skip(R.BAD_LABEL_VALUE, image_path, f"study {study_id}: {e}")
            continue
        findings, impression = sections
        out.append(
            R.RawRecord(
                split=split,
                image_path=image_path,
                image_id=dicom_id,
                study_id=study_id,
                subject_id=subject_id,
                view=view,
                report=join_report(findings, impression),
                findings=findings,
                impression=impression,
                labels=labels,
            )
        )
    return R.SourceScan("mimic_cxr", SOURCE_VERSION, R.CHEXPERT_LABELS, out, len(meta), skips, DESCRIPTION)
