"""A split's images grouped into studies for the multi-view encoder: frontal views first, then laterals, then
the others (vit.VIEW_TYPES), at most `max_views` per study, the rest padding."""

from __future__ import annotations

import numpy as np

from mvlp_jax.data.records import view_selected

LATERAL = ("LATERAL", "LAT", "LL", "RL", "L")


def view_type(view: str) -> int:
    """Index in vit.VIEW_TYPES of a view position as datasets spell it ('PA', 'AP supine', 'LATERAL', 'LL')."""
    if view_selected(view, "frontal"):
        return 0
    words = view.strip().upper().split()
    return 1 if words and words[0] in LATERAL else 2


def group(study_ids: list[str], views: list[str], max_views: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(record index per study and view slot (S, max_views), -1 for padding; view type per slot (S, max_views);
    the S study ids in order of first appearance). Within a study: by view type, then record order; views
    beyond `max_views` are left out. An image without a study id is a study of its own (blank ids would merge
    every such image, of any patient, into one); its id stays ''."""
    members: dict[tuple[str, int], list[int]] = {}
    for index, study in enumerate(study_ids):
        members.setdefault((study, -1) if study.strip() else ("", index), []).append(index)
    keys = list(members)
    order = [study for study, _ in keys]
    records = np.full((len(order), max_views), -1, np.int64)
    types = np.zeros((len(order), max_views), np.int32)
    for s, key in enumerate(keys):
        ranked = sorted(members[key], key=lambda i: (view_type(views[i]), i))[:max_views]
        records[s, : len(ranked)] = ranked
        types[s, : len(ranked)] = [view_type(views[i]) for i in ranked]
    return records, types, order


def largest(study_ids: list[str]) -> int:
    """Images in the largest study (an image without a study id is a study of one)."""
    sizes: dict[str, int] = {}
    for study in study_ids:
        if study.strip():
            sizes[study] = sizes.get(study, 0) + 1
    return max(sizes.values(), default=1)


def slice_key(record: dict) -> tuple[float, str]:
    """A slice's place in its series: its stored `slice_position` (datasets built with --slice_position_column, z
    in mm or an index), then its image id (the whole order without positions: name slices so, e.g. '..._z007')."""
    position = float(record["slice_position"]) if "slice_position" in record else 0.0
    return position, record["image_id"].decode()


def volumes(series_ids: list[str], slice_keys: list[tuple[float, str]], depth: int) -> tuple[np.ndarray, int]:
    """A split's slices as volumes: (record index per series and slice (S, longest), -1 for padding, slices in
    `slice_key` order), and how many series were left out for having fewer than `depth` slices. Each series is
    one study id (a CT series, a patient's scan)."""
    members: dict[str, list[int]] = {}
    for index, series in enumerate(series_ids):
        members.setdefault(series, []).append(index)
    kept = [sorted(m, key=lambda i: slice_keys[i]) for m in members.values() if len(m) >= depth]
    records = np.full((len(kept), max((len(m) for m in kept), default=depth)), -1, np.int64)
    for s, slices in enumerate(kept):
        records[s, : len(slices)] = slices
    return records, len(members) - len(kept)
