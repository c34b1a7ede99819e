"""Deterministic shard plan: studies sorted by id, cut into shards, shards dealt to workers.

Any worker computes the same plan from the same source, so N workers split the job without talking.
"""

from __future__ import annotations


def shards(study_ids: list[str], records_per_shard: int) -> list[list[str]]:
    ordered = sorted(study_ids)
    return [ordered[i : i + records_per_shard] for i in range(0, len(ordered), records_per_shard)] or [[]]


def worker_shards(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"--worker_index={worker_index} must be in [0, --num_workers={num_workers})")
    return [s for s in range(num_shards) if s % num_workers == worker_index]


def token_budget_batches(
    lengths: dict[str, int], budget: int, max_batch: int, max_padding: float = 0.1
) -> list[list[str]]:
    """Longest first; a batch closes before it would exceed `budget` padded tokens, `max_batch` reports,
    or a padding fraction (pad tokens / padded tokens) of `max_padding` (dynamic padding)."""
    order = sorted(lengths, key=lambda s: (-lengths[s], s))
    batches, current, real = [], [], 0
    for study in order:
        if current:
            padded = lengths[current[0]] * (len(current) + 1)
            if padded > budget or len(current) >= max_batch or 1 - (real + lengths[study]) / padded > max_padding:
                batches.append(current)
                current, real = [], 0
        current.append(study)
        real += lengths[study]
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: dict[str, int], batches: list[list[str]]) -> float:
    """Pad tokens over padded tokens across `batches`."""
    padded = sum(max(lengths[s] for s in b) * len(b) for b in batches)
    return 1 - sum(lengths[s] for b in batches for s in b) / padded if padded else 0.0
