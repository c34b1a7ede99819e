"""Small CSV helpers shared by the sources: (gzipped) CSV reading with required-column checks."""

from __future__ import annotations

import csv
import gzip
import io
import os

from mvlp_jax.data.records import InputError


def read_csv(path: str, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Reads a CSV (plain or .gz) into dict rows; InputError names a missing file or column."""
    if not os.path.exists(path):
        raise InputError(f"required file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing required column(s) {missing}; has {reader.fieldnames}")
            return list(reader)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded): save it as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 IN > OUT, and rerun"
        ) from error


def read_text(data: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
