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
   (bootstrap=0), a plumbing check. Picture: ct_windows.png, each window as its own panel, tumour outlined.
5. CT in 3D: the three patients as volumes (sts_ct_volumes: the train and validate patients train, the test
   patient is held out); MAE in 3D (configs/mae.py:demo,volume, 16 slices, tubelets of 2) for `--steps`
   steps of 4 volumes; then its masked-reconstruction loss on the held-out patient's volumes against the untrained
   encoder's (the same masks), and tumour segmentation in 3D (evaluator=volume_segmentation: windows of 16
   slices, the head trains on the train patient, stops early on the validate one, the test patient's series is
   stitched and scored whole). A plumbing check of the 3D path on real CT, not a method: the encoder saw the
   train and validate patients' slices in pretraining, never the test patient's.

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
        slice_position_column="z_mm",  # stacked in z order
        mask_column="mask",
        window="ct_soft_lung_bone",
        intensity_offset=32768,
        channels=3,
        image_size=0,
    ),
}
VOLUMES = "sts_ct_volumes"  # sts_ct with the validate patient training too: two series train, one is held out
# run -> (dataset, config variants of configs/mae.py, objectives)
RUNS = {
    "fundus_mae": ("hrf_fundus", "fundus", {"mae": 1.0}),
    "fundus_mae_dino_vitdet": ("hrf_fundus", "fundus,vitdet", {"mae": 1.0, "dino": 1.0}),
    "ct_mae": ("sts_ct", "fundus", {"mae": 1.0}),
    "ct_mae3d": (VOLUMES, "demo,volume", {"mae": 1.0}),
}


def volume_manifest(out: str) -> str:
    """sts_ct's manifest with the validate patient moved to train (the 3D run's two training series)."""
    import pandas as pd

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "sts_ct_volumes.csv")
    folder = os.path.join(SHARED, "sts_ct")
    table = pd.read_csv(os.path.join(folder, "manifest.csv"))
    table = table.assign(  # file paths resolve against the manifest's folder: absolute here
        split=table["split"].replace({"validate": "train"}),
        image=folder + os.sep + table["image"],
        mask=folder + os.sep + table["mask"],
    )
    table.to_csv(path, index=False)
    return path


