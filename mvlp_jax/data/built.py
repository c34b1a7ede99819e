"""Opening a dataset written by data_prep.build_dataset (`{data_dir}/{name}/{version}/`)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mvlp_jax.runtime import storage


def open_builder(data_dir: str, dataset: str) -> tuple[Any, str, str]:
    """'name' or 'name:version' -> (tfds builder, name, version); the newest version when none is given."""
    import tensorflow_datasets as tfds

    name, _, version = dataset.partition(":")
    root = storage.check_exists(
        storage.join(data_dir, name),
        "dataset",
        f"dataset {name!r} not found under data dir {data_dir!r} (build it with python -m data_prep.build_dataset)",
    )
    versions = sorted(v.name for v in root.iterdir() if (v / "dataset_info.json").exists())
    if not versions or (version and version not in versions):
        raise FileNotFoundError(
            f"dataset {name!r} has no complete version {version or ''} under {root} (found {versions})"
        )
    version = version or versions[-1]
    return tfds.builder_from_directory(os.fspath(root / version)), name, version


def channels(builder: Any) -> int:
    """Channels of the dataset's stored images (1 grayscale, 3 colour)."""
    return int(builder.info.features["image"].shape[-1])


def open_split(builder: Any, split: str, decode_images: bool = False) -> Any:
    """Random-access source of one split; images (and masks) stay PNG bytes unless `decode_images`."""
    import tensorflow_datasets as tfds

    available = list(builder.info.splits)
    if split not in available:
        raise ValueError(f"dataset {builder.info.name} has no split {split!r}; it has {available}")
    decoders = (
        None
        if decode_images
        else {key: tfds.decode.SkipDecoding() for key in ("image", "mask") if key in builder.info.features}
    )
    return builder.as_data_source(split, decoders=decoders)


def fingerprint(builder: Any, splits: list[str] | None = None) -> dict:
    """What a built dataset's splits hold, without reading them: per split the record count and each shard's
    length and the bytes written, as dataset_info.json records them, and a sha256 of those and the features. A
    rebuild that moves images between splits, adds or drops records or rewrites reports changes it; an identical
    rebuild (builds are deterministic) does not."""
    info = builder.info
    chosen = sorted(splits or info.splits)
    per_split = {
        s: {
            "examples": int(info.splits[s].num_examples),
            "shards": [int(n) for n in info.splits[s].shard_lengths],
            "bytes": int(info.splits[s].num_bytes),
        }
        for s in chosen
    }
    identity = {"name": info.name, "version": str(info.version), "splits": per_split, "features": repr(info.features)}
    return {
        "dataset": f"{info.name}:{info.version}",
        "splits": per_split,
        "sha256": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
    }


def describe_change(before: dict, after: dict) -> str:
    """How two fingerprints of a dataset differ, in words."""
    changes = [
        f"{split} {before['splits'].get(split, {}).get('examples', 0)} -> "
        f"{after['splits'].get(split, {}).get('examples', 0)} records"
        for split in sorted(set(before["splits"]) | set(after["splits"]))
        if before["splits"].get(split) != after["splits"].get(split)
    ]
    return ", ".join(changes) or "its features changed"
