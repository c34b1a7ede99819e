"""Segmentation on frozen pretrained encoders (the evaluation binary with evaluator=segmentation).

  python -m mvlp_jax.evaluate --config=configs/segmentation.py --config.workdirs=runs/demo/mae,random_init \
      --config.data_dir=runs/demo/tfds --config.dataset=covid_lungs --output_dir=runs/demo/eval_segmentation

The dataset must carry masks (data_prep.build_dataset --source=csv --mask_column=...). Variant `:demo` is the
demo's lung masks at 100% and 10% of the training patients, with a decoder narrowed and training shortened
for a CPU. Variant `:volume` is segmentation in 3D (evaluator=volume_segmentation) of a CT set's series, all
training patients, scored without intervals (a few patients).
"""

from mvlp_jax.evaluation import registry
from mvlp_jax.runtime import schema


def get_config(arg: str | None = None):
    variants = schema.parse_arg(arg, ("demo", "volume"), "configs/segmentation.py")
    c = registry.defaults()  # every key documented in docs/config.md
    c.evaluator = "segmentation"
    c.data_dir, c.dataset = "~/tensorflow_datasets", "covid_lungs"
    c.train_split, c.val_split, c.test_split = "train", "validate", "test"
    c.label_fractions = (1.0, 0.1, 0.01)  # M-FLAG's and MGCA's 100% / 10% / 1%
    if "demo" in variants:
        c.data_dir = "runs/demo/tfds"
        c.label_fractions = (1.0, 0.1)
        c.segmentation.channels = (64, 32, 16, 16)
        c.segmentation.epochs, c.segmentation.patience = 20, 5  # 3 seeds x 2 fractions x 5 encoders in the demo
    if "volume" in variants:  # masks of volumes: a ViT3D checkpoint (configs/mae.py:volume), one mask per slice
        c.evaluator, c.dataset = "volume_segmentation", "sts_ct"
        c.label_fractions, c.bootstrap = (1.0,), 0  # CT sets of a few patients: every series, no intervals
        c.volume_segmentation.channels = (64, 32, 16, 16)
    return c
