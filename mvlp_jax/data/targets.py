"""LLM targets: the stored report vectors, loaded once and joined to training images by study id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mvlp_jax.data import built, embedding_shards
from mvlp_jax.runtime import storage


@dataclass(frozen=True)
class TargetTable:
    """Row i of `vectors` is the target of `study_ids[i]` (float16 or float32 as stored); its record is number
    `locations[i][1]` of shard `shards[locations[i][0]]` (where per-token states are read from)."""

    study_ids: tuple[str, ...]
    vectors: np.ndarray
    manifest: dict
    shards: tuple[str, ...] = ()
    locations: np.ndarray | None = None  # (studies, 2) int32: shard number, record number

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.study_ids)}


def check_manifest(manifest: dict, pooling: str, hidden_size: int = 0) -> None:
    """Fails before training when the stored embeddings do not fit the config."""
    version = manifest.get("schema_version", embedding_shards.SCHEMA_VERSION)
    if version != embedding_shards.SCHEMA_VERSION:
        raise ValueError(
            f"embedding schema version {version}; this code reads version {embedding_shards.SCHEMA_VERSION}"
        )
    stored = manifest.get("poolings", ["mean", "last"])
    if pooling not in stored:
        raise ValueError(f"config contrastive.target={pooling!r} but the embeddings hold {stored}")
    if hidden_size and manifest["hidden_size"] != hidden_size:
        raise ValueError(f"embeddings have hidden size {manifest['hidden_size']}, the config expects {hidden_size}")


def load_targets(embeddings_dir: str, pooling: str) -> TargetTable:
    """Reads every shard once: (num_studies, hidden) in the stored dtype (~1.9 GB for MIMIC at 4096, fp16)."""
    folder = storage.path(embeddings_dir)
    try:
        storage.check_exists(folder / "manifest.json", "embeddings dir")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"embeddings dir {embeddings_dir} holds no manifest.json"
            + ("" if folder.exists() else " (it does not exist)")
            + ": make it with python -m data_prep.precompute_text_embeddings "
            "--output_dir=... or fix config data.embeddings_dir"
        ) from None
    manifest = embedding_shards.read_manifest(embeddings_dir)
    check_manifest(manifest, pooling)
    paths = embedding_shards.shard_paths(embeddings_dir)
    if not paths:
        raise FileNotFoundError(f"no embedding shards in {embeddings_dir}")
    ids, vectors, locations = [], [], []
    for shard, path in enumerate(tqdm(paths, desc="loading LLM targets", unit="shard", disable=len(paths) < 4)):
        if embedding_shards.read_provenance(path) is not None and (problem := embedding_shards.shard_problem(path)):
            raise ValueError(
                f"embedding shard {path}: {problem}; rerun data_prep.precompute_text_embeddings with "
                f"the same flags to redo it (--verify names every such shard)"
            )
        for index, record in enumerate(embedding_shards.read_shard(path)):
            ids.append(record["study_id"])
            vectors.append(record[pooling])
            locations.append((shard, index))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{embeddings_dir}: a study appears in more than one record (run --verify)")
    return TargetTable(tuple(ids), np.stack(vectors), manifest, tuple(paths), np.asarray(locations, np.int32))


def check_source(manifest: dict, builder, embeddings_dir: str, allow_other: bool, allow_changed: bool) -> None:
    """The embeddings were made from the reports of this dataset, as it is now: study ids alone (often plain
    numbers) can match another source's, and a dataset rebuilt since would pair images with old reports."""
    dataset, version = builder.info.name, str(builder.info.version)
    source = manifest.get("source")
    if not source or allow_other:
        return
    if source.get("kind") != "dataset" or source.get("name") != dataset or source.get("version") != version:
        made_from = (
            f"dataset {source.get('name')}:{source.get('version')}"
            if source.get("kind") == "dataset"
            else f"{source.get('kind')} {source.get('path', '')}".strip()
        )
        raise ValueError(
            f"{embeddings_dir} was made from the reports of {made_from}, not of the training dataset "
            f"{dataset}:{version}; its study ids would pair images with another source's reports. Embed "
            f"this dataset (data_prep.precompute_text_embeddings --dataset={dataset}), or, if its study "
            f"ids really are this dataset's, set --config.data.embeddings_any_source=True"
        )
    embedded = manifest.get("source_fingerprint")
    if embedded and not allow_changed:
        now = built.fingerprint(builder, list(embedded["splits"]))
        if now["sha256"] != embedded["sha256"]:
            raise ValueError(
                f"{dataset}:{version} was rebuilt since {embeddings_dir} embedded its reports "
                f"({built.describe_change(embedded, now)}): the vectors may be of other reports. Rerun "
                f"data_prep.precompute_text_embeddings with the same flags (it redoes the shards whose "
                f"reports changed), or set --config.data.allow_changed_inputs=True"
            )


def join(
    study_ids: list[str],
    table: TargetTable,
    allow_missing: bool,
    where: str,
    role: str = "training",
    fix: str = "embed them with data_prep.precompute_text_embeddings or set "
    "--config.data.allow_missing_embeddings=True to drop them",
) -> np.ndarray:
    """Target row per image (-1 where missing and allowed); otherwise a clear error with the count, saying what
    the images are for (`role`) and what to do (`fix`)."""
    rows = table.rows()
    joined = np.array([rows.get(s, -1) for s in study_ids], np.int64)
    missing = [s for s, r in zip(study_ids, joined) if r < 0]
    if missing and not allow_missing:
        unique = list(dict.fromkeys(missing))
        raise ValueError(
            f"{len(missing)} {role} images of {where} ({len(unique)} studies) have no LLM embedding, "
            f"e.g. study {', '.join(repr(s) for s in unique[:5])}: {fix}"
        )
    return joined
