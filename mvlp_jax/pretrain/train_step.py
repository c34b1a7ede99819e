"""Train state and the jit-sharded train step (pure: state, batch -> state, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import combine, registry
from mvlp_jax.objectives.spec import image_shape
from mvlp_jax.pretrain import optim
from mvlp_jax.runtime import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: updates attempted (skipped ones included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step s uses fold_in(rng, s), so resuming is exact
    nonfinite_run: jax.Array  # int32: consecutive skipped (non-finite) updates
    nonfinite_total: jax.Array
    extra: Any  # state outside the optimizer: DINO's EMA teacher and center ({} otherwise)


def example_batch(config: ml_collections.ConfigDict, target_dim: int, batch: int = 2) -> dict[str, jax.Array]:
    """Zeros shaped like a batch of the configured objectives' entries (the input pipeline's, at `batch`)."""
    return {k: jnp.zeros((batch, *shape), dtype) for k, (shape, dtype) in registry.entries(config, target_dim).items()}


def param_layout(model: Pretrainer, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Callable, Any, Any]:
    """(init function of a PRNG key -> boxed params, abstract params, param shardings): the parameters' shape and
    layout without computing them or building an optimizer (what restoring an encoder needs)."""
    ex = example_batch(config, model.target_dim)
    images = ex.get("image", jnp.zeros((2, *image_shape(config)[0]), jnp.float32))

    def init_params(k):
        return model.init(
            {"params": k, "masking": k, "dropout": k}, images, ex.get("target"), method=Pretrainer.init_all
        )["params"]

    key = jax.random.PRNGKey(config.seed)
    with sharding.active(mesh):
        boxed = jax.eval_shape(init_params, key)
    return init_params, nn.unbox(boxed), sharding.param_shardings(boxed, mesh)


def state_layout(
    model: Pretrainer, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[Callable, TrainState, Any]:
    """(init function of a PRNG key, abstract state, state shardings): the state's shape without computing it."""
    init_params, _, param_sh = param_layout(model, config, mesh)

    def init(k):
        params = nn.unbox(init_params(k))
        extra = {}
        for spec in registry.configured(config):
            if spec.init_extra is not None:
                extra.update(spec.init_extra(params, config))
        return TrainState(
            jnp.zeros((), jnp.int32),
            params,
            tx.init(params),
            jax.random.fold_in(k, 1),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            extra,
        )

    with sharding.active(mesh):
        abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    rep = sharding.replicated(mesh)
    opt_sh, extra_sh = (
        _match_param_shardings(tree, abstract.params, param_sh, jax.tree.map(lambda x: rep, tree))
        for tree in (abstract.opt_state, abstract.extra)
    )
    return init, abstract, TrainState(rep, param_sh, opt_sh, rep, rep, rep, extra_sh)


def create_state(
    model: Pretrainer, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[TrainState, Any]:
    """Initialises params and optimizer state directly in their shardings; returns (state, shardings)."""
    init, _, state_sh = state_layout(model, tx, config, mesh)
    with sharding.active(mesh):
        state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
    return state, state_sh


def _match_param_shardings(opt_state: Any, params: Any, param_sh: Any, default: Any) -> Any:
    """Optimizer leaves whose path ends with a parameter's path (Adam moments) take its sharding."""
    by_path = {
        tuple(path): (leaf.shape, sh)
        for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh))
    }
    depth = {len(p) for p in by_path}

    def pick(path, leaf, fallback):
        for n in depth:
            match = by_path.get(tuple(path[-n:]))
            if match and match[0] == leaf.shape:
                return match[1]
        return fallback

    return jax.tree_util.tree_map_with_path(pick, opt_state, default)


def make_train_step(
    model: Pretrainer,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    only: Iterable[str] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`only`: train only these objectives (every step), to measure one objective's cost in a cyclic run."""
    loss_fn = combine.make(model, config, only)
    updaters = [s.update_extra for s in registry.configured(config, only) if s.update_extra is not None]
    accum = config.optim.accum_steps

    def grads_of(params, batch, rng, step, extra):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, step, extra)

    def accumulated(params, batch, rng, step, extra):
        """Mean of gradients over `accum` strided micro-batches (each shard stays on its devices)."""
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

        def body(carry, i_batch):
            i, b = i_batch
            (loss, metrics), grads = grads_of(params, b, jax.random.fold_in(rng, i), step, extra)
            return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

        zeros = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng, step, extra)
        )
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return jax.tree.map(lambda x: x / accum, total)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        compute = grads_of if accum == 1 else accumulated
        (loss, metrics), grads = compute(state.params, batch, rng, state.step, state.extra)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        extra = state.extra
        for update in updaters:  # after the student's update (DINO's teacher follows the updated student)
            extra, metrics = update(extra, params, metrics, state.step, config)
        state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=state.rng,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            extra=keep(extra, state.extra),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "skipped_nonfinite": state.nonfinite_total,
            "nonfinite_run": state.nonfinite_run,
            "learning_rate": optim.learning_rate(config)(state.step - 1),
        }
        return state, metrics

    return train_step


def lower_train_step(
    train_step: Callable, state: TrainState, state_sh: Any, mesh: Mesh, batch_shapes: dict[str, jax.ShapeDtypeStruct]
) -> Any:
    """The jitted step lowered with explicit shardings (state donated, batch over (data, fsdp)), not compiled."""
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    with sharding.active(mesh):
        return jitted.lower(state, batch_shapes)


def compile_train_step(
    train_step: Callable, state: TrainState, state_sh: Any, mesh: Mesh, batch_shapes: dict[str, jax.ShapeDtypeStruct]
) -> Any:
    """jit with explicit shardings (state donated and kept in place, batch over (data, fsdp)), compiled
    ahead of time so its FLOPs are known; call it as compiled(state, global_batch)."""
    lowered = lower_train_step(train_step, state, state_sh, mesh, batch_shapes)
    with sharding.active(mesh):
        return lowered.compile()


def cyclic_flops_share(
    model: Pretrainer,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    state: TrainState,
    state_sh: Any,
    mesh: Mesh,
    batch_shapes: dict[str, jax.ShapeDtypeStruct],
) -> float:
    """What to multiply a cyclic program's counted FLOPs by to get those of a mean step (1 for other schedules).

    XLA's cost analysis of a `lax.switch` counts its costliest branch (measured: the cyclic multitask step counts
    as much as its DINO step alone, ~3x its MAE step), while step s runs objective s mod n. Each objective's step
    and the cyclic one are lowered (not compiled): the ratio of the mean of the first to the second."""
    if not combine.cyclic(config):
        return 1.0

    def count(only):
        step = make_train_step(model, tx, config, only)
        cost = lower_train_step(step, state, state_sh, mesh, batch_shapes).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0))

    whole = count(None)
    alone = [count([name]) for name in sorted(config.objectives)]
    return sum(alone) / len(alone) / whole if whole > 0 and all(alone) else 1.0
