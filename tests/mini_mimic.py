"""Writes a miniature MIMIC-CXR-JPG 2.1.0 + reports tree for tests (real layout, synthetic content)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import zipfile

import numpy as np
from PIL import Image

from mvlp_jax.data.records import CHEXPERT_LABELS

# (subject, study, dicom, view, split, (width, height), image kind)
IMAGES = [
    ("10000032", "50414267", "d1-pa", "PA", "train", (300, 400), "ok"),
    ("10000032", "50414267", "d1-lat", "LATERAL", "train", (300, 400), "ok"),
    ("10000032", "53189527", "d2-ap", "AP", "train", (640, 512), "ok"),
    ("10000764", "57375967", "d3-noreport", "PA", "train", (200, 200), "ok"),
    ("11000011", "51000001", "d4-corrupt", "PA", "train", (256, 256), "corrupt"),
    ("11000011", "52000002", "d5-codes", "PA", "validate", (256, 300), "ok"),
    ("12000022", "53000003", "d6-test", "PA", "test", (700, 520), "ok"),
    ("12000022", "54000004", "d7-absent", "PA", "test", (256, 256), "absent"),
    ("12000022", "55000005", "d8-badlabel", "PA", "train", (256, 256), "ok"),
    ("13000033", "56000006", "d9-nolabelrow", "AP", "validate", (256, 256), "ok"),
]

# study -> 14 label cells in CHEXPERT_LABELS order ('' = blank)
LABEL_CELLS = {
    "50414267": ["1.0", "0.0", "", "-1.0", "", "", "", "", "", "1.0", "", "", "", ""],
    "53189527": [""] * 8 + ["1.0"] + [""] * 5,
    "57375967": ["0.0"] * 14,
    "51000001": ["1.0"] * 14,
    "52000002": ["1.0", "0.0", "-1.0", "", "1.0", "0.0", "-1.0", "", "1.0", "0.0", "-1.0", "", "1.0", "0.0"],
    "53000003": ["-1.0"] * 14,
    "54000004": ["0.0"] * 14,
    "55000005": ["2.0"] + [""] * 13,
}
EXPECTED_CODES = {
    study: [-2 if c == "" else int(float(c)) for c in cells]
    for study, cells in LABEL_CELLS.items()
    if study != "55000005"
}

REPORTS = {
    "50414267": (
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
        " INDICATION:  ___ with cough\n\n FINDINGS: \n\n  No focal consolidation.  Heart size normal.\n\n"
        " IMPRESSION: \n\n No acute cardiopulmonary process.\n"
    ),
    "53189527": "FINAL REPORT\nComparison: none.\n\nImpression :\n  Mild   pulmonary edema.\n",
    "51000001": "FINDINGS: Clear lungs.\nIMPRESSION: Normal.\n",
    "52000002": "WET READ: ___\n\nfindings:\nSmall left effusion.\n\nNOTIFICATION: called Dr. ___.\n",
    "53000003": "Portable AP chest.\nLines and tubes in place, unchanged from prior.\n",
    "55000005": "FINDINGS: Normal.\nIMPRESSION: Normal.\n",
    "56000006": "FINDINGS AND IMPRESSION: Right lower lobe pneumonia.\n",
    "54000004": "IMPRESSION: Normal.\n",
}
EXPECTED_SECTIONS = {
    "50414267": ("No focal consolidation. Heart size normal.", "No acute cardiopulmonary process."),
    "53189527": ("", "Mild pulmonary edema."),
    "52000002": ("Small left effusion.", ""),
    "53000003": ("", "Portable AP chest. Lines and tubes in place, unchanged from prior."),
    "56000006": ("Right lower lobe pneumonia.", ""),
}


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    gradient = np.linspace(0, 200, w)[None, :] + rng.integers(0, 50, (h, w))
    return Image.fromarray(gradient.astype(np.uint8), mode="L")


def _gz_csv(path: str, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_tree(root: str) -> str:
    """Creates the miniature tree under `root`; returns root."""
    for i, (subject, study, dicom, _, _, size, kind) in enumerate(IMAGES):
        folder = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{dicom}.jpg")
        if kind == "absent":
            continue
        buffer = io.BytesIO()
        _image(size, i).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3] if kind == "corrupt" else data)
    _gz_csv(
        os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"],
        [[d, s, st, "CHEST", v, str(sz[1]), str(sz[0])] for s, st, d, v, _, sz, _ in IMAGES],
    )
    _gz_csv(
        os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"),
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, s, sp] for s, st, d, _, sp, _, _ in IMAGES],
    )
    subject_of = {st: s for s, st, *_ in IMAGES}
    _gz_csv(
        os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"),
        ["subject_id", "study_id", *CHEXPERT_LABELS],
        [[subject_of[st], st, *cells] for st, cells in LABEL_CELLS.items()],
    )
    with zipfile.ZipFile(os.path.join(root, "mimic-cxr-reports.zip"), "w") as z:
        for study, text in REPORTS.items():
            s = subject_of[study]
            z.writestr(f"files/p{s[:2]}/p{s}/s{study}.txt", text)
    return root
