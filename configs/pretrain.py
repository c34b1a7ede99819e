"""LLM-target contrastive + MAE pretraining on MIMIC-CXR (ViT-B/16 at 224): the production default.

  python -m mvlp_jax.main --config=configs/pretrain.py --workdir=DIR [--config.key=value ...]

Variants by argument, comma-separated (as big_vision does):
  :demo    the shipped real sample (covid notes + SmolLM2 embeddings) on a CPU in minutes
  :vitdet  the windowed ViTDet encoder (SimMIM masking instead of MAE token dropping)
  :local   + local report-word / image-region alignment (objective local_alignment; needs embeddings made
           with --store_tokens)
Every key is documented in docs/config.md (generated from mvlp_jax/configuration.py and the objectives).
"""

from mvlp_jax import configuration
from mvlp_jax.objectives import registry
from mvlp_jax.runtime import schema

VARIANTS = ("demo", "vitdet", "local")


def parse_variants(arg: str | None) -> set[str]:
    return schema.parse_arg(arg, VARIANTS, "configs/pretrain.py")


def apply_demo(c) -> None:
    """Shipped sample, tiny encoder at 96 px, 150 steps of 16: each demo config trains in 1-4 CPU minutes, so
    `make demo` (four of them) stays near 15 minutes on 2 cores."""
    c.data.data_dir = "runs/demo/tfds"
    c.data.dataset = "covid_notes"
    c.data.embeddings_dir = "runs/demo/emb/covid_notes"
    c.data.batch_size = 16
    c.data.num_threads = 4
    c.model.variant = "Ti/16"
    c.model.image_size = 96
    c.model.dtype = "float32"  # bfloat16 is slower than float32 on CPUs
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 128, 2, 4
    c.model.pool_heads = 4
    c.total_steps = 150
    c.optim.lr = 8e-3  # x batch/256: peak 5e-4
    c.optim.warmup_steps = 15
    c.checkpoint.save_interval_steps = 50
    c.log_every_steps = 10
    c.log_images_every_steps = 75  # pictures of what was learned, half-way and at the end (WORKDIR/plots)


def get_config(arg: str | None = None):
    variants = parse_variants(arg)
    c = configuration.defaults()
    c.objectives = dict(registry.DEFAULT)  # LLM contrastive + MAE
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.dataset = "mimic_cxr"
    c.data.embeddings_dir = "~/mvlp/embeddings/mimic_cxr_llama2_7b"
    c.data.batch_size = 256
    c.total_steps = 100_000
    c.optim.warmup_steps = 5_000
    if "vitdet" in variants:
        c.model.encoder = "vitdet"
        c.model.pool = "map"
    if "local" in variants:
        c.objectives["local_alignment"] = 1.0
    if "demo" in variants:
        apply_demo(c)
    return c
