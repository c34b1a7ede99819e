"""Dataset sources: each scans one on-disk layout into `RawRecord`s (no image decoding)."""

from __future__ import annotations

from collections.abc import Callable

from mvlp_jax.data.records import SourceScan

SOURCE_NAMES = ("mimic_cxr", "iu_xray", "nih14", "csv")


def get_scanner(source: str) -> Callable[..., SourceScan]:
    """The scan function of a source, imported lazily; ValueError for an unknown source."""
    if source == "mimic_cxr":
        from data_prep.sources.mimic_cxr import scan
    elif source == "iu_xray":
        from data_prep.sources.iu_xray import scan
    elif source == "nih14":
        from data_prep.sources.nih14 import scan
    elif source == "csv":
        from data_prep.sources.csv_manifest import scan
    else:
        raise ValueError(f"unknown --source={source!r}; choose one of {', '.join(SOURCE_NAMES)}")
    return scan
