"""Pair labelled X-rays with real reports whose findings agree with their labels (issue #27's controlled
experiment): NIH ChestX-ray14 images get IU X-ray reports through the CheXpert labels of the reports.

  python -m data_prep.pair_reports --nih_dir=../shared/data/nih_pneumonia1000 \
      --iu_labels=../shared/data/iu_xray_reports/iuxray_chexpert_labels.csv --output_dir=runs/report_transfer \
      [--shuffle] [--pretrain_fraction=0.7] [--seed=0]

Patients are split (by a seeded hash) into a pretraining set, whose images are paired, and a held-out set that is
never paired (the probes' data). An image with no NIH finding gets a report labelled "No Finding"; an image with
findings gets a report positive for as many of them as any report is (through NIH_TO_CHEXPERT; Pneumonia accepts
Pneumonia, Consolidation or Lung Opacity), preferring reports not used yet, then those with the fewest other
positive findings. `--shuffle` then permutes the chosen reports over the images: the control whose reports are
real language but agree with their images only by chance. Writes pretrain.csv (image, patient_id, view, report,
report_id, and the image's labels), heldout.csv (the rest, labels only) and pairing.json (pool sizes, reuse, and
the fraction of images whose report agrees with their labels). The pairing is by labels, not by a radiologist.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import numpy as np
import pandas as pd

from mvlp_jax.data.records import NIH14_LABELS

NIH_LABELS = NIH14_LABELS  # the NIH findings, in the dataset's order
# NIH finding -> the CheXpert labels of a report that state it (Emphysema, Fibrosis and Hernia have none)
NIH_TO_CHEXPERT = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "Effusion": ("Pleural Effusion",),
    "Infiltration": ("Lung Opacity",),
    "Mass": ("Lung Lesion",),
    "Nodule": ("Lung Lesion",),
    "Pneumonia": ("Pneumonia", "Consolidation", "Lung Opacity"),
    "Pneumothorax": ("Pneumothorax",),
    "Consolidation": ("Consolidation", "Lung Opacity"),
    "Edema": ("Edema",),
    "Pleural_Thickening": ("Pleural Other",),
}


def report_findings(iu: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One row per IU study with a report text, (reports, normal (R,), states (R, NIH labels): the report is
    positive for a CheXpert label that states the NIH finding). A study whose report is empty is no candidate."""
    reports = iu.drop_duplicates("subject_id")
    reports = reports[reports["report"].fillna("").str.strip() != ""].reset_index(drop=True)
    positive = lambda columns: (reports[list(columns)] == 1).any(axis=1).to_numpy()
    states = np.stack(
        [positive(NIH_TO_CHEXPERT[n]) if n in NIH_TO_CHEXPERT else np.zeros(len(reports), bool) for n in NIH_LABELS],
        axis=1,
    )
    return reports, (reports["No Finding"] == 1).to_numpy(), states


