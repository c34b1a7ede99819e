"""A pretraining run's image encoder as evaluation and export read it: the parameters of one checkpoint (or of
an untrained model of the same architecture), restored without the optimizer state or the train state."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mvlp_jax import configuration
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import registry
from mvlp_jax.pretrain import train_step
from mvlp_jax.runtime import checkpointing, run_inputs, sharding, storage

RANDOM_INIT = "random_init"


@dataclass
class Encoder:
    name: str
    config: ml_collections.ConfigDict
    model: Pretrainer
    params: dict
    step: int
    source: str = ""  # the resolved checkpoint path (or random_init@architecture)
    fingerprint: str = ""  # sha256 of the restored parameters: what the feature cache is keyed on
    workdir: str = ""  # the run's folder as listed ('' for random_init)
    notes: tuple[str, ...] = ()  # what every result of this encoder must say (run_inputs.notes)


def params_fingerprint(params: Any) -> str:
    """sha256 over every parameter's path, shape, dtype and bytes: two encoders share it only if equal."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.shape}:{value.dtype};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def display_names(locations: list[str]) -> dict[str, str]:
    """A label per listed workdir (or embeddings dir) that no other shares: its folder name, or as many of its
    trailing path components as tell it apart (`A/run`, `B/run`); results are keyed by the location itself."""
    parts = {
        loc: storage.canonical(loc).rstrip("/").split("/") if loc != RANDOM_INIT else [RANDOM_INIT]
        for loc in dict.fromkeys(locations)
    }
    depth = {loc: 1 for loc in parts}
    while True:
        label = {loc: "/".join(p[-depth[loc] :]) for loc, p in parts.items()}
        clashing = [loc for loc in parts if list(label.values()).count(label[loc]) > 1 and depth[loc] < len(parts[loc])]
        if not clashing:
            return label
        for loc in clashing:
            depth[loc] += 1


def load(
    workdir: str,
    step: int,
    mesh: jax.sharding.Mesh,
    like: str = "",
    teacher: bool = False,
    step_flag: str = "--config.step",
    name: str = "",
) -> Encoder:
    """The params of `workdir`'s checkpoint `step` (-1: newest) on `mesh`, read without the optimizer state.
    `random_init` gives the architecture of `like` (a workdir) at its initialisation: the floor. `teacher`
    swaps in a DINO run's EMA teacher encoder (the network DINO evaluates) for the student's. `step_flag`: the
    caller's flag that picks a step, named when a checkpoint is damaged; `name`: the label results use (default:
    the folder's name)."""
    source = like if workdir == RANDOM_INIT else workdir
    if not source:
        raise ValueError("random_init needs an architecture: list a real workdir too, or set config.random_init_like")
    config, target_dim = configuration.load(source)
    config.mesh.data, config.mesh.fsdp, config.mesh.model = -1, 1, 1
    model = Pretrainer(config, target_dim)
    init_params, abstract, param_sh = train_step.param_layout(model, config, mesh)
    if workdir == RANDOM_INIT:
        with sharding.active(mesh):
            params = jax.jit(lambda k: nn.unbox(init_params(k)), out_shardings=param_sh)(
                jax.random.PRNGKey(config.seed)
            )
        return Encoder(
            RANDOM_INIT,
            config,
            model,
            params,
            0,
            f"{RANDOM_INIT}@{storage.canonical(source)}",
            params_fingerprint(params),
        )
    wanted = {"step": jax.ShapeDtypeStruct((), np.int32), "params": abstract}
    shardings = {"step": sharding.replicated(mesh), "params": param_sh}
    store = checkpointing.Store(workdir, config, writer=False)
    if store.latest_step() is None:
        store.close()
        raise FileNotFoundError(f"{workdir} has no checkpoints (looked in {workdir}/checkpoints)")
    try:
        if teacher:
            extra: dict = {}  # the shape of the state its objectives keep outside the optimizer
            for spec in registry.configured(config):
                if spec.init_extra is not None:
                    extra.update(jax.eval_shape(lambda p, s=spec: s.init_extra(p, config), abstract))
            if "encoder" not in extra.get("teacher", {}):
                raise ValueError(f"{workdir} has no DINO teacher (its objectives: {dict(config.objectives)})")
            wanted["extra"] = {"teacher": {"encoder": abstract["encoder"]}}
            shardings["extra"] = {"teacher": {"encoder": param_sh["encoder"]}}
        state = store.restore(wanted, shardings, None if step < 0 else step, step_flag=step_flag, partial=True)[0]
    finally:
        store.close()
    params, name = state["params"], name or display_names([workdir])[workdir]
    if teacher:
        params, name = {**params, "encoder": state["extra"]["teacher"]["encoder"]}, f"{name}/teacher"
    where = f"{storage.canonical(workdir)}/checkpoints/{int(state['step'])}" + ("/teacher" if teacher else "")
    return Encoder(
        name,
        config,
        model,
        params,
        int(state["step"]),
        where,
        params_fingerprint(params),
        workdir,
        tuple(run_inputs.notes(workdir)),
    )
