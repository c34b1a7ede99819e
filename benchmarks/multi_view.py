"""One view at a time vs a study's views in one sequence: the same LLM contrastive + MAE pretraining and image
budget, probed one feature per study.

  JAX_PLATFORMS=cpu .venv/bin/python -m benchmarks.multi_view [--recipe=llm|dino] [--steps=150]
      [--workdir=runs/bench/multi_view]

Data: the 297 real COVID-19 image-collection X-rays with clinical notes (../shared/data/covid_cxr_notes), frontal
and lateral views kept; a study is a patient's images of one day (same offset, else same date), 171 studies of
which 36 have several views (31 a lateral). Label: COVID-19 in the finding (1), another finding (0), 'todo' left
unlabelled. Patients are split 60/40 into train / test (seeded).

Recipes: `llm` (default) is configs/pretrain.py:demo (LLM contrastive + MAE, ViT-Ti/16 at 96 px, seed 0) with
the notes embedded by SmolLM2-135M; `dino` is configs/multitask.py:demo without query-box (MAE and DINO in turn,
ViTDet-Ti/16 at 96 px; on studies DINO's two global crops come from two different views of a study). Both runs of
a recipe train on the training split: (a) max_views=1, 16 images a step; (b) max_views=2, 8 studies a step, for
as many steps as give (a)'s image count (the studies' mean number of views, at most 2, sets it). Probes: linear, one
feature per test study (study_views=2: (b) reads the views as one sequence, (a) and an untrained encoder
average their views' features), bootstrap CIs over patients and the paired difference (b) minus (a), printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from mvlp_jax.data.records import seeded_split
from mvlp_jax.tools import demo

SOURCE = os.path.join(os.path.dirname(demo.REPO), "shared", "data", "covid_cxr_notes")
BATCH_IMAGES = 16


def write_manifest(out: str) -> str:
    """The source's metadata with a study id, the binary COVID-19 label and absolute image paths."""
    d = pd.read_csv(os.path.join(SOURCE, "metadata.csv"))
    d["study"] = [
        f"{p}_day{o}" if pd.notna(o) else f"{p}_{t}" if pd.notna(t) else f"{p}_{f}"
        for p, o, t, f in zip(d["patientid"], d["offset"], d["date"], d["filename"])
    ]
    d["covid"] = np.where(d["finding"] == "todo", "", d["finding"].str.startswith("COVID-19").astype(int).astype(str))
    d["image"] = [os.path.join(SOURCE, "images", f) for f in d["filename"]]
    d["split"] = [seeded_split(str(p), 0, (0.6, 0.0, 0.4)) for p in d["patientid"]]  # a test set worth scoring
    path = os.path.join(out, "manifest.csv")
    os.makedirs(out, exist_ok=True)
    d.to_csv(path, index=False)
    return path


def build_and_embed(out: str) -> str:
    from data_prep.build_dataset import build, summary_line
    from data_prep.tfds_builder import VERSION

    data_dir = os.path.join(out, "tfds")
    if not os.path.exists(os.path.join(data_dir, "covid_studies", VERSION, "build_report.json")):
        print(
            "[multi_view] "
            + summary_line(
                build(
                    "csv",
                    out,
                    data_dir,
                    name="covid_studies",
                    manifest=write_manifest(out),
                    text_column="clinical_notes",
                    study_column="study",
                    group_column="patientid",
                    split_column="split",
                    view_column="view",
                    views="all",
                    label_columns="covid",
                    image_size=256,
                    num_workers=2,
                )
            ),
            flush=True,
        )
    embeddings = os.path.join(out, "emb")
    if not os.path.exists(os.path.join(embeddings, "manifest.json")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.precompute_text_embeddings",
                f"--data_dir={data_dir}",
                "--dataset=covid_studies",
                "--model=smollm2",
                f"--output_dir={embeddings}",
            ],
            check=True,
        )
    return data_dir


