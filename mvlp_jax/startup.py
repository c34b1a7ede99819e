"""Checks a pretraining run passes before it writes anything into its workdir.

A run that would fail (an unwritable workdir, a batch the mesh cannot split, a resume under a config that
changes the parameter or data layout) stops here with a message, leaving the workdir as it was. Harmless
changes on resume (more steps, another learning rate, logging) are allowed and recorded.
"""
from __future__ import annotations

import datetime
import json
from typing import Any

import jax
import ml_collections

from mvlp_jax import checkpointing, configuration, storage

# Keys a resumed run may change: they alter neither the parameter tree nor which records are read in
# which order. Everything else (model, objectives, seed, batch, dataset) refuses.
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "max_nonfinite_steps", "peak_flops_per_device", "checkpoint.",
                  "compilation_cache_dir", "profile_steps",
                  "mesh.", "optim.", "model.remat", "model.dtype", "model.attention", "data.num_threads",
                  "data.num_workers", "data.prefetch", "data.data_dir", "data.embeddings_dir")
CHANGES_FILE = "config_changes.json"


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch splits evenly over the batch axes and the processes (and the micro-batches)."""
    batch, accum = config.data.batch_size, config.optim.accum_steps
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % ways:
        fits = batch - batch % ways or ways
        raise ValueError(f"config data.batch_size={batch} does not divide over the mesh's {ways} data-parallel "
                         f"devices (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}): use a multiple of "
                         f"{ways}, e.g. --config.data.batch_size={fits}")
    if batch % jax.process_count():
        raise ValueError(f"config data.batch_size={batch} does not divide over {jax.process_count()} processes")
    if batch % (accum * ways):
        raise ValueError(f"config data.batch_size={batch} is not a multiple of optim.accum_steps={accum} x "
                         f"{ways} data-parallel devices: each micro-batch must split over the devices")


def _normalised(config: Any) -> dict[str, Any]:
    """Flat key -> JSON value, with every SPEC key present (older workdirs lack newer keys: their defaults)."""
    flat = configuration.flatten(ml_collections.ConfigDict(json.loads(json.dumps(
        config.to_dict() if hasattr(config, "to_dict") else config, default=list))))
    defaults = {k: json.loads(json.dumps(v[0], default=list)) for k, v in configuration.SPEC.items()}
    return {**defaults, **json.loads(json.dumps(flat, default=list))}


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def check_resume(config: ml_collections.ConfigDict, workdir: Any, target_dim: int) -> dict[str, tuple]:
    """{key: (stored, new)} of the harmless changes against the workdir's stored config; raises ValueError
    listing the others when the workdir holds checkpoints of a run they would not fit."""
    path = storage.join(workdir, "config.json")
    if not storage.path(path).exists() or checkpointing.finished_steps(workdir) == []:
        return {}
    stored_config, stored_dim = configuration.load(workdir)
    old, new = _normalised(stored_config), _normalised(config)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if stored_dim != target_dim:
        changed["LLM target width (from data.embeddings_dir)"] = (stored_dim, target_dim)
    refused = {k: v for k, v in changed.items() if not resumable(k)}
    if refused:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"{workdir} holds checkpoints of a run with another config, and these keys change the "
                         f"parameters or the data order, so it cannot resume: {lines}. Use a new --workdir, or "
                         f"pass the stored values (in {path}). Keys a resume may change: "
                         f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_KEYS)}")
    return changed


def record(config: ml_collections.ConfigDict, workdir: Any, target_dim: int, changes: dict[str, tuple]) -> None:
    """Writes config.json / model.json, and appends the resume's changes to config_changes.json."""
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    if changes:
        path = storage.path(workdir) / CHANGES_FILE
        history = storage.read_json(path) if path.exists() else []
        history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "resumed_at_step": max(checkpointing.finished_steps(workdir)),
                        "changes": {k: {"stored": a, "now": b} for k, (a, b) in changes.items()}})
        storage.write_json(path, history, indent=2, default=list)
    configuration.save(config, workdir, target_dim=target_dim)
