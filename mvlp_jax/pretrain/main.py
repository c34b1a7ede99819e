"""Pretraining binary.

  python -m mvlp_jax.main --config=configs/pretrain.py[:demo] --workdir=DIR [--config.key=value ...]

Resumes from the newest checkpoint in DIR; SIGTERM saves and exits 0. Multi-host start-up is automatic
(`mvlp_jax/runtime/distributed.py`): a Cloud TPU VM slice or an srun task with several tasks initialises
jax.distributed by itself; elsewhere pass --coordinator_address, --num_processes and --process_id (CPU
collectives over gloo), or --distributed for jax's own detection (MPI, Kubernetes). One host: a no-op.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from mvlp_jax import configuration
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import cli, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, config.json, metrics and plots go here.")
flags.DEFINE_bool("distributed", False, "Force jax.distributed.initialize() with jax's own cluster detection.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit multi-process set-up).")
flags.DEFINE_integer("num_processes", 1, "Processes in the job (explicit multi-process set-up).")
flags.DEFINE_integer("process_id", 0, "This process's index (explicit multi-process set-up).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    method = distributed.initialize(FLAGS.num_processes, FLAGS.process_id, FLAGS.coordinator_address, FLAGS.distributed)
    if method != "none":
        import jax

        if jax.process_index() == 0:
            print(
                f"distributed start-up: {method}, {jax.process_count()} processes, {jax.device_count()} devices",
                flush=True,
            )

    configuration.validate(FLAGS.config)
    try:
        train.train(FLAGS.config, FLAGS.workdir)
    except train.NonFiniteError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    return 0


def run_binary() -> None:
    """`python -m mvlp_jax.main`."""
    cli.run("mvlp_jax.main", main, config_keys=configuration.SPEC)
