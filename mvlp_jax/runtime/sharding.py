"""The one place that builds the device mesh and decides how arrays are laid out on it.

Mesh axes: `data` (pure data parallel), `fsdp` (batch split and parameters sharded), `model`
(tensor parallel over heads and MLP hidden units). Parameters carry logical axis names from the
models (`embed`, `mlp`, `heads`, ...); RULES map them to mesh axes, MaxText-style. A dimension not
divisible by its mesh axes is replicated instead, so any model runs on any mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mvlp_jax.kernels import backend
from mvlp_jax.runtime.logical_axes import ACTIVE_MESH, AXES, BATCH, RULES, activation_spec, active_mesh, constrain, fit  # noqa: F401


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """config.mesh {data, fsdp, model} with one -1 filled by the remaining devices."""
    sizes = [int(config.mesh[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got mesh {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    # topology-aware on TPU (splitting physical axes where a mesh axis needs it), id order on GPU, as given on CPU
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES)


def param_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of (possibly nn.Partitioned-boxed) arrays or shape structs."""
    specs = nn.get_partition_spec(boxed_tree)
    logical_free = nn.logical_to_mesh(specs, RULES)
    shapes = nn.unbox(boxed_tree)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit(spec, x.shape, mesh)),
        logical_free,
        shapes,
        is_leaf=lambda s: isinstance(s, P),
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process batch slices -> global arrays sharded over (data, fsdp) across all processes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


@contextlib.contextmanager
def active(mesh: Mesh) -> Iterator[None]:
    """Mesh, RULES and the kernel backend of the mesh's devices in effect while tracing, so activation
    constraints resolve to mesh axes and kernels follow the devices the program is for (`kernels.backend`).

    The mesh is held here rather than set globally (jax.set_mesh): flax would then also constrain
    parameters while unboxing them, which breaks on DenseGeneral's flattened kernels.
    """
    chosen = backend.select(list(mesh.devices.flat))  # outside any trace: may load MKL and time GEMMs once
    token = ACTIVE_MESH.set(mesh)
    try:
        with nn.logical_axis_rules(RULES), backend.use(chosen):
            yield
    finally:
        ACTIVE_MESH.reset(token)
