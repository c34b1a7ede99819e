"""Dataset build throughput on the real COVID chest X-ray JPEGs, 1 vs 2 decode workers.

  python -m benchmarks.build_dataset [--shared_data=../shared/data] [--repeats=2]

Prints images/s for each worker count; the last line is the 2-worker / 1-worker speed-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from data_prep.build_dataset import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared_data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    source = os.path.join(args.shared_data, "covid_cxr_notes")
    best: dict[int, float] = {}
    for workers in (1, 2):
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                report = build(
                    "csv",
                    source,
                    out,
                    name="covid_bench",
                    manifest="metadata.csv",
                    image_column="filename",
                    image_dir="images",
                    text_column="clinical_notes",
                    group_column="patientid",
                    view_column="view",
                    views="all",
                    image_size=args.image_size,
                    num_workers=workers,
                )
            rate = report["records_written_total"] / report["elapsed_s"]
            best[workers] = max(best.get(workers, 0.0), rate)
        print(
            f"num_workers={workers}: {best[workers]:.1f} images/s "
            f"({report['records_written_total']} real JPEGs -> {args.image_size}px PNG, end to end)"
        )
    print(f"build_dataset speed-up, 2 workers vs 1: {best[2] / best[1]:.2f}x ({best[2]:.1f} vs {best[1]:.1f} images/s)")


if __name__ == "__main__":
    main()
