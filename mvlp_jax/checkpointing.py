"""The one place that writes and reads checkpoints: orbax, holding the train state and data position.

A checkpoint is complete or absent (orbax finalises by rename), so a run killed mid-save resumes
from the previous one. Restoring takes the shardings of the *current* mesh, so a run can resume on
a different mesh shape or device count.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    c = config.checkpoint
    options = ocp.CheckpointManagerOptions(save_interval_steps=c.save_interval_steps, max_to_keep=c.max_to_keep,
                                           enable_async_checkpointing=c.async_save, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)), force=force)


def restore_latest(mngr: ocp.CheckpointManager, state: Any, state_shardings: Any,
                   step: int | None = None) -> tuple[Any, dict] | None:
    """(state, data state) of checkpoint `step` (default: the newest) laid out with `state_shardings`;
    None when there is none. `state` may be abstract (shape/dtype structs)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint {step} in {mngr.directory}; there are {sorted(mngr.all_steps())}")
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"])


def describe_latest(workdir: str) -> str:
    """Human pointer to the last good checkpoint (for error messages)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    return f"{directory}/{steps[-1]}" if steps else f"none yet in {directory}"
