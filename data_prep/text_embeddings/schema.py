"""Embedding record schema (version 1) and the reader the training pipeline uses.

One ArrayRecord record per study: a msgpack map
  {"study_id": str, "mean": bytes, "last": bytes, "dim": int, "dtype": str,
   ["tokens": bytes (num_tokens x dim), "num_tokens": int]}
`mean` is the masked mean of the chosen layer's hidden states over the report's tokens, `last` the
state of its last real token; vectors are stored little-endian in `dtype` (default float16).
Shards are `embeddings-SSSSS-of-NNNNN.array_record`; `manifest.json` describes them.
"""
from __future__ import annotations

import glob
import json
import os
import re

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

SCHEMA_VERSION = 1
SHARD_PATTERN = "embeddings-{index:05d}-of-{count:05d}.array_record"
_SHARD_RE = re.compile(r"embeddings-(\d{5})-of-(\d{5})\.array_record$")


def encode(study_id: str, mean: np.ndarray, last: np.ndarray, dtype: str,
           tokens: np.ndarray | None = None) -> bytes:
    record = {"study_id": study_id, "dim": int(mean.shape[-1]), "dtype": dtype,
              "mean": mean.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
              "last": last.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()}
    if tokens is not None:
        record["tokens"] = tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        record["num_tokens"] = int(tokens.shape[0])
    return msgpack.packb(record)


def decode(data: bytes) -> dict:
    record = msgpack.unpackb(data)
    dtype = np.dtype(record["dtype"]).newbyteorder("<")
    out = {"study_id": record["study_id"],
           "mean": np.frombuffer(record["mean"], dtype).astype(record["dtype"]),
           "last": np.frombuffer(record["last"], dtype).astype(record["dtype"])}
    if "tokens" in record:
        out["tokens"] = np.frombuffer(record["tokens"], dtype).astype(record["dtype"]).reshape(
            record["num_tokens"], record["dim"])
    return out


def write_shard(path: str, records: list[bytes]) -> None:
    """Writes to a temporary name and renames, so a shard on disk under its final name is complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    os.replace(tmp, path)


def shard_paths(output_dir: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(output_dir, "embeddings-*.array_record")) if _SHARD_RE.search(p))


def read_shard(path: str) -> list[dict]:
    reader = ArrayRecordReader(path)
    try:
        return [decode(r) for r in reader.read_all()]
    finally:
        reader.close()


def read_manifest(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "manifest.json")) as f:
        return json.load(f)


class EmbeddingIndex:
    """Random access to the stored vectors by study id (index built once at start-up)."""

    def __init__(self, output_dir: str):
        self.manifest = read_manifest(output_dir)
        self._readers = [ArrayRecordReader(p) for p in shard_paths(output_dir)]
        self._where: dict[str, tuple[int, int]] = {}
        for s, reader in enumerate(self._readers):
            for i, record in enumerate(reader.read_all()):
                self._where[msgpack.unpackb(record)["study_id"]] = (s, i)

    def __contains__(self, study_id: str) -> bool:
        return study_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, study_id: str) -> dict:
        shard, index = self._where[study_id]
        return decode(self._readers[shard].read([index])[0])
