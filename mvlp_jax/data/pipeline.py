"""The training input pipeline: grain over a built dataset, joined to the LLM targets by study id.

Random access all the way: record order = a per-epoch index shuffle of the seed; augmentation = a
NumPy generator seeded by (seed, position in the stream). Process p of P reads local batch
`step * P + p` of the stream cut into local batches, so the global batch of a step is the same
records in the same order on 1 host or on P hosts, and resuming at step s only needs s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grain
import ml_collections
import numpy as np
from tqdm import tqdm

from mvlp_jax.data import built, report_tokens, studies, transforms, views
from mvlp_jax.data import targets as targets_lib
from mvlp_jax.objectives import combine, registry
from mvlp_jax.runtime import run_inputs


@dataclass
class TrainRecords:
    """What the pipeline reads: the split, the examples kept (images, or studies of several), their LLM target
    rows."""

    source: Any
    indices: np.ndarray  # kept record index into `source` per example ((E, max_views), -1 padded,
    # for studies)
    target_rows: np.ndarray | None  # row in `table.vectors` per example
    table: targets_lib.TargetTable | None
    where: str
    view_types: np.ndarray | None = None  # studies: (E, max_views) vit.VIEW_TYPES index per slot
    inputs: dict | None = None  # run_inputs.current: fingerprints of the split and the embeddings
    tokens: report_tokens.ReportTokens | None = None  # per-token report states, where an objective reads them
    volumes: bool = False  # `indices` (E, longest series) are the slices of volumes (model.encoder=vit3d)


def open_records(config: ml_collections.ConfigDict) -> TrainRecords:
    """Opens the split and, when an objective needs LLM targets, joins every image to its study's vector."""
    builder, name, version = built.open_builder(config.data.data_dir, config.data.dataset)
    source = built.open_split(builder, config.data.train_split)
    where = f"{name}:{version}/{config.data.train_split}"
    stored = built.channels(builder)
    if config.data.channels not in (0, stored):
        raise ValueError(
            f"config.data.channels={config.data.channels}, but {where} stores {stored}-channel images: "
            f"set 0 (take the dataset's) or rebuild the dataset with --channels={config.data.channels}"
        )
    config.data.channels = stored  # the encoder reads what the dataset stores; config.json records it
    if len(source) == 0:
        raise ValueError(f"{where} has no records")
    grouped = config.data.max_views > 1
    volumetric = config.model.encoder == "vit3d"
    if grouped or volumetric or registry.needs_targets(config):
        keys = [
            (r["study_id"].decode(), r["view"].decode(), studies.slice_key(r))
            for r in (
                source[i]
                for i in tqdm(range(len(source)), desc="reading study ids", unit="img", disable=len(source) < 10_000)
            )
        ]
        study_ids = [study for study, _, _ in keys]
    if volumetric:
        indices, short = studies.volumes(study_ids, [key for _, _, key in keys], config.model.volume_depth)
        if short:
            print(f"{where}: {short} series have fewer than {config.model.volume_depth} slices: left out", flush=True)
        if not len(indices):
            raise ValueError(
                f"{where} has no series of model.volume_depth={config.model.volume_depth} slices (a series is a "
                "study id: build the dataset with --study_column naming the series, or the patient)"
            )
        if registry.needs_targets(config):
            raise ValueError("model.encoder=vit3d reads no LLM targets yet")
        inputs = run_inputs.current(builder, config.data.train_split, "")
        return TrainRecords(source, indices, None, None, where, None, inputs, None, volumes=True)
    if grouped:
        most, blank = studies.largest(study_ids), sum(not s.strip() for s in study_ids)
        if blank:
            print(f"{where}: {blank} images have no study id: each is a study of its own", flush=True)
        if config.data.max_views > max(most, 2):  # padding slots cost memory and compute, and nothing fills them
            print(
                f"{where}: data.max_views={config.data.max_views}, but its largest study has {most} images: "
                f"clamped to {max(most, 2)}",
                flush=True,
            )
            config.data.max_views = max(most, 2)
        indices, view_types, study_ids = studies.group(study_ids, [view for _, view, _ in keys], config.data.max_views)
    else:
        indices, view_types = np.arange(len(source)), None
    if not registry.needs_targets(config):
        return TrainRecords(
            source, indices, None, None, where, view_types, run_inputs.current(builder, config.data.train_split, "")
        )
    if not config.data.embeddings_dir:
        needing = [spec.name for spec in registry.configured(config) if spec.needs_targets]
        raise ValueError(
            f"objectives {', '.join(needing)} need config.data.embeddings_dir "
            "(the output of data_prep.precompute_text_embeddings)"
        )
    table = targets_lib.load_targets(config.data.embeddings_dir, config.contrastive.target)
    targets_lib.check_source(
        table.manifest,
        builder,
        config.data.embeddings_dir,
        config.data.get("embeddings_any_source", False),
        config.data.allow_changed_inputs,
    )
    rows = targets_lib.join(study_ids, table, config.data.allow_missing_embeddings, where)
    keep = rows >= 0
    if not keep.any():
        raise ValueError(f"no image of {where} has an LLM embedding in {config.data.embeddings_dir}")
    length = registry.report_tokens(config)
    needing = [spec.name for spec in registry.configured(config) if spec.report_tokens is not None]
    return TrainRecords(
        source,
        indices[keep],
        rows[keep],
        table,
        where,
        None if view_types is None else view_types[keep],
        run_inputs.current(builder, config.data.train_split, config.data.embeddings_dir),
        report_tokens.ReportTokens(table, length, needing, config.data.embeddings_dir) if length else None,
    )


