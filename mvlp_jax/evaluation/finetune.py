"""Fine-tuning probe: the whole encoder and a linear head trained on the labels, layer-wise lr decay.

The MAE/BEiT recipe: the head and the final norm learn at the full rate, block i of L at
`layer_decay ** (L - i)` of it, the patch embedding at `layer_decay ** (L + 1)`; everything pretraining
trained that features do not use (decoder, projections) is frozen. AdamW with warmup and cosine decay,
the pretraining augmentation, masked BCE; the epoch with the best validation mAUC is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mvlp_jax.data import views
from mvlp_jax.evaluation import metrics
from mvlp_jax.evaluation.features import Encoder, apply_to_split
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives.spec import image_shape
from mvlp_jax.pretrain import optim
from mvlp_jax.runtime import sharding

TRAINED = ("encoder", "pool")  # the Pretrainer subtrees fine-tuning updates (besides the new head)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def layer_scales(params: Any, depth: int, decay: float) -> Any:
    """Per-parameter lr multipliers of a Pretrainer's params: decay ** (depth + 1 - layer_id), 0 for frozen
    subtrees. Layer ids: 0 the embedding (and CLS / mask tokens), i + 1 block i, depth + 1 the final norm and
    the pooling (and the probe's head, outside these params). A scanned
    stack (leading layer axis) gets one multiplier per layer, broadcast over the rest."""

    def scale(path, leaf):
        keys = [_key(p) for p in path]
        if keys[0] not in TRAINED:
            return jnp.zeros((), jnp.float32)
        layer = depth + 1
        if keys[0] == "encoder":
            inner = keys[2] if keys[1] == "encoder" and len(keys) > 2 else ""
            if inner.startswith("block_"):
                layer = int(inner.split("_")[1]) + 1
            elif inner == "blocks":
                ids = jnp.arange(1, depth + 1, dtype=jnp.float32).reshape((depth,) + (1,) * (leaf.ndim - 1))
                return decay ** (depth + 1 - ids)
            elif keys[1] != "encoder":
                layer = 0
        return jnp.asarray(decay ** (depth + 1 - layer), jnp.float32)

    return jax.tree_util.tree_map_with_path(scale, params)


class _Empty(NamedTuple):
    pass


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its entry of `scales` (a scalar or a broadcastable array per leaf)."""
    return optax.GradientTransformation(
        lambda params: _Empty(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state),
    )


@dataclass
class FineTuned:
    params: Any
    epoch: int
    val_mauc: float
    lr: float


class _Labelled(grain.transforms.RandomMap):
    """Augmented image + (targets, mask) of a training case, by stream position."""

    def __init__(self, source, indices: np.ndarray, config, y: np.ndarray, m: np.ndarray):
        self.source, self.indices, self.config, self.y, self.m = source, indices, config, y, m

    def random_map(self, position: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = views.training_image(
            views.ViewInputs.of(self.source[int(self.indices[position])]["image"], self.config, rng)
        )
        return {"image": image, "y": self.y[position], "m": self.m[position]}


def _predictor(model: Pretrainer, pooling: str):
    def logits(params, images, train=False, rng=None):
        feats = model.apply(
            {"params": params["model"]},
            images,
            pooling,
            train,
            rngs={"dropout": rng} if train else {},
            method=Pretrainer.features,
        )
        return feats @ params["head"]["w"] + params["head"]["b"]

    return logits


def predict(
    encoder: Encoder, fitted: FineTuned, source, pooling: str, batch_size: int, mesh: jax.sharding.Mesh, desc: str
) -> np.ndarray:
    """Probabilities (N, labels) of the fine-tuned network on every record of `source`."""
    logits = _predictor(encoder.model, pooling)
    return apply_to_split(
        lambda p, x: jax.nn.sigmoid(logits(p, x)), fitted.params, source, encoder.config, batch_size, mesh, desc
    )


def fit(
    encoder: Encoder,
    source,
    indices: np.ndarray,
    y: np.ndarray,
    m: np.ndarray,
    val_source,
    val_y: np.ndarray,
    val_m: np.ndarray,
    pooling: str,
    settings: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    seed: int,
) -> FineTuned:
    """Fine-tunes `encoder` on records `indices` of `source` (targets y, mask m: (len(indices), labels))."""
    f = settings
    devices = mesh.devices.size
    batch = max(devices, min(f.batch_size, len(indices)) // devices * devices)
    steps_per_epoch = max(1, len(indices) // batch)
    total = f.epochs * steps_per_epoch
    lr = f.lr * batch / 256
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(f.warmup_epochs * steps_per_epoch, total - 1), max(total, 2)
    )
    feature_dim = jax.eval_shape(
        lambda p, x: encoder.model.apply({"params": p}, x, pooling, method=Pretrainer.features),
        encoder.params,
        jnp.zeros((1, *image_shape(encoder.config)[0])),
    ).shape[-1]
    rep = sharding.replicated(mesh)
    params = {
        "model": encoder.params,
        "head": {
            "w": jax.device_put(jnp.zeros((feature_dim, y.shape[1])), rep),
            "b": jax.device_put(jnp.zeros((y.shape[1],)), rep),
        },
    }
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=f.weight_decay, mask=optim.decay_mask),
        scale_by_tree(
            {
                "model": layer_scales(encoder.params, depth(encoder.params), f.layer_decay),
                "head": jax.tree.map(lambda _: jnp.ones(()), params["head"]),
            }
        ),
    )
    model = Pretrainer(with_drop_path(encoder.config, f.drop_path), encoder.model.target_dim)
    logits = _predictor(model, pooling)

    def loss_fn(p, images, targets, mask, rng):
        losses = optax.sigmoid_binary_cross_entropy(logits(p, images, True, rng), targets)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    batch_sh = sharding.batch_sharding(mesh, 4)
    rows_sh = sharding.batch_sharding(mesh, 2)

    @jax.jit
    def step(p, opt_state, images, targets, mask, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, targets, mask, rng)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    stream = (
        grain.MapDataset.range(len(indices))
        .shuffle(seed=seed)
        .repeat(None)
        .random_map(
            _Labelled(source, np.asarray(indices), encoder.config, y.astype(np.float32), m.astype(np.float32)),
            seed=seed,
        )
        .batch(batch, drop_remainder=True)
    )
    iterator = iter(stream[:total].to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    with sharding.active(mesh):
        opt_state = jax.jit(tx.init)(params)
        best, since_best = FineTuned(params, 0, -1.0, lr), 0
        key = jax.random.PRNGKey(seed)
        for epoch in range(1, f.epochs + 1):
            for s in tqdm(
                range(steps_per_epoch),
                desc=f"fine-tuning {encoder.name} epoch {epoch}/{f.epochs}",
                unit="step",
                leave=False,
            ):
                b = next(iterator)
                params, opt_state, loss = step(
                    params,
                    opt_state,
                    jax.device_put(b["image"], batch_sh),
                    jax.device_put(b["y"], rows_sh),
                    jax.device_put(b["m"], rows_sh),
                    jax.random.fold_in(key, (epoch - 1) * steps_per_epoch + s),
                )
            val = metrics.mean_auc(
                val_y,
                predict(
                    encoder, FineTuned(params, epoch, 0.0, lr), val_source, pooling, f.batch_size, mesh, "validation"
                ),
                val_m.astype(bool),
            )
            val = float(np.nan_to_num(val, nan=0.0))
            print(
                f"fine-tuning {encoder.name}: epoch {epoch}, train loss {float(loss):.4f}, validation mAUC {val:.4f}",
                flush=True,
            )
            if val > best.val_mauc:
                best, since_best = FineTuned(params, epoch, val, lr), 0
            else:
                since_best += 1
                if since_best >= f.patience:
                    break
    return best


def depth(params: Any) -> int:
    inner = params["encoder"]["encoder"]
    if "blocks" in inner:
        return int(jax.tree.leaves(inner["blocks"])[0].shape[0])
    return sum(k.startswith("block_") for k in inner)


def with_drop_path(config: ml_collections.ConfigDict, drop_path: float) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.drop_path = drop_path
    return config