def mean_views(data_dir: str, max_views: int) -> float:
    from mvlp_jax.data import built, studies

    source = built.open_split(built.open_builder(data_dir, "covid_studies")[0], "train")
    records = [source[i] for i in range(len(source))]
    grouped, _, _ = studies.group(
        [r["study_id"].decode() for r in records], [r["view"].decode() for r in records], max_views
    )
    return float((grouped >= 0).sum(1).mean())


RECIPES = {"llm": ("pretrain", ""), "dino": ("multitask", "_dino")}  # recipe: (demo config, run name suffix)


def pretrain(out: str, data_dir: str, recipe: str, name: str, max_views: int, steps: int) -> str:
    from mvlp_jax.pretrain import train

    config = demo.load_config(RECIPES[recipe][0], "demo")
    if recipe == "dino":
        config.objectives = {"mae": 1.0, "dino": 1.0}  # query-box crops one image: refused on studies
    else:
        config.data.embeddings_dir = os.path.join(out, "emb")
    config.data.data_dir, config.data.dataset, config.data.max_views = data_dir, "covid_studies", max_views
    config.data.batch_size = BATCH_IMAGES // max_views
    config.total_steps, config.optim.warmup_steps = steps, max(1, steps // 10)
    config.checkpoint.save_interval_steps, config.log_images_every_steps = steps, 0
    workdir = os.path.join(out, name)
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        print(
            f"[multi_view] pretraining {name}: max_views={max_views}, {config.data.batch_size} per step, "
            f"{steps} steps -> {workdir}",
            flush=True,
        )
        train.train(config, workdir)
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="llm", help="what both runs pretrain")
    parser.add_argument("--steps", type=int, default=150, help="steps of the one-view run (16 images each)")
    parser.add_argument(
        "--workdir", default=os.path.join(demo.REPO, "runs", "bench", "multi_view"), type=os.path.abspath
    )  # manifests are passed to the builder by absolute path
    args = parser.parse_args()
    data_dir = build_and_embed(args.workdir)
    per_study = mean_views(data_dir, 2)
    study_steps = round(args.steps * BATCH_IMAGES / (BATCH_IMAGES // 2 * per_study))
    suffix = RECIPES[args.recipe][1]
    one = pretrain(args.workdir, data_dir, args.recipe, "one_view" + suffix, 1, args.steps)
    multi = pretrain(args.workdir, data_dir, args.recipe, "multi_view" + suffix, 2, study_steps)
    print(
        f"[multi_view] images seen: one_view {args.steps * BATCH_IMAGES}, multi_view ~{study_steps} x "
        f"{BATCH_IMAGES // 2} studies x {per_study:.3f} views = {study_steps * BATCH_IMAGES // 2 * per_study:.0f}"
    )

    from mvlp_jax.evaluation import evaluate

    config = demo.load_config("linear_probe", None)
    config.data_dir, config.dataset, config.val_split, config.test_split = data_dir, "covid_studies", "", "test"
    config.workdirs, config.label_fractions, config.study_views = f"{one},{multi},random_init", (1.0,), 2
    config.unmentioned = "ignore"  # 'todo' findings are unlabelled, not negative
    output = os.path.join(args.workdir, "eval" + suffix)
    if not os.path.exists(os.path.join(output, "results.json")):
        evaluate.evaluate(config, output)
    with open(os.path.join(output, "results.json")) as f:
        results = json.load(f)
    for row in results["checkpoints"]:
        lo, hi = row["ci95"]["mauc"]
        print(
            f"{row['name']} (step {row['step']}): COVID-19 AUC {row['mauc']:.4f} [{lo:.4f}, {hi:.4f}] over "
            f"{row['test_cases']} test studies, {row['train_cases']} training studies"
        )
    c = next(c for c in results["comparisons"] if c["candidate"] == "multi_view" + suffix)
    print(
        f"multi_view ({args.recipe}): study-level AUC, multi-view minus one-view pretraining (same images): "
        f"{c['mauc_difference']:+.4f} [95% CI {c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]"
    )


if __name__ == "__main__":
    main()
