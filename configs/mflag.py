"""M-FLAG: the image encoder learns from a frozen LLM by alignment + orthogonality (no negatives, no MAE).

  python -m mvlp_jax.main --config=configs/mflag.py[:demo|:vitdet] --workdir=DIR

Same encoder, data and schedule as configs/pretrain.py. The image features are mean-pooled patch tokens
(the pooling linear probes read by default), projected by an MLP with batch norm and a final affine-free
batch norm; the stored LLM vector goes through its own MLP. Loss: 2 - 2 cos(z_img, z_txt) +
ortho_weight * orthogonality(features), both over the global batch.
"""

import os

from mvlp_jax.runtime import schema

pretrain = schema.config_module(os.path.join(os.path.dirname(__file__), "pretrain.py"))


def get_config(arg: str | None = None):
    c = pretrain.get_config(arg)
    c.objectives = {"mflag": 1.0}
    c.model.pool = "mean"
    if "demo" in pretrain.parse_variants(arg):
        c.mflag.embed_dim, c.mflag.hidden_dim = 128, 512
    return c
