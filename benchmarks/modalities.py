"""Beyond chest X-rays on real pixels: colour fundus photographs and CT slices in Hounsfield units. Both sets are
tiny (45 photographs; 158 slices of 3 patients): they prove the path end to end, not a method.

  JAX_PLATFORMS=cpu GLIBC_TUNABLES=... .venv/bin/python -m benchmarks.modalities [--steps=300]
                                                          [--workdir=runs/bench/modalities]

1. Builds ../shared/data/hrf_fundus in colour (--channels=3) and ../shared/data/sts_ct with the soft-tissue, lung
   and bone windows in HU as its three channels (stored HU + 32768: --intensity_offset=32768), tumour masks and
   a per-slice "tumor" label.
2. Pretrains on the training split of each, the demo's ViT-Ti/16 at 128 px (configs/mae.py:fundus), `--steps`
   steps of 16: fundus with MAE on the ViT and with MAE + DINO on the ViTDet (configs/multitask.py's objectives
   without query-box), CT with MAE on the ViT. Colour reconstruction and attention pictures land in each run's
   plots/.
3. Fundus: linear probes of the three classes (healthy, diabetic retinopathy, glaucoma; one-vs-rest AUC) with
   patient-level 95% intervals (12 test photographs of 12 patients), against an untrained encoder.
4. CT: a slice-level "tumour present" probe and tumour segmentation (train on the train patient, early stopping
   on the validate one, Dice on the test one), against an untrained encoder. One test patient: no interval
   (bootstrap=0), a plumbing check.

Stages whose output exists are reused. Prints the tables; last, the fundus mAUC of MAE minus untrained.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mvlp_jax.tools import demo

SHARED = os.path.join(os.path.dirname(demo.REPO), "shared", "data")
DATASETS = {
    "hrf_fundus": dict(
        input_dir=os.path.join(SHARED, "hrf_fundus"),
        split_column="split",
        label_columns="healthy,diabetic_retinopathy,glaucoma",
        group_column="patient_id",
        channels=3,
        image_size=0,
    ),
    "sts_ct": dict(
        input_dir=os.path.join(SHARED, "sts_ct"),
        split_column="split",
        label_columns="tumor",
        group_column="patient_id",
        study_column="patient_id",  # a patient's slices are one series: a volume for the 3D encoder
        mask_column="mask",
        window="ct_soft_lung_bone",
        intensity_offset=32768,
        channels=3,
        image_size=0,
    ),
}
# run -> (dataset, config variants of configs/mae.py, objectives)
RUNS = {
    "fundus_mae": ("hrf_fundus", "fundus", {"mae": 1.0}),
    "fundus_mae_dino_vitdet": ("hrf_fundus", "fundus,vitdet", {"mae": 1.0, "dino": 1.0}),
    "ct_mae": ("sts_ct", "fundus", {"mae": 1.0}),
}


def pretrain(out: str, run: str, steps: int) -> str:
    from mvlp_jax.pretrain import train

    dataset, variants, objectives = RUNS[run]
    config = demo.load_config("mae", variants)
    config.data.data_dir, config.data.dataset, config.objectives = os.path.join(out, "tfds"), dataset, objectives
    if "dino" in objectives:  # the multitask demo's DINO settings, cyclic with MAE
        multitask = demo.load_config("multitask", "demo")
        config.dino, config.task_schedule = multitask.dino, "cyclic"
        config.model.window_size = multitask.model.window_size
    config.total_steps, config.optim.warmup_steps = steps, max(1, steps // 10)
    config.checkpoint.save_interval_steps, config.log_images_every_steps = steps, steps // 2
    workdir = os.path.join(out, run)
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        print(f"[modalities] pretraining {run} (configs/mae.py:{variants}, {objectives}) -> {workdir}", flush=True)
        began = time.perf_counter()
        train.train(config, workdir)
        with open(os.path.join(workdir, "pretraining_seconds.json"), "w") as f:
            json.dump({"seconds": time.perf_counter() - began}, f)
    return workdir


def evaluate(out: str, name: str, config) -> dict:
    from mvlp_jax.evaluation import evaluate as evaluation

    folder = os.path.join(out, name)
    if not os.path.exists(os.path.join(folder, "results.json")):
        print(f"[modalities] evaluating {name} -> {folder}", flush=True)
        evaluation.evaluate(config, folder)
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def probe_config(out: str, dataset: str, workdirs: list[str], bootstrap: int):
    config = demo.load_config("linear_probe", None)
    config.data_dir, config.dataset, config.val_split = os.path.join(out, "tfds"), dataset, "validate"
    config.workdirs, config.label_fractions, config.bootstrap = ",".join(workdirs + ["random_init"]), (1.0,), bootstrap
    return config


def segmentation_config(out: str, workdirs: list[str]):
    config = demo.load_config("segmentation", "demo")
    config.data_dir, config.dataset, config.bootstrap = os.path.join(out, "tfds"), "sts_ct", 0
    config.workdirs, config.label_fractions = ",".join(workdirs + ["random_init"]), (1.0,)
    return config


def tables(fundus: dict, ct_probe: dict, ct_segmentation: dict, seconds: dict) -> str:
    lines = [
        "Colour fundus (hrf_fundus: 27 train / 6 validate / 12 test photographs, one per patient), linear probe, "
        "one-vs-rest AUC (mAUC with its 95% CI over patients):",
        "",
        "| encoder | mAUC | healthy | diabetic retinopathy | glaucoma |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in fundus["checkpoints"]:
        lo, hi = row["ci95"]["mauc"]
        cells = [f"{row['auc'][label]:.3f}" for label in ("healthy", "diabetic_retinopathy", "glaucoma")]
        lines.append(f"| {row['name']} | {row['mauc']:.3f} [{lo:.3f}, {hi:.3f}] | " + " | ".join(cells) + " |")
    lines += [
        "",
        "CT in HU (sts_ct: slices of 1 train / 1 validate / 1 test patient), no intervals (one test patient):",
        "",
        "| encoder | tumour present, slice AUC | tumour Dice (test patient) |",
        "| --- | --- | --- |",
    ]
    dice = {row["name"]: row["dice"]["mean"] for row in ct_segmentation["segmentation"]}
    for row in ct_probe["checkpoints"]:
        lines.append(f"| {row['name']} | {row['auc']['tumor']:.3f} | {dice.get(row['name'], float('nan')):.3f} |")
    lines.append("\npretraining seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps of 16 images")
    parser.add_argument(
        "--workdir", default=os.path.join(demo.REPO, "runs", "bench", "modalities"), type=os.path.abspath
    )
    args = parser.parse_args()
    start = time.perf_counter()
    demo.build_datasets(DATASETS, os.path.join(args.workdir, "tfds"))
    workdirs = {run: pretrain(args.workdir, run, args.steps) for run in RUNS}
    seconds = {}
    for run, workdir in workdirs.items():
        with open(os.path.join(workdir, "pretraining_seconds.json")) as f:
            seconds[run] = json.load(f)["seconds"]
    fundus_runs = [workdirs["fundus_mae"], workdirs["fundus_mae_dino_vitdet"]]
    fundus = evaluate(args.workdir, "eval_fundus", probe_config(args.workdir, "hrf_fundus", fundus_runs, 1000))
    ct_probe = evaluate(args.workdir, "eval_ct_probe", probe_config(args.workdir, "sts_ct", [workdirs["ct_mae"]], 0))
    ct_segmentation = evaluate(
        args.workdir, "eval_ct_segmentation", segmentation_config(args.workdir, [workdirs["ct_mae"]])
    )
    print(tables(fundus, ct_probe, ct_segmentation, seconds))
    print(f"\nthis invocation {time.perf_counter() - start:.0f} s")
    rows = {os.path.basename(r["name"]): r for r in fundus["checkpoints"]}
    difference = next(c for c in fundus["comparisons"] if c["candidate"] == "random_init")
    print(
        f"modalities: fundus 3-class probe mAUC, MAE {rows['fundus_mae']['mauc']:.4f} vs untrained "
        f"{rows['random_init']['mauc']:.4f}: MAE minus untrained {-difference['mauc_difference']:+.4f} "
        f"[{-difference['interval'][1]:+.4f}, {-difference['interval'][0]:+.4f}]"
    )


if __name__ == "__main__":
    main()
