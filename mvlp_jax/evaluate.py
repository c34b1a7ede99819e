"""Evaluation binary: probes on pretrained checkpoints -> per-label AUC, mAUC, exact-match accuracy.

  python -m mvlp_jax.evaluate --config=configs/linear_probe.py --config.workdirs=A,B[,random_init] \
      --config.dataset=... --output_dir=DIR

Writes DIR/results.json (everything), DIR/results.md (one row per checkpoint and label fraction:
mAUC [95% CI], accuracy [95% CI], per-label AUC), roc_<label>.png with every checkpoint overlaid,
auc_per_label.png, and prints the table. Intervals resample patients; every checkpoint after the
first is compared with the first by a paired bootstrap.

`mode=linear` (default) fits a logistic-regression probe on frozen features; `mode=finetune` trains the
whole encoder with layer-wise lr decay. `features_from=text_embeddings` probes the stored LLM vectors
of `config.embeddings` instead: the ceiling the image encoder is chasing. `mode=retrieval` and `mode=zero_shot`
use a run's image-text space (retrieval.py, zero_shot.py); `task=segmentation` and `task=detection` train dense
heads on the frozen patch tokens (dense_tasks.py).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the binary only (so `evaluate()` can be imported beside other absl programs)."""
    config_flags.DEFINE_config_file("config", None, "configs/linear_probe.py[:nih_sample]", lock_config=True)
    flags.DEFINE_string("output_dir", None, "results.json, results.md, plots and the feature cache go here.")
    flags.mark_flags_as_required(["config", "output_dir"])


def targets_and_mask(labels: np.ndarray, uncertain: str, unmentioned: str) -> tuple[np.ndarray, np.ndarray]:
    """Coded labels (1/0/-1/-2) -> (0/1 targets, mask of the entries that count)."""
    y = (labels == 1).astype(np.float32)
    mask = np.ones(labels.shape, bool)
    if uncertain == "ignore":
        mask &= labels != -1
    else:
        y[labels == -1] = 1.0 if uncertain == "ones" else 0.0
    if unmentioned == "ignore":
        mask &= labels != -2
    return y, mask


def patient_fraction(patients: np.ndarray, fraction: float, seed: int, salt: str = "fraction") -> np.ndarray:
    """Cases of a fixed, seeded `fraction` of the patients (at least one)."""
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(f"{salt}:{seed}:{p}".encode()).hexdigest())
    keep = set(unique[:max(1, math.ceil(fraction * len(unique)))])
    return np.array([p in keep for p in patients])


