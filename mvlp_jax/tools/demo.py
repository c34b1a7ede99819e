"""`make demo`: the pipeline on the shipped real sample, stage by stage, reusing finished stages.

Stages: build the COVID image+notes set and the NIH 14-label set from data_prep/sample; embed the
COVID notes with the embedded SmolLM2; pretrain the four recipes on them with the same encoder size,
steps and seed (configs/{pretrain,mae,mflag,multitask}.py:demo: LLM contrastive + MAE, MAE alone,
M-FLAG, and MAE + DINO + query box in a cycle on ViTDet), each drawing pictures of what it learned half-way
and at the end (runs/demo/{recipe}/plots); linear-probe all four and an untrained encoder
on the NIH sample's 14 labels (runs/demo/eval/results.md); for the recipes with an image-text space,
image <-> report retrieval on the COVID test split and zero-shot classification of the NIH sample from
prompts (runs/demo/eval_retrieval, eval_zero_shot_{pair,ensemble}); lung segmentation on every frozen
encoder at 100% and 10% of the masks (runs/demo/eval_segmentation). Each stage is skipped (and says so) when
its output is already complete; an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mvlp_jax.data.records import BUILDER_VERSION, NIH14_LABELS
from mvlp_jax.evaluation import evaluate
from mvlp_jax.objectives import registry
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import schema

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "data_prep", "sample")
RUNS = os.path.join(REPO, "runs", "demo")
DATA_DIR = os.path.join(RUNS, "tfds")

DATASETS = {
    "covid_notes": dict(
        input_dir=os.path.join(SAMPLE, "covid_notes"),
        text_column="notes",
        group_column="patient_id",
        view_column="view",
        image_size=256,
    ),
    "nih_sample": dict(
        input_dir=os.path.join(SAMPLE, "nih14"),
        split_column="split",
        label_columns=",".join(NIH14_LABELS),
        group_column="patient_id",
        view_column="view",
        views="all",
        image_size=0,
    ),
    "covid_lungs": dict(
        input_dir=os.path.join(SAMPLE, "covid_lungs"),
        mask_column="mask",
        group_column="patient_id",
        view_column="view",
        views="all",
        image_size=0,
    ),
}


def build_datasets(datasets: dict[str, dict] = DATASETS, data_dir: str = DATA_DIR) -> None:
    """The demo's datasets (or `datasets` into `data_dir`), each by the builder's command line (data_prep writes,
    the package only reads); a dataset built before is reused."""
    for name, options in datasets.items():
        folder = os.path.join(data_dir, name, BUILDER_VERSION)
        if os.path.exists(os.path.join(folder, "build_report.json")):
            print(f"[demo] dataset {name}: already built, reusing {folder}")
            continue
        options = dict(options)
        input_dir = options.pop("input_dir")
        print(f"[demo] building dataset {name} from {input_dir}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.build_dataset",
                "--source=csv",
                f"--input_dir={input_dir}",
                f"--output_dir={data_dir}",
                f"--name={name}",
                "--num_workers=2",
                *(f"--{k}={v}" for k, v in options.items()),
            ],
            check=True,
        )


EMBEDDINGS = os.path.join(RUNS, "emb", "covid_notes")


def embed_reports() -> None:
    if os.path.exists(os.path.join(EMBEDDINGS, "manifest.json")):
        print(f"[demo] embeddings: already computed, reusing {EMBEDDINGS}")
        return
    print("[demo] embedding the COVID notes with SmolLM2-135M (frozen, offline)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.precompute_text_embeddings",
            f"--data_dir={DATA_DIR}",
            "--dataset=covid_notes",
            "--model=smollm2",
            f"--output_dir={EMBEDDINGS}",
        ],
        check=True,
    )


def load_config(name: str, arg: str | None):
    """configs/{name}.py:{arg} of this checkout."""
    return schema.load_file(os.path.join(REPO, "configs", f"{name}.py"), arg)


# the demo's pretraining recipes, by config file; the first is the baseline the others are compared with
RECIPES = tuple(
    os.path.splitext(os.path.basename(path))[0]
    for path in ("configs/mae.py", "configs/pretrain.py", "configs/mflag.py", "configs/multitask.py")
)


def pretrain(config_name: str) -> None:
    """Trains configs/{config_name}.py:demo into runs/demo/{config_name} (resuming if interrupted)."""
    config = load_config(config_name, "demo")
    config.data.data_dir, config.data.embeddings_dir = DATA_DIR, EMBEDDINGS
    workdir = os.path.join(RUNS, config_name)
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(config.total_steps))):
        print(f"[demo] {config_name}: already trained, reusing {workdir}")
        return
    print(f"[demo] pretraining configs/{config_name}.py:demo into {workdir}")
    train.train(config, workdir)


def _evaluate_once(folder: str, what: str, config) -> None:
    """Runs the evaluation binary's `config` into runs/demo/{folder}, or shows the results already there."""
    out = os.path.join(RUNS, folder)
    if os.path.exists(os.path.join(out, "results.md")):
        with open(os.path.join(out, "results.md")) as f:
            print(f"[demo] {what}: already done, reusing {out}/results.md\n{f.read()}")
        return
    print(f"[demo] {what} -> {out}")
    evaluate.evaluate(config, out)


