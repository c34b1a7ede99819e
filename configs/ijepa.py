"""I-JEPA (mvlp_jax/objectives/ijepa.py): latent prediction of target blocks from a context block, with the same
encoder, data and schedule as configs/pretrain.py.

  python -m mvlp_jax.main --config=configs/ijepa.py[:demo|:vitdet|:llm, comma-separated] --workdir=DIR

  :demo, :vitdet  as in configs/pretrain.py
  :llm            I-JEPA + the LLM-target contrastive loss (then it reads data.embeddings_dir)
"""

import os

from mvlp_jax.runtime import schema

pretrain = schema.config_module(os.path.join(os.path.dirname(__file__), "pretrain.py"))


def get_config(arg: str | None = None):
    variants = schema.parse_arg(arg, (*pretrain.VARIANTS, "llm"), "configs/ijepa.py")
    c = pretrain.get_config(",".join(sorted(variants - {"llm"})))
    c.objectives = {"ijepa": 1.0, "llm_contrastive": 1.0} if "llm" in variants else {"ijepa": 1.0}
    return c
