"""The classification evaluator (`--config.evaluator=classification`, the default): per-label AUC, mAUC and
exact-match accuracy of heads trained on the labels.

`mode=linear` fits a logistic-regression probe on frozen features (probe.py); `mode=finetune` trains the whole
encoder with layer-wise lr decay (finetune.py). `features_from=text_embeddings` probes the stored LLM vectors of
`config.embeddings` instead: the ceiling the image encoder is chasing. Writes results.json, results.md (one row per
checkpoint and label fraction: mAUC [95% CI], accuracy [95% CI], per-label AUC), roc_<label>.png with every
checkpoint overlaid and auc_per_label.png. Intervals resample patients; every checkpoint after the first is
compared with the first by a paired bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from mvlp_jax.evaluation import common, features, finetune, metrics, probe, report, statistics
from mvlp_jax.pretrain.encoder import Encoder, display_names
from mvlp_jax.runtime import schema, storage

# the keys of a comparison, in the order results.json has always listed them
_COMPARED = ("baseline", "candidate", "baseline_workdir", "candidate_workdir", "label_fraction")


def trainable_labels(
    y: np.ndarray, mask: np.ndarray, names: list[str], fraction: float, patients: np.ndarray
) -> tuple[np.ndarray, dict[str, str]]:
    """(labels with both a positive and a negative counted training case, {skipped label: its counts}).
    A probe fitted without positives (or negatives) only learns a bias: its AUC would be noise, so such a
    label is neither trained nor scored. Raises ValueError when no label is left."""
    positives, negatives = ((y == 1) & mask).sum(0), ((y == 0) & mask).sum(0)
    usable = (positives > 0) & (negatives > 0)
    skipped = {n: f"{p} positive / {q} negative" for n, p, q, u in zip(names, positives, negatives, usable) if not u}
    if not usable.any():
        raise ValueError(
            f"label fraction {fraction:g} keeps {len(y)} training cases of {len(set(patients))} "
            f"patients, and no label has both a positive and a negative case among them: use a larger "
            f"fraction (config.label_fractions) or a larger training split"
        )
    return usable[None, :], skipped


def _subjects(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Iterator[tuple[str, str, int, Encoder | None]]:
    """(location, name, step, encoder) of what is evaluated: the workdirs' encoders (the common loop), or the
    stored LLM vectors of each embeddings dir (encoder None)."""
    if config.features_from == "image":
        for subject, encoder in common.encoders(config, mesh):
            yield subject, encoder.name, encoder.step, encoder
        return
    dirs = common.listed(config.embeddings)
    labels = display_names(dirs)
    for subject in dirs:
        yield subject, features.text_name(subject, config.text_pooling, labels[subject]), 0, None


def run(config: ml_collections.ConfigDict, output_dir: str, mesh: jax.sharding.Mesh) -> dict:
    splits = {}
    for role in ("train", "val", "test"):
        name = config[f"{role}_split"]
        if name:
            splits[role] = features.labelled_split(config.data_dir, config.dataset, name)
            if config.study_views:  # one example per study
                source, names, where = splits[role]
                splits[role] = (
                    features.Studies(source, config.study_views),
                    names,
                    f"{where} (studies, up to {config.study_views} views)",
                )
    names = splits["train"][1]
    for _, other, where in splits.values():
        if other != names:
            raise ValueError(f"{where} has labels {other}, the training split {names}")
    labels = {role: features.read_labels(src) for role, (src, _, _) in splits.items()}
    fingerprints = {
        role: features.split_fingerprint(config.data_dir, config.dataset, config[f"{role}_split"]) for role in splits
    }
    train_idx = np.arange(len(labels["train"][0]))
    if "val" in splits:
        val_src, val_idx = splits["val"][0], np.arange(len(labels["val"][0]))
        val_labels = labels["val"][0]
    else:  # carve 10% of the training patients out for model selection
        carved = common.patient_fraction(labels["train"][1], 0.1, config.seed, salt="validation")
        val_src, val_idx, train_idx = splits["train"][0], train_idx[carved], train_idx[~carved]
        val_labels = labels["train"][0][carved]
    vy, vm = common.targets_and_mask(val_labels, config.uncertain, config.unmentioned)
    test_y, test_m = common.targets_and_mask(labels["test"][0], config.uncertain, config.unmentioned)
    test_groups = labels["test"][1]
    statistics.require(test_groups, splits["test"][2], config.bootstrap > 0)
    if not any(len(set(test_y[test_m[:, j], j])) == 2 for j in range(len(names))):
        raise ValueError(
            f"no label of {splits['test'][2]} has both a positive and a negative test case: AUC is not defined for any"
        )
    results = {"config": config.to_dict(), "label_names": names, "checkpoints": [], "comparisons": []}
    probs_by, name_of, statistics_by, encoders = {}, {}, {}, []
    for subject, name, step, encoder in _subjects(config, mesh):
        if encoder is None:  # stored LLM vectors
            table = features.load_text_table(subject, config.text_pooling)
            feats = {role: features.text_features(table, src, where) for role, (src, _, where) in splits.items()}
        else:
            encoders.append(encoder)
            feats = (
                None
                if config.mode == "finetune"
                else {
                    role: features.extract(
                        encoder,
                        src,
                        config.pooling,
                        config.batch_size,
                        mesh,
                        storage.join(output_dir, "features"),
                        where,
                        fingerprints[role],
                    )
                    for role, (src, _, where) in splits.items()
                }
            )
        train_labels, train_patients = labels["train"][0][train_idx], labels["train"][1][train_idx]
        for fraction in config.label_fractions:
            first_subset = common.patient_fraction(train_patients, fraction, config.seed)
            seeds = statistics.seeds_for(config.seeds, fraction, int(first_subset.sum()), head_is_random=feats is None)
            runs = []
            for seed in range(config.seed, config.seed + seeds):  # a label subset and a head per seed
                keep = common.patient_fraction(train_patients, fraction, seed)
                y, m = common.targets_and_mask(train_labels[keep], config.uncertain, config.unmentioned)
                usable, skipped = trainable_labels(y, m, names, fraction, train_patients[keep])
                m, scored = m & usable, test_m & usable
                if feats is not None:
                    val_x = feats["val"] if "val" in splits else feats["train"][val_idx]
                    fitted = probe.fit(feats["train"][train_idx[keep]], y, m, val_x, vy, vm)
                    probs = fitted.predict(feats["test"])
                    trained = {"l2": fitted.l2, "lr": fitted.lr, "steps": fitted.steps, "val_mauc": fitted.val_mauc}
                else:
                    tuned = finetune.fit(
                        encoder,
                        splits["train"][0],
                        train_idx[keep],
                        y,
                        m,
                        features.Subset(val_src, val_idx),
                        vy,
                        vm,
                        config.pooling,
                        config.finetune,
                        mesh,
                        seed,
                    )
                    probs = finetune.predict(
                        encoder, tuned, splits["test"][0], config.pooling, config.batch_size, mesh, f"test {name}"
                    )
                    trained = {"epoch": tuned.epoch, "lr": tuned.lr, "val_mauc": tuned.val_mauc}
                runs.append(
                    {
                        "seed": seed,
                        "keep": keep,
                        "probs": probs,
                        "scored": scored,
                        "skipped": skipped,
                        "trained": trained,
                        **metrics.summary(test_y, probs, scored, names),
                    }
                )
            probs_by[(subject, fraction)], name_of[subject] = runs[0]["probs"], name
            statistics_by[(subject, fraction)] = [
                lambda i, r=r: metrics.mean_auc(test_y[i], r["probs"][i], r["scored"][i]) for r in runs
            ]
            mauc = statistics.estimate(statistics_by[(subject, fraction)], test_groups, config.bootstrap, config.seed)
            accuracy = statistics.estimate(
                [lambda i, r=r: metrics.exact_match_accuracy(test_y[i], r["probs"][i], r["scored"][i]) for r in runs],
                test_groups,
                config.bootstrap,
                config.seed,
            )
            keep = runs[0]["keep"]
            row = {
                "name": name,
                "workdir": subject,
                "step": step,
                "label_fraction": fraction,
                "train_cases": int(keep.sum()),
                "train_patients": len(set(train_patients[keep])),
                "train_fraction": float(keep.mean()),
                "labels_skipped": {
                    k: v
                    for k, v in runs[0]["skipped"].items()  # in every seed: never scored
                    if all(k in r["skipped"] for r in runs)
                },
                "labels_skipped_by_seed": [sorted(r["skipped"]) for r in runs],
                "test_cases": len(runs[0]["probs"]),
                "mode": config.mode,
                "probe": runs[0]["trained"],
                **_mean_over_seeds(runs, names),
                "mauc": mauc["mean"],
                "accuracy": accuracy["mean"],
                "ci95": {"mauc": mauc["ci95"], "accuracy": accuracy["ci95"]},
                "seeds": {
                    "count": seeds,
                    "first": config.seed,
                    "mauc": mauc.get("seeds", [mauc["mean"]]),
                    "accuracy": accuracy.get("seeds", [accuracy["mean"]]),
                    "train_cases": [int(r["keep"].sum()) for r in runs],
                },
            }
            results["checkpoints"].append(row)
            spread = (
                f" (seeds {config.seed}-{config.seed + seeds - 1}: {min(row['seeds']['mauc']):.4f} to "
                f"{max(row['seeds']['mauc']):.4f})"
                if seeds > 1
                else ""
            )
            print(
                f"{name} (step {step}), {report.percent(fraction)} of the labels = {row['train_cases']} of "
                f"{len(keep)} training cases ({report.percent(row['train_fraction'])}), "
                f"{row['train_patients']} patients, {config.mode}: mAUC {row['mauc']:.4f}{spread} over "
                f"{len(names) - len(row['labels_skipped'])} labels, exact-match accuracy {row['accuracy']:.4f}"
                + (
                    f"; skipped (no positive or no negative training case): {', '.join(row['labels_skipped'])}"
                    if row["labels_skipped"]
                    else ""
                ),
                flush=True,
            )
    for comparison in common.compare_to_first(statistics_by, name_of, test_groups, config):
        difference = comparison.pop("difference")
        results["comparisons"].append(
            {**{k: comparison.pop(k) for k in _COMPARED}, "mauc_difference": difference, **comparison}
        )
    results["notes"] = report.notes_of(encoders)
    report.save(output_dir, results, report.markdown(results))
    report.plots(results, {(name_of[s], f): p for (s, f), p in probs_by.items()}, test_y, test_m, output_dir)
    return results


def _mean_over_seeds(runs: list[dict], names: list[str]) -> dict:
    """Per-label AUC and AP averaged over the seeds' heads (a label a seed could not score stays out of its mean)."""

    def mean(key: str) -> dict:
        values = np.array([[r[key][n] for n in names] for r in runs], np.float64)
        return {
            n: float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
            for n, v in zip(names, values.T)
        }

    missing = sorted({n for r in runs for n in r["labels_without_both_classes"]})
    return {"auc": mean("auc"), "ap": mean("ap"), "labels_without_both_classes": missing}