def _every_recipe_and_random_init(config):
    config.data_dir = DATA_DIR
    config.workdirs = ",".join([os.path.join(RUNS, name) for name in RECIPES] + ["random_init"])
    return config


def evaluate_probes() -> None:
    _evaluate_once(
        "eval",
        "linear probes on the NIH sample",
        _every_recipe_and_random_init(load_config("linear_probe", "nih_sample")),
    )


def evaluate_segmentation() -> None:
    """Lung segmentation on every recipe's frozen encoder and an untrained one, at 100% and 10% of the masks."""
    _evaluate_once(
        "eval_segmentation",
        "lung segmentation on the frozen encoders",
        _every_recipe_and_random_init(load_config("segmentation", "demo")),
    )


def evaluate_text_space() -> None:
    """Retrieval and zero-shot rows for every recipe whose objectives declare an image-text space."""
    spaced = [
        name
        for name in RECIPES
        if any(s.shared_space is not None for s in registry.configured(load_config(name, "demo")))
    ]
    modes = {
        "eval_retrieval": ("retrieval", "covid_notes", "test", "pair"),
        "eval_zero_shot_pair": ("zero_shot", "nih_sample", "valid", "pair"),
        "eval_zero_shot_ensemble": ("zero_shot", "nih_sample", "valid", "ensemble"),
    }
    for folder, (mode, dataset, split, prompts) in modes.items():
        config = load_config("linear_probe", "nih_sample")
        config.evaluator, config.dataset, config.test_split, config.prompts = mode, dataset, split, prompts
        config.data_dir, config.workdirs = DATA_DIR, ",".join(os.path.join(RUNS, name) for name in spaced)
        _evaluate_once(folder, f"{mode.replace('_', '-')} ({dataset}/{split}) of {', '.join(spaced)}", config)


def _timed(stage: str, run, *args) -> float:
    """Runs one stage and says how long it took; returns the seconds."""
    start = time.perf_counter()
    run(*args)
    seconds = time.perf_counter() - start
    print(f"[demo] {stage}: {seconds:.0f}s", flush=True)
    return seconds


def main() -> None:
    os.makedirs(RUNS, exist_ok=True)
    stages = [
        ("datasets", build_datasets),
        ("embeddings", embed_reports),
        *((f"pretraining {name}", pretrain, name) for name in RECIPES),
        ("linear probes", evaluate_probes),
        ("segmentation", evaluate_segmentation),
        ("retrieval and zero-shot", evaluate_text_space),
    ]
    seconds = {stage[0]: _timed(*stage) for stage in stages}
    print(
        f"[demo] done in {sum(seconds.values()):.0f}s ("
        + ", ".join(f"{stage} {s:.0f}s" for stage, s in seconds.items())
        + f"); outputs under {RUNS}"
    )


if __name__ == "__main__":
    main()
