"""Segmentation downstream task (`--config.task=segmentation` of the evaluation binary), MGCA's protocol for
ViTs as M-FLAG reports it.

Each checkpoint's frozen encoder turns every image (centre crop at the run's size and normalisation) into its
last layer's patch-token grid; a SETR progressive-upsampling head (models/dense_heads.py) learns the mask from
a patient-sampled fraction of the training images with 10 x focal(gamma 2) - log(soft Dice), AdamW, and early
stopping on the validation loss; the epoch with the best validation loss is scored on the test split: per-image
Dice at threshold 0.5 (empty truth and empty prediction score 1), mean with a patient-bootstrap 95% interval,
and the paired difference against the first checkpoint. Writes results.json, results.md and segmentation.png
(true mask red, prediction blue, on test images).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from mvlp_jax import dense_metrics, features, report
from mvlp_jax.data import transforms
from mvlp_jax.models.dense_heads import ProgressiveUpsampling
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.models.vit import variant

FOCAL_WEIGHT, FOCAL_GAMMA = 10.0, 2.0


def open_masked_split(data_dir: str, dataset: str, split: str):
    """(random-access source, 'name:version/split') of a split whose records carry masks."""
    from data_prep import built

    builder, name, version = built.open_builder(data_dir, dataset)
    if "mask" not in builder.info.features:
        raise ValueError(f"dataset {name}:{version} has no masks: build it with data_prep.build_dataset "
                         f"--mask_column=... (csv source)")
    source = built.open_split(builder, split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {name}:{version} is empty")
    return source, f"{name}:{version}/{split}"


def read_masks(source, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool masks (N, size, size), cropped and resized as the images are, nearest-neighbour; patient ids)."""
    records = [source[i] for i in range(len(source))]
    masks = np.stack([transforms.center_crop_resize(transforms.decode_png(r["mask"]), size, Image.NEAREST)
                      for r in records]) > 0
    return masks, np.array([r["subject_id"].decode() for r in records])


