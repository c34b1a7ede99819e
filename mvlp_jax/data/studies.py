"""A split's images grouped into studies for the multi-view encoder: frontal views first, then laterals, then
the others (vit.VIEW_TYPES), at most `max_views` per study, the rest padding."""
from __future__ import annotations

import numpy as np

from data_prep.records import view_selected

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
    beyond `max_views` are left out."""
    members: dict[str, list[int]] = {}
    for index, study in enumerate(study_ids):
        members.setdefault(study, []).append(index)
    order = list(members)
    records = np.full((len(order), max_views), -1, np.int64)
    types = np.zeros((len(order), max_views), np.int32)
    for s, study in enumerate(order):
        ranked = sorted(members[study], key=lambda i: (view_type(views[i]), i))[:max_views]
        records[s, :len(ranked)] = ranked
        types[s, :len(ranked)] = [view_type(views[i]) for i in ranked]
    return records, types, order
