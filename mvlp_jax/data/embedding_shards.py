"""Embedding record schema (version 1) and the reader the training pipeline uses.

One ArrayRecord record per study: a msgpack map
  {"study_id": str, "mean": bytes, "last": bytes, "dim": int, "dtype": str,
   ["tokens": bytes (num_tokens x dim), "num_tokens": int, ["words": [str] (each token as text)]]}
`mean` is the masked mean of the chosen layer's hidden states over the report's tokens, `last` the
state of its last real token; vectors are stored little-endian in `dtype` (default float16).
Shards are `embeddings-SSSSS-of-NNNNN.array_record`; `manifest.json` describes them. Beside each shard,
`<shard>.json` records what it was made from (its study ids, the sha256 of their texts, the sha256 of the
settings) and its own size and sha256: a shard without it, or whose bytes or inputs differ, is not complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from mvlp_jax.runtime import storage

SCHEMA_VERSION = 1
SHARD_PATTERN = "embeddings-{index:05d}-of-{count:05d}.array_record"
_SHARD_RE = re.compile(r"embeddings-(\d{5})-of-(\d{5})\.array_record$")


def encode(
    study_id: str,
    mean: np.ndarray,
    last: np.ndarray,
    dtype: str,
    tokens: np.ndarray | None = None,
    words: list[str] | None = None,
) -> bytes:
    """One record; `words` (optional, with `tokens`) are the tokens as text, for pictures of what each one matched."""
    record = {
        "study_id": study_id,
        "dim": int(mean.shape[-1]),
        "dtype": dtype,
        "mean": mean.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
        "last": last.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
    }
    if tokens is not None:
        record["tokens"] = tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        record["num_tokens"] = int(tokens.shape[0])
        if words is not None:
            if len(words) != tokens.shape[0]:
                raise ValueError(f"study {study_id}: {len(words)} words for {tokens.shape[0]} token states")
            record["words"] = list(words)
    return msgpack.packb(record)


def decode(data: bytes) -> dict:
    record = msgpack.unpackb(data)
    dtype = np.dtype(record["dtype"]).newbyteorder("<")
    out = {
        "study_id": record["study_id"],
        "mean": np.frombuffer(record["mean"], dtype).astype(record["dtype"]),
        "last": np.frombuffer(record["last"], dtype).astype(record["dtype"]),
    }
    if "tokens" in record:
        out["tokens"] = (
            np.frombuffer(record["tokens"], dtype).astype(record["dtype"]).reshape(record["num_tokens"], record["dim"])
        )
    if "words" in record:
        out["words"] = record["words"]
    return out


def write_shard(path: str, records: list[bytes], provenance: dict | None = None) -> None:
    """Writes the shard to a local temporary file, then its provenance record (the shard's ids, inputs and
    settings hashes, with its size and sha256 added), then puts the shard in place (renamed, or uploaded whole
    to a gs:// folder): a shard under its final name has its record."""
    remote = storage.is_remote(path)
    tmp = os.path.join(tempfile.mkdtemp(prefix="mvlp-shard-"), "shard") if remote else f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    if provenance is not None:
        record = {**provenance, "records": len(records), "bytes": os.path.getsize(tmp), "sha256": storage.sha256(tmp)}
        storage.write_json(f"{path}.json", record)
    if remote:
        with open(tmp, "rb") as f:
            storage.write_bytes(path, f.read())
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)
    else:
        os.replace(tmp, path)


def inputs_sha256(study_ids: list[str], texts: dict[str, str]) -> str:
    """sha256 of the (study id, text) pairs a shard is made from."""
    return hashlib.sha256(json.dumps([[s, texts[s]] for s in study_ids]).encode()).hexdigest()


def settings_sha256(manifest: dict, keys: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def read_provenance(path: str) -> dict | None:
    try:
        return storage.read_json(f"{path}.json")
    except (OSError, ValueError):
        return None


def shard_problem(path: str, inputs: str | None = None, settings: str | None = None) -> str | None:
    """None when the shard at `path` is complete and (where given) made from these inputs and settings;
    otherwise why not, in words."""
    if not storage.path(path).exists():
        return "missing"
    record = read_provenance(path)
    if record is None:
        return "no provenance record beside it (written by an interrupted or older run)"
    size = storage.size(path)
    if size != record["bytes"]:
        return f"{size} bytes on disk, {record['bytes']} when written (cut short or overwritten)"
    if storage.sha256(path) != record["sha256"]:
        return "its bytes changed since it was written (sha256 differs)"
    if inputs is not None and record.get("inputs_sha256") != inputs:
        return "the reports it was made from have changed (other study ids or texts)"
    if settings is not None and record.get("settings_sha256") != settings:
        return "it was made with other settings"
    return None


def shard_paths(output_dir: str) -> list[str]:
    folder = storage.path(output_dir)
    found = folder.glob("embeddings-*.array_record") if folder.exists() else []
    return sorted(os.fspath(p) for p in found if _SHARD_RE.search(os.fspath(p)))


def shard_position(path: str) -> tuple[int, int]:
    """(index, count) from a shard's file name."""
    match = _SHARD_RE.search(path)
    return int(match.group(1)), int(match.group(2))


def read_shard(path: str) -> list[dict]:
    reader = None
    try:
        reader = ArrayRecordReader(path)
        return [decode(r) for r in reader.read_all()]
    except (RuntimeError, ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as error:
        raise ValueError(
            f"embedding shard {path} cannot be read ({str(error).splitlines()[0][:160]}): rerun "
            f"data_prep.precompute_text_embeddings with the same flags to redo it"
        ) from error
    finally:
        if reader is not None:
            reader.close()


def read_manifest(output_dir: str) -> dict:
    return storage.read_json(storage.join(output_dir, "manifest.json"))


class RecordReader:
    """Random access to stored records by (shard number, record number in the shard). Each thread, and each
    worker process it is pickled to, opens its own readers on first use."""

    def __init__(self, shards: Sequence[str]):
        self.shards = tuple(shards)
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"shards": self.shards}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shards"])

    def read(self, shard: int, index: int) -> dict:
        readers = self._local.__dict__.setdefault("readers", {})
        if shard not in readers:
            readers[shard] = ArrayRecordReader(self.shards[shard])
        return decode(readers[shard].read([index])[0])


FINGERPRINT_KEYS = (
    "model",
    "weights_sha256",
    "layer",
    "hidden_size",
    "poolings",
    "store_dtype",
    "max_tokens",
    "text_template",
)


def fingerprint(output_dir: str) -> dict:
    """What a set of embeddings is: the manifest's model, layer and settings, and each shard's sha256 as its
    provenance record holds it (written with the shard by the precompute job), else the shard's own digest
    (storage.file_digest: a full read of a local shard, the listing's MD5 of an object). Rebuilt embeddings (another
    layer, reports embedded again, shards rewritten by other tools) change it; the same shards moved to another
    folder do not, unless shards without a record move between a disk and a bucket (sha256 against MD5)."""
    manifest = read_manifest(output_dir)
    shards = {
        os.path.basename(p): (read_provenance(p) or {}).get("sha256") or storage.file_digest(p)
        for p in shard_paths(output_dir)
    }
    settings = {k: manifest.get(k) for k in FINGERPRINT_KEYS}
    digest = hashlib.sha256(json.dumps({"settings": settings, "shards": shards}, sort_keys=True).encode())
    return {**settings, "shards": len(shards), "sha256": digest.hexdigest()}