def trainable_labels(y: np.ndarray, mask: np.ndarray, names: list[str], fraction: float,
                     patients: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """(labels with both a positive and a negative counted training case, {skipped label: its counts}).
    A probe fitted without positives (or negatives) only learns a bias: its AUC would be noise, so such a
    label is neither trained nor scored. Raises ValueError when no label is left."""
    positives, negatives = ((y == 1) & mask).sum(0), ((y == 0) & mask).sum(0)
    usable = (positives > 0) & (negatives > 0)
    skipped = {n: f"{p} positive / {q} negative" for n, p, q, u in zip(names, positives, negatives, usable) if not u}
    if not usable.any():
        raise ValueError(f"label fraction {fraction:g} keeps {len(y)} training cases of {len(set(patients))} "
                         f"patients, and no label has both a positive and a negative case among them: use a larger "
                         f"fraction (config.label_fractions) or a larger training split")
    return usable[None, :], skipped


def _subjects(config) -> list[str]:
    """What is evaluated: pretraining workdirs (image features) or embedding dirs (stored LLM vectors)."""
    listed = config.embeddings if config.features_from == "text_embeddings" else config.workdirs
    return [w.strip() for w in listed.split(",") if w.strip()]


def evaluate(config, output_dir: str) -> dict:
    from mvlp_jax import configuration, features, finetune, metrics, probe, report, sharding, statistics, storage

    configuration.validate(config, configuration.EVAL_SPEC)
    storage.check_writable_dir(output_dir, "--output_dir")
    config = config.copy_and_resolve_references()  # the caller's config stays as given
    config.unlock()
    config.mesh = {"data": -1, "fsdp": 1, "model": 1}
    mesh = sharding.make_mesh(config)
    if config.task != "classification":
        from mvlp_jax import dense_tasks

        return dense_tasks.evaluate_subjects(dense_tasks.get(config.task), config, output_dir, mesh,
                                             _subjects(config))
    if config.mode == "retrieval":  # image-text modes: no probe, no training split
        from mvlp_jax import retrieval

        return retrieval.run(config, output_dir, mesh, _subjects(config))
    if config.mode == "zero_shot":
        from mvlp_jax import zero_shot

        return zero_shot.run(config, output_dir, mesh, _subjects(config))
    splits = {}
    for role in ("train", "val", "test"):
        name = config[f"{role}_split"]
        if name:
            splits[role] = features.labelled_split(config.data_dir, config.dataset, name)
            if config.study_views:  # one example per study
                source, names, where = splits[role]
                splits[role] = (features.Studies(source, config.study_views), names,
                                f"{where} (studies, up to {config.study_views} views)")
    names = splits["train"][1]
    for role, (_, other, where) in splits.items():
        if other != names:
            raise ValueError(f"{where} has labels {other}, the training split {names}")
    labels = {role: features.read_labels(src) for role, (src, _, _) in splits.items()}
    fingerprints = {role: features.split_fingerprint(config.data_dir, config.dataset, config[f"{role}_split"])
                    for role in splits}
    train_idx = np.arange(len(labels["train"][0]))
    if "val" in splits:
        val_src, val_idx = splits["val"][0], np.arange(len(labels["val"][0]))
        val_labels = labels["val"][0]
    else:  # carve 10% of the training patients out for model selection
        carved = patient_fraction(labels["train"][1], 0.1, config.seed, salt="validation")
        val_src, val_idx, train_idx = splits["train"][0], train_idx[carved], train_idx[~carved]
        val_labels = labels["train"][0][carved]
    vy, vm = targets_and_mask(val_labels, config.uncertain, config.unmentioned)
    test_y, test_m = targets_and_mask(labels["test"][0], config.uncertain, config.unmentioned)
    test_groups = labels["test"][1]
    statistics.require(test_groups, splits["test"][2])
    if not any(len(set(test_y[test_m[:, j], j])) == 2 for j in range(len(names))):
        raise ValueError(f"no label of {splits['test'][2]} has both a positive and a negative test case: AUC is not "
                         f"defined for any")
    subjects = _subjects(config)
    labels_of = features.display_names(subjects)
    like = next((w for w in subjects if w != features.RANDOM_INIT), config.random_init_like)
    results = {"config": config.to_dict(), "label_names": names, "checkpoints": [], "comparisons": []}
    probs_by, name_of, statistics_by, encoders = {}, {}, {}, []
    for subject in subjects:
        if config.features_from == "text_embeddings":
            name, step, encoder = features.text_name(subject, config.text_pooling, labels_of[subject]), 0, None
            table = features.load_text_table(subject, config.text_pooling)
            feats = {role: features.text_features(table, src, where) for role, (src, _, where) in splits.items()}
        else:
            encoder = features.load_encoder(subject, config.step, mesh, like, name=labels_of[subject],
                                            teacher=config.teacher and subject != features.RANDOM_INIT)
            name, step = encoder.name, encoder.step
            encoders.append(encoder)
            feats = None if config.mode == "finetune" else {
                role: features.extract(encoder, src, config.pooling, config.batch_size, mesh,
                                       storage.join(output_dir, "features"), where, fingerprints[role])
                for role, (src, _, where) in splits.items()}
        train_labels, train_patients = labels["train"][0][train_idx], labels["train"][1][train_idx]
        for fraction in config.label_fractions:
            first_subset = patient_fraction(train_patients, fraction, config.seed)
            seeds = statistics.seeds_for(config.seeds, fraction, int(first_subset.sum()),
                                         head_is_random=feats is None)
            runs = []
            for seed in range(config.seed, config.seed + seeds):  # a label subset and a head per seed
                keep = patient_fraction(train_patients, fraction, seed)
                y, m = targets_and_mask(train_labels[keep], config.uncertain, config.unmentioned)
                usable, skipped = trainable_labels(y, m, names, fraction, train_patients[keep])
                m, scored = m & usable, test_m & usable
                if feats is not None:
                    val_x = feats["val"] if "val" in splits else feats["train"][val_idx]
                    fitted = probe.fit(feats["train"][train_idx[keep]], y, m, val_x, vy, vm)
                    probs = fitted.predict(feats["test"])
                    trained = {"l2": fitted.l2, "lr": fitted.lr, "steps": fitted.steps, "val_mauc": fitted.val_mauc}
                else:
                    tuned = finetune.fit(encoder, splits["train"][0], train_idx[keep], y, m,
                                         features.Subset(val_src, val_idx), vy, vm, config.pooling, config.finetune,
                                         mesh, seed)
                    probs = finetune.predict(encoder, tuned, splits["test"][0], config.pooling, config.batch_size,
                                             mesh, f"test {name}")
                    trained = {"epoch": tuned.epoch, "lr": tuned.lr, "val_mauc": tuned.val_mauc}
                runs.append({"seed": seed, "keep": keep, "probs": probs, "scored": scored, "skipped": skipped,
                             "trained": trained, **metrics.summary(test_y, probs, scored, names)})
            probs_by[(subject, fraction)], name_of[subject] = runs[0]["probs"], name
            statistics_by[(subject, fraction)] = [
                lambda i, r=r: metrics.mean_auc(test_y[i], r["probs"][i], r["scored"][i]) for r in runs]
            mauc = statistics.estimate(statistics_by[(subject, fraction)], test_groups, config.bootstrap,
                                       config.seed)
            accuracy = statistics.estimate([lambda i, r=r: metrics.exact_match_accuracy(test_y[i], r["probs"][i],
                                                                                        r["scored"][i])
                                            for r in runs], test_groups, config.bootstrap, config.seed)
            keep = runs[0]["keep"]
            row = {"name": name, "workdir": subject, "step": step, "label_fraction": fraction,
                   "train_cases": int(keep.sum()), "train_patients": len(set(train_patients[keep])),
                   "train_fraction": float(keep.mean()),
                   "labels_skipped": {k: v for k, v in runs[0]["skipped"].items()  # in every seed: never scored
                                      if all(k in r["skipped"] for r in runs)},
                   "labels_skipped_by_seed": [sorted(r["skipped"]) for r in runs],
                   "test_cases": len(runs[0]["probs"]), "mode": config.mode, "probe": runs[0]["trained"],
                   **_mean_over_seeds(runs, names), "mauc": mauc["mean"], "accuracy": accuracy["mean"],
                   "ci95": {"mauc": mauc["ci95"], "accuracy": accuracy["ci95"]},
                   "seeds": {"count": seeds, "first": config.seed, "mauc": mauc.get("seeds", [mauc["mean"]]),
                             "accuracy": accuracy.get("seeds", [accuracy["mean"]]),
                             "train_cases": [int(r["keep"].sum()) for r in runs]}}
            results["checkpoints"].append(row)
            spread = f" (seeds {config.seed}-{config.seed + seeds - 1}: {min(row['seeds']['mauc']):.4f} to " \
                     f"{max(row['seeds']['mauc']):.4f})" if seeds > 1 else ""
            print(f"{name} (step {step}), {report.percent(fraction)} of the labels = {row['train_cases']} of "
                  f"{len(keep)} training cases ({report.percent(row['train_fraction'])}), "
                  f"{row['train_patients']} patients, {config.mode}: mAUC {row['mauc']:.4f}{spread} over "
                  f"{len(names) - len(row['labels_skipped'])} labels, exact-match accuracy {row['accuracy']:.4f}"
                  + (f"; skipped (no positive or no negative training case): {', '.join(row['labels_skipped'])}"
                     if row["labels_skipped"] else ""), flush=True)
    first = subjects[0]
    for (subject, fraction), candidate in statistics_by.items():
        if subject != first and (first, fraction) in statistics_by:
            paired = statistics.paired(statistics_by[(first, fraction)], candidate, test_groups, config.bootstrap,
                                       config.seed)
            results["comparisons"].append({"baseline": name_of[first], "candidate": name_of[subject],
                                           "baseline_workdir": first, "candidate_workdir": subject,
                                           "label_fraction": fraction, "mauc_difference": paired.pop("difference"),
                                           **paired})
    results["notes"] = report.notes_of(encoders)
    report.save(output_dir, results, report.markdown(results))
    report.plots(results, {(name_of[s], f): p for (s, f), p in probs_by.items()}, test_y, test_m, output_dir)
    return results


def _mean_over_seeds(runs: list[dict], names: list[str]) -> dict:
    """Per-label AUC and AP averaged over the seeds' heads (a label a seed could not score stays out of its mean)."""
    def mean(key: str) -> dict:
        values = np.array([[r[key][n] for n in names] for r in runs], np.float64)
        return {n: float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
                for n, v in zip(names, values.T)}
    missing = sorted({n for r in runs for n in r["labels_without_both_classes"]})
    return {"auc": mean("auc"), "ap": mean("ap"), "labels_without_both_classes": missing}


def main(argv: list[str]) -> int:
    del argv
    evaluate(FLAGS.config, FLAGS.output_dir)
    return 0


if __name__ == "__main__":
    from mvlp_jax import cli, configuration

    define_flags()
    cli.run("mvlp_jax.evaluate", main, config_keys=configuration.EVAL_SPEC)
