"""The TFDS builder that writes every source as ArrayRecord shards with one feature schema.

Images are decoded and resized in a pool of spawned worker processes (PIL only) and arrive as PNG
bytes in the source's record order, so a build is deterministic whatever `num_workers` is.
"""

from __future__ import annotations

import multiprocessing
import time
import types
from collections import Counter
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from data_prep.images import decode_task, parse_window
from mvlp_jax.data import records as R

VERSION = R.BUILDER_VERSION
SCHEMA_NOTE = (
    "labels: int8[num_labels], 1 positive, 0 negative, -1 uncertain, -2 not mentioned; "
    "label names in metadata['label_names']"
)


def features(num_labels: int, annotations: tuple[str, ...] = (), channels: int = 1) -> tfds.features.FeaturesDict:
    """The record schema (images of 1 channel, or 3 for colour); datasets built with masks or boxes add `mask`
    (uint8 0/1, the image's size) or `boxes` (float32 [N, 4] x0, y0, x1, y1 in the stored image's pixels) with
    `box_labels` (N names); with slice positions, `slice_position` (float32, orders a series' slices)."""
    dense = {}
    if "mask" in annotations:
        dense["mask"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")
    if "boxes" in annotations:
        dense["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
        dense["box_labels"] = tfds.features.Sequence(tfds.features.Text())
    if "slice_position" in annotations:
        dense["slice_position"] = tfds.features.Scalar(dtype=np.float32)
    return tfds.features.FeaturesDict(
        {
            **dense,
            "image": tfds.features.Image(shape=(None, None, channels), dtype=np.uint8, encoding_format="png"),
            "image_id": tfds.features.Text(),
            "study_id": tfds.features.Text(),
            "subject_id": tfds.features.Text(),
            "view": tfds.features.Text(),
            "report": tfds.features.Text(),
            "findings": tfds.features.Text(),
            "impression": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.int8),
        }
    )


class ChestXrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a `SourceScan`; subclassed per dataset name by `builder_class`."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(
        self,
        *,
        scan: R.SourceScan,
        image_size: int,
        num_workers: int,
        decode_skips: R.SkipLog,
        channels: int = 1,
        window: str = "",
        intensity_offset: float = 0.0,
        mask_values: str = "auto",
        **kwargs,
    ):
        self._scan = scan
        self._image_size = image_size
        self._channels, self._window, self._mask_values = channels, window, mask_values
        self._offset = intensity_offset
        self.bit_depths: Counter = Counter()  # the source files' bits per sample -> images
        self.masks: dict[str, Counter] = {}  # split -> {"masks": n, "empty": n}
        self.mask_values: Counter = Counter()  # a non-zero stored mask value -> masks holding it
        self.box_fixes: Counter = Counter()  # boxes put in order, clipped or dropped (images.scale_boxes)
        self.saturated = 0  # images the window put (nearly) all at 0 or 255 (images.saturated)
        self._num_workers = num_workers
        self._decode_skips = decode_skips
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"{self._scan.description} {SCHEMA_NOTE}",
            features=features(len(self._scan.label_names), self._scan.annotations, self._channels),
            metadata=tfds.core.MetadataDict(
                label_names=list(self._scan.label_names),
                source=self._scan.source,
                source_version=self._scan.source_version,
                image_size=self._image_size,
                annotations=list(self._scan.annotations),
                channels=self._channels,
                bit_depth=8,
                window=self._window,
                windows=parse_window(self._window, self._offset).describe(),
                intensity_offset=self._offset,
                mask_values=self._mask_values,
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, recs) for split, recs in sorted(self._scan.splits().items())}

    def _generate_examples(self, split: str, recs: list[R.RawRecord]) -> Iterator[tuple[str, dict]]:
        tasks = [
            (
                i,
                rec.image_path,
                self._image_size,
                rec.mask_path,
                rec.boxes,
                self._channels,
                self._window,
                self._offset,
                self._mask_values,
            )
            for i, rec in enumerate(recs)
        ]
        annotations = self._scan.annotations
        bar = tqdm(total=len(tasks), desc=f"{self.name}/{split}", unit="img", dynamic_ncols=True)
        start = time.perf_counter()
        with _decoder_map(self._num_workers) as imap:
            for index, decoded, reason, error in imap(decode_task, tasks):
                bar.update(1)
                rec = recs[index]
                if reason == R.MASK_ENCODING:
                    raise R.InputError(error)
                if decoded is None:
                    self._decode_skips.skip(reason, rec.image_path, error)
                    continue
                self.bit_depths[decoded["bit_depth"]] += 1
                self.saturated += decoded["saturated"]
                dense = {}
                if "mask" in annotations:
                    dense["mask"] = decoded["mask"]
                    counts = self.masks.setdefault(split, Counter())
                    counts["masks"] += 1
                    counts["empty"] += decoded["mask_empty"]
                    self.mask_values.update(decoded["mask_values"])
                if "boxes" in annotations:
                    dense["boxes"] = decoded["boxes"]
                    dense["box_labels"] = [rec.box_labels[i] for i in decoded["box_kept"]]
                    self.box_fixes.update(decoded["box_fixes"])
                if "slice_position" in annotations:
                    dense["slice_position"] = np.float32(rec.slice_position)
                yield (
                    rec.image_id,
                    {
                        "image": decoded["image"],
                        "image_id": rec.image_id,
                        "study_id": rec.study_id,
                        "subject_id": rec.subject_id,
                        "view": rec.view,
                        "report": rec.report,
                        "findings": rec.findings,
                        "impression": rec.impression,
                        "labels": np.asarray(rec.labels, np.int8).reshape(len(self._scan.label_names)),
                        **dense,
                    },
                )
        bar.set_postfix_str(f"{len(tasks) / max(time.perf_counter() - start, 1e-9):.1f} img/s")
        bar.close()


class _decoder_map:
    """Context manager giving an ordered `imap`: in-process for 1 worker, a spawn pool otherwise."""

    def __init__(self, num_workers: int):
        self._pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 1 else None

    def __enter__(self):
        if self._pool is None:
            return map
        return lambda fn, items: self._pool.imap(fn, items, chunksize=4)

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


def builder_class(name: str) -> type[ChestXrayBuilder]:
    """A builder class whose TFDS name (and so folder name) is `name`."""
    return types.new_class(
        "".join(part.title() for part in name.split("_")),
        (ChestXrayBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(name=name, __module__=__name__),
    )
