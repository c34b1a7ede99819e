"""The evaluation binary: every listed checkpoint through one evaluator, with patient-level intervals.

  python -m mvlp_jax.evaluate --config=configs/linear_probe.py --config.workdirs=A,B[,random_init] \
      --config.dataset=... [--config.evaluator=classification|retrieval|zero_shot|segmentation|detection] \
      --output_dir=DIR

`config.evaluator` picks the evaluator (evaluation/registry.py); each writes DIR/results.json (everything),
DIR/results.md (its table) and its pictures, and prints its rows as they come.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mvlp_jax.evaluation import registry
from mvlp_jax.runtime import cli, sharding, storage

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the binary only (so `evaluate()` can be imported beside other absl programs)."""
    config_flags.DEFINE_config_file("config", None, "configs/linear_probe.py[:nih_sample]", lock_config=True)
    flags.DEFINE_string("output_dir", None, "results.json, results.md, plots and the feature cache go here.")
    flags.mark_flags_as_required(["config", "output_dir"])


def evaluate(config, output_dir: str) -> dict:
    """Runs `config.evaluator` on every checkpoint of `config`; returns what it wrote to results.json."""
    registry.validate(config)
    storage.check_writable_dir(output_dir, "--output_dir")
    config = config.copy_and_resolve_references()  # the caller's config stays as given
    config.unlock()
    config.mesh = {"data": -1, "fsdp": 1, "model": 1}
    return registry.get(config.evaluator).run(config, output_dir, sharding.make_mesh(config))


def main(argv: list[str]) -> int:
    del argv
    evaluate(FLAGS.config, FLAGS.output_dir)
    return 0


def run_binary() -> None:
    """`python -m mvlp_jax.evaluate`."""
    define_flags()
    cli.run("mvlp_jax.evaluate", main, config_keys=registry.table())