def pretrain(out: str, run: str, steps: int) -> str:
    from mvlp_jax.pretrain import train

    dataset, variants, objectives = RUNS[run]
    config = demo.load_config("mae", variants)
    config.data.data_dir, config.data.dataset, config.objectives = os.path.join(out, "tfds"), dataset, objectives
    if dataset == VOLUMES:  # 4 volumes of 16 slices a step
        config.log_images_every_steps = 0
    if "dino" in objectives:  # the multitask demo's DINO settings, cyclic with MAE
        multitask = demo.load_config("multitask", "demo")
        config.dino, config.task_schedule = multitask.dino, "cyclic"
        config.model.window_size = multitask.model.window_size
    config.total_steps, config.optim.warmup_steps = steps, max(1, steps // 10)
    config.checkpoint.save_interval_steps = steps
    config.log_images_every_steps = config.log_images_every_steps and steps // 2
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


def volume_segmentation_config(out: str, workdir: str):
    """Tumour masks in 3D on sts_ct's three patients (train / validate / test), windows of the encoder's depth."""
    config = demo.load_config("segmentation", "volume")
    config.data_dir, config.workdirs = os.path.join(out, "tfds"), f"{workdir},random_init"
    config.volume_segmentation.depth = demo.load_config("mae", "demo,volume").model.volume_depth
    return config


def heldout_reconstruction(out: str, workdir: str, masks: int = 8) -> dict[str, float]:
    """Masked-reconstruction loss of MAE in 3D on the held-out patient's non-overlapping volumes (centre crops,
    no jitter), trained vs untrained, `masks` draws of the same masks for both."""
    import jax
    import numpy as np

    from mvlp_jax.data import built, studies, transforms, views
    from mvlp_jax.pretrain import encoder as encoder_lib
    from mvlp_jax.runtime import sharding

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    trained = encoder_lib.load(workdir, -1, mesh)
    config = trained.config
    builder, _, _ = built.open_builder(config.data.data_dir, config.data.dataset)
    source = built.open_split(builder, "test")
    records = sorted((source[i] for i in range(len(source))), key=studies.slice_key)
    size, depth = config.model.image_size, config.model.volume_depth
    slices = np.stack(
        [
            transforms.center_crop_resize(transforms.decode_png(r["image"], views.channels(config)), size)
            for r in records
        ]
    )
    volumes = slices[: len(slices) // depth * depth].reshape(-1, depth, *slices.shape[1:])
    volumes = transforms.normalise(volumes, config.data.mean, config.data.std, views.channels(config))
    losses = {}
    for name, encoder in (("ct_mae3d", trained), ("random_init", encoder_lib.load("random_init", -1, mesh, workdir))):
        run = jax.jit(
            lambda p, x, k, model=encoder.model: model.apply(
                {"params": p}, x, rngs={"masking": k}, method=lambda m, x: m.masked_model(x)
            )["loss"]
        )
        draws = [float(run(encoder.params, volumes, jax.random.PRNGKey(k))) for k in range(masks)]
        losses[name] = float(np.mean(draws))
    losses["volumes"] = len(volumes)
    return losses


def window_picture(out: str, count: int = 4) -> str:
    """ct_windows.png: slices of the test patient with a tumour, each HU window (a stored channel) as its own
    panel, the tumour mask outlined in red on the composite."""
    import numpy as np
    from PIL import Image

    from mvlp_jax.data import built
    from mvlp_jax.runtime import figures

    builder, _, _ = built.open_builder(os.path.join(out, "tfds"), "sts_ct")
    source = built.open_split(builder, "test", decode_images=True)
    shown = [r for r in (source[i] for i in range(len(source))) if r["mask"].any()][::8][:count]
    rows = []
    for record in shown:
        pixels, mask = np.asarray(record["image"]), np.asarray(record["mask"])[..., 0] > 0
        inner = np.zeros_like(mask)
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        outlined = figures.rgb(pixels)
        outlined[mask & ~inner] = (1.0, 0.1, 0.1)
        rows.append([figures.rgb(pixels[..., c]) for c in range(3)] + [outlined])
    picture = figures.grid_figure(
        rows,
        ["soft tissue L40/W400", "lung L-600/W1500", "bone L400/W1800", "composite, tumour outlined"],
        "sts_ct test patient: the three HU windows stored as channels",
    )
    path = os.path.join(out, "ct_windows.png")
    Image.fromarray(picture).save(path)
    return path


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
    datasets = {**DATASETS, VOLUMES: dict(DATASETS["sts_ct"], manifest=volume_manifest(args.workdir))}
    demo.build_datasets(datasets, os.path.join(args.workdir, "tfds"))
    print(f"[modalities] CT windows picture: {window_picture(args.workdir)}", flush=True)
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
    volumes = heldout_reconstruction(args.workdir, workdirs["ct_mae3d"])
    print(
        f"\nCT in 3D (held-out patient, {volumes['volumes']} volumes of 16 slices): masked-reconstruction loss "
        f"MAE3D {volumes['ct_mae3d']:.4f} vs untrained {volumes['random_init']:.4f}"
    )
    in_3d = evaluate(
        args.workdir, "eval_ct_volume_segmentation", volume_segmentation_config(args.workdir, workdirs["ct_mae3d"])
    )
    for row in in_3d["volume_segmentation"]:
        seeds = ", ".join(f"{v:.3f}" for v in row["dice"].get("seeds", [row["dice"]["mean"]]))
        print(
            f"CT in 3D, tumour segmentation of the test patient's series ({row['test_images']} windows of 16 "
            f"slices, stitched): {row['name']} Dice per volume {row['dice']['mean']:.3f}, per slice with a mask "
            f"{row['dice_slices']['mean']:.3f} (seeds {seeds})"
        )
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
