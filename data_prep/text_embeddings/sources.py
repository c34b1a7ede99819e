"""Reports to embed: from a built dataset (one per study) or from a CSV; empty texts are counted."""
from __future__ import annotations

import csv
import os

DEFAULT_TEMPLATE = "{findings} {impression}"


def render(template: str, fields: dict[str, str]) -> str:
    """Fills the template; when it comes out empty and a full `report` exists, the report is used
    (datasets built from CSV notes have a report but no findings/impression sections)."""
    text = " ".join(template.format(**fields).split())
    if not text and template == DEFAULT_TEMPLATE:
        text = " ".join(fields.get("report", "").split())
    return text


def from_dataset(data_dir: str, dataset: str, splits: list[str] | None, template: str
                 ) -> tuple[dict[str, str], dict]:
    """study_id -> text for the given splits of a dataset built by data_prep.build_dataset."""
    from data_prep import built

    builder, name, version = built.open_builder(data_dir, dataset)
    splits = splits or list(builder.info.splits)
    texts: dict[str, str] = {}
    for split in splits:
        source = built.open_split(builder, split)
        for i in range(len(source)):
            record = source[i]
            study = record["study_id"].decode()
            if study not in texts:  # several images of a study share its report
                fields = {k: record[k].decode() for k in ("report", "findings", "impression")}
                texts[study] = render(template, fields)
    return texts, {"kind": "dataset", "name": name, "version": version, "splits": splits}


def from_csv(path: str, id_column: str, text_column: str) -> tuple[dict[str, str], dict]:
    texts: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (id_column, text_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        for row in reader:
            texts.setdefault(str(row[id_column]).strip(), " ".join((row[text_column] or "").split()))
    return texts, {"kind": "csv", "path": os.path.abspath(path), "id_column": id_column, "text_column": text_column}
