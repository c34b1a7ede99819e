"""Training a dense model (a segmentation or detection head on frozen patch tokens, or an encoder and head on
images): AdamW, full batches drawn from a fresh permutation every epoch and sharded over the mesh's devices,
early stopping on the validation loss; the variables of the best epoch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mvlp_jax.runtime import sharding

Targets = dict[str, np.ndarray]  # per-image arrays, first axis the image
LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]  # (model outputs, targets) -> scalar
Optimizer = Callable[[Any], optax.GradientTransformation]  # params -> their optimiser


def _context(mesh: jax.sharding.Mesh | None):
    return sharding.active(mesh) if mesh is not None else contextlib.nullcontext()


class Head:
    """A trained model: its module and variables (params and BatchNorm statistics) at `epoch`."""

    def __init__(
        self, module: nn.Module, variables: dict, epoch: int, val_loss: float, mesh: jax.sharding.Mesh | None = None
    ):
        self.module, self.variables, self.epoch, self.val_loss, self.mesh = module, variables, epoch, val_loss, mesh
        self._apply = _inference(module)

    def outputs(self, inputs: np.ndarray, batch: int = 32) -> Any:
        """The model's outputs (an array or a tuple of arrays) for every input, as numpy."""
        with _context(self.mesh):
            parts = [
                jax.tree.map(np.asarray, self._apply(self.variables, jnp.asarray(inputs[i : i + batch])))
                for i in range(0, len(inputs), batch)
            ]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def graft(params: dict, pretrained: dict, where: str = "params") -> dict:
    """`params` with each subtree that `pretrained` names taken from it: every leaf the model has there must come
    from `pretrained` with its shape; what only `pretrained` has (pretraining-only weights such as SimMIM's mask
    token) is left out."""
    out = dict(params)
    for key, value in pretrained.items():
        if key not in params:
            raise ValueError(f"{where}/{key} is not a parameter of the model")
        out[key] = _take(params[key], value, f"{where}/{key}")
    return out


def _take(model: Any, pretrained: Any, where: str) -> Any:
    if isinstance(model, dict):
        missing = [k for k in model if not isinstance(pretrained, dict) or k not in pretrained]
        if missing:
            raise ValueError(f"{where}/{missing[0]} is missing from the pretrained weights")
        return {k: _take(v, pretrained[k], f"{where}/{k}") for k, v in model.items()}
    if np.shape(pretrained) != np.shape(model):
        raise ValueError(f"{where}: pretrained shape {np.shape(pretrained)}, the model's {np.shape(model)}")
    return pretrained


def batch_size(n: int, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> int:
    """`c.batch_size` (at most n) rounded down to a multiple of the mesh's devices, at least one per device."""
    devices = mesh.devices.size if mesh is not None else 1
    return max(devices, min(c.batch_size, n) // devices * devices)


def steps_per_epoch(n: int, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> int:
    return -(-n // batch_size(n, c, mesh))


def _rows(targets: Targets, idx, put: Callable) -> dict[str, jax.Array]:
    return {k: put(v[idx]) for k, v in targets.items()}


def _compiled_once(factory: Callable) -> Callable:
    """`factory`'s jitted function made once per model and loss (and optimiser settings), not once per head: an
    evaluation trains one head per checkpoint, label fraction and seed, all of the same shapes. A module holding
    an unhashable field (a ConfigDict) gets its own each time."""
    cached = functools.lru_cache(maxsize=16)(factory)

    def get(*args: Any) -> Any:
        try:
            hash(args)
        except TypeError:
            return factory(*args)
        return cached(*args)

    return get


@_compiled_once
def _inference(module: nn.Module) -> Callable:
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


@_compiled_once
def _validation_loss(module: nn.Module, loss_fn: LossFn) -> Callable:
    return jax.jit(lambda v, x, y: loss_fn(module.apply(v, x, train=False), y))


def _train_step(module: nn.Module, loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
    def step(variables: dict, opt_state: Any, x: jax.Array, y: dict, rng: jax.Array):
        def loss(params):
            out, updated = module.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
            )
            return loss_fn(out, y), updated

        (value, updated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {**variables, "params": optax.apply_updates(variables["params"], updates), **updated}, opt_state, value

    return jax.jit(step)


@_compiled_once
def _adamw(
    module: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float
) -> tuple[optax.GradientTransformation, Callable]:
    tx = optax.adamw(lr, weight_decay=weight_decay)
    return tx, _train_step(module, loss_fn, tx)


def fit(
    module: nn.Module,
    loss_fn: LossFn,
    inputs: np.ndarray,
    targets: Targets,
    val_inputs: np.ndarray,
    val_targets: Targets,
    c: ml_collections.ConfigDict,
    seed: int,
    desc: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    pretrained: dict | None = None,
    optimizer: Optimizer | None = None,
) -> Head:
    """Trains `module` on (inputs, targets) with `c.batch_size`, `c.epochs` and `c.patience` (and by default
    AdamW at `c.lr`, `c.weight_decay`); `pretrained` replaces the named parameter subtrees after init. Batches
    are a multiple of the mesh's devices and split over them. Returns the model at the epoch of the lowest
    validation loss."""
    key = jax.random.PRNGKey(seed)
    variables = nn.meta.unbox(module.init({"params": key, "dropout": key}, jnp.asarray(inputs[:1])))
    if pretrained:
        variables = {**variables, "params": graft(variables["params"], pretrained)}
    if optimizer:
        tx = optimizer(variables["params"])
        step = _train_step(module, loss_fn, tx)
    else:
        tx, step = _adamw(module, loss_fn, c.lr, c.weight_decay)
    batch = batch_size(len(inputs), c, mesh)
    put = (
        (lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)))
        if mesh is not None and mesh.devices.size > 1
        else jnp.asarray
    )
    evaluate = _validation_loss(module, loss_fn)
    chunks = [slice(i, i + batch) for i in range(0, len(val_inputs), batch)]
    val_loss = lambda v: float(
        np.average(
            [evaluate(v, jnp.asarray(val_inputs[s]), _rows(val_targets, s, jnp.asarray)) for s in chunks],
            weights=[len(val_inputs[s]) for s in chunks],
        )
    )
    rng = np.random.default_rng(seed)
    steps = steps_per_epoch(len(inputs), c, mesh)
    permutations = max(2, -(-batch // len(inputs)))  # enough for full batches that see every input
    with _context(mesh):
        opt_state = tx.init(variables["params"])
        best, since_best = Head(module, variables, 0, np.inf, mesh), 0
        bar = tqdm(range(1, c.epochs + 1), desc=desc, unit="epoch", leave=False)
        for epoch in bar:
            order = np.concatenate([rng.permutation(len(inputs)) for _ in range(permutations)])
            for s in range(steps):
                idx = order[s * batch : (s + 1) * batch]
                variables, opt_state, _ = step(
                    variables,
                    opt_state,
                    put(inputs[idx]),
                    _rows(targets, idx, put),
                    jax.random.fold_in(key, epoch * steps + s),
                )
            loss = val_loss(variables)
            if loss < best.val_loss:
                best, since_best = Head(module, variables, epoch, loss, mesh), 0
            else:
                since_best += 1
            bar.set_postfix(val_loss=f"{loss:.4f}", best=f"{best.val_loss:.4f} at {best.epoch}")
            if since_best >= c.patience:
                break
    return best
