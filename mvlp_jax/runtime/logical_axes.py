"""Logical axis names of activations and parameters -> mesh axes (MaxText-style RULES), and the mesh a program
is being traced for: what model code and kernels read to lay activations out, below everything that builds
meshes (runtime/sharding.py)."""

from __future__ import annotations

import contextvars
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")

# logical name -> mesh axes, first unused match wins (flax semantics)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicates the dimensions whose size the assigned mesh axes do not divide."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mvlp_active_mesh", default=None)


def active_mesh() -> Mesh | None:
    """The mesh of `active(mesh)`, or None outside it."""
    return ACTIVE_MESH.get()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names; identity outside `active(mesh)`."""
    mesh = ACTIVE_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.shape, names, mesh)))


def activation_spec(shape: tuple[int, ...], names: tuple[str | None, ...], mesh: Mesh) -> P:
    """The PartitionSpec of an activation of `shape` with logical axis `names` on `mesh` (by RULES)."""
    return fit(nn.logical_to_mesh_axes(names, RULES), shape, mesh)
