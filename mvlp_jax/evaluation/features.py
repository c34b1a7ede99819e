"""Frozen features of a labelled split: an encoder (pretrain/encoder.py) run once over it, cached on disk."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from mvlp_jax.data import built, studies, targets, views
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain.encoder import Encoder, display_names
from mvlp_jax.runtime import sharding, storage


def split_fingerprint(data_dir: str, dataset: str, split: str) -> str:
    """Identity of a built split: its folder, dataset_info.json and each of its files' size and mtime
    (a rebuilt dataset changes it without hashing gigabytes of images)."""
    builder, name, version = built.open_builder(data_dir, dataset)
    root = storage.canonical(storage.join(data_dir, name, version))
    digest = hashlib.sha256(root.encode())
    digest.update(storage.path(root).joinpath("dataset_info.json").read_bytes())
    for file, (size, version_of_file) in storage.file_versions(root).items():
        if f"-{split}." in file:
            digest.update(f"{file}:{size}:{version_of_file};".encode())
    return digest.hexdigest()


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
    return (np.stack([r["labels"] for r in rows]).astype(np.int8), np.array([r["subject_id"].decode() for r in rows]))


def extract(
    encoder: Encoder,
    source,
    pooling: str,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    cache_dir: str,
    where: str,
    data_fingerprint: str,
) -> np.ndarray:
    """(N, D) float32 features of every record (centre crop, the training normalisation), cached on disk.

    The cache key is what the features depend on: the parameters' fingerprint, the split's fingerprint
    and the preprocessing; a checkpoint retrained under the same name or step never reuses old features."""
    c = encoder.config
    identity = {
        "params": encoder.fingerprint,
        "data": data_fingerprint,
        "where": where,
        "pooling": pooling,
        "image_size": c.model.image_size,
        "mean": c.data.mean,
        "std": c.data.std,
        "records": len(source),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    safe_name = encoder.name.replace("/", "_")
    path = storage.path(cache_dir) / f"{safe_name}-{encoder.step}-{pooling}-{key}.npy"
    if encoder.fingerprint and path.exists():
        return np.load(io.BytesIO(path.read_bytes()))
    if isinstance(source, Studies):
        forward = lambda p, x: encoder.model.apply(
            {"params": p}, x["image"], x["view_type"], x["view_mask"], pooling, method=Pretrainer.study_features
        )
    else:
        forward = lambda p, x: encoder.model.apply({"params": p}, x, pooling, method=Pretrainer.features)
    features = apply_to_split(forward, encoder.params, source, c, batch_size, mesh, f"features {encoder.name} {where}")
    buffer = io.BytesIO()
    np.save(buffer, features)
    storage.write_bytes(path, buffer.getvalue())
    storage.write_json(path.with_suffix(".json"), {**identity, "checkpoint": encoder.source}, indent=2)
    return features


def apply_to_split(
    forward: Callable,
    params: Any,
    source,
    config: ml_collections.ConfigDict,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    desc: str,
) -> np.ndarray:
    """`forward(params, images)` over every record of `source` (centre crop at the model's size, the training
    normalisation), batch-sharded over all devices of `mesh`; float32 (N, ...) in record order. Over `Studies`,
    `forward(params, {"image", "view_type", "view_mask"})` (views.eval_study); over `Volumes`, `forward(params,
    volumes (B, depth, S, S, C))`."""
    per_device = -(-batch_size // mesh.devices.size)
    batch = per_device * mesh.devices.size

    def prep(r: dict) -> Any:
        if "views" in r:
            return views.eval_study(r["views"], r["view_types"], config)
        return views.eval_volume(r["slices"], config) if "slices" in r else views.eval_image(r["image"], config)

    n = len(source)
    padded = grain.MapDataset.range(-(-n // batch) * batch).map(lambda i: prep(source[min(i, n - 1)])).batch(batch)
    jitted = jax.jit(forward, out_shardings=sharding.replicated(mesh))
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    out = []
    iterator = padded.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    with sharding.active(mesh):
        for images in tqdm(iterator, total=len(padded), desc=desc, unit="batch"):
            out.append(np.asarray(jitted(params, jax.tree.map(put, images)), np.float32))
    return np.concatenate(out)[:n]


class Studies:
    """A split's studies as a source: item i is its first view's record (labels, subject and study ids) with
    "views" (the study's records, frontal first, at most `max_views`) and "view_types" (max_views,)."""

    def __init__(self, source, max_views: int):
        records = [source[i] for i in range(len(source))]
        self.source, self.max_views = source, max_views
        self.indices, self.types, self.ids = studies.group(
            [r["study_id"].decode() for r in records], [r["view"].decode() for r in records], max_views
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        views = [self.source[int(j)] for j in self.indices[i] if j >= 0]
        return {**views[0], "views": views, "view_types": self.types[i]}


class Volumes:
    """Windows of a split's series as a source: item i is {"slices": the PNGs of records `windows[i]` in order}."""

    def __init__(self, source, windows: np.ndarray):
        self.source, self.windows = source, np.asarray(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"slices": [self.source[int(j)]["image"] for j in self.windows[i]]}


class Subset:
    """Records `indices` of a random-access source, as a source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def text_name(embeddings_dir: str, pooling: str, label: str = "") -> str:
    return f"llm:{label or display_names([embeddings_dir])[embeddings_dir]}/{pooling}"


def load_text_table(embeddings_dir: str, pooling: str):
    return targets.load_targets(embeddings_dir, pooling)


def text_features(table, source, where: str) -> np.ndarray:
    """(N, hidden) float32: the stored LLM vector of each record's study (the text-side ceiling)."""
    rows = table.rows()
    study_ids = [source[i]["study_id"].decode() for i in range(len(source))]
    missing = sorted({s for s in study_ids if s not in rows})
    if missing:
        raise ValueError(
            f"{len(missing)} studies of {where} have no stored embedding, e.g. {', '.join(missing[:5])}; "
            f"embed the dataset with data_prep.precompute_text_embeddings --dataset=..."
        )
    return table.vectors[[rows[s] for s in study_ids]].astype(np.float32)
