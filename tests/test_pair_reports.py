"""Reports paired with X-rays by their labels: normal with normal, findings with reports stating them, a new
report per image while the pool lasts, held-out patients never paired, and the shuffled control."""

import os

import numpy as np
import pandas as pd
import pytest

from data_prep.pair_reports import NIH_LABELS, pair
from tests.conftest import SHARED_DATA

CHEXPERT = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def _iu(rows: list[tuple[str, dict]]) -> pd.DataFrame:
    """Two images per study, as the IU table has; `rows`: (report, positive CheXpert labels)."""
    table = []
    for study, (text, positive) in enumerate(rows):
        for _ in range(2):
            table.append({"subject_id": study, "report": text, **{c: float(positive.get(c, 0)) for c in CHEXPERT}})
    return pd.DataFrame(table)


def _nih(findings: list[tuple[str, ...]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"image": f"{i}.png", "patient_id": i, "view": "PA", **{n: int(n in f) for n in NIH_LABELS}}
            for i, f in enumerate(findings)
        ]
    )


def test_images_get_reports_that_state_their_findings_and_new_ones_while_the_pool_lasts():
    iu = _iu(
        [
            ("normal a", {"No Finding": 1}),
            ("normal b", {"No Finding": 1}),
            ("opacity", {"Lung Opacity": 1}),
            ("consolidation and effusion", {"Consolidation": 1, "Pleural Effusion": 1}),
            ("effusion only", {"Pleural Effusion": 1}),
            ("fracture", {"Fracture": 1}),
        ]
    )
    nih = _nih([(), (), (), ("Pneumonia",), ("Pneumonia", "Effusion"), ("Hernia",)])
    paired, heldout, stats = pair(nih, iu, pretrain_fraction=1.0, seed=0, shuffle=False)
    assert heldout.empty and stats["unpaired_images"] == 1  # Hernia: no report states it
    by_image = dict(zip(paired["image"], paired["report"]))
    assert {by_image["0.png"], by_image["1.png"], by_image["2.png"]} <= {"normal a", "normal b"}
    assert len({by_image[f"{i}.png"] for i in range(3)}) == 2  # both normal reports before one is reused
    assert by_image["4.png"] == "consolidation and effusion"  # states both of its findings
    assert by_image["3.png"] in ("opacity", "consolidation and effusion")
    assert stats["agreeing_fraction"] == 1.0 and stats["most_uses_of_one_report"] == 2  # 3 normal images, 2 reports


def test_held_out_patients_are_never_paired_and_the_control_only_permutes_the_reports():
    iu = _iu(
        [(f"normal {i}", {"No Finding": 1}) for i in range(30)]
        + [(f"pneumonia {i}", {"Pneumonia": 1}) for i in range(30)]
    )
    nih = _nih([()] * 40 + [("Pneumonia",)] * 40)
    paired, heldout, stats = pair(nih, iu, pretrain_fraction=0.6, seed=3, shuffle=False)
    control, heldout_again, shuffled = pair(nih, iu, pretrain_fraction=0.6, seed=3, shuffle=True)
    assert not set(paired["patient_id"]) & set(heldout["patient_id"])
    assert len(paired) + len(heldout) == len(nih) and heldout.equals(heldout_again)
    assert sorted(control["report"]) == sorted(paired["report"]) and list(control["image"]) == list(paired["image"])
    assert stats["agreeing_fraction"] == 1.0 and shuffled["agreeing_fraction"] < 0.8


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "nih_pneumonia1000")), reason="shared data absent")
def test_the_real_nih_images_all_find_an_agreeing_report():
    nih = pd.read_csv(os.path.join(SHARED_DATA, "nih_pneumonia1000", "labels.csv"))
    iu = pd.read_csv(os.path.join(SHARED_DATA, "iu_xray_reports", "iuxray_chexpert_labels.csv"))
    paired, heldout, stats = pair(nih, iu, pretrain_fraction=0.7, seed=0, shuffle=False)
    assert stats["unpaired_images"] == 0 and stats["agreeing_fraction"] == 1.0
    assert stats["distinct_reports_used"] > 0.8 * len(paired)
    assert (paired["report"].str.strip() != "").all()  # 25 IU studies have an empty report: never chosen
    normal = paired[list(NIH_LABELS)].sum(axis=1) == 0
    reports = iu.drop_duplicates("subject_id").set_index(iu.drop_duplicates("subject_id")["subject_id"].astype(str))
    assert (reports.loc[paired.loc[normal, "report_id"], "No Finding"] == 1).all()
    assert np.isclose(len(paired) / len(nih), 0.7, atol=0.05)
