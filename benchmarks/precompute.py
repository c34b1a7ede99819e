"""Embedding-job throughput on real IU reports with SmolLM2: this job vs a naive padded loop.

  python -m benchmarks.precompute [--num_reports=96] [--batch=16]

Peer, in the same run: transformers, same model, same batch size, every batch padded to 512 tokens,
reports in input order. Ours: length-sorted token-budget batches with dynamic padding. Prints the
reports/s ratio last (target >= 2x) and our padding fraction (target < 10%).
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from data_prep.text_embeddings import plan
from mvlp_jax.models.frozen_lm import FrozenLM

IU_CSV = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "iu_xray_reports", "iuxray_chexpert_labels.csv"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", default=IU_CSV)
    parser.add_argument("--num_reports", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    texts: dict[str, str] = {}
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["report"].split())
            if text:
                texts.setdefault(row["subject_id"], text)
    ids = list(texts)[: args.num_reports]
    lm = FrozenLM("smollm2")

    start = time.perf_counter()
    for i in range(0, len(ids), args.batch):  # naive peer: input order, padded to 512
        batch = lm.tokenizer(
            [texts[s] for s in ids[i : i + args.batch]],
            padding="max_length",
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        with torch.inference_mode():
            lm.model(**batch, output_hidden_states=True)
    naive = len(ids) / (time.perf_counter() - start)

    lengths = {s: min(n, 512) for s, n in zip(ids, lm.token_lengths([texts[s] for s in ids]))}
    start = time.perf_counter()
    batches = plan.token_budget_batches(lengths, budget=8192, max_batch=args.batch)
    for batch in batches:
        lm.embed([texts[s] for s in batch], 512, with_tokens=False)
    ours = len(ids) / (time.perf_counter() - start)
    print(f"naive (padded to 512, input order): {naive:.2f} reports/s")
    padding = plan.padding_fraction(lengths, batches)
    print(f"this job (sorted, dynamic padding): {ours:.2f} reports/s, padding fraction {padding:.1%}")
    print(f"precompute speed-up vs naive padded loop: {ours / naive:.2f}x")


if __name__ == "__main__":
    main()
