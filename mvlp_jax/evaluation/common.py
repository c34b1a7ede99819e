"""What every evaluator shares: the common config rows, the `Evaluator` an evaluator module exports, the one
per-checkpoint loop (`encoders`), label coding, seeded patient fractions and the comparison of every checkpoint
with the first on the same patient resamples."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from mvlp_jax.evaluation import statistics
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import schema

RANDOM_INIT = encoder_lib.RANDOM_INIT
LABEL_FRACTIONS = schema.Rule(lambda v: len(v) > 0 and all(0 < f <= 1 for f in v), "must be fractions in (0, 1]")

# The rows every evaluation config has (each evaluator adds its own): key -> (default, check, description)
ROWS: schema.Table = {
    "workdirs": ("", None, "Comma-separated pretraining workdirs; 'random_init' adds the untrained floor."),
    "random_init_like": ("", None, "Architecture of random_init when no real workdir is listed (a workdir)."),
    "step": (-1, None, "Checkpoint step of every workdir (-1: the newest)."),
    "teacher": (
        False,
        None,
        "Probe a DINO run's EMA teacher encoder (the network DINO evaluates) instead of the "
        "student; refused for a run without one.",
    ),
    "mode": (
        "linear",
        ("linear", "finetune"),
        "Classification, segmentation, detection: 'linear' trains a head on the frozen encoder (logistic "
        "regression for classification); 'finetune' trains the whole network with it (layer decay, drop path "
        "and warmup from finetune.*).",
    ),
    "embeddings": (
        "",
        None,
        "classification with features_from='text_embeddings': comma-separated precompute "
        "output dirs (study ids must match); retrieval: the precompute output holding the test split's "
        "reports (default the run's own).",
    ),
    "data_dir": ("~/tensorflow_datasets", None, "TFDS data dir of the labelled dataset."),
    "dataset": ("mimic_cxr", None, "Labelled dataset (optionally name:version)."),
    "train_split": ("train", None, "Split the probes are fitted on."),
    "val_split": ("validate", None, "Model-selection split; '' carves 10% of the training patients out."),
    "test_split": ("test", None, "Split the reported numbers come from."),
    "label_fractions": (
        (1.0, 0.1, 0.01),
        LABEL_FRACTIONS,
        "Fractions of training patients labelled (fixed seed), as in label-efficiency studies.",
    ),
    "uncertain": ("ignore", ("ignore", "ones", "zeros"), "-1 labels: masked out of loss and metrics, or 1, or 0."),
    "unmentioned": ("negative", ("negative", "ignore"), "-2 labels: negative, or masked out."),
    "batch_size": (64, schema.POSITIVE, "Feature extraction batch, all devices."),
    "allow_changed_inputs": (
        False,
        None,
        "Retrieval, zero-shot: use a run's embeddings although they changed since "
        "it trained on them (another layer, re-embedded reports); refused by default, and "
        "printed in every result when allowed.",
    ),
    "bootstrap": (
        1000,
        schema.NON_NEGATIVE,
        "Patient-level resamples for the 95% intervals; 0: no intervals, which lets a test split of fewer than 5 "
        "patients be scored (a plumbing check).",
    ),
    "seed": (0, None, "Seed of label fractions, probes and bootstrap."),
    "seeds": (
        0,
        schema.NON_NEGATIVE,
        "Heads trained per checkpoint and label fraction, seeds seed, seed+1, ... "
        "(each its own label subset and initialisation); 0: auto, 3 where a head learns from few cases (a "
        "fraction under 100%, or fewer than 300 training cases) and its seed changes something (a linear probe "
        "on all the labels is deterministic), else 1. Results give the mean over seeds, their spread, and "
        "intervals whose draws resample test patients and pick a seed.",
    ),
    "finetune.epochs": (10, schema.POSITIVE, "Fine-tuning: passes over the labelled training cases."),
    "finetune.batch_size": (64, schema.POSITIVE, "Fine-tuning batch."),
    "finetune.lr": (
        5e-4,
        schema.POSITIVE,
        "Fine-tuning: peak lr, scaled by batch_size / 256 (MAE fine-tuning's base).",
    ),
    "finetune.layer_decay": (
        0.75,
        schema.Rule(lambda v: 0 < v <= 1, "must lie in (0, 1]"),
        "Fine-tuning: block i of L learns at layer_decay ** (L - i) of the head's rate.",
    ),
    "finetune.weight_decay": (0.05, schema.NON_NEGATIVE, "Fine-tuning: AdamW decay."),
    "finetune.warmup_epochs": (1, schema.NON_NEGATIVE, "Fine-tuning: linear warmup epochs."),
    "finetune.drop_path": (0.1, schema.FRACTION, "Fine-tuning: stochastic depth rate."),
    "finetune.patience": (3, schema.POSITIVE, "Fine-tuning: epochs without a better validation mAUC before stopping."),
}

# Rules every evaluator's config obeys: (holds, the message when it does not)
RULES: tuple[schema.Between, ...] = (
    (
        lambda c: c.features_from != "image" or bool(c.workdirs),
        "config.workdirs is empty: list pretraining workdirs (and/or random_init)",
    ),
)

# The rule of the evaluators that read the workdirs' image encoders only (all but classification)
IMAGE_ENCODERS_ONLY: schema.Between = (
    lambda c: c.features_from == "image" and not c.study_views,
    "this evaluator reads the workdirs' image encoders one image at a time: it needs features_from='image' and "
    "study_views=0 (both are classification's)",
)

# The rule of the evaluators that train no head (retrieval, zero-shot): mode='finetune' would mean nothing there
TRAINS_NOTHING: schema.Between = (
    lambda c: c.mode == "linear",
    "this evaluator trains no head and tunes no encoder: mode='finetune' does not apply to it",
)

Run = Callable[[ml_collections.ConfigDict, str, jax.sharding.Mesh], dict]  # (config, output_dir, mesh) -> results


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One evaluation: its name (`config.evaluator`), what it does (docs/config.md), `run` (config, output
    directory, mesh -> results, having written results.json and results.md there through report.save), its own
    config rows and the rules between keys it needs."""

    name: str
    run: Run
    description: str
    config_rows: schema.Table = dataclasses.field(default_factory=dict)
    rules: tuple[schema.Between, ...] = ()


