"""MAE-only baseline: the same encoder, data and schedule as configs/pretrain.py, without the LLM target.

  python -m mvlp_jax.main --config=configs/mae.py[:demo|:vitdet] --workdir=DIR

The side-by-side comparison the evaluation binary reports (MAE alone vs LLM contrastive + MAE).
"""

import os

from mvlp_jax.runtime import schema

pretrain = schema.config_module(os.path.join(os.path.dirname(__file__), "pretrain.py"))


def get_config(arg: str | None = None):
    c = pretrain.get_config(arg)
    c.objectives = {"mae": 1.0}
    return c
