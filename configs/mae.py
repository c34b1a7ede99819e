"""MAE-only baseline: the same encoder, data and schedule as configs/pretrain.py, without the LLM target.

  python -m mvlp_jax.main --config=configs/mae.py[:demo|:vitdet|:fundus] --workdir=DIR

The side-by-side comparison the evaluation binary reports (MAE alone vs LLM contrastive + MAE).
  :fundus  the demo's encoder and budget on colour fundus photographs (hrf_fundus, 3 channels; build it as
           benchmarks/modalities.py does, into runs/modalities/tfds)
  :volume  MAE in 3D (ViT3D, tubelets of 2 slices x 16 x 16) on volumes of 16 consecutive CT slices (sts_ct,
           built the same way); with :demo the demo's encoder at 64 px
"""

import os

from mvlp_jax.runtime import schema

pretrain = schema.config_module(os.path.join(os.path.dirname(__file__), "pretrain.py"))
VARIANTS = (*pretrain.VARIANTS, "fundus", "volume")


def apply_fundus(c) -> None:
    """45 colour photographs (27 for training): the demo's Ti/16, at 128 px for the vessels, 300 steps of 16."""
    pretrain.apply_demo(c)
    c.data.data_dir, c.data.dataset, c.data.embeddings_dir = "runs/modalities/tfds", "hrf_fundus", ""
    c.model.image_size = 128
    c.total_steps, c.optim.warmup_steps = 300, 30
    c.checkpoint.save_interval_steps, c.log_images_every_steps = 100, 150


def apply_volume(c, demo: bool) -> None:
    """Volumes of a CT series: 16 consecutive slices, one 3D crop each; sts_ct's 3 patients are 3 series."""
    c.model.encoder, c.model.volume_depth, c.model.tubelet = "vit3d", 16, 2
    c.data.dataset, c.data.embeddings_dir = "sts_ct", ""
    c.log_images_every_steps = 0  # the run's pictures are 2D ones
    if demo:
        c.data.data_dir, c.model.image_size, c.data.batch_size = "runs/modalities/tfds", 64, 4


def get_config(arg: str | None = None):
    variants = schema.parse_arg(arg, VARIANTS, "configs/mae.py")
    c = pretrain.get_config(",".join(sorted(variants - {"fundus", "volume"})))
    c.objectives = {"mae": 1.0}
    if "fundus" in variants:
        apply_fundus(c)
    if "volume" in variants:
        apply_volume(c, "demo" in variants)
    return c
