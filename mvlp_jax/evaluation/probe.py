"""Linear probe: multi-label logistic regression (one sigmoid per label, masked BCE) on frozen features.

Features are standardised with the training split's statistics. The L2 strength and the learning rate
are chosen on the validation split, and training stops early at the validation loss minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvlp_jax.evaluation import metrics


@dataclass
class Probe:
    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    b: np.ndarray
    l2: float
    lr: float
    steps: int
    val_mauc: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probabilities (N, labels)."""
        x = (features - self.mean) / self.std
        return np.asarray(jax.nn.sigmoid(x @ self.w + self.b))


def _masked_bce(w, b, x, y, m):
    logits = x @ w + b
    losses = optax.sigmoid_binary_cross_entropy(logits, y)
    return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0)


def _train(x, y, m, xv, yv, mv, l2: float, lr: float, max_steps: int, eval_every: int):
    """Full-batch Adam; returns the weights at the validation-loss minimum and its step."""
    tx = optax.adam(lr)
    w, b = jnp.zeros((x.shape[1], y.shape[1])), jnp.zeros((y.shape[1],))
    state = tx.init((w, b))

    @jax.jit
    def run(w, b, state):
        def step(carry, _):
            w, b, state = carry
            grads = jax.grad(lambda p: _masked_bce(*p, x, y, m) + 0.5 * l2 * jnp.sum(p[0] ** 2))((w, b))
            updates, state = tx.update(grads, state)
            w, b = optax.apply_updates((w, b), updates)
            return (w, b, state), None

        (w, b, state), _ = jax.lax.scan(step, (w, b, state), None, length=eval_every)
        return w, b, state, _masked_bce(w, b, xv, yv, mv)

    best = (np.inf, w, b, 0)
    for i in range(max_steps // eval_every):
        w, b, state, val = run(w, b, state)
        if float(val) < best[0]:
            best = (float(val), w, b, (i + 1) * eval_every)
        elif (i + 1) * eval_every - best[3] >= 4 * eval_every:  # patience: 4 evaluations
            break
    return best


def fit(
    train_x,
    train_y,
    train_m,
    val_x,
    val_y,
    val_m,
    l2_grid=(0.0, 1e-4, 1e-3, 1e-2, 1e-1),
    lr_grid=(1e-2, 1e-1),
    max_steps: int = 2000,
    eval_every: int = 25,
) -> Probe:
    """Best probe over the (l2, lr) grid by validation mAUC (ties: lower validation loss)."""
    mean = train_x.mean(0)
    std = train_x.std(0) + 1e-6
    norm = lambda f: jnp.asarray((f - mean) / std, jnp.float32)
    x, xv = norm(train_x), norm(val_x)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    y, m, yv, mv = as32(train_y), as32(train_m), as32(val_y), as32(val_m)
    best = None
    for l2, lr in product(l2_grid, lr_grid):
        loss, w, b, steps = _train(x, y, m, xv, yv, mv, l2, lr, max_steps, eval_every)
        probe = Probe(mean, std, np.asarray(w), np.asarray(b), l2, lr, steps, float("nan"))
        probe.val_mauc = metrics.mean_auc(np.asarray(val_y), probe.predict(val_x), np.asarray(val_m, bool))
        key = (np.nan_to_num(probe.val_mauc, nan=-1.0), -loss)
        if best is None or key > best[0]:
            best = (key, probe)
    return best[1]