ROWS: schema.Table = {
    "features_from": (
        "image",
        ("image", "text_embeddings"),
        "'image': the workdirs' encoders; 'text_embeddings': the stored LLM vectors of `embeddings`.",
    ),
    "text_pooling": ("mean", ("mean", "last"), "text_embeddings: which stored vector."),
    "pooling": ("mean", ("mean", "cls", "map"), "Image features: mean of patch tokens, CLS, or the trained MAP."),
    "study_views": (
        0,
        schema.NON_NEGATIVE,
        "0: one feature per image. N: one per study (images grouped by study_id, "
        "frontal first, up to N), labelled by its first view: a study encoder (data.max_views > 1) "
        "reads the views as one sequence, a single-image encoder averages their features.",
    ),
}

RULES: tuple[schema.Between, ...] = (
    (
        lambda c: c.features_from != "text_embeddings" or bool(c.embeddings),
        "features_from='text_embeddings' needs config.embeddings: comma-separated output dirs of "
        "data_prep.precompute_text_embeddings",
    ),
    (
        lambda c: c.features_from != "text_embeddings" or c.mode == "linear",
        "features_from='text_embeddings' probes stored vectors: it needs mode='linear'",
    ),
    (
        lambda c: not c.study_views or (c.mode == "linear" and c.features_from == "image"),
        "config.study_views (study-level features) is built for linear probes of image encoders",
    ),
)

EVALUATOR = common.Evaluator(
    name="classification",
    run=run,
    config_rows=ROWS,
    rules=RULES,
    description="the labels: linear probes or fine-tuning (mode), per-label AUC, mAUC and exact-match accuracy",
)
