"""Per-token LLM states of each study's report (the precompute job's --store_tokens), read record by record as
examples are made, never held in memory whole: at MIMIC-CXR scale they are ~100x the pooled vectors (see
`python -m launch.budget`). What objectives that align image regions with report words read."""

from __future__ import annotations

import numpy as np

from mvlp_jax.data import embedding_shards
from mvlp_jax.data.targets import TargetTable

ENTRIES = ("report_tokens", "report_token_mask")  # the batch entries: (L, hidden) float16 states, (L,) real tokens


def entries(length: int, hidden: int) -> dict[str, tuple[tuple[int, ...], type]]:
    return {"report_tokens": ((length, hidden), np.float16), "report_token_mask": ((length,), np.bool_)}


class ReportTokens:
    """A study's first `length` token states, zero-padded, and which of them are real (the table's rows)."""

    def __init__(self, table: TargetTable, length: int, needed_by: list[str], embeddings_dir: str):
        stored = table.manifest.get("poolings", ["mean", "last"])
        if "tokens" not in stored:
            raise ValueError(
                f"objectives {', '.join(needed_by)} read per-token report states, but {embeddings_dir} holds "
                f"{stored} only: rerun data_prep.precompute_text_embeddings with --store_tokens"
            )
        self.length, self.hidden = length, table.dim
        self.locations = table.locations
        self.reader = embedding_shards.RecordReader(table.shards)

    def record(self, row: int) -> dict:
        shard, index = self.locations[row]
        return self.reader.read(int(shard), int(index))

    def example(self, row: int) -> dict[str, np.ndarray]:
        states = self.record(row)["tokens"][: self.length]
        tokens = np.zeros((self.length, self.hidden), np.float16)
        tokens[: len(states)] = states
        return {"report_tokens": tokens, "report_token_mask": np.arange(self.length) < len(states)}

    def words(self, row: int) -> list[str]:
        """The first `length` tokens as text (records written before words were stored: their positions)."""
        record = self.record(row)
        count = min(len(record["tokens"]), self.length)
        return record.get("words", [f"#{i}" for i in range(count)])[:count]
