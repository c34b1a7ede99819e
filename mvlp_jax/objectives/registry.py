"""The objectives a config may name, by name; what the configured ones need, asked of their specs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_collections

from mvlp_jax.data import report_tokens as report_tokens_lib
from mvlp_jax.objectives import dino, ijepa, llm_contrastive, local_alignment, mae, mflag, query_box
from mvlp_jax.objectives.spec import Spec, image_shape

SPECS: dict[str, Spec] = {}
DEFAULT = {"llm_contrastive": 1.0, "mae": 1.0}  # config.objectives of the production recipe


def register(spec: Spec) -> Spec:
    """Adds an objective (a name `config.objectives` may then use); returns it."""
    if spec.name in SPECS and SPECS[spec.name] is not spec:
        raise ValueError(f"an objective named {spec.name!r} is already registered")
    SPECS[spec.name] = spec
    return spec


for _module in (llm_contrastive, mae, mflag, dino, query_box, ijepa, local_alignment):
    register(_module.SPEC)


def config_rows() -> dict[str, tuple]:
    """The config keys of every registered objective (mvlp_jax/configuration.py adds them to its core rows)."""
    rows: dict[str, tuple] = {}
    for spec in SPECS.values():
        clash = sorted(set(rows) & set(spec.config_rows))
        if clash:
            raise ValueError(f"objective {spec.name!r} declares config keys another objective owns: {clash}")
        rows.update(spec.config_rows)
    return rows


def get(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(SPECS)}")
    return SPECS[name]


def configured(config: ml_collections.ConfigDict, names: Iterable[str] | None = None) -> list[Spec]:
    """Specs of the config's objectives (or of `names`), in name order (the order losses and views run in)."""
    return [get(n) for n in sorted(config.objectives if names is None else names)]


def needs_targets(config: ml_collections.ConfigDict) -> bool:
    return any(s.needs_targets for s in configured(config))


def report_tokens(config: ml_collections.ConfigDict) -> int:
    """How many per-token report states per example the configured objectives read (0: none)."""
    return max([s.report_tokens(config) for s in configured(config) if s.report_tokens is not None], default=0)


def entries(config: ml_collections.ConfigDict, target_dim: int = 0) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Every batch entry the configured objectives read: {key: (per-example shape, dtype)}."""
    specs = configured(config)
    out = {"image": image_shape(config)} if any(s.uses_image for s in specs) else {}
    views = config.data.get("max_views", 1)
    if views > 1 and out:  # a study: its views, their types and which slots are padding
        import numpy as np

        shape, dtype = out["image"]
        out.update(image=((views, *shape), dtype), view_type=((views,), np.int32), view_mask=((views,), np.bool_))
    if target_dim and any(s.needs_targets for s in specs):
        import numpy as np

        out["target"] = ((target_dim,), np.float32)
        if report_tokens(config):
            out.update(report_tokens_lib.entries(report_tokens(config), target_dim))
    for s in specs:
        out.update(s.entries(config))
    return out


def check(config: ml_collections.ConfigDict) -> None:
    for s in configured(config):
        if s.check is not None:
            s.check(config)
    single = [s.name for s in configured(config) if s.views is not None and s.study_views is None]
    if config.data.get("max_views", 1) > 1 and single:
        study_ready = [s.name for s in SPECS.values() if s.views is None or s.study_views is not None]
        raise ValueError(
            f"objectives {', '.join(single)} build their own views of one image; with "
            f"data.max_views={config.data.max_views} (studies) use {', '.join(sorted(study_ready))}"
        )
