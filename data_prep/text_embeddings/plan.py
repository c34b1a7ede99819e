"""Deterministic shard plan: studies sorted by id, cut into shards, shards dealt to workers.

Any worker computes the same plan from the same source, so N workers split the job without talking.
"""
from __future__ import annotations


def shards(study_ids: list[str], records_per_shard: int) -> list[list[str]]:
    ordered = sorted(study_ids)
    return [ordered[i:i + records_per_shard] for i in range(0, len(ordered), records_per_shard)] or [[]]


def worker_shards(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"--worker_index={worker_index} must be in [0, --num_workers={num_workers})")
    return [s for s in range(num_shards) if s % num_workers == worker_index]


def token_budget_batches(lengths: dict[str, int], budget: int, max_batch: int) -> list[list[str]]:
    """Longest first; a batch holds as many as fit `budget` padded tokens (dynamic padding)."""
    order = sorted(lengths, key=lambda s: (-lengths[s], s))
    batches, current = [], []
    for study in order:
        width = lengths[current[0]] if current else lengths[study]
        if current and (width * (len(current) + 1) > budget or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(study)
    if current:
        batches.append(current)
    return batches
