"""Pretraining binary.

  python -m mvlp_jax.main --config=configs/pretrain.py[:demo] --workdir=DIR [--config.key=value ...]

Resumes from the newest checkpoint in DIR; SIGTERM saves and exits 0. Multi-host: on a TPU pod or
SLURM pass --distributed (jax.distributed.initialize() finds the peers); on one machine with several
processes pass --coordinator_address, --num_processes and --process_id (CPU collectives over gloo).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, config.json, metrics and plots go here.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM clusters).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit multi-process set-up).")
flags.DEFINE_integer("num_processes", 1, "Processes in the job (explicit multi-process set-up).")
flags.DEFINE_integer("process_id", 0, "This process's index (explicit multi-process set-up).")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    import jax

    if FLAGS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only when the devices are CPUs
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address or None,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv: list[str]) -> int:
    del argv
    init_distributed()
    from mvlp_jax import configuration, train

    try:
        configuration.validate(FLAGS.config)
    except ValueError as error:
        print(f"invalid config: {error}", file=sys.stderr)
        return 2
    try:
        train.train(FLAGS.config, FLAGS.workdir)
    except train.NonFiniteError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    app.run(main)
