"""Linear probes on frozen pretrained encoders (the evaluation binary's config).

  python -m mvlp_jax.evaluate --config=configs/linear_probe.py --config.workdirs=runs/demo/mae,runs/demo/pretrain \
      --config.data_dir=runs/demo/tfds --config.dataset=nih_sample --output_dir=runs/demo/eval

Variant `:nih_sample` points at the demo's NIH sample (splits train / valid).
"""

from mvlp_jax.evaluation import registry
from mvlp_jax.runtime import schema


def get_config(arg: str | None = None):
    variants = schema.parse_arg(arg, ("nih_sample",), "configs/linear_probe.py")
    c = registry.defaults()  # every key documented in docs/config.md
    c.data_dir, c.dataset = "~/tensorflow_datasets", "mimic_cxr"
    c.train_split, c.val_split, c.test_split = "train", "validate", "test"  # MIMIC-CXR's official split
    if "nih_sample" in variants:
        c.data_dir, c.dataset = "runs/demo/tfds", "nih_sample"
        c.val_split, c.test_split = "", "valid"
        c.label_fractions = (1.0,)
    return c
