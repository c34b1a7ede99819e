"""`make demo`: the pipeline on the shipped real sample, stage by stage, reusing finished stages.

Stages so far: build the COVID image+notes set and the NIH 14-label set from data_prep/sample.
Each stage is skipped (and says so) when its output is already complete.
"""
from __future__ import annotations

import os
import time

from data_prep.records import NIH14_LABELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data_prep", "sample")
RUNS = os.path.join(REPO, "runs", "demo")
DATA_DIR = os.path.join(RUNS, "tfds")

DATASETS = {
    "covid_notes": dict(input_dir=os.path.join(SAMPLE, "covid_notes"), text_column="notes",
                        group_column="patient_id", view_column="view", image_size=256),
    "nih_sample": dict(input_dir=os.path.join(SAMPLE, "nih14"), split_column="split",
                       label_columns=",".join(NIH14_LABELS), group_column="patient_id",
                       view_column="view", views="all", image_size=0),
}


def build_datasets() -> None:
    from data_prep.build_dataset import build, summary_line
    from data_prep.tfds_builder import VERSION

    for name, options in DATASETS.items():
        if os.path.exists(os.path.join(DATA_DIR, name, VERSION, "build_report.json")):
            print(f"[demo] dataset {name}: already built, reusing {os.path.join(DATA_DIR, name, VERSION)}")
            continue
        options = dict(options)
        input_dir = options.pop("input_dir")
        print(f"[demo] building dataset {name} from {input_dir}")
        print("[demo] " + summary_line(build("csv", input_dir, DATA_DIR, name=name, num_workers=2, **options)))


def main() -> None:
    start = time.perf_counter()
    os.makedirs(RUNS, exist_ok=True)
    build_datasets()
    print(f"[demo] done in {time.perf_counter() - start:.0f}s; outputs under {RUNS}")


if __name__ == "__main__":
    main()
