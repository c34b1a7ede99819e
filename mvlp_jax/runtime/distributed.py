"""Multi-host start-up: decide how (and whether) to call `jax.distributed.initialize`.

One rule for every launcher, checked in this order:
  explicit   --num_processes > 1 (with --coordinator_address, --process_id): anything else, local tests
  slurm      SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID (srun sets them);
             jax's SLURM detection takes the coordinator from the first node and, per task, the GPU
             SLURM_LOCALID (one process per GPU) unless JAX_LOCAL_DEVICE_IDS lists a node's GPUs
  tpu        a Cloud TPU VM (TPU devices under /dev, or GKE's TPU_WORKER_HOSTNAMES): jax reads the slice's
             workers from the TPU metadata, so a pod slice needs no arguments
  forced     --distributed: jax's own detection (MPI, Kubernetes, ...)
  none       one host: nothing to initialise
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping, MutableMapping

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def on_tpu_vm(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*") or environ.get("TPU_WORKER_HOSTNAMES"))


def choose_platforms(environ: MutableMapping[str, str] = os.environ) -> str:
    """Sets JAX_PLATFORMS (unless the user did) to the backends this machine has, so a CPU or GPU run never
    loads libtpu: its failed initialisation on a machine without TPU chips prints errors (and, beside a second
    process, advice to delete its lockfile) into every run. A TPU VM, or a machine with AMD GPUs, keeps JAX's own
    choice. Returns the setting ('' when left to JAX). Call before JAX initialises a backend."""
    import importlib.util

    if environ.get("JAX_PLATFORMS") or on_tpu_vm(environ) or os.path.exists("/dev/kfd"):
        return environ.get("JAX_PLATFORMS", "")
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
    if "jax" in sys.modules:  # imported before us: its config read the environment already
        sys.modules["jax"].config.update("jax_platforms", environ["JAX_PLATFORMS"])
    return environ["JAX_PLATFORMS"]


def detect(num_processes: int, force: bool, environ: Mapping[str, str] = os.environ, tpu: bool | None = None) -> str:
    """Which start-up applies: 'explicit', 'slurm', 'tpu', 'forced' or 'none' (see the module docstring)."""
    if num_processes > 1:
        return "explicit"
    if all(v in environ for v in SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if on_tpu_vm(environ) if tpu is None else tpu:
        return "tpu"
    return "forced" if force else "none"


def initialize(num_processes: int = 1, process_id: int = 0, coordinator_address: str = "", force: bool = False) -> str:
    """Initialises the multi-controller runtime when the environment asks for it; returns the method used.
    CPU collectives go over gloo (used only when the devices are CPUs, e.g. local multi-process runs)."""
    import jax

    method = detect(num_processes, force)
    if method == "none":
        return method
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if method == "explicit":
        if not coordinator_address:
            raise ValueError("--num_processes > 1 needs --coordinator_address=host:port of process 0")
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    else:
        jax.distributed.initialize()
    return method


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name`: the coordination service's barrier, not a collective, so hosts
    that arrive minutes apart (after reading data from a bucket at different speeds, or process 0 writing the
    run's files) start their first collective together. One process: nothing to wait for."""
    import jax
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize made

    if jax.process_count() > 1:
        jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def from_process_0(key: str, value: str, timeout_s: int = 1800) -> str:
    """Process 0's `value` on every process (through the coordination service's key-value store), e.g. whether
    a start-up check it alone makes passed. One process: `value`."""
    import jax
    from jax._src import distributed as jax_distributed

    if jax.process_count() == 1:
        return value
    client = jax_distributed.global_state.client
    if jax.process_index() == 0:
        client.key_value_set(key, "=" + value)  # never empty
        return value
    return client.blocking_key_value_get(key, timeout_s * 1000)[1:]