def loss_fn(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """10 x focal(gamma 2) - log(soft Dice) over the batch (MGCA's segmentation loss)."""
    logits, t = logits.reshape(logits.shape[0], -1), masks.reshape(masks.shape[0], -1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, t)
    focal = jnp.mean((1.0 - jnp.exp(-bce)) ** FOCAL_GAMMA * bce)
    p = jax.nn.sigmoid(logits)
    dice = (2.0 * jnp.sum(p * t) + 1.0) / (jnp.sum(p) + jnp.sum(t) + 1.0)
    return FOCAL_WEIGHT * focal - jnp.log(dice)


class Head:
    """A trained decoder: its module and variables (params and BatchNorm statistics)."""

    def __init__(self, module: ProgressiveUpsampling, variables: dict, epoch: int, val_loss: float):
        self.module, self.variables, self.epoch, self.val_loss = module, variables, epoch, val_loss
        self._apply = jax.jit(lambda v, x: module.apply(v, x, train=False)[..., 0])

    def logits(self, tokens: np.ndarray, batch: int = 32) -> np.ndarray:
        return np.concatenate([np.asarray(self._apply(self.variables, jnp.asarray(tokens[i:i + batch])))
                               for i in range(0, len(tokens), batch)])


def fit(tokens: np.ndarray, masks: np.ndarray, val_tokens: np.ndarray, val_masks: np.ndarray, patch_size: int,
        c: ml_collections.ConfigDict, seed: int, desc: str) -> Head:
    """Trains the head on (tokens, masks); returns it at the epoch of the lowest validation loss."""
    module = ProgressiveUpsampling(patch_size=patch_size, channels=tuple(c.channels))
    variables = module.init(jax.random.PRNGKey(seed), jnp.asarray(tokens[:1]))
    tx = optax.adamw(c.lr, weight_decay=c.weight_decay)
    opt_state = tx.init(variables["params"])
    batch = min(c.batch_size, len(tokens))

    @jax.jit
    def step(variables: dict, opt_state: Any, x: jax.Array, y: jax.Array):
        def loss(params):
            out, updated = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return loss_fn(out[..., 0], y), updated
        (value, updated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), **updated}, opt_state, value

    evaluate = jax.jit(lambda v, x, y: loss_fn(module.apply(v, x, train=False)[..., 0], y))
    val_loss = lambda v: float(np.mean([evaluate(v, jnp.asarray(val_tokens[i:i + batch]),
                                                 jnp.asarray(val_masks[i:i + batch]))
                                        for i in range(0, len(val_tokens), batch)]))
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(tokens) // batch)
    best, since_best = Head(module, variables, 0, np.inf), 0
    bar = tqdm(range(1, c.epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in bar:
        order = np.concatenate([rng.permutation(len(tokens)) for _ in range(2)])  # full batches, every image
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            variables, opt_state, _ = step(variables, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(masks[idx]))
        loss = val_loss(variables)
        if loss < best.val_loss:
            best, since_best = Head(module, variables, epoch, loss), 0
        else:
            since_best += 1
        bar.set_postfix(val_loss=f"{loss:.4f}", best=f"{best.val_loss:.4f} at {best.epoch}")
        if since_best >= c.patience:
            break
    return best


def evaluate_subjects(config: ml_collections.ConfigDict, output_dir: str, mesh: jax.sharding.Mesh,
                      subjects: list[str]) -> dict:
    from mvlp_jax.evaluate import patient_fraction

    roles = ("train", "val", "test") if config.val_split else ("train", "test")
    sources = {role: open_masked_split(config.data_dir, config.dataset, config[f"{role}_split"]) for role in roles}
    like = next((w for w in subjects if w != features.RANDOM_INIT), config.random_init_like)
    results: dict[str, Any] = {"config": config.to_dict(), "segmentation": [], "comparisons": []}
    dice_by: dict[tuple[str, float], np.ndarray] = {}
    shown: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    masks_by_size: dict[int, dict] = {}
    for subject in subjects:
        encoder = features.load_encoder(subject, config.step, mesh, like, teacher=config.teacher and
                                        subject != features.RANDOM_INIT)
        size, patch = encoder.config.model.image_size, variant(encoder.config.model.variant)["patch_size"]
        if size not in masks_by_size:
            masks_by_size[size] = {role: read_masks(src, size) for role, (src, _) in sources.items()}
        masks = masks_by_size[size]
        forward = lambda p, x: encoder.model.apply({"params": p}, x, method=Pretrainer.patch_grid)
        tokens = {role: features.apply_to_split(forward, encoder.params, src, encoder.config, config.batch_size,
                                                mesh, f"tokens {encoder.name} {where}")
                  for role, (src, where) in sources.items()}
        train_tokens, (train_masks, train_patients) = tokens["train"], masks["train"]
        if "val" in sources:
            val_tokens, val_masks = tokens["val"], masks["val"][0]
        else:  # carve 10% of the training patients out for early stopping
            carved = patient_fraction(train_patients, 0.1, config.seed, salt="validation")
            val_tokens, val_masks = train_tokens[carved], train_masks[carved]
            train_tokens, train_masks, train_patients = (train_tokens[~carved], train_masks[~carved],
                                                         train_patients[~carved])
        test_masks = masks["test"][0]
        for fraction in config.label_fractions:
            keep = patient_fraction(train_patients, fraction, config.seed)
            head = fit(train_tokens[keep], train_masks[keep], val_tokens, val_masks, patch, config.segmentation,
                       config.seed, f"{encoder.name} {report.percent(fraction)}")
            predicted = head.logits(tokens["test"]) > 0.0
            dice = dense_metrics.dice_per_image(predicted, test_masks)
            test_patients = masks["test"][1]
            dice_by[(encoder.name, fraction)] = dice
            if fraction == max(config.label_fractions):
                shown[encoder.name] = predicted
            row = {"name": encoder.name, "workdir": subject, "step": encoder.step, "label_fraction": fraction,
                   "train_images": int(keep.sum()), "train_patients": len(set(train_patients[keep])),
                   "test_images": len(dice), "split": sources["test"][1], "task": "segmentation",
                   "head": {"epoch": head.epoch, "val_loss": head.val_loss},
                   "dice": dense_metrics.mean_with_interval(dice, test_patients, config.bootstrap, config.seed)}
            results["segmentation"].append(row)
            lo, hi = row["dice"]["ci95"]
            print(f"{encoder.name} (step {encoder.step}), {report.percent(fraction)} of the masks = "
                  f"{row['train_images']} images of {row['train_patients']} patients: test Dice "
                  f"{row['dice']['mean']:.4f} [{lo:.4f}, {hi:.4f}] ({len(dice)} images; best epoch {head.epoch})",
                  flush=True)
    first = results["segmentation"][0]["name"]
    for (name, fraction), dice in dice_by.items():
        if name != first:
            results["comparisons"].append({"baseline": first, "candidate": name, "label_fraction": fraction,
                                           **dense_metrics.paired_difference(dice_by[(first, fraction)], dice,
                                                                             masks["test"][1], config.bootstrap,
                                                                             config.seed)})
    report.save(output_dir, results, table(results))
    plot(sources["test"][0], masks["test"][0], shown, size, config.segmentation.plot_images,
         os.path.join(output_dir, "segmentation.png"))
    return results


def table(results: dict) -> str:
    lines = ["| checkpoint | step | masks | head | Dice [95% CI] | test images |", "| --- " * 6 + "|"]
    for r in results["segmentation"]:
        lo, hi = r["dice"]["ci95"]
        lines.append(f"| {r['name']} | {r['step']} | {report.percent(r['label_fraction'])} ({r['train_images']} "
                     f"images) | SETR-PUP, frozen encoder | {r['dice']['mean']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{r['test_images']} |")
    for c in results["comparisons"]:
        lo, hi = c["interval"]
        lines.append(f"\n{c['candidate']} vs {c['baseline']} ({report.percent(c['label_fraction'])} masks): Dice "
                     f"difference {c['difference']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], "
                     f"P(not better) = {c['p_not_better']:.3f}")
    return "\n".join(lines) + "\n"


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def plot(source, truth: np.ndarray, predicted: dict[str, np.ndarray], size: int, count: int, path: str) -> None:
    """A grid: one row per checkpoint, `count` test images; true mask outline red, prediction outline blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(truth))
    if not predicted or count == 0:
        return
    fig, axes = plt.subplots(len(predicted), count, figsize=(1.8 * count, 1.9 * len(predicted)), squeeze=False)
    for i in range(count):
        gray = transforms.center_crop_resize(transforms.decode_png(source[i]["image"]), size) / 255.0
        for row, (name, masks) in enumerate(predicted.items()):
            rgb = np.repeat(gray[..., None], 3, axis=-1)
            rgb[_outline(truth[i])] = (1.0, 0.1, 0.1)
            rgb[_outline(masks[i])] = (0.2, 0.4, 1.0)
            ax = axes[row, i]
            ax.imshow(rgb)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"Dice {dense_metrics.dice_per_image(masks[i:i + 1], truth[i:i + 1])[0]:.2f}", fontsize=7)
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("test images: true mask (red) and prediction (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
