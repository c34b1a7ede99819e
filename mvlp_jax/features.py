"""Frozen features of a labelled split: restore an encoder (or a random one), run it once, cache."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import grain
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from data_prep import built
from mvlp_jax import checkpointing, configuration, optim, sharding, train_step
from mvlp_jax.data import transforms
from mvlp_jax.models.pretrainer import Pretrainer

RANDOM_INIT = "random_init"


@dataclass
class Encoder:
    name: str
    config: ml_collections.ConfigDict
    model: Pretrainer
    params: dict
    step: int


def display_name(workdir: str) -> str:
    return RANDOM_INIT if workdir == RANDOM_INIT else os.path.basename(os.path.normpath(workdir))


def load_encoder(workdir: str, step: int, mesh: jax.sharding.Mesh, like: str = "") -> Encoder:
    """The params of `workdir`'s checkpoint `step` (-1: newest), without the optimizer state, on `mesh`.
    `random_init` gives the architecture of `like` (a workdir) at its initialisation: the floor."""
    source = like if workdir == RANDOM_INIT else workdir
    if not source:
        raise ValueError("random_init needs an architecture: list a real workdir too, or set config.random_init_like")
    config, target_dim = configuration.load(source)
    config.mesh.data, config.mesh.fsdp, config.mesh.model = -1, 1, 1
    model, tx = Pretrainer(config, target_dim), optim.make(config)
    init, abstract, state_sh = train_step.state_layout(model, tx, config, mesh)
    if workdir == RANDOM_INIT:
        with sharding.active(mesh):
            params = jax.jit(lambda k: init(k).params, out_shardings=state_sh.params)(jax.random.PRNGKey(config.seed))
        return Encoder(RANDOM_INIT, config, model, params, 0)
    mngr = checkpointing.manager(workdir, config)
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"{workdir} has no checkpoints (looked in {workdir}/checkpoints)")
    try:
        state, _ = checkpointing.restore_latest(mngr, abstract, state_sh, None if step < 0 else step)
    except (ValueError, KeyError) as error:
        raise ValueError(f"{workdir}: its checkpoint does not match the model in its config.json: {error}") from error
    finally:
        mngr.close()
    return Encoder(display_name(workdir), config, model, state.params, int(state.step))


def labelled_split(data_dir: str, dataset: str, split: str):
    builder, name, version = built.open_builder(data_dir, dataset)
    source = built.open_split(builder, split)
    names = list(builder.info.metadata.get("label_names", [])) if builder.info.metadata else []
    if not names:
        raise ValueError(f"dataset {name}:{version} has no labels (label_names is empty in its metadata)")
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {name}:{version} is empty")
    return source, names, f"{name}:{version}/{split}"


def read_labels(source) -> tuple[np.ndarray, np.ndarray]:
    """(labels int8 (N, L) coded 1/0/-1/-2, patient ids (N,)) without decoding images."""
    rows = [source[i] for i in range(len(source))]
    return (np.stack([r["labels"] for r in rows]).astype(np.int8),
            np.array([r["subject_id"].decode() for r in rows]))


def extract(encoder: Encoder, source, pooling: str, batch_size: int, mesh: jax.sharding.Mesh,
            cache_dir: str, where: str) -> np.ndarray:
    """(N, D) float32 features of every record (centre crop, the training normalisation), cached on disk."""
    c = encoder.config
    key = hashlib.sha256(json.dumps([encoder.name, encoder.step, where, pooling, c.model.image_size, c.model.variant,
                                     os.path.abspath(cache_dir)]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{encoder.name}-{encoder.step}-{pooling}-{key}.npy")
    if encoder.name != RANDOM_INIT and os.path.exists(path):
        return np.load(path)
    size, mean, std = c.model.image_size, c.data.mean, c.data.std
    per_device = -(-batch_size // mesh.devices.size)
    batch = per_device * mesh.devices.size
    prep = lambda r: transforms.normalise(transforms.center_crop_resize(transforms.decode_png(r["image"]), size),
                                          mean, std)
    n = len(source)
    padded = grain.MapDataset.range(-(-n // batch) * batch).map(lambda i: prep(source[min(i, n - 1)])).batch(batch)
    forward = jax.jit(lambda p, x: encoder.model.apply({"params": p}, x, pooling, method=Pretrainer.features),
                      in_shardings=(None, sharding.batch_sharding(mesh, 4)), out_shardings=sharding.replicated(mesh))
    out = []
    iterator = padded.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    with sharding.active(mesh):
        for images in tqdm(iterator, total=len(padded), desc=f"features {encoder.name} {where}", unit="batch"):
            out.append(np.asarray(forward(encoder.params, jax.device_put(images, sharding.batch_sharding(mesh, 4)))))
    features = np.concatenate(out)[:n]
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, features)
    return features