def listed(text: str) -> list[str]:
    """'A, B,random_init' -> ['A', 'B', 'random_init']."""
    return [w.strip() for w in text.split(",") if w.strip()]


def encoders(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, text_space: str = ""
) -> Iterator[tuple[str, encoder_lib.Encoder]]:
    """The one per-checkpoint loop: (the workdir as listed, its encoder) of each listed workdir in order (its newest
    checkpoint, or config.step; a DINO run's teacher with config.teacher), labelled by the shortest trailing path that
    tells it apart. `random_init` is the architecture of the first real workdir (or config.random_init_like) at its
    initialisation; an evaluator of the image-text space (`text_space`: what it does) refuses it."""
    subjects = listed(config.workdirs)
    if text_space and RANDOM_INIT in subjects:
        raise ValueError(f"random_init has no text space: {text_space}")
    like = next((w for w in subjects if w != RANDOM_INIT), config.random_init_like)
    names = encoder_lib.display_names(subjects)
    for subject in subjects:
        yield (
            subject,
            encoder_lib.load(
                subject, config.step, mesh, like, name=names[subject], teacher=config.teacher and subject != RANDOM_INIT
            ),
        )


def compare_to_first(
    statistic_by: dict[tuple[str, float], list[Callable]],
    name_of: dict[str, str],
    groups: np.ndarray,
    config: ml_collections.ConfigDict,
) -> list[dict]:
    """Per (workdir, label fraction) after the first workdir's: candidate - first, each a per-seed statistic of
    case indices, on the same patient resamples (statistics.paired)."""
    first = next(iter(statistic_by))[0] if statistic_by else ""
    out = []
    for (subject, fraction), candidate in statistic_by.items():
        if subject != first and (first, fraction) in statistic_by:
            out.append(
                {
                    "baseline": name_of[first],
                    "candidate": name_of[subject],
                    "baseline_workdir": first,
                    "candidate_workdir": subject,
                    "label_fraction": fraction,
                    **statistics.paired(
                        statistic_by[(first, fraction)], candidate, groups, config.bootstrap, config.seed
                    ),
                }
            )
    return out


def targets_and_mask(labels: np.ndarray, uncertain: str, unmentioned: str) -> tuple[np.ndarray, np.ndarray]:
    """Coded labels (1/0/-1/-2) -> (0/1 targets, mask of the entries that count)."""
    y = (labels == 1).astype(np.float32)
    mask = np.ones(labels.shape, bool)
    if uncertain == "ignore":
        mask &= labels != -1
    else:
        y[labels == -1] = 1.0 if uncertain == "ones" else 0.0
    if unmentioned == "ignore":
        mask &= labels != -2
    return y, mask


def patient_fraction(patients: np.ndarray, fraction: float, seed: int, salt: str = "fraction") -> np.ndarray:
    """Cases of a fixed, seeded `fraction` of the patients (at least one)."""
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(f"{salt}:{seed}:{p}".encode()).hexdigest())
    keep = set(unique[: max(1, math.ceil(fraction * len(unique)))])
    return np.array([p in keep for p in patients])
