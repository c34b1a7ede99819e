"""The config engine: tables of keys (default, check, description), ConfigDicts built from them, validation that
names the bad key and the rule it breaks, and the Markdown that documents them.

A table is `{dotted key: (default, check, description)}`. Pretraining's is assembled in mvlp_jax/configuration.py
(its core rows and each objective Spec's), the evaluation binary's in mvlp_jax/evaluation/registry.py (its common
rows and each evaluator's): one table per program, so code, checks and docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on a value and the rule it states, shown when a value breaks it (a callable text is asked
    when shown: a rule over a registry names what is registered then)."""

    holds: Callable[[Any], bool]
    text: str | Callable[[], str]

    def says(self) -> str:
        return self.text() if callable(self.text) else self.text


Check = tuple | Rule | None  # a tuple of allowed values, a rule, or any value of the type
Row = tuple[Any, Check, str]  # (default, check, description)
Table = dict[str, Row]
Between = tuple[Callable[[Any], bool], str]  # a rule between keys: (holds, the message when it does not)

POSITIVE = Rule(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
FRACTION = Rule(lambda v: 0 <= v < 1, "must lie in [0, 1)")
UNIT_INTERVAL = Rule(lambda v: 0 <= v <= 1, "must lie in [0, 1]")
CROP_SCALE = Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must be (low, high) with 0 < low <= high <= 1")
WIDTHS = Rule(lambda v: len(v) > 0 and all(int(c) > 0 for c in v), "must be positive widths")


def defaults(table: Table) -> ml_collections.ConfigDict:
    """The ConfigDict holding every key of `table` at its default."""
    tree: dict[str, Any] = {}
    for key, (default, _, _) in table.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = default
    return ml_collections.ConfigDict(tree)


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys ('model.image_size') of `config` in place, as --config.KEY=VALUE flags do, creating
    missing groups (`validate` rejects unknown keys); returns it."""
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = value
    return config


def flatten(config: Any, table: Table, prefix: str = "") -> dict[str, Any]:
    """{'model.image_size': 224, ...}; a dict that is a key's value (config.objectives) stays whole."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in table:
            out.update(flatten(value, table, name + "."))
        else:
            out[name] = value
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    kinds = {float: (int, float), tuple: (tuple, list), dict: (dict, ml_collections.ConfigDict)}
    return isinstance(value, kinds.get(type(default), type(default)))


def validate(config: ml_collections.ConfigDict, table: Table, between: tuple[Between, ...] = ()) -> None:
    """Raises ValueError naming the first unknown key or invalid value, with the rule it breaks; then the first
    rule `between` keys that does not hold."""
    flat = flatten(config, table)
    for key in flat:
        if key not in table:
            close = [k for k in table if k.split(".")[-1] == key.split(".")[-1]]
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    for key, (default, check, doc) in table.items():
        if key not in flat:
            raise ValueError(f"config key {key!r} is missing (default {default!r})")
        value = flat[key]
        if not _same_kind(default, value):
            raise ValueError(f"config key {key!r} = {value!r} must be of type {type(default).__name__}")
        if isinstance(check, tuple) and value not in check:
            raise ValueError(f"config key {key!r} = {value!r}; allowed values: {', '.join(map(repr, check))}")
        if isinstance(check, Rule) and not check.holds(value):
            shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            raise ValueError(f"config key {key!r} = {shown!r} {check.says()}: {doc}")
    for holds, message in between:
        if not holds(config):
            raise ValueError(message)


def describe(table: Table) -> str:
    """Markdown table of every key of `table` (docs/config.md)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, (default, check, doc) in table.items():
        allowed = (
            f" One of {', '.join(map(repr, check))}."
            if isinstance(check, tuple)
            else f" Value {check.says()}."
            if isinstance(check, Rule)
            else ""
        )
        rows.append(f"| `{key}` | `{default!r}` | {doc}{allowed} |")
    return "\n".join(rows)


def parse_arg(arg: str | None, allowed: tuple[str, ...], config: str) -> set[str]:
    """A config file's variants: 'demo,vitdet' -> {'demo', 'vitdet'}; refuses names outside `allowed`, naming
    the config file (big_vision's `parse_arg` idea, with names only)."""
    chosen = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = sorted(chosen - set(allowed))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} of {config}; choose from {', '.join(allowed)}")
    return chosen


def config_module(path: str):
    """The config file at `path` as a module, loaded by path as --config=PATH loads it (config files are not a
    package: one builds on another through this, e.g. `schema.config_module(os.path.join(os.path.dirname(__file__),
    "pretrain.py"))`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config file {path}")
    name = "mvlp_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (--config=PATH:ARG)."""
    return config_module(path).get_config(arg)
