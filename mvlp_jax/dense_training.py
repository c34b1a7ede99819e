"""Training a dense head (segmentation, detection) on frozen patch-token grids: AdamW, full batches drawn
from a fresh permutation every epoch, early stopping on the validation loss; the head of the best epoch."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

Targets = dict[str, np.ndarray]  # per-image arrays, first axis the image
LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]  # (head outputs, targets) -> scalar


class Head:
    """A trained head: its module and variables (params and BatchNorm statistics) at `epoch`."""

    def __init__(self, module: nn.Module, variables: dict, epoch: int, val_loss: float):
        self.module, self.variables, self.epoch, self.val_loss = module, variables, epoch, val_loss
        self._apply = jax.jit(lambda v, x: module.apply(v, x, train=False))

    def outputs(self, tokens: np.ndarray, batch: int = 32) -> Any:
        """The head's outputs (an array or a tuple of arrays) for every image, as numpy."""
        parts = [jax.tree.map(np.asarray, self._apply(self.variables, jnp.asarray(tokens[i:i + batch])))
                 for i in range(0, len(tokens), batch)]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _rows(targets: Targets, idx) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v[idx]) for k, v in targets.items()}


def fit(module: nn.Module, loss_fn: LossFn, tokens: np.ndarray, targets: Targets, val_tokens: np.ndarray,
        val_targets: Targets, c: ml_collections.ConfigDict, seed: int, desc: str) -> Head:
    """Trains `module` on (tokens, targets) with `c.lr`, `c.weight_decay`, `c.batch_size`, `c.epochs` and
    `c.patience`; returns it at the epoch of the lowest validation loss."""
    variables = module.init(jax.random.PRNGKey(seed), jnp.asarray(tokens[:1]))
    tx = optax.adamw(c.lr, weight_decay=c.weight_decay)
    opt_state = tx.init(variables["params"])
    batch = min(c.batch_size, len(tokens))

    @jax.jit
    def step(variables: dict, opt_state: Any, x: jax.Array, y: dict):
        def loss(params):
            out, updated = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return loss_fn(out, y), updated
        (value, updated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), **updated}, opt_state, value

    evaluate = jax.jit(lambda v, x, y: loss_fn(module.apply(v, x, train=False), y))
    chunks = [slice(i, i + batch) for i in range(0, len(val_tokens), batch)]
    val_loss = lambda v: float(np.average([evaluate(v, jnp.asarray(val_tokens[s]), _rows(val_targets, s))
                                           for s in chunks], weights=[len(val_tokens[s]) for s in chunks]))
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(tokens) // batch)
    best, since_best = Head(module, variables, 0, np.inf), 0
    bar = tqdm(range(1, c.epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in bar:
        order = np.concatenate([rng.permutation(len(tokens)) for _ in range(2)])  # full batches, every image
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            variables, opt_state, _ = step(variables, opt_state, jnp.asarray(tokens[idx]), _rows(targets, idx))
        loss = val_loss(variables)
        if loss < best.val_loss:
            best, since_best = Head(module, variables, epoch, loss), 0
        else:
            since_best += 1
        bar.set_postfix(val_loss=f"{loss:.4f}", best=f"{best.val_loss:.4f} at {best.epoch}")
        if since_best >= c.patience:
            break
    return best