def choose(
    findings: np.ndarray, normal: np.ndarray, states: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Report index per image (findings (N, NIH labels) bool), -1 where no report agrees; and pool sizes."""
    uses = np.zeros(len(normal), int)
    extras = states.sum(1)
    chosen, pools = np.full(len(findings), -1), {}
    for i in rng.permutation(len(findings)):
        wanted = findings[i] & np.isin(NIH_LABELS, list(NIH_TO_CHEXPERT))
        if not findings[i].any():
            candidates = np.flatnonzero(normal)
        else:
            matched = (states & wanted).sum(1) * ~normal
            best = matched.max() if wanted.any() else 0
            candidates = np.flatnonzero(matched == best) if best > 0 else np.array([], int)
        key = "+".join(n for n, f in zip(NIH_LABELS, findings[i]) if f) or "No Finding"
        pools[key] = int(len(candidates))
        if len(candidates):
            order = np.lexsort(
                (
                    rng.random(len(candidates)),
                    extras[candidates] - (states[candidates] & wanted).sum(1),
                    uses[candidates],
                )
            )
            chosen[i] = candidates[order[0]]
            uses[chosen[i]] += 1
    return chosen, pools


def agrees(findings: np.ndarray, normal: np.ndarray, states: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per image: its report states at least one of its mappable findings (or is normal for a normal image)."""
    mappable = findings & np.isin(NIH_LABELS, list(NIH_TO_CHEXPERT))
    with_findings = (states[chosen] & mappable).any(1) & ~normal[chosen]
    return np.where(findings.any(1), with_findings, normal[chosen])


def in_pretraining(patient: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"pair_reports:{seed}:{patient}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def pair(
    nih: pd.DataFrame, iu: pd.DataFrame, pretrain_fraction: float, seed: int, shuffle: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(paired pretraining images, held-out images, statistics)."""
    reports, normal, states = report_findings(iu)
    pretraining = nih["patient_id"].astype(str).map(lambda p: in_pretraining(p, pretrain_fraction, seed)).to_numpy()
    images = nih[pretraining].reset_index(drop=True)
    findings = images[list(NIH_LABELS)].to_numpy() == 1
    rng = np.random.default_rng(seed)
    chosen, pools = choose(findings, normal, states, rng)
    paired = chosen >= 0
    images, findings, chosen = images[paired].reset_index(drop=True), findings[paired], chosen[paired]
    if shuffle:
        chosen = chosen[rng.permutation(len(chosen))]
    images["report"] = reports["report"].to_numpy()[chosen]
    images["report_id"] = reports["subject_id"].astype(str).to_numpy()[chosen]
    reuse = Counter(chosen.tolist())
    stats = {
        "pretraining_images": int(pretraining.sum()),
        "paired_images": int(paired.sum()),
        "unpaired_images": int((~paired).sum()),
        "heldout_images": int((~pretraining).sum()),
        "pretraining_patients": int(nih[pretraining]["patient_id"].nunique()),
        "heldout_patients": int(nih[~pretraining]["patient_id"].nunique()),
        "report_pool": int(len(reports)),
        "normal_reports": int(normal.sum()),
        "distinct_reports_used": len(reuse),
        "most_uses_of_one_report": max(reuse.values(), default=0),
        "agreeing_fraction": float(agrees(findings, normal, states, chosen).mean()) if len(chosen) else 0.0,
        "candidate_pool_by_finding_set": dict(sorted(pools.items())),
        "shuffled": shuffle,
        "seed": seed,
    }
    return images, nih[~pretraining].reset_index(drop=True), stats


def main(argv: list[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    nih = pd.read_csv(os.path.join(f.nih_dir, "labels.csv"))
    iu = pd.read_csv(f.iu_labels)
    paired, heldout, stats = pair(nih, iu, f.pretrain_fraction, f.seed, f.shuffle)
    os.makedirs(f.output_dir, exist_ok=True)
    paired.to_csv(os.path.join(f.output_dir, "pretrain.csv"), index=False)
    heldout.to_csv(os.path.join(f.output_dir, "heldout.csv"), index=False)
    with open(os.path.join(f.output_dir, "pairing.json"), "w") as out:
        json.dump(stats, out, indent=2)
    print(json.dumps({k: v for k, v in stats.items() if k != "candidate_pool_by_finding_set"}, indent=2))
    return 0


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("nih_dir", None, "Folder with labels.csv (image, patient_id, view, the 14 NIH labels).")
    flags.DEFINE_string("iu_labels", None, "CSV of IU reports with CheXpert labels (subject_id, report, labels).")
    flags.DEFINE_string("output_dir", None, "pretrain.csv, heldout.csv and pairing.json go here.")
    flags.DEFINE_float("pretrain_fraction", 0.7, "Fraction of the NIH patients whose images are paired.")
    flags.DEFINE_integer("seed", 0, "Seed of the patient split, the pairing order and the shuffle.")
    flags.DEFINE_bool("shuffle", False, "Permute the chosen reports over the images (the control).")
    flags.mark_flags_as_required(["nih_dir", "iu_labels", "output_dir"])


if __name__ == "__main__":
    from mvlp_jax.runtime import cli

    define_flags()
    cli.run("data_prep.pair_reports", main)
