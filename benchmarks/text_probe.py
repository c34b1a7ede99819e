"""Do the stored LLM vectors carry the clinical content? A linear probe from `mean` vectors to labels.

  python -m benchmarks.text_probe --embeddings=runs/emb/iu_smollm2 [--csv=.../iuxray_chexpert_labels.csv]

Patient-level split (seeded hash of the report uid, 80/20), uncertain labels ignored, blank = negative;
one logistic regression per CheXpert label with both classes in train and test. Prints per-label AUC
and the mean AUC last.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from benchmarks.precompute import IU_CSV
from mvlp_jax.data import embedding_shards
from mvlp_jax.data.records import CHEXPERT_LABELS, code_label, seeded_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--csv", default=IU_CSV)
    parser.add_argument("--pooling", default="mean", choices=["mean", "last"])
    args = parser.parse_args()
    vectors = {
        r["study_id"]: r[args.pooling].astype(np.float32)
        for p in embedding_shards.shard_paths(args.embeddings)
        for r in embedding_shards.read_shard(p)
    }
    labels: dict[str, list[int]] = {}
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            labels.setdefault(row["subject_id"], [code_label(row[name]) for name in CHEXPERT_LABELS])
    ids = sorted(set(vectors) & set(labels))
    x = np.stack([vectors[i] for i in ids])
    y = np.array([labels[i] for i in ids])
    test = np.array([seeded_split(i, 0, (0.8, 0.2)) == "validate" for i in ids])
    scaler = StandardScaler().fit(x[~test])
    x = scaler.transform(x)
    aucs = {}
    for j, name in enumerate(CHEXPERT_LABELS):
        known = y[:, j] != -1  # uncertain ignored; blank (-2) counts as negative
        target = (y[:, j] == 1).astype(int)
        tr, te = known & ~test, known & test
        if len(set(target[tr])) < 2 or len(set(target[te])) < 2:
            print(f"{name:28s} skipped (one class only)")
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(x[tr], target[tr])
        aucs[name] = roc_auc_score(target[te], clf.predict_proba(x[te])[:, 1])
        print(f"{name:28s} AUC {aucs[name]:.3f}  (test positives {target[te].sum()})")
    print(f"{len(ids)} reports ({test.sum()} test), {len(aucs)} labels probed")
    mean_auc = np.mean(list(aucs.values()))
    print(f"text_probe: mean AUC of a linear probe on stored {args.pooling} vectors: {mean_auc:.3f}")


if __name__ == "__main__":
    main()
