"""Objectives combined per step: a weighted sum, or one objective per step in turn (cyclic)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import dino, llm_contrastive, mae, mflag, query_box

Objective = Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]  # (params, batch, rng, context)
REGISTRY: dict[str, Callable[[Pretrainer, ml_collections.ConfigDict], Objective]] = {
    "llm_contrastive": llm_contrastive.make,
    "mae": mae.make,
    "mflag": mflag.make,
    "dino": dino.make,
    "query_box": query_box.make,
}


def make(model: Pretrainer, config: ml_collections.ConfigDict
         ) -> Callable[..., tuple[jax.Array, dict]]:
    """(params, batch, rng, step, extra={}) -> (total loss, metrics named 'objective/metric'); `extra` is the
    train state's non-gradient part (DINO's teacher and center), handed to objectives with the step."""
    names = sorted(config.objectives)
    weights = {n: float(config.objectives[n]) for n in names}
    objectives = {n: REGISTRY[n](model, config) for n in names}

    def run(name: str, params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        loss, metrics = objectives[name](params, batch, jax.random.fold_in(rng, names.index(name)), context)
        metrics = {**metrics, "active": jnp.ones((), jnp.float32)}  # 0 on the steps a cyclic schedule skips it
        return weights[name] * loss, {f"{name}/{k}": v for k, v in metrics.items()}

    def weighted_sum(params: Any, batch: dict, rng: jax.Array, step: jax.Array, extra: Any = None
                     ) -> tuple[jax.Array, dict]:
        context = {"step": step, "extra": extra}
        total, metrics = jnp.zeros((), jnp.float32), {}
        for name in names:
            loss, m = run(name, params, batch, rng, context)
            total, metrics = total + loss, {**metrics, **m}
        return total, metrics

    def cyclic(params: Any, batch: dict, rng: jax.Array, step: jax.Array, extra: Any = None
               ) -> tuple[jax.Array, dict]:
        context = {"step": step, "extra": extra}
        shapes = {n: jax.eval_shape(lambda p, b, r, n=n: run(n, p, b, r, context)[1], params, batch, rng)
                  for n in names}
        zeros = {k: jnp.zeros(v.shape, v.dtype) for s in shapes.values() for k, v in s.items()}

        def branch(name: str) -> Callable:
            def f(p, b, r):
                loss, m = run(name, p, b, r, context)
                return loss, {**zeros, **m}
            return f

        return jax.lax.switch(step % len(names), [branch(n) for n in names], params, batch, rng)

    return cyclic if config.task_schedule == "cyclic" and len(names) > 1 else weighted_sum

