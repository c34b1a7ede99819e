"""Indiana University / Open-i chest X-rays: PNG images with ecgen-radiology XML reports.

Layout: `ecgen-radiology/<uid>.xml` (or `NLMCXR_reports.tgz` holding it) and the PNGs
`CXR<uid>_<n>_IM-....png` anywhere below input_dir. Optional labels: a CSV like
`iuxray_chexpert_labels.csv` (`subject_id` = report uid, 14 CheXpert columns). The XML has no view
position, so `--views` cannot filter IU images; a seeded, patient(report)-level split is used.
"""

from __future__ import annotations

import glob
import os
import tarfile
import xml.etree.ElementTree as ET

from data_prep.report_sections import join_report
from data_prep.sources.tables import read_csv
from mvlp_jax.data import records as R

SOURCE_VERSION = "Open-i IU chest X-ray collection (NLMCXR)"
DESCRIPTION = "Indiana University chest X-rays with radiology reports (Open-i)."


def _parse_report(xml_bytes: bytes) -> tuple[str, str, list[str]]:
    root = ET.fromstring(xml_bytes)
    texts = {el.get("Label", "").upper(): " ".join((el.text or "").split()) for el in root.iter("AbstractText")}
    image_ids = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
    return texts.get("FINDINGS", ""), texts.get("IMPRESSION", ""), image_ids


def _iter_xml(input_dir: str):
    """Yields (uid, xml bytes) from an unpacked ecgen-radiology/ folder or NLMCXR_reports.tgz."""
    folder = os.path.join(input_dir, "ecgen-radiology")
    tgz = os.path.join(input_dir, "NLMCXR_reports.tgz")
    if os.path.isdir(folder):
        for path in sorted(glob.glob(os.path.join(folder, "*.xml"))):
            with open(path, "rb") as f:
                yield os.path.basename(path)[:-4], f.read()
    elif os.path.exists(tgz):
        with tarfile.open(tgz) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".xml")), key=lambda m: m.name)
            for member in members:
                yield os.path.basename(member.name)[:-4], tar.extractfile(member).read()
    else:
        raise R.InputError(f"{input_dir}: neither ecgen-radiology/ nor NLMCXR_reports.tgz found")


def scan(input_dir: str, *, strict: bool = False, labels_csv: str = "", seed: int = 0, **_) -> R.SourceScan:
    skips = R.SkipLog(strict)
    pngs = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(input_dir, "**", "*.png"), recursive=True)}
    labels_of: dict[str, dict] = {}
    if labels_csv:
        for row in read_csv(labels_csv, ("subject_id",) + R.CHEXPERT_LABELS):
            labels_of.setdefault(str(row["subject_id"]).strip(), row)

    out: list[R.RawRecord] = []
    read = 0
    for uid, xml_bytes in _iter_xml(input_dir):
        findings, impression, image_ids = _parse_report(xml_bytes)
        for image_id in image_ids:
            read += 1
            path = pngs.get(image_id, os.path.join(input_dir, f"{image_id}.png"))
            if image_id not in pngs:
                skips.skip(R.IMAGE_MISSING, path)
                continue
            if not (findings or impression):
                skips.skip(R.REPORT_MISSING, path, f"report {uid}.xml has neither FINDINGS nor IMPRESSION")
                continue
            labels: tuple[int, ...] = ()
            if labels_csv:
                row = labels_of.get(uid)
                try:
                    labels = (
                        R.code_labels(row, R.CHEXPERT_LABELS) if row else (R.NOT_MENTIONED,) * len(R.CHEXPERT_LABELS)
                    )
                except ValueError as e:
                    skips.skip(R.BAD_LABEL_VALUE, path, f"report {uid}: {e}")
                    continue
            out.append(
                R.RawRecord(
                    split=R.seeded_split(uid, seed),
                    image_path=path,
                    image_id=image_id,
                    study_id=uid,
                    subject_id=uid,
                    report=join_report(findings, impression),
                    findings=findings,
                    impression=impression,
                    labels=labels,
                )
            )
    if read and not out and skips.counts.get(R.IMAGE_MISSING, 0) == read:
        raise R.InputError(
            f"IU X-ray: found the reports ({read} images referenced) but none of the images under "
            f"{input_dir}; expected PNGs named like CXR1_1_IM-0001-3001.png (Open-i NLMCXR_png.tgz). "
            "To embed the reports without images, use precompute_text_embeddings --reports_csv."
        )
    names = R.CHEXPERT_LABELS if labels_csv else ()
    return R.SourceScan(
        "iu_xray",
        SOURCE_VERSION,
        names,
        out,
        read,
        skips,
        DESCRIPTION,
        notes=["IU reports carry no view position: --views does not filter this source."],
    )
