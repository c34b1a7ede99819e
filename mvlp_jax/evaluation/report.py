"""Evaluation outputs a user pastes or looks at: the markdown table, ROC curves, per-label AUC bars."""

from __future__ import annotations

import numpy as np

from mvlp_jax.runtime import storage


def save(output_dir: str, results: dict, table: str) -> None:
    """Writes results.json (everything) and results.md (`table`, then the notes every result of a run must carry:
    results["notes"]), and prints them."""
    notes = results.get("notes") or []
    text = table + "".join(f"\nNote: {note}\n" for note in notes)
    storage.write_json(storage.join(output_dir, "results.json"), results, indent=2, default=float)
    storage.write_text(storage.join(output_dir, "results.md"), text + "\n")
    print(text)


def notes_of(encoders: list) -> list[str]:
    """The notes of the evaluated encoders (encoder_lib.Encoder.notes), each once, in order."""
    return list(dict.fromkeys(note for encoder in encoders for note in getattr(encoder, "notes", ())))


def _ci(row: dict, key: str) -> str:
    return interval(row[key], row["ci95"][key]) + seeds_note(row.get("seeds", {}).get(key, []))


def interval(value: float, ci: list[float]) -> str:
    """'0.5600 [0.5000, 0.6200]', or '0.5600 [not estimable]' when too few draws had a value."""
    if not np.all(np.isfinite(ci)):
        return f"{value:.4f} [not estimable]"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def difference(value: float, ci: list[float], p_not_better: float) -> str:
    """'+0.0300 [95% CI -0.0100, +0.0700], P(not better) = 0.120', or '+0.0300 (no interval)' without draws
    (bootstrap=0, or too few patients)."""
    if not np.all(np.isfinite(ci)):
        return f"{value:+.4f} (no interval: bootstrap=0 or too few patients)"
    return f"{value:+.4f} [95% CI {ci[0]:+.4f}, {ci[1]:+.4f}], P(not better) = {p_not_better:.3f}"


def seeds_note(values: list[float]) -> str:
    """' (3 seeds: 0.5412-0.5803)' where several seeds trained heads, else ''."""
    return f" ({len(values)} seeds: {min(values):.4f}-{max(values):.4f})" if len(values) > 1 else ""


def percent(fraction: float) -> str:
    """10% / 1% / 0.5% / 0.12%: never '0%' for a small non-zero fraction."""
    for digits in range(4):
        text = f"{fraction * 100:.{digits}f}"
        if float(text) != 0 and abs(float(text) - fraction * 100) < 0.05 * fraction * 100:
            return f"{text}%"
    return f"{fraction:.2e}"


def _labels_cell(row: dict) -> str:
    cases = f" ({row['train_cases']} cases)" if "train_cases" in row else ""
    return f"{percent(row['label_fraction'])}{cases}"


def markdown(results: dict) -> str:
    names = results["label_names"]
    head = ["checkpoint", "step", "labels", "probe", "mAUC [95% CI]", "exact-match acc. [95% CI]", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["checkpoints"]:
        aucs = [f"{row['auc'][n]:.3f}" if np.isfinite(row["auc"][n]) else "n/a" for n in names]
        lines.append(
            f"| {row['name']} | {row['step']} | {_labels_cell(row)} | {row['mode']} | {_ci(row, 'mauc')} | "
            f"{_ci(row, 'accuracy')} | " + " | ".join(aucs) + " |"
        )
    for c in results["comparisons"]:
        lines.append(
            f"\n{c['candidate']} vs {c['baseline']} ({percent(c['label_fraction'])} labels): mAUC difference "
            + difference(c["mauc_difference"], c["interval"], c["p_not_better"])
        )
    skipped = {percent(row["label_fraction"]): row.get("labels_skipped", {}) for row in results["checkpoints"]}
    for fraction, labels in skipped.items():
        if labels:
            lines.append(
                f"\nNot trained or scored at {fraction} of the labels (no positive or no negative training "
                f"case): " + ", ".join(f"{n} ({c})" for n, c in labels.items())
            )
    missing = sorted(
        {
            n
            for row in results["checkpoints"]
            for n in row["labels_without_both_classes"]
            if n not in row.get("labels_skipped", {})
        }
    )
    if missing:
        lines.append(f"\nLeft out of mAUC (a class is absent from the test set): {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    y = y[order].astype(bool)
    tpr = np.r_[0, np.cumsum(y) / max(y.sum(), 1)]
    fpr = np.r_[0, np.cumsum(~y) / max((~y).sum(), 1)]
    return fpr, tpr


def plots(results: dict, probs_by: dict, labels: np.ndarray, mask: np.ndarray, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["label_names"]
    for j, name in enumerate(names):
        m = mask[:, j]
        if len(set(labels[m, j])) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4, 4))
        for (ckpt, fraction), probs in probs_by.items():
            fpr, tpr = _roc(labels[m, j], probs[m, j])
            ax.plot(fpr, tpr, label=f"{ckpt} ({percent(fraction)})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=name, xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        storage.save_figure(fig, storage.join(output_dir, f"roc_{name.lower().replace(' ', '_')}.png"), dpi=90)
        plt.close(fig)
    rows = results["checkpoints"]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.7), 3.5))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        ax.bar(
            np.arange(len(names)) + i * width,
            [row["auc"][n] for n in names],
            width,
            label=f"{row['name']} ({percent(row['label_fraction'])})",
        )
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("AUC")
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    fig.tight_layout()
    storage.save_figure(fig, storage.join(output_dir, "auc_per_label.png"), dpi=90)
    plt.close(fig)
