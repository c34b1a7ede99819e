"""Objectives combined per step: a weighted sum, or one objective per step in turn (cyclic)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.objectives import registry


def cyclic(config: ml_collections.ConfigDict) -> bool:
    """Whether steps take the objectives in turn (a cyclic schedule of more than one)."""
    return config.task_schedule == "cyclic" and len(config.objectives) > 1


def active(config: ml_collections.ConfigDict, step: int) -> list[str]:
    """The objectives step `step` trains, in name order."""
    names = sorted(config.objectives)
    return [names[step % len(names)]] if cyclic(config) else names


def make(
    model: nn.Module, config: ml_collections.ConfigDict, only: Iterable[str] | None = None
) -> Callable[..., tuple[jax.Array, dict]]:
    """(params, batch, rng, step, extra={}) -> (total loss, metrics named 'objective/metric'); `extra` is the
    train state's non-gradient part (DINO's teacher and center), handed to objectives with the step. `only`
    restricts a weighted sum to some objectives (to measure one objective's share of a cyclic step)."""
    names = sorted(config.objectives)
    weights = {n: float(config.objectives[n]) for n in names}
    objectives = {n: registry.get(n).make_loss(model, config) for n in names}

    def run(name: str, params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        loss, metrics = objectives[name](params, batch, jax.random.fold_in(rng, names.index(name)), context)
        metrics = {**metrics, "active": jnp.ones((), jnp.float32)}  # 0 on the steps a cyclic schedule skips it
        return weights[name] * loss, {f"{name}/{k}": v for k, v in metrics.items()}

    def weighted_sum(
        params: Any, batch: dict, rng: jax.Array, step: jax.Array, extra: Any = None
    ) -> tuple[jax.Array, dict]:
        context = {"step": step, "extra": extra}
        total, metrics = jnp.zeros((), jnp.float32), {}
        for name in names if only is None else sorted(only):
            loss, m = run(name, params, batch, rng, context)
            total, metrics = total + loss, {**metrics, **m}
        return total, metrics

    def one_per_step(
        params: Any, batch: dict, rng: jax.Array, step: jax.Array, extra: Any = None
    ) -> tuple[jax.Array, dict]:
        context = {"step": step, "extra": extra}
        shapes = {
            n: jax.eval_shape(lambda p, b, r, n=n: run(n, p, b, r, context)[1], params, batch, rng) for n in names
        }
        zeros = {k: jnp.zeros(v.shape, v.dtype) for s in shapes.values() for k, v in s.items()}

        def branch(name: str) -> Callable:
            def f(p, b, r):
                loss, m = run(name, p, b, r, context)
                return loss, {**zeros, **m}

            return f

        return jax.lax.switch(step % len(names), [branch(n) for n in names], params, batch, rng)

    return one_per_step if only is None and cyclic(config) else weighted_sum
