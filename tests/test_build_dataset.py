"""Dataset builders: a miniature MIMIC-CXR tree, IU X-ray, NIH14 and CSV layouts, read back via TFDS and grain."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep.build_dataset import build
from data_prep.report_sections import extract_findings_impression
from mvlp_jax.data import records as R
from tests import mini_mimic
from tests.conftest import REPO, SAMPLE, SHARED_DATA


def _read_all(dataset_dir: str) -> dict[str, list[dict]]:
    builder = tfds.builder_from_directory(dataset_dir)
    return {
        split: [source[i] for i in range(len(source))]
        for split in builder.info.splits
        for source in [builder.as_data_source(split)]
    }


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = mini_mimic.write_tree(str(tmp_path_factory.mktemp("mimic_raw")))
    out = str(tmp_path_factory.mktemp("tfds"))
    report = build("mimic_cxr", root, out, image_size=128, num_workers=1)
    return root, out, report


def test_mimic_records_read_back_through_data_source_and_grain(mimic):
    _, _, report = mimic
    records = _read_all(report["dataset_dir"])
    ids = {split: sorted(r["image_id"].decode() for r in recs) for split, recs in records.items()}
    assert ids == {"train": ["d1-pa", "d2-ap"], "validate": ["d5-codes", "d9-nolabelrow"], "test": ["d6-test"]}
    source = tfds.builder_from_directory(report["dataset_dir"]).as_data_source("train")
    via_grain = list(grain.MapDataset.source(source))
    assert [r["image_id"] for r in via_grain] == [r["image_id"] for r in records["train"]]
    for recs in records.values():
        for r in recs:
            assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[-1] == 1
            assert min(r["image"].shape[:2]) == 128  # shorter side resized, aspect kept


def test_mimic_image_resize_keeps_aspect(mimic):
    records = _read_all(mimic[2]["dataset_dir"])
    by_id = {r["image_id"].decode(): r for recs in records.values() for r in recs}
    assert by_id["d1-pa"]["image"].shape[:2] == (171, 128)  # 300x400 (w x h) -> 128 x 171
    assert by_id["d6-test"]["image"].shape[:2] == (128, 172)  # 700x520 -> 172 x 128


def test_mimic_labels_decoded_exactly_for_every_coding(mimic):
    records = _read_all(mimic[2]["dataset_dir"])
    by_study = {r["study_id"].decode(): r["labels"].tolist() for recs in records.values() for r in recs}
    for study, expected in mini_mimic.EXPECTED_CODES.items():
        if study in by_study:
            assert by_study[study] == expected, study
    assert by_study["56000006"] == [R.NOT_MENTIONED] * 14  # study without a chexpert row
    assert set(by_study["52000002"]) == {1, 0, -1, -2}
    metadata = tfds.builder_from_directory(mimic[2]["dataset_dir"]).info.metadata
    assert list(metadata["label_names"]) == list(R.CHEXPERT_LABELS)


def test_mimic_official_split_and_sections(mimic):
    records = _read_all(mimic[2]["dataset_dir"])
    split_of = {d: sp for _, _, d, _, sp, _, _ in mini_mimic.IMAGES}
    for split, recs in records.items():
        for r in recs:
            assert split_of[r["image_id"].decode()] == split
            study = r["study_id"].decode()
            findings, impression = mini_mimic.EXPECTED_SECTIONS.get(study, (None, None))
            if findings is not None:
                assert (r["findings"].decode(), r["impression"].decode()) == (findings, impression)
                assert r["report"].decode() == " ".join(p for p in (findings, impression) if p)


def test_mimic_skips_counted_by_reason(mimic):
    _, _, report = mimic
    counts = {reason: v["count"] for reason, v in report["skipped"].items()}
    assert counts == {
        R.VIEW_NOT_SELECTED: 1,
        R.REPORT_MISSING: 1,
        R.IMAGE_UNREADABLE: 1,
        R.IMAGE_MISSING: 1,
        R.BAD_LABEL_VALUE: 1,
    }
    assert "d4-corrupt.jpg" in report["skipped"][R.IMAGE_UNREADABLE]["examples"][0]
    on_disk = json.load(open(os.path.join(report["dataset_dir"], "build_report.json")))
    assert on_disk["records_read"] == len(mini_mimic.IMAGES) and on_disk["records_written_total"] == 5


def test_mimic_views_all_keeps_lateral(mimic, tmp_path):
    report = build("mimic_cxr", mimic[0], str(tmp_path), image_size=64, views="all")
    assert R.VIEW_NOT_SELECTED not in report["skipped"] and report["records_written"]["train"] == 3
    # the study with a PA and a lateral image is one study of two views, frontal first
    from mvlp_jax.data import built
    from mvlp_jax.evaluation.features import Studies

    studies = Studies(built.open_split(built.open_builder(str(tmp_path), "mimic_cxr")[0], "train"), max_views=2)
    by_id = {sid: (studies[i], studies.types[i].tolist()) for i, sid in enumerate(studies.ids)}
    first, types = by_id["50414267"]
    assert [v["view"].decode() for v in first["views"]] == ["PA", "LATERAL"] and types == [0, 1]
    assert len(studies) == 2  # 53189527 (AP) is a study of one view


def test_build_is_deterministic_across_worker_counts(mimic, tmp_path):
    root = mimic[0]
    first = build("mimic_cxr", root, str(tmp_path / "a"), image_size=128, num_workers=1)
    second = build("mimic_cxr", root, str(tmp_path / "b"), image_size=128, num_workers=2)
    a, b = _read_all(first["dataset_dir"]), _read_all(second["dataset_dir"])
    assert a.keys() == b.keys()
    for split in a:
        for ra, rb in zip(a[split], b[split], strict=True):
            assert ra["image_id"] == rb["image_id"] and ra["report"] == rb["report"]
            np.testing.assert_array_equal(ra["image"], rb["image"])
            np.testing.assert_array_equal(ra["labels"], rb["labels"])
    digest = lambda d: {
        f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for f in os.listdir(d)
        if ".array_record" in f
    }
    assert digest(first["dataset_dir"]) == digest(second["dataset_dir"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.build_dataset", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_strict_fails_naming_the_file_and_leaves_nothing(mimic, tmp_path):
    out = tmp_path / "strict"
    result = _cli("--source=mimic_cxr", f"--input_dir={mimic[0]}", f"--output_dir={out}", "--strict")
    assert result.returncode != 0
    assert "d1-lat.jpg" in result.stderr and "view_not_selected" in result.stderr
    assert not (out / "mimic_cxr").exists()


def test_strict_names_a_corrupt_image(tmp_path):
    root = tmp_path / "csv"
    _png(str(root / "a.png"))
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    (root / "manifest.csv").write_text("image,split\na.png,train\nbad.png,train\n")
    with pytest.raises(R.BadRecordError, match="bad.png"):
        build("csv", str(root), str(tmp_path / "out"), split_column="split", strict=True)
    assert not (tmp_path / "out" / "cxr_csv").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".staging")]


def test_missing_files_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(R.InputError, match="mimic-cxr-2.0.0-metadata.csv.gz"):
        build("mimic_cxr", str(tmp_path), str(tmp_path / "out"))
    result = _cli("--source=bogus", f"--input_dir={tmp_path}", f"--output_dir={tmp_path}")
    assert result.returncode != 0 and "bogus" in result.stderr
    result = _cli("--source=csv", f"--output_dir={tmp_path}")
    assert result.returncode != 0 and "input_dir" in result.stderr


def test_existing_dataset_needs_overwrite(mimic):
    _, out, _ = mimic
    with pytest.raises(R.InputError, match="--overwrite"):
        build("mimic_cxr", mimic[0], out, image_size=128)


def test_section_extraction_on_tricky_reports():
    cases = {
        "FINDINGS: a.\nIMPRESSION: b.": ("a.", "b."),
        "  Findings :   lungs   clear.\n\n  Impression:\n normal.": ("lungs clear.", "normal."),
        "EXAMINATION: chest.\nIMPRESSION: only impression.": ("", "only impression."),
        "INDICATION: x.\nFINDINGS: only findings.": ("only findings.", ""),
        "No headers at all, just text.": ("", "No headers at all, just text."),
        "INDICATION: cough.\nCOMPARISON: none.\nFinal line section here.": ("", "none. Final line section here."),
        "IMPRESSIONS: plural header.": ("", "plural header."),
        "": ("", ""),
    }
    for text, expected in cases.items():
        assert extract_findings_impression(text) == expected, text


# --- other sources ---


def _png(path, size=(80, 100), mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size[::-1] + ((3,) if mode == "RGB" else ()), 120, np.uint8), mode=mode).save(path)


def test_iu_xray_with_images_labels_and_without_images(tmp_path):
    root = tmp_path / "iu"
    reports = root / "ecgen-radiology"
    reports.mkdir(parents=True)
    xml = (
        '<eCitation><Abstract><AbstractText Label="FINDINGS">{f}</AbstractText>'
        '<AbstractText Label="IMPRESSION">{i}</AbstractText></Abstract>{imgs}</eCitation>'
    )
    for uid, f, i in [("1", "Clear lungs.", "Normal."), ("2", "", ""), ("3", "Effusion.", "")]:
        imgs = "".join(f'<parentImage id="CXR{uid}_1_IM-000{uid}-{n}"/>' for n in (1001, 2001))
        (reports / f"{uid}.xml").write_text(xml.format(f=f, i=i, imgs=imgs))
    labels = tmp_path / "labels.csv"
    labels.write_text("subject_id," + ",".join(R.CHEXPERT_LABELS) + "\n1," + ",".join(["1.0"] + [""] * 13) + "\n")
    with pytest.raises(R.InputError, match="none of the images"):
        build("iu_xray", str(root), str(tmp_path / "out"), labels_csv=str(labels))
    for uid in ("1", "2", "3"):
        _png(str(root / "images" / f"CXR{uid}_1_IM-000{uid}-1001.png"))
    report = build("iu_xray", str(root), str(tmp_path / "out"), labels_csv=str(labels), image_size=64)
    assert report["records_written_total"] == 2
    assert {k: v["count"] for k, v in report["skipped"].items()} == {R.IMAGE_MISSING: 3, R.REPORT_MISSING: 1}
    recs = [r for split in _read_all(report["dataset_dir"]).values() for r in split]
    by_id = {r["image_id"].decode(): r for r in recs}
    assert by_id["CXR1_1_IM-0001-1001"]["labels"].tolist() == [1] + [-2] * 13
    assert by_id["CXR3_1_IM-0003-1001"]["labels"].tolist() == [-2] * 14  # no label row
    assert by_id["CXR1_1_IM-0001-1001"]["report"].decode() == "Clear lungs. Normal."


def test_nih14_layout(tmp_path):
    root = tmp_path / "nih"
    rows = [
        ("00000001_000.png", "Cardiomegaly|Effusion", "1", "PA"),
        ("00000002_000.png", "No Finding", "2", "AP"),
        ("00000003_000.png", "Hernia", "3", "PA"),
        ("00000004_000.png", "Bogus", "4", "PA"),
        ("00000005_000.png", "Mass", "5", "LL"),
    ]
    (root / "images").mkdir(parents=True)
    with open(root / "Data_Entry_2017_v2020.csv", "w") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n")
        for name, labels, patient, view in rows:
            f.write(f"{name},{labels},0,{patient},50,M,{view}\n")
            _png(str(root / "images" / name), mode="RGB")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n00000004_000.png\n00000005_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n")
    report = build("nih14", str(root), str(tmp_path / "out"), val_fraction=0.0)
    assert report["records_written"] == {"train": 2, "test": 1}
    assert {k: v["count"] for k, v in report["skipped"].items()} == {R.BAD_LABEL_VALUE: 1, R.VIEW_NOT_SELECTED: 1}
    by_id = {r["image_id"].decode(): r["labels"] for s in _read_all(report["dataset_dir"]).values() for r in s}
    expected = np.zeros(14, np.int8)
    expected[[R.NIH14_LABELS.index("Cardiomegaly"), R.NIH14_LABELS.index("Effusion")]] = 1
    np.testing.assert_array_equal(by_id["00000001_000"], expected)
    assert by_id["00000003_000"].tolist() == [0] * 13 + [1]


def test_csv_manifest_bad_rows_and_missing_columns(tmp_path):
    root = tmp_path / "csv"
    _png(str(root / "a.png"))
    _png(str(root / "b.png"))
    (root / "c.png").write_bytes(b"not an image")
    (root / "manifest.csv").write_text(
        "image,text,y1,y2,pid,split\na.png,note a,1,,p1,train\n"
        "b.png,note b,0,-1,p2,test\nc.png,note c,1,1,p3,train\n"
        "d.png,note d,1,1,p4,train\ne.png,x,7,1,p5,train\n"
    )
    report = build(
        "csv",
        str(root),
        str(tmp_path / "out"),
        text_column="text",
        label_columns="y1,y2",
        group_column="pid",
        split_column="split",
        name="mine",
    )
    assert report["records_written"] == {"train": 1, "test": 1}
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        R.IMAGE_UNREADABLE: 1,
        R.IMAGE_MISSING: 2,
    }  # e.png is absent: missing before its label is read
    recs = _read_all(report["dataset_dir"])
    assert recs["test"][0]["labels"].tolist() == [0, -1] and recs["test"][0]["report"] == b"note b"
    with pytest.raises(R.InputError, match="missing required column"):
        build("csv", str(root), str(tmp_path / "out2"), text_column="nope")


def test_shipped_sample_builds(tmp_path):
    nih = build(
        "csv",
        os.path.join(SAMPLE, "nih14"),
        str(tmp_path),
        name="nih_sample",
        split_column="split",
        label_columns=",".join(R.NIH14_LABELS),
        group_column="patient_id",
        view_column="view",
        views="all",
        image_size=0,
    )
    assert nih["records_written"] == {"train": 600, "valid": 200} and nih["skipped_total"] == 0
    covid = build(
        "csv",
        os.path.join(SAMPLE, "covid_notes"),
        str(tmp_path),
        name="covid_notes",
        text_column="notes",
        group_column="patient_id",
        view_column="view",
        image_size=0,
    )
    assert covid["records_written_total"] == 211 and covid["skipped_total"] == 0


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data not present")
def test_real_shared_data_builds_and_iu_without_images_says_so(tmp_path):
    covid = build(
        "csv",
        os.path.join(SHARED_DATA, "covid_cxr_notes"),
        str(tmp_path),
        name="covid",
        manifest="metadata.csv",
        image_column="filename",
        image_dir="images",
        text_column="clinical_notes",
        group_column="patientid",
        view_column="view",
        num_workers=2,
        image_size=256,
    )
    assert covid["records_read"] == 297 and covid["records_written_total"] == 211
    nih = build(
        "csv",
        os.path.join(SHARED_DATA, "nih1000"),
        str(tmp_path),
        name="nih",
        manifest="train=train/labels.csv,valid=valid/labels.csv",
        image_dir="",
        label_columns=",".join(R.NIH14_LABELS),
        group_column="patient_id",
        view_column="view",
        views="all",
    )
    assert nih["records_written"] == {"train": 600, "valid": 200}
    iu = tmp_path / "iu"
    iu.mkdir()
    with tarfile.open(os.path.join(SHARED_DATA, "iu_xray_reports", "NLMCXR_reports.tgz")) as tar:
        tar.extractall(iu, filter="data")
    with pytest.raises(R.InputError, match="none of the images"):
        build("iu_xray", str(iu), str(tmp_path))


def test_empty_reports_are_skipped_and_counted_when_reports_are_asked_for(tmp_path):
    root = tmp_path / "csv"
    for name in ("a", "b", "c"):
        _png(str(root / f"{name}.png"))
    (root / "manifest.csv").write_text("image,text,split\na.png,note a,train\nb.png,  ,train\nc.png,,test\n")
    report = build("csv", str(root), str(tmp_path / "out"), text_column="text", split_column="split", name="notes")
    assert report["records_written"] == {"train": 1}
    assert report["skipped"][R.REPORT_MISSING]["count"] == 2
    images_only = build("csv", str(root), str(tmp_path / "out"), split_column="split", name="images")
    assert images_only["records_written"] == {"train": 2, "test": 1}  # no text asked for: every image kept


def test_a_constant_16_bit_image_keeps_its_level_instead_of_turning_black(tmp_path):
    import io

    from data_prep.images import load_png

    for value, want in ((0, 0), (32768, 128), (65535, 255)):
        path = str(tmp_path / f"flat{value}.png")
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
        png, _ = load_png(path, 0)
        assert np.asarray(Image.open(io.BytesIO(png))).tolist() == np.full((8, 8), want).tolist()
    ramp = str(tmp_path / "ramp.png")
    Image.fromarray(np.arange(1000, 1064, dtype=np.uint16).reshape(8, 8)).save(ramp)
    png, _ = load_png(ramp, 0)
    got = np.asarray(Image.open(io.BytesIO(png)))
    assert got.min() == 0 and got.max() == 255  # a scan with a range is still stretched to 8 bits


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build(tmp_path):
    from data_prep.build_dataset import remove_abandoned_staging

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = out / f".staging-mine-{dead.stdout.strip()}"  # a pid that has exited
    running = out / f".staging-mine-{os.getpid()}"  # a build still going (this process)
    other = out / f".staging-other-{dead.stdout.strip()}"
    for folder in (abandoned, running, other):
        (folder / "mine" / "1.0.0").mkdir(parents=True)
    assert remove_abandoned_staging(str(out), "mine") == [abandoned.name]
    assert not abandoned.exists() and running.exists() and other.exists()
