"""Regenerates the shipped demo sample (data_prep/sample/, < 10 MB) from ../shared/data.

  python -m data_prep.make_sample --shared_data=../shared/data

covid_notes: the frontal (PA/AP) X-rays with clinical notes, grayscale, longest side 256 px, one row
per distinct image, with each image's licence, DOI and URL kept. nih14: the 600 + 200 NIH images as
grayscale 64 px PNGs with their 14 labels and the train/valid split of the source folders. covid_lungs: the 210
X-rays with human-reviewed lung masks, longest side 256 px (masks resized nearest-neighbour to the same size),
with each image's licence, DOI and URL kept.
"""

from __future__ import annotations

import csv
import os
import shutil

from absl import app, flags
from PIL import Image

from mvlp_jax.data.records import NIH14_LABELS, view_selected

flags.DEFINE_string("shared_data", "../shared/data", "The shared real-data folder.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "sample"), "Where the sample goes.")
FLAGS = flags.FLAGS

COVID_COLUMNS = ("image", "patient_id", "view", "finding", "license", "doi", "url", "notes")
LUNG_COLUMNS = ("image", "mask", "patient_id", "view", "finding", "license", "doi", "url")
NIH_COLUMNS = ("image", "patient_id", "split", "view", "age", "sex") + NIH14_LABELS


def _copy_attribution(shared: str, out_dir: str) -> None:
    with open(os.path.join(shared, "README.md")) as f:
        readme = f.read()
    licences = readme[readme.index("## Sources and licences") : readme.index("## Shipping a sample")]
    with open(os.path.join(out_dir, "ATTRIBUTION.md"), "w") as f:
        f.write(
            "# Attribution and licences of the shipped sample\n\n"
            "A downscaled grayscale derivative of public data, made by `python -m data_prep.make_sample`.\n"
            "Per-image licence, DOI and URL of the COVID images are in `covid_notes/manifest.csv` and\n"
            "`covid_lungs/manifest.csv`.\n"
            "CC BY-NC-SA images: non-commercial use, share-alike.\n\n" + licences.strip() + "\n"
        )


def make_covid(shared: str, out_dir: str) -> int:
    source = os.path.join(shared, "covid_cxr_notes")
    target = os.path.join(out_dir, "covid_notes")
    os.makedirs(os.path.join(target, "images"), exist_ok=True)
    seen, rows = set(), []
    with open(os.path.join(source, "metadata.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["filename"] in seen or not view_selected(row["view"], "frontal"):
                continue
            seen.add(row["filename"])
            stem = os.path.splitext(row["filename"])[0]
            with Image.open(os.path.join(source, "images", row["filename"])) as image:
                image = image.convert("L")
                image.thumbnail((256, 256), Image.Resampling.LANCZOS)
                image.save(os.path.join(target, "images", f"{stem}.jpg"), quality=90)
            rows.append(
                {
                    "image": f"images/{stem}.jpg",
                    "patient_id": row["patientid"],
                    "view": row["view"],
                    "finding": row["finding"],
                    "license": row["license"],
                    "doi": row["doi"],
                    "url": row["url"],
                    "notes": row["clinical_notes"],
                }
            )
    _write_csv(os.path.join(target, "manifest.csv"), COVID_COLUMNS, rows)
    return len(rows)


def make_lungs(shared: str, out_dir: str) -> int:
    source = os.path.join(shared, "covid_lung_masks")
    target = os.path.join(out_dir, "covid_lungs")
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(target, folder), exist_ok=True)
    rows = []
    with open(os.path.join(source, "metadata.csv"), newline="") as f:
        for row in csv.DictReader(f):
            stem = os.path.splitext(row["filename"])[0]
            with Image.open(os.path.join(source, "images", row["filename"])) as image:
                image = image.convert("L")
                image.thumbnail((256, 256), Image.Resampling.LANCZOS)
                image.save(os.path.join(target, "images", f"{stem}.jpg"), quality=90)
            with Image.open(os.path.join(source, "masks", row["mask"])) as mask:
                mask.convert("L").resize(image.size, Image.Resampling.NEAREST).save(
                    os.path.join(target, "masks", f"{stem}.png"), optimize=True
                )
            rows.append(
                {
                    "image": f"images/{stem}.jpg",
                    "mask": f"masks/{stem}.png",
                    "patient_id": row["patientid"],
                    "view": row["view"],
                    "finding": row["finding"],
                    "license": row["license"],
                    "doi": row["doi"],
                    "url": row["url"],
                }
            )
    _write_csv(os.path.join(target, "manifest.csv"), LUNG_COLUMNS, rows)
    return len(rows)


def make_nih(shared: str, out_dir: str) -> int:
    target = os.path.join(out_dir, "nih14")
    os.makedirs(os.path.join(target, "images"), exist_ok=True)
    rows = []
    for split in ("train", "valid"):
        folder = os.path.join(shared, "nih1000", split)
        with open(os.path.join(folder, "labels.csv"), newline="") as f:
            for row in csv.DictReader(f):
                with Image.open(os.path.join(folder, row["image"])) as image:
                    image.convert("L").save(os.path.join(target, "images", row["image"]), optimize=True)
                rows.append(
                    {
                        "image": f"images/{row['image']}",
                        "patient_id": row["patient_id"],
                        "split": split,
                        "view": row["view"],
                        "age": row["age"],
                        "sex": row["sex"],
                        **{label: row[label] for label in NIH14_LABELS},
                    }
                )
    _write_csv(os.path.join(target, "manifest.csv"), NIH_COLUMNS, rows)
    return len(rows)


def _write_csv(path: str, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str]) -> None:
    del argv
    shutil.rmtree(FLAGS.out_dir, ignore_errors=True)
    os.makedirs(FLAGS.out_dir)
    covid = make_covid(FLAGS.shared_data, FLAGS.out_dir)
    nih = make_nih(FLAGS.shared_data, FLAGS.out_dir)
    lungs = make_lungs(FLAGS.shared_data, FLAGS.out_dir)
    _copy_attribution(FLAGS.shared_data, FLAGS.out_dir)
    print(
        f"sample written to {FLAGS.out_dir}: {covid} covid images with notes, {nih} NIH images, {lungs} X-rays "
        f"with lung masks"
    )


if __name__ == "__main__":
    app.run(main)
