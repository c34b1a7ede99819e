"""Linear probes on frozen pretrained encoders (the evaluation binary's config).

  python -m mvlp_jax.evaluate --config=configs/linear_probe.py --config.workdirs=runs/demo/mae,runs/demo/pretrain \
      --config.data_dir=runs/demo/tfds --config.dataset=nih_sample --output_dir=runs/demo/eval

Variant `:nih_sample` points at the demo's NIH sample (splits train / valid).
"""
import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.workdirs = ""              # comma-separated pretraining workdirs; 'random_init' adds the untrained floor
    c.random_init_like = ""      # architecture of random_init when no real workdir is listed (a workdir)
    c.step = -1                  # checkpoint step of every workdir (-1: the newest)
    c.mode = "linear"            # 'linear' (frozen encoder, logistic regression) or 'finetune' (whole network)
    c.features_from = "image"    # 'image' (the workdirs' encoders) or 'text_embeddings' (the stored LLM vectors)
    c.embeddings = ""            # text_embeddings: comma-separated precompute output dirs (study ids must match)
    c.text_pooling = "mean"      # text_embeddings: which stored vector, 'mean' or 'last'
    c.pooling = "mean"           # 'mean' of patch tokens, 'cls', or 'map' (the trained attention pooling)
    c.data_dir = "~/tensorflow_datasets"
    c.dataset = "mimic_cxr"
    c.train_split = "train"
    c.val_split = "validate"     # '' carves 10% of the training patients out for model selection
    c.test_split = "test"
    c.label_fractions = (1.0, 0.1, 0.01)  # of training patients (fixed seed), as in label-efficiency studies
    c.uncertain = "ignore"       # -1 labels: 'ignore' (masked out of loss and metrics), 'ones', 'zeros'
    c.unmentioned = "negative"   # -2 labels: 'negative' or 'ignore'
    c.batch_size = 64            # feature extraction, all devices
    c.bootstrap = 1000           # patient-level resamples for the 95% intervals
    c.seed = 0
    c.finetune = ml_collections.ConfigDict(dict(
        epochs=10,               # passes over the labelled training cases
        batch_size=64,
        lr=5e-4,                 # peak, scaled by batch_size / 256 (MAE fine-tuning's base lr)
        layer_decay=0.75,        # block i of L learns at layer_decay ** (L - i) of the head's rate
        weight_decay=0.05,
        warmup_epochs=1,
        drop_path=0.1,           # stochastic depth while fine-tuning
        patience=3,              # epochs without a better validation mAUC before stopping
    ))
    if arg == "nih_sample":
        c.data_dir, c.dataset = "runs/demo/tfds", "nih_sample"
        c.val_split, c.test_split = "", "valid"
        c.label_fractions = (1.0,)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; choose 'nih_sample'")
    return c