class Preprocess(grain.transforms.RandomMap):
    """(stream position, record) -> training example: the entries the objectives of its step read (`registry.entries`:
    the augmented image (S, S, channels) float32, the LLM target (D,), and each objective's own views). On a cyclic
    schedule only the step's objective's views are built; the others' entries are zeros of their shape, so
    every batch has one structure and the step one program."""

    def __init__(self, records: TrainRecords, config: ml_collections.ConfigDict, examples_per_step: int):
        self.records, self.config = records, config
        self.examples_per_step = examples_per_step  # stream positions per global step
        self.zeros = {k: np.zeros(shape, dtype) for k, (shape, dtype) in registry.entries(config).items()}

    def random_map(self, element: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """element: (position in the example stream, kept record number), as `local_batches` pairs them."""
        position, kept = element
        specs = registry.configured(self.config, combine.active(self.config, position // self.examples_per_step))
        example = dict(self.zeros)
        if self.records.volumes:
            example.update(image=self._volume(kept, rng))
        elif self.records.view_types is not None:
            example.update(self._study(kept, specs, rng))
        else:
            example.update(self._image(int(self.records.indices[kept]), specs, rng))
        if self.records.table is not None:
            row = self.records.target_rows[kept]
            example["target"] = self.records.table.vectors[row].astype(np.float32)
            if self.records.tokens is not None:
                example.update(self.records.tokens.example(row))
        return example

    def _image(self, index: int, specs: list, rng: np.random.Generator) -> dict[str, np.ndarray]:
        inputs = views.ViewInputs.of(self.records.source[index]["image"], self.config, rng)
        example = {}
        if any(spec.uses_image for spec in specs):
            example["image"] = views.training_image(inputs)
        for spec in specs:
            if spec.views is not None:
                example.update(spec.views(inputs))
        return example

    def _volume(self, kept: int, rng: np.random.Generator) -> np.ndarray:
        """`model.volume_depth` consecutive slices of the series from a random start, all cut by one random
        resized crop (a 3D crop) with one intensity jitter: (D, S, S, channels)."""
        series = self.records.indices[kept]
        length, depth = int((series >= 0).sum()), self.config.model.volume_depth
        start = int(rng.integers(0, length - depth + 1))
        inputs = [
            views.ViewInputs.of(self.records.source[int(i)]["image"], self.config, rng)
            for i in series[start : start + depth]
        ]
        box = transforms.random_resized_crop_box(*inputs[0].decoded.shape[:2], tuple(self.config.data.crop_scale), rng)
        size = self.config.model.image_size
        stack = np.stack([transforms.crop_resize(view.decoded, box, size) for view in inputs])
        return inputs[0].normalise(inputs[0].jitter(stack))

    def _study(self, kept: int, specs: list, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A study's augmented views (V, S, S, C), each with its own crop and jitter (padding slots are zeros),
        and the objectives' own views of the study."""
        records, types = self.records.indices[kept], self.records.view_types[kept]
        present = np.flatnonzero(records >= 0)
        inputs = [
            views.ViewInputs.of(self.records.source[int(records[slot])]["image"], self.config, rng) for slot in present
        ]
        example = {}
        if any(spec.uses_image for spec in specs):
            image = np.zeros(self.zeros["image"].shape, np.float32)
            for slot, view in zip(present, inputs):
                image[slot] = views.training_image(view)
            example.update(image=image, view_type=types, view_mask=records >= 0)
        for spec in specs:
            if spec.study_views is not None:
                example.update(spec.study_views(inputs, types[present]))
        return example


def _with_position(position: int, kept: int) -> tuple[int, int]:
    return position, kept


def local_batches(
    records: TrainRecords, config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> grain.MapDataset:
    """MapDataset whose element s is this process's share of global batch s (infinite, random access)."""
    if config.data.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by {process_count} processes")
    local = config.data.batch_size // process_count
    stream = (
        grain.MapDataset.range(len(records.indices))
        .shuffle(seed=config.seed)
        .repeat(None)
        .map_with_index(_with_position)
        .random_map(Preprocess(records, config, config.data.batch_size), seed=config.seed)
    )
    return stream.batch(local, drop_remainder=True)[process_index::process_count]


class TrainIterator:
    """Iterates local batches from `start_step` with prefetching threads/processes; state = next step."""

    def __init__(self, batches: grain.MapDataset, config: ml_collections.ConfigDict, start_step: int = 0):
        self._batches = batches
        self._config = config
        self.next_step = start_step
        self._iter = self._open(start_step)

    def _open(self, start: int) -> Iterator:
        dataset = self._batches[start:].to_iter_dataset(
            grain.ReadOptions(
                num_threads=self._config.data.num_threads,
                prefetch_buffer_size=max(self._config.data.prefetch, self._config.data.num_threads),
            )
        )
        if self._config.data.num_workers:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._config.data.num_workers))
        return iter(dataset)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self.next_step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_step": self.next_step, "seed": self._config.seed}

    def set_state(self, state: dict[str, int]) -> None:
        if state.get("seed", self._config.seed) != self._config.seed:
            raise ValueError(f"checkpointed data order has seed {state['seed']}, the config {self._config.seed}")
        self.next_step = int(state["next_step"])
        self._iter = self._open(self.next_step)
