"""The evaluators `config.evaluator` may name, and the evaluation binary's config table: the common rows, each
evaluator's own rows and the `evaluator` key itself. A new evaluator is one module exporting
`EVALUATOR = common.Evaluator(...)` and one line below (or a `register` call, as tests do)."""

from __future__ import annotations

import ml_collections

from mvlp_jax.evaluation import classification, common, retrieval, zero_shot
from mvlp_jax.evaluation.dense import detection, segmentation, volume_segmentation
from mvlp_jax.runtime import schema

EVALUATORS: dict[str, common.Evaluator] = {}


def register(evaluator: common.Evaluator) -> common.Evaluator:
    """Adds an evaluator (a name `config.evaluator` may then use); returns it."""
    if evaluator.name in EVALUATORS and EVALUATORS[evaluator.name] is not evaluator:
        raise ValueError(f"an evaluator named {evaluator.name!r} is already registered")
    EVALUATORS[evaluator.name] = evaluator
    return evaluator


for _module in (classification, retrieval, zero_shot, segmentation, detection, volume_segmentation):
    register(_module.EVALUATOR)


def get(name: str) -> common.Evaluator:
    if name not in EVALUATORS:
        raise ValueError(f"unknown evaluator {name!r}; registered: {', '.join(EVALUATORS)}")
    return EVALUATORS[name]


def table() -> schema.Table:
    """Every evaluation key: `evaluator`, the common rows, then each registered evaluator's own."""
    rows: schema.Table = {
        "evaluator": (
            "classification",
            schema.Rule(lambda v: v in EVALUATORS, lambda: f"must be one of {', '.join(EVALUATORS)}"),
            "What to evaluate: " + "; ".join(f"'{e.name}': {e.description}" for e in EVALUATORS.values()) + ".",
        )
    }
    rows.update(common.ROWS)
    for evaluator in EVALUATORS.values():
        clash = sorted(set(rows) & set(evaluator.config_rows))
        if clash:
            raise ValueError(f"evaluator {evaluator.name!r} declares config keys already taken: {clash}")
        rows.update(evaluator.config_rows)
    return rows


def defaults() -> ml_collections.ConfigDict:
    """Every evaluation key at its default: what configs/linear_probe.py and the other evaluation configs start
    from."""
    return schema.defaults(table())


def rules(name: str) -> tuple[schema.Between, ...]:
    """The rules between keys that a config for evaluator `name` must obey."""
    return common.RULES + (get(name).rules if name in EVALUATORS else ())


# Evaluation configs written before the registry chose the evaluation by task x mode: what each now is
_RENAMED = {
    ("mode", "retrieval"): "evaluator='retrieval'",
    ("mode", "zero_shot"): "evaluator='zero_shot'",
    ("task", "classification"): "evaluator='classification'",
    ("task", "segmentation"): "evaluator='segmentation'",
    ("task", "detection"): "evaluator='detection'",
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first unknown key, bad value or broken rule of an evaluation config (and what
    an older config's task or mode is called now)."""
    for (key, value), now in _RENAMED.items():
        if config.get(key) == value:
            raise ValueError(
                f"config.{key}={value!r} is now config.{now} (the evaluator registry picks the "
                f"evaluation; mode stays 'linear' or 'finetune')"
            )
    schema.validate(config, table(), rules(config.get("evaluator", "")))
