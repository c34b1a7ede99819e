"""Dense downstream tasks (`--config.evaluator=segmentation|detection`): one loop for every task, which declares
what it reads, trains and scores (`DenseTask`); each task's module makes it an evaluator (`evaluator()`).

Per checkpoint, every image of the task's splits is taken as evaluation sees it (centre crop at the run's size
and normalisation). With `mode=linear` (frozen encoder) the images become the encoder's last-layer patch-token
grids once, and per label fraction (training patients sampled by a fixed seed) a fresh head learns from them;
with `mode=finetune` the encoder learns with the head from the images (finetune.py). Either trains with
early stopping on the validation loss (`training.fit`), and the epoch of the best validation loss is scored
on the test split: the task's metric with a patient-bootstrap 95% interval, and each checkpoint's paired
difference against the first on the same resamples. The head's decoder is the task's `decoder`: 'auto' takes
SETR's upsampling for a ViT and the simple feature pyramid for a ViTDet. Writes results.json, results.md and
`{task}.png` (truth red, prediction blue, on test images).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mvlp_jax.data import built, transforms
from mvlp_jax.evaluation import common, features, report, statistics
from mvlp_jax.evaluation.dense import finetune, training
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.models.vit import variant
from mvlp_jax.runtime import schema, storage

Truth = dict[str, Any]  # "records": source indices, "patients", "targets": training arrays, + the task's own


class DenseTask(Protocol):
    name: str  # its key in the config and in results.json
    feature: str  # the record feature it needs
    build_hint: str  # how to build a dataset with it
    metric: str  # the main metric's key in a result row (comparisons use it)
    metric_label: str
    metrics: dict[str, str]  # every metric it reports (the main one first) -> its label
    unit: str  # what a case is, in results' words ("images", "windows")
    head_labels: dict[str, str]  # per decoder (models/dense_heads.DECODERS), how results name the head

    def context(self, sources: dict, c: ml_collections.ConfigDict) -> dict: ...  # what read / head need

    def read(self, source, size: int, patch: int, context: dict) -> Truth: ...

    # what the encoder reads for the truth's items (features.apply_to_split's source): images or volumes
    def inputs(self, source, truth: Truth, config: ml_collections.ConfigDict) -> Any: ...

    def cases(self, truth: Truth) -> np.ndarray: ...  # the patient of each scored case (a test split's size)

    def head(self, patch: int, c: ml_collections.ConfigDict, context: dict, decoder: str) -> nn.Module: ...

    def loss(self, outputs: Any, targets: dict) -> jax.Array: ...

    def score(
        self, outputs: Any, truth: Truth, patch: int, context: dict
    ) -> tuple[dict[str, Callable[[np.ndarray], float]], Any]: ...  # ({metric: statistic of image

    # indices}, predictions)

    def check(self, truth: Truth, where: str) -> None: ...  # refuses a test split it cannot score meaningfully

    def draw(self, ax: Any, image: np.ndarray, truth: Truth, predictions: Any, i: int) -> str: ...  # image (S, S, 3)


def open_split(data_dir: str, dataset: str, split: str, task: DenseTask):
    """(random-access source, 'name:version/split') of a split whose records carry the task's feature."""
    builder, name, version = built.open_builder(data_dir, dataset)
    if task.feature not in builder.info.features:
        raise ValueError(
            f"dataset {name}:{version} has no {task.feature!r} feature, which {task.name} needs: {task.build_hint}"
        )
    source = built.open_split(builder, split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {name}:{version} is empty")
    return source, f"{name}:{version}/{split}"


class ImageTask:
    """What a 2D task shares: the encoder reads the truth's records, an image each (an encoder of volumes is
    refused), and each image is a case."""

    unit = "images"

    def inputs(self, source, truth: Truth, config: ml_collections.ConfigDict) -> features.Subset:
        if config.model.encoder == "vit3d":
            raise ValueError(
                "this checkpoint encodes volumes (model.encoder=vit3d), this evaluator images: use "
                "evaluator='volume_segmentation'"
            )
        return features.Subset(source, truth["records"])

    def cases(self, truth: Truth) -> np.ndarray:
        return truth["patients"]


def decoder_for(setting: str, encoder_kind: str) -> str:
    """The decoder a task's `decoder` setting means for an encoder ('vit' or 'vitdet')."""
    if setting != "auto":
        return setting
    return "pyramid" if encoder_kind == "vitdet" else "upsampling"


def select(truth: Truth, keep: np.ndarray) -> Truth:
    """The truth of the images `keep` (a boolean mask or indices)."""
    pick = lambda v: v[keep] if isinstance(v, np.ndarray) else [v[i] for i in np.flatnonzero(keep)]
    return {k: ({t: a[keep] for t, a in v.items()} if k == "targets" else pick(v)) for k, v in truth.items()}


def run(task: DenseTask, config: ml_collections.ConfigDict, output_dir: str, mesh: jax.sharding.Mesh) -> dict:
    """Every listed checkpoint through `task` (the module docstring); returns what results.json holds."""
    roles = ("train", "val", "test") if config.val_split else ("train", "test")
    sources = {role: open_split(config.data_dir, config.dataset, config[f"{role}_split"], task) for role in roles}
    settings = config[task.name]
    context = task.context({role: src for role, (src, _) in sources.items()}, settings)
    results: dict[str, Any] = {"config": config.to_dict(), "context": context, task.name: [], "comparisons": []}
    statistic_by: dict[tuple[str, float], dict[str, list[Callable]]] = {}  # (workdir, fraction) -> per-seed stats
    shown: dict[str, Any] = {}
    name_of, encoders = {}, []
    truth_by_view: dict[tuple[int, int], dict[str, Truth]] = {}
    for subject, encoder in common.encoders(config, mesh):
        encoders.append(encoder)
        size, patch = encoder.config.model.image_size, variant(encoder.config.model.variant)["patch_size"]
        if (size, patch) not in truth_by_view:
            truth_by_view[(size, patch)] = {
                role: task.read(src, size, patch, context) for role, (src, _) in sources.items()
            }
            statistics.require(
                task.cases(truth_by_view[(size, patch)]["test"]), sources["test"][1], config.bootstrap > 0
            )
            task.check(truth_by_view[(size, patch)]["test"], sources["test"][1])
        truth = dict(truth_by_view[(size, patch)])
        tuned = config.mode == "finetune"
        if tuned:  # the encoder learns: its inputs are the images
            forward, desc = (lambda p, x: x), "images"
        else:
            forward = lambda p, x, model=encoder.model: model.apply({"params": p}, x, method=Pretrainer.patch_grid)
            desc = f"tokens {encoder.name}"
        inputs = {
            role: features.apply_to_split(
                forward,
                encoder.params,
                task.inputs(src, truth[role], encoder.config),
                encoder.config,
                config.batch_size,
                mesh,
                f"{desc} {where}",
            )
            for role, (src, where) in sources.items()
        }
        if "val" not in sources:  # carve 10% of the training patients out for early stopping
            carved = common.patient_fraction(truth["train"]["patients"], 0.1, config.seed, salt="validation")
            truth["val"], inputs["val"] = select(truth["train"], carved), inputs["train"][carved]
            truth["train"], inputs["train"] = select(truth["train"], ~carved), inputs["train"][~carved]
        patients = truth["train"]["patients"]
        decoder = decoder_for(settings.decoder, encoder.config.model.encoder)
        for fraction in config.label_fractions:
            seeds = statistics.seeds_for(
                config.seeds,
                fraction,
                int(common.patient_fraction(patients, fraction, config.seed).sum()),
                head_is_random=True,
            )
            runs = []
            for seed in range(config.seed, config.seed + seeds):  # a subset of the training patients, a head
                keep = common.patient_fraction(patients, fraction, seed)
                head_module = task.head(patch, settings, context, decoder)
                trained = (
                    dict(
                        module=finetune.model(encoder, head_module, config.finetune),
                        pretrained=finetune.pretrained(encoder),
                        optimizer=finetune.optimizer(
                            settings, config.finetune, training.steps_per_epoch(int(keep.sum()), settings, mesh)
                        ),
                    )
                    if tuned
                    else dict(module=head_module)
                )
                head = training.fit(
                    loss_fn=task.loss,
                    inputs=inputs["train"][keep],
                    targets=select(truth["train"], keep)["targets"],
                    val_inputs=inputs["val"],
                    val_targets=truth["val"]["targets"],
                    c=settings,
                    seed=seed,
                    desc=f"{encoder.name} {report.percent(fraction)} seed {seed}",
                    mesh=mesh,
                    **trained,
                )
                scores, predictions = task.score(head.outputs(inputs["test"]), truth["test"], patch, context)
                runs.append({"keep": keep, "head": head, "scores": scores, "predictions": predictions})
            statistic_by[(subject, fraction)] = {m: [r["scores"][m] for r in runs] for m in task.metrics}
            name_of[subject] = encoder.name
            if fraction == max(config.label_fractions):
                shown[encoder.name] = runs[0]["predictions"]
            keep, head = runs[0]["keep"], runs[0]["head"]
            row = {
                "name": encoder.name,
                "workdir": subject,
                "step": encoder.step,
                "label_fraction": fraction,
                "train_images": int(keep.sum()),
                "train_patients": len(set(patients[keep])),
                "test_images": len(truth["test"]["patients"]),
                "split": sources["test"][1],
                "task": task.name,
                "mode": config.mode,
                "head": {
                    "kind": task.head_labels[decoder],
                    "decoder": decoder,
                    "encoder": "fine-tuned" if tuned else "frozen",
                    "epoch": head.epoch,
                    "val_loss": head.val_loss,
                },
                "seeds": {
                    "count": seeds,
                    "first": config.seed,
                    "train_images": [int(r["keep"].sum()) for r in runs],
                    "epochs": [r["head"].epoch for r in runs],
                },
                **{
                    m: statistics.estimate(stats, truth["test"]["patients"], config.bootstrap, config.seed)
                    for m, stats in statistic_by[(subject, fraction)].items()
                },
            }
            results[task.name].append(row)
            value, (lo, hi) = row[task.metric]["mean"], row[task.metric]["ci95"]
            print(
                f"{encoder.name} (step {encoder.step}), {report.percent(fraction)} of the training {task.unit} = "
                f"{row['train_images']} of {row['train_patients']} patients, {row['head']['encoder']} encoder: "
                f"test {task.metric_label} {value:.4f} [{lo:.4f}, {hi:.4f}]"
                f"{report.seeds_note(row[task.metric].get('seeds', []))} ({row['test_images']} {task.unit}; best "
                f"epoch {head.epoch})",
                flush=True,
            )
    test = truth_by_view[(size, patch)]["test"]
    results["comparisons"] = common.compare_to_first(
        {key: by_metric[task.metric] for key, by_metric in statistic_by.items()}, name_of, test["patients"], config
    )
    results["notes"] = report.notes_of(encoders)
    report.save(output_dir, results, table(task, results))
    plot(
        task, sources["test"][0], test, shown, size, settings.plot_images, storage.join(output_dir, f"{task.name}.png")
    )
    return results


def table(task: DenseTask, results: dict) -> str:
    labels = [f"{label} [95% CI]" for label in task.metrics.values()]
    lines = [
        f"| checkpoint | step | training {task.unit} | head | " + " | ".join(labels) + f" | test {task.unit} |",
        "| --- " * (5 + len(labels)) + "|",
    ]
    for r in results[task.name]:
        cells = [
            report.interval(r[m]["mean"], r[m]["ci95"]) + report.seeds_note(r[m].get("seeds", [])) for m in task.metrics
        ]
        lines.append(
            f"| {r['name']} | {r['step']} | {report.percent(r['label_fraction'])} ({r['train_images']}) | "
            f"{r['head']['kind']}, {r['head']['encoder']} encoder | " + " | ".join(cells) + f" | {r['test_images']} |"
        )
    for c in results["comparisons"]:
        lines.append(
            f"\n{c['candidate']} vs {c['baseline']} ({report.percent(c['label_fraction'])} of the training "
            f"{task.unit}): {task.metric_label} difference "
            + report.difference(c["difference"], c["interval"], c["p_not_better"])
        )
    return "\n".join(lines) + "\n"


def plot(task: DenseTask, source, truth: Truth, shown: dict[str, Any], size: int, count: int, path: str) -> None:
    """A grid: one row per checkpoint, `count` test images, drawn by the task (truth red, prediction blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(truth["patients"]))
    if not shown or count == 0:
        return
    fig, axes = plt.subplots(len(shown), count, figsize=(1.8 * count, 1.9 * len(shown)), squeeze=False)
    for i in range(count):
        record = source[int(truth["records"][i])]
        image = transforms.center_crop_resize(transforms.decode_png(record["image"], 3), size) / 255.0
        for row, (name, predictions) in enumerate(shown.items()):
            ax = axes[row, i]
            ax.set_title(task.draw(ax, image, truth, predictions, i), fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"{task.name} on test {task.unit}: truth (red) and prediction (blue)", fontsize=9)
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=110)
    plt.close(fig)


def evaluator(task: DenseTask, rows: schema.Table, description: str) -> common.Evaluator:
    """The evaluator of a dense task: `run` on it, its config rows, the rule that it reads image encoders."""
    return common.Evaluator(
        name=task.name,
        run=lambda config, output_dir, mesh: run(task, config, output_dir, mesh),
        description=description,
        config_rows=rows,
        rules=(common.IMAGE_ENCODERS_ONLY,),
    )
