"""Opening a dataset written by data_prep.build_dataset (`{data_dir}/{name}/{version}/`)."""
from __future__ import annotations

import os
from typing import Any

from mvlp_jax import storage


def open_builder(data_dir: str, dataset: str) -> tuple[Any, str, str]:
    """'name' or 'name:version' -> (tfds builder, name, version); the newest version when none is given."""
    import tensorflow_datasets as tfds

    name, _, version = dataset.partition(":")
    root = storage.check_exists(storage.join(data_dir, name), "dataset",
                                f"dataset {name!r} not found under data dir {data_dir!r} (build it with python -m "
                                f"data_prep.build_dataset)")
    versions = sorted(v.name for v in root.iterdir() if (v / "dataset_info.json").exists())
    if not versions or (version and version not in versions):
        raise FileNotFoundError(f"dataset {name!r} has no complete version {version or ''} under {root} "
                                f"(found {versions})")
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
    decoders = None if decode_images else {key: tfds.decode.SkipDecoding() for key in ("image", "mask")
                                           if key in builder.info.features}
    return builder.as_data_source(split, decoders=decoders)
