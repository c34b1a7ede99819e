"""Does the LLM target teach the encoder what the report says? Real NIH X-rays paired with real IU reports.

  JAX_PLATFORMS=cpu GLIBC_TUNABLES=... .venv/bin/python -m benchmarks.report_transfer \
      [--steps=200,800] [--workdir=runs/bench/report_transfer]

1. data_prep.pair_reports pairs 70% of nih_pneumonia1000's patients with IU reports whose CheXpert findings agree
   with the image's NIH labels, and again with the reports shuffled over the same images (the control). The
   other 30% of the patients are never paired: the probes' data, split 60/40 by patient into train / test.
2. Three datasets are built (paired, shuffled, held-out) and both report sets are embedded by SmolLM2-135M.
3. The same encoder (configs/*.py:demo, ViT-Ti/16 at 128 px, batch 32, seed 0) is pretrained at each budget as
   (a) MAE alone, (b) LLM contrastive + MAE, (g) (b) + local report-word / image-region alignment, (c) M-FLAG,
   (e) I-JEPA, (f) I-JEPA + LLM contrastive, (d) (b) on the shuffled pairing.
4. Each budget's checkpoints and an untrained encoder get linear probes on the held-out images at 100% and 10%
   of the training labels (the five findings that reports state and that at least 50 of the 993 images carry),
   with bootstrap CIs over patients and paired differences against (b); the image-text heads get image->report
   retrieval on the paired test split (the agreeing pairs, chance = 1 / images) and, as the pairing is by labels,
   the fraction of its images whose nearest report (among the split's) states their findings (normal for normal).

Stages whose output exists are reused. Prints the table and, last, (b) minus (a) and (b) minus (d) at the
largest budget with 100% of the labels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd

from data_prep import pair_reports
from mvlp_jax.data.records import seeded_split
from mvlp_jax.objectives import registry
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.tools import demo

SHARED = os.path.join(os.path.dirname(demo.REPO), "shared", "data")
NIH_DIR = os.path.join(SHARED, "nih_pneumonia1000")
IU_LABELS = os.path.join(SHARED, "iu_xray_reports", "iuxray_chexpert_labels.csv")
# findings a report can state (pair_reports.NIH_TO_CHEXPERT) carried by >= 50 of the 993 images; fixed up front
PROBE_LABELS = ("Atelectasis", "Effusion", "Infiltration", "Pneumonia", "Edema")
PAIRINGS = {"paired": False, "shuffled": True}
# recipe -> (config file, its variants, pairing); the first is the baseline of the probes' paired differences
RECIPES = {
    "llm_mae": ("pretrain", "demo", "paired"),
    "mae": ("mae", "demo", "paired"),
    "llm_mae_local": ("pretrain", "demo,local", "paired"),
    "mflag": ("mflag", "demo", "paired"),
    "ijepa": ("ijepa", "demo", "paired"),
    "ijepa_llm": ("ijepa", "demo,llm", "paired"),
    "llm_mae_shuffled": ("pretrain", "demo", "shuffled"),
}
IMAGE_SIZE, BATCH, SEED = 128, 32, 0


def make_pairings(out: str) -> None:
    """OUT/pairing/{paired,shuffled}/ (pretrain.csv, pairing.json) and OUT/pairing/heldout.csv with a split."""
    nih, iu = pd.read_csv(os.path.join(NIH_DIR, "labels.csv")), pd.read_csv(IU_LABELS)
    for name, shuffle in PAIRINGS.items():
        folder = os.path.join(out, "pairing", name)
        if os.path.exists(os.path.join(folder, "pairing.json")):
            continue
        paired, heldout, stats = pair_reports.pair(nih, iu, pretrain_fraction=0.7, seed=SEED, shuffle=shuffle)
        os.makedirs(folder, exist_ok=True)
        paired.to_csv(os.path.join(folder, "pretrain.csv"), index=False)
        with open(os.path.join(folder, "pairing.json"), "w") as f:
            json.dump(stats, f, indent=2)
        heldout["split"] = [seeded_split(str(p), SEED, (0.6, 0.0, 0.4)) for p in heldout["patient_id"]]
        heldout.to_csv(os.path.join(out, "pairing", "heldout.csv"), index=False)


def build_datasets(out: str) -> str:
    from data_prep.build_dataset import build, summary_line
    from data_prep.tfds_builder import VERSION

    data_dir = os.path.join(out, "tfds")
    common = dict(
        image_dir=os.path.join(NIH_DIR, "images"),
        group_column="patient_id",
        view_column="view",
        views="all",
        image_size=0,
        num_workers=2,
    )
    datasets = {
        name: dict(manifest=os.path.join(out, "pairing", name, "pretrain.csv"), text_column="report")
        for name in PAIRINGS
    }
    datasets["heldout"] = dict(
        manifest=os.path.join(out, "pairing", "heldout.csv"), split_column="split", label_columns=",".join(PROBE_LABELS)
    )
    for name, options in datasets.items():
        if not os.path.exists(os.path.join(data_dir, name, VERSION, "build_report.json")):
            print(
                "[report_transfer] " + summary_line(build("csv", NIH_DIR, data_dir, name=name, **common, **options)),
                flush=True,
            )
    return data_dir


def embed(out: str, data_dir: str) -> None:
    for name in PAIRINGS:
        target = os.path.join(out, "emb", name)
        if not os.path.exists(os.path.join(target, "manifest.json")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_prep.precompute_text_embeddings",
                    f"--data_dir={data_dir}",
                    f"--dataset={name}",
                    "--model=smollm2",
                    "--store_tokens",  # per-token states too: what local report-region alignment reads
                    f"--output_dir={target}",
                ],
                check=True,
            )


def pretrain(out: str, data_dir: str, recipe: str, steps: int) -> str:
    from mvlp_jax.pretrain import train

    config = recipe_config(recipe)
    config_name, variants, pairing = RECIPES[recipe]
    config.data.data_dir, config.data.dataset = data_dir, pairing
    config.data.embeddings_dir = os.path.join(out, "emb", pairing)
    config.data.batch_size, config.model.image_size, config.seed = BATCH, IMAGE_SIZE, SEED
    config.total_steps, config.optim.warmup_steps = steps, max(1, steps // 10)
    config.checkpoint.save_interval_steps, config.log_every_steps = steps, max(1, steps // 10)
    config.log_images_every_steps = 0
    workdir = os.path.join(out, f"steps_{steps}", recipe)
    timing = os.path.join(workdir, "pretraining_seconds.json")
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        print(
            f"[report_transfer] pretraining {recipe} (configs/{config_name}.py:{variants} on the {pairing} pairing) "
            f"for {steps} steps -> {workdir}",
            flush=True,
        )
        began = time.perf_counter()
        train.train(config, workdir)
        with open(timing, "w") as f:
            json.dump({"seconds": time.perf_counter() - began}, f)
    return workdir


def recipe_config(recipe: str):
    config_name, variants, _ = RECIPES[recipe]
    return demo.load_config(config_name, variants)


def pretraining_seconds(workdir: str) -> float:
    """Wall time of the run that trained `workdir` (nan when it was trained before times were recorded)."""
    path = os.path.join(workdir, "pretraining_seconds.json")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        return json.load(f)["seconds"]


def _evaluate(output_dir: str, config) -> dict:
    from mvlp_jax.evaluation import evaluate

    if not os.path.exists(os.path.join(output_dir, "results.json")):
        evaluate.evaluate(config, output_dir)
    with open(os.path.join(output_dir, "results.json")) as f:
        return json.load(f)


def probe(out: str, data_dir: str, workdirs: list[str], steps: int) -> dict:
    config = demo.load_config("linear_probe", None)
    config.data_dir, config.dataset, config.val_split = data_dir, "heldout", ""
    config.workdirs, config.label_fractions = ",".join(workdirs + ["random_init"]), (1.0, 0.1)
    return _evaluate(os.path.join(out, f"steps_{steps}", "eval_probe"), config)


def retrieval(out: str, data_dir: str, workdirs: list[str], steps: int) -> dict:
    config = demo.load_config("linear_probe", None)
    config.evaluator, config.data_dir, config.dataset, config.test_split = "retrieval", data_dir, "paired", "test"
    config.embeddings, config.workdirs = os.path.join(out, "emb", "paired"), ",".join(workdirs)
    return _evaluate(os.path.join(out, f"steps_{steps}", "eval_retrieval"), config)


def report_agreement(out: str, data_dir: str, workdir: str) -> tuple[float, float, float, float]:
    """(fraction of the paired test images whose nearest test report agrees with their labels, its 95% bootstrap
    interval over images, that fraction for a report drawn at random): does the image-text space order reports by
    what they state?"""
    import jax
    import numpy as np

    from mvlp_jax.data import built, targets
    from mvlp_jax.evaluation import shared_space
    from mvlp_jax.runtime import sharding

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(workdir, -1, mesh)
    space = shared_space.resolve(encoder)
    builder, _, _ = built.open_builder(data_dir, "paired")
    source = built.open_split(builder, "test")
    records = [source[i] for i in range(len(source))]
    pairing = pd.read_csv(os.path.join(out, "pairing", "paired", "pretrain.csv"))
    pairing = pairing.set_index(pairing["image"].str.rsplit(".", n=1).str[0])  # the builder's image ids
    images = [r["image_id"].decode() for r in records]
    reports, first = np.unique(pairing.loc[images, "report_id"].astype(str).to_numpy(), return_index=True)
    table = targets.load_targets(os.path.join(out, "emb", "paired"), encoder.config.contrastive.target)
    rows = targets.join([records[i]["study_id"].decode() for i in first], table, False, "paired/test")
    embedded = shared_space.embed_images(
        encoder, space, source, demo.load_config("linear_probe", None), mesh, f"agreement {encoder.name}"
    )
    texts = shared_space.embed_texts(encoder, space, table.vectors[rows])  # one vector per distinct report
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    nearest = np.argmax(unit(embedded) @ unit(texts).T, axis=1)
    iu = pd.read_csv(IU_LABELS)
    _, normal, states = pair_reports.report_findings(
        iu[iu["subject_id"].astype(str).isin(reports)]
        .assign(key=lambda d: d["subject_id"].astype(str))
        .set_index("key")
        .loc[reports]
        .reset_index(drop=True)
    )
    findings = pairing.loc[images, list(pair_reports.NIH_LABELS)].to_numpy() == 1
    agree = np.stack(
        [pair_reports.agrees(findings, normal, states, np.full(len(images), j)) for j in range(len(reports))], axis=1
    )  # (images, distinct reports)
    hits = agree[np.arange(len(images)), nearest]
    draws = np.random.default_rng(SEED).integers(0, len(hits), (1000, len(hits)))
    lo, hi = np.percentile(hits[draws].mean(1), (2.5, 97.5))
    return float(hits.mean()), float(lo), float(hi), float(agree.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="200,800", help="comma-separated pretraining budgets (steps of 32)")
    parser.add_argument(
        "--workdir", default=os.path.join(demo.REPO, "runs", "bench", "report_transfer"), type=os.path.abspath
    )  # manifests are passed to the builder by absolute path
    args = parser.parse_args()
    budgets = sorted(int(s) for s in args.steps.split(","))
    start = time.perf_counter()
    make_pairings(args.workdir)
    data_dir = build_datasets(args.workdir)
    embed(args.workdir, data_dir)
    tables, seconds = {}, {}
    for steps in budgets:
        workdirs = []
        for recipe in RECIPES:
            workdirs.append(pretrain(args.workdir, data_dir, recipe, steps))
            seconds[(recipe, steps)] = pretraining_seconds(workdirs[-1])
        # the recipes with an image-text space (an LLM-target objective): retrieval and the nearest-report check
        spaced = [w for w, r in zip(workdirs, RECIPES) if registry.needs_targets(recipe_config(r))]
        agreement = {os.path.basename(w): report_agreement(args.workdir, data_dir, w) for w in spaced}
        tables[steps] = (
            probe(args.workdir, data_dir, workdirs, steps),
            retrieval(args.workdir, data_dir, spaced, steps),
            agreement,
        )
    print(summary(tables, seconds, time.perf_counter() - start))


def summary(tables: dict, seconds: dict, elapsed: float) -> str:
    lines = [
        "| steps | checkpoint | labels | mAUC [95% CI] | Pneumonia AUC | image->report R@1 / R@5 | nearest report "
        "agrees (random report) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for steps, (probes, retrieved, agreement) in tables.items():
        recall = {r["name"]: r["image_to_report"] for r in retrieved["retrieval"]}
        for row in probes["checkpoints"]:
            name, (lo, hi) = row["name"], row["ci95"]["mauc"]
            r = recall.get(name)
            chance = 1 / retrieved["retrieval"][0]["images"]
            cell = f"{r['R@1']:.3f} / {r['R@5']:.3f} (chance R@1 {chance:.3f})" if r else "-"
            a = agreement.get(name)
            agrees = f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] ({a[3]:.3f})" if a else "-"
            lines.append(
                f"| {steps} | {name} | {row['label_fraction']:.0%} | {row['mauc']:.4f} [{lo:.4f}, {hi:.4f}] "
                f"| {row['auc']['Pneumonia']:.4f} | {cell} | {agrees} |"
            )
    lines.append("")
    for steps, (probes, _, _) in tables.items():
        for c in probes["comparisons"]:
            lo, hi = c["interval"]
            lines.append(
                f"{steps} steps, {c['label_fraction']:.0%} labels: {c['candidate']} minus "
                f"llm_mae mAUC {c['mauc_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            )
    lines.append(
        "\npretraining seconds (as trained): "
        + ", ".join(f"{r}@{s} {t:.0f}" for (r, s), t in seconds.items())
        + f"; this invocation {elapsed:.0f} s"
    )
    steps = max(tables)
    comparisons = {(c["candidate"], c["label_fraction"]): c for c in tables[steps][0]["comparisons"]}
    key = []
    for name in ("mae", "llm_mae_shuffled"):
        if (name, 1.0) in comparisons:  # stored as candidate minus llm_mae: turned around here
            c = comparisons[(name, 1.0)]
            key.append(
                f"llm_mae minus {name} {-c['mauc_difference']:+.4f} "
                f"[{-c['interval'][1]:+.4f}, {-c['interval'][0]:+.4f}]"
            )
    lines.append(f"report_transfer: {steps} steps, 100% labels, held-out mAUC: " + ", ".join(key))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
