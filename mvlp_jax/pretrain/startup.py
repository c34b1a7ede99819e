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
import numpy as np

from mvlp_jax import configuration
from mvlp_jax.objectives import registry
from mvlp_jax.runtime import checkpointing, run_inputs, storage

# Keys a resumed run may change: they alter neither the parameter tree nor which records are read in
# which order. Everything else (model, objectives, seed, batch, dataset) refuses.
RESUMABLE_KEYS = (
    "total_steps",
    "log_every_steps",
    "max_nonfinite_steps",
    "peak_flops_per_device",
    "checkpoint.",
    "compilation_cache_dir",
    "profile_steps",
    "mesh.",
    "optim.",
    "model.remat",
    "model.dtype",
    "model.attention",
    "data.num_threads",
    "data.num_workers",
    "data.prefetch",
    "data.data_dir",
    "data.embeddings_dir",
    "data.allow_changed_inputs",
)
CHANGES_FILE = "config_changes.json"


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch splits evenly over the batch axes and the processes (and the micro-batches)."""
    batch, accum = config.data.batch_size, config.optim.accum_steps
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % ways:
        fits = batch - batch % ways or ways
        raise ValueError(
            f"config data.batch_size={batch} does not divide over the mesh's {ways} data-parallel "
            f"devices (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}): use a multiple of "
            f"{ways}, e.g. --config.data.batch_size={fits}"
        )
    if batch % jax.process_count():
        raise ValueError(f"config data.batch_size={batch} does not divide over {jax.process_count()} processes")
    if batch % (accum * ways):
        raise ValueError(
            f"config data.batch_size={batch} is not a multiple of optim.accum_steps={accum} x "
            f"{ways} data-parallel devices: each micro-batch must split over the devices"
        )


def available_memory() -> int | None:
    """Bytes of memory available to new allocations on this host (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_host_memory(config: ml_collections.ConfigDict, target_dim: int, processes: int) -> str | None:
    """Estimates the host memory the input pipeline holds (the batches in flight) before the first step: refuses
    (ValueError naming the knobs) above 80% of what this host has available; returns a line to log above 25%."""
    entries = registry.entries(config, target_dim)
    per_example = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in entries.values())
    in_flight = max(config.data.prefetch, config.data.num_threads) + 2 + config.data.num_workers
    needed = per_example * config.data.batch_size // processes * in_flight
    available = available_memory()
    if available is None or needed < available // 4:
        return None
    what = (
        f"the input pipeline holds ~{needed / 2**30:.1f} GiB ({in_flight} batches of "
        f"{config.data.batch_size // processes} examples of {per_example / 2**20:.1f} MiB in flight: prefetch, "
        f"threads and workers) of the {available / 2**30:.1f} GiB this host has available"
    )
    if needed > 0.8 * available:
        raise ValueError(
            f"{what}: lower data.batch_size, data.prefetch or data.num_threads"
            + (", or data.max_views" if config.data.max_views > 1 else "")
        )
    return what


def _normalised(config: Any) -> dict[str, Any]:
    """Flat key -> JSON value, with every SPEC key present (older workdirs lack newer keys: their defaults)."""
    flat = configuration.flatten(
        ml_collections.ConfigDict(
            json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config, default=list))
        )
    )
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
        raise ValueError(
            f"{workdir} holds checkpoints of a run with another config, and these keys change the "
            f"parameters or the data order, so it cannot resume: {lines}. Use a new --workdir, or "
            f"pass the stored values (in {path}). Keys a resume may change: "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_KEYS)}"
        )
    return changed


def check_inputs(config: ml_collections.ConfigDict, workdir: Any, inputs: dict) -> list[str]:
    """The inputs of a resumed run that changed since it recorded them (WORKDIR/inputs.json), in words; raises
    ValueError naming them unless data.allow_changed_inputs."""
    before = run_inputs.recorded(workdir)
    if before is None or not checkpointing.finished_steps(workdir):
        return []
    changed = run_inputs.differences(before, inputs)
    if changed and not config.data.allow_changed_inputs:
        raise ValueError(
            f"{workdir} trained on other inputs than it would resume on: {'; '.join(changed)}. Resume "
            f"on the data it trained on (its {run_inputs.FILE} records them), or set "
            f"--config.{run_inputs.OVERRIDE}=True (recorded in {CHANGES_FILE} and printed in every "
            f"evaluation result of the run)"
        )
    return changed


def record(
    config: ml_collections.ConfigDict,
    workdir: Any,
    target_dim: int,
    changes: dict[str, tuple],
    inputs: dict,
    changed_inputs: list[str],
) -> None:
    """Writes config.json / model.json / inputs.json, and appends the resume's changes to config_changes.json."""
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    if changes or changed_inputs:
        path = storage.path(workdir) / CHANGES_FILE
        history = storage.read_json(path) if path.exists() else []
        history.append(
            {
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "resumed_at_step": max(checkpointing.finished_steps(workdir)),
                "changes": {k: {"stored": a, "now": b} for k, (a, b) in changes.items()},
                **({"inputs": changed_inputs} if changed_inputs else {}),
            }
        )
        storage.write_json(path, history, indent=2, default=list)
    configuration.save(config, workdir, target_dim=target_dim)
    run_inputs.save(workdir, inputs)
