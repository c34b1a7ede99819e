"""The unsupervised toolkit for medical ViTs: MAE + DINO-style contrastive embedding + query-box
localization on the windowed ViTDet, one task per minibatch in a cycle (no reports needed).

  python -m mvlp_jax.main --config=configs/multitask.py[:demo|:sum] --workdir=DIR

Variants: `demo` (the shipped sample on a CPU), `sum` (every step optimises the weighted sum instead of
cycling). Same data, schedule and evaluation as configs/pretrain.py.
"""

import os

from mvlp_jax.runtime import schema

pretrain = schema.config_module(os.path.join(os.path.dirname(__file__), "pretrain.py"))


def get_config(arg: str | None = None):
    chosen = schema.parse_arg(arg, ("demo", "sum"), "configs/multitask.py")
    c = pretrain.get_config("demo,vitdet" if "demo" in chosen else "vitdet")
    c.objectives = {"mae": 1.0, "dino": 1.0, "query_box": 1.0}
    c.task_schedule = "sum" if "sum" in chosen else "cyclic"
    c.data.embeddings_dir = ""
    if "demo" in chosen:
        c.model.window_size = 3  # 96 px / 16 = 6 x 6 patches: 4 windows, no padding
        c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 1024, 256, 64
        c.dino.num_local_crops, c.dino.local_size = 2, 48
        # sharper teacher than DINO's 0.04: at 0.04 a tiny encoder's centred targets stayed near uniform (teacher
        # entropy ~6.3 of ln 1024 = 6.9) and the loss rose; at 0.02 it falls in 150 steps (README, demo)
        c.dino.teacher_temp = c.dino.warmup_teacher_temp = 0.02
        c.query_box.size = 48
    return c
