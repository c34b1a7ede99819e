"""Detection on frozen pretrained encoders (the evaluation binary with evaluator=detection).

  python -m data_prep.boxes_from_masks --input_dir=data_prep/sample/covid_lungs --label=lung \
      --output=runs/demo/lung_boxes.csv
  python -m data_prep.build_dataset --source=csv --input_dir=data_prep/sample/covid_lungs --output_dir=runs/demo/tfds \
      --name=covid_lung_boxes --boxes_csv=$PWD/runs/demo/lung_boxes.csv --group_column=patient_id --views=all \
      --view_column=view --image_size=0
  python -m mvlp_jax.evaluate --config=configs/detection.py:demo --config.workdirs=runs/demo/mae,random_init \
      --output_dir=runs/demo/eval_detection

The dataset must carry boxes (data_prep.build_dataset --source=csv --boxes_csv=...). Variant `:demo` is the lung
boxes above at 100% and 10% of the training patients, with a decoder narrowed for a CPU; `:nih_pneumonia` the 47
official NIH pathology boxes of nih_pneumonia1000 (README, "Detection").
"""

from mvlp_jax.evaluation import registry
from mvlp_jax.runtime import schema


def get_config(arg: str | None = None):
    variants = schema.parse_arg(arg, ("demo", "nih_pneumonia"), "configs/detection.py")
    c = registry.defaults()  # every key documented in docs/config.md
    c.evaluator = "detection"
    c.data_dir, c.dataset = "~/tensorflow_datasets", "covid_lung_boxes"
    c.train_split, c.val_split, c.test_split = "train", "validate", "test"
    c.label_fractions = (1.0, 0.1, 0.01)  # M-FLAG's 100% / 10% / 1%
    if "demo" in variants:
        c.data_dir = "runs/demo/tfds"
        c.label_fractions = (1.0, 0.1)
        c.detection.channels = (64, 32)
    if "nih_pneumonia" in variants:
        c.dataset = "nih_pneumonia"
        c.label_fractions = (1.0,)  # 42 boxed images: no fraction of them is worth a row
        c.detection.channels = (64, 32)
    return c
