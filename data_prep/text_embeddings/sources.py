"""Reports to embed: from a built dataset (one per study) or from a CSV; empty texts are counted."""

from __future__ import annotations

import os

DEFAULT_TEMPLATE = "{findings} {impression}"


def render(template: str, fields: dict[str, str]) -> str:
    """Fills the template; when it comes out empty and a full `report` exists, the report is used
    (datasets built from CSV notes have a report but no findings/impression sections)."""
    text = " ".join(template.format(**fields).split())
    if not text and template == DEFAULT_TEMPLATE:
        text = " ".join(fields.get("report", "").split())
    return text


def from_dataset(data_dir: str, dataset: str, splits: list[str] | None, template: str) -> tuple[dict[str, str], dict]:
    """study_id -> text for the given splits of a dataset built by data_prep.build_dataset."""
    from mvlp_jax.data import built

    builder, name, version = built.open_builder(data_dir, dataset)
    splits = splits or list(builder.info.splits)
    texts: dict[str, str] = {}
    conflicting: set[str] = set()
    for split in splits:
        source = built.open_split(builder, split)
        for i in range(len(source)):
            record = source[i]
            study = record["study_id"].decode()
            text = render(template, {k: record[k].decode() for k in ("report", "findings", "impression")})
            if texts.setdefault(study, text) != text:  # the images of a study should share its report
                conflicting.add(study)
    info = {
        "kind": "dataset",
        "name": name,
        "version": version,
        "splits": splits,
        "fingerprint": built.fingerprint(builder, splits),
        **_conflicts(conflicting, f"{name}:{version}", "report"),
    }
    return texts, info


def _conflicts(conflicting: set[str], where: str, what: str) -> dict:
    """The count and first examples of ids whose rows disagree on their text, and a note saying so."""
    info = {"conflicting_duplicate_ids": len(conflicting), "conflicting_examples": sorted(conflicting)[:5]}
    if conflicting:
        info["notes"] = [
            f"{len(conflicting)} ids of {where} have rows with different {what} texts (e.g. "
            f"{', '.join(sorted(conflicting)[:5])}); the first row of each is embedded"
        ]
    return info


def from_csv(path: str, id_column: str, text_column: str) -> tuple[dict[str, str], dict]:
    """study id -> text; the first row of an id wins, and ids whose rows disagree on the text are counted."""
    from data_prep.sources.tables import read_csv

    texts: dict[str, str] = {}
    conflicting: set[str] = set()
    for row in read_csv(path, (id_column, text_column)):
        study, text = str(row[id_column]).strip(), " ".join((row[text_column] or "").split())
        if texts.setdefault(study, text) != text:
            conflicting.add(study)
    info = {
        "kind": "csv",
        "path": os.path.abspath(path),
        "id_column": id_column,
        "text_column": text_column,
        **_conflicts(conflicting, path, repr(text_column)),
    }
    return texts, info
