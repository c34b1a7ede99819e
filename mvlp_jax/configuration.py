"""Every pretraining config key in one table: default, allowed values and what it means.

The table is the core rows below plus each registered objective's own (its Spec's `config_rows`);
`defaults()` builds the ConfigDict that configs/*.py start from, `validate()` rejects unknown keys and invalid
values at start-up naming the key and the rule (the engine: runtime/schema.py), and `save`/`load` keep a run's
resolved config in its workdir.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mvlp_jax.kernels.attention_ops import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from mvlp_jax.objectives import registry
from mvlp_jax.runtime import schema, storage


def _profile_window(text: str) -> bool:
    parts = text.split(",")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1])


MESH_AXIS = schema.Rule(lambda v: v == -1 or v >= 1, "must be >= 1, or -1 for the remaining devices")
PROFILE_STEPS = schema.Rule(
    lambda v: v == "" or _profile_window(v), "must be 'START,END' with 1 <= START <= END, or ''"
)
OBJECTIVE_WEIGHTS = schema.Rule(
    lambda v: bool(v) and all(k in registry.SPECS and w >= 0 for k, w in v.items()),
    lambda: f"must map registered objective names to weights >= 0 (registered: {', '.join(registry.SPECS)})",
)

# key -> (default, check, description); each objective adds its own rows (objectives/registry.py)
CORE: schema.Table = {
    "seed": (0, None, "Seed of parameter init, masking, dropout and the data order."),
    "total_steps": (100_000, schema.POSITIVE, "Optimizer steps to train."),
    "objectives": (
        dict(registry.DEFAULT),
        OBJECTIVE_WEIGHTS,
        f"Objective name -> loss weight (>= 0); names from {tuple(registry.SPECS)} (mvlp_jax/objectives/).",
    ),
    "task_schedule": (
        "sum",
        ("sum", "cyclic"),
        "'sum': every step optimises the weighted sum; 'cyclic': step s trains objective s mod n only.",
    ),
    "model.encoder": (
        "vit",
        ("vit", "vitdet", "vit3d"),
        "Image encoder: plain ViT (MAE), windowed ViTDet (SimMIM), or ViT3D over volumes (3D MAE; tubelets).",
    ),
    "model.variant": ("B/16", None, "Encoder size/patch, e.g. 'S/16', 'B/16', 'L/16'."),
    "model.image_size": (224, schema.POSITIVE, "Training resolution (square crops)."),
    "model.dtype": (
        "auto",
        ("auto", "float32", "bfloat16"),
        "Compute dtype; 'auto': bfloat16 on TPU and GPU, float32 on CPU (where bfloat16 is slower). "
        "Parameters, optimizer state, softmax and losses stay float32.",
    ),
    "model.attention": (
        "auto",
        ATTENTION_IMPLEMENTATIONS,
        "Attention kernel; 'auto': Pallas splash on TPU, cuDNN on GPU, MKL on one CPU device, XLA's "
        "formula where a kernel does not apply (mvlp_jax/kernels/attention_ops.py).",
    ),
    "model.remat": ("none", ("none", "full", "dots", "dots_no_batch"), "Activation rematerialisation policy."),
    "model.scan": (False, None, "Scan the encoder blocks (faster compile for deep models)."),
    "model.drop_path": (0.0, schema.FRACTION, "Stochastic depth rate of the last block."),
    "model.window_size": (14, schema.POSITIVE, "ViTDet window (in patches)."),
    "model.tubelet": (2, schema.POSITIVE, "ViT3D: slices per tubelet (the depth of its patches)."),
    "model.volume_depth": (
        16,
        schema.POSITIVE,
        "ViT3D: slices per training volume (consecutive slices of a series; a multiple of model.tubelet).",
    ),
    "model.mask_ratio": (0.75, schema.FRACTION, "Fraction of patches masked for MAE / SimMIM."),
    "model.norm_pix_loss": (False, None, "Per-patch normalised MAE targets (noise-like reconstructions on X-rays)."),
    "model.decoder_width": (512, schema.POSITIVE, "MAE decoder width."),
    "model.decoder_depth": (8, schema.POSITIVE, "MAE decoder depth."),
    "model.decoder_heads": (16, schema.POSITIVE, "MAE decoder heads."),
    "model.pool": ("map", ("map", "mean", "cls"), "Image embedding pooling (MAP = attention pooling)."),
    "model.pool_heads": (8, schema.POSITIVE, "Heads of the MAP pooling."),
    "data.data_dir": ("", None, "TFDS data dir written by data_prep.build_dataset."),
    "data.dataset": ("mimic_cxr", None, "Dataset name (optionally name:version) under data.data_dir."),
    "data.train_split": ("train", None, "Split to train on."),
    "data.embeddings_dir": ("", None, "Output dir of data_prep.precompute_text_embeddings."),
    "data.allow_missing_embeddings": (False, None, "Drop images whose study has no embedding instead of failing."),
    "data.embeddings_any_source": (
        False,
        None,
        "Accept embeddings made from another source (a reports CSV, another "
        "dataset) whose study ids are this dataset's; refused by default.",
    ),
    "data.allow_changed_inputs": (
        False,
        None,
        "Resume (or train on embeddings made before the dataset was rebuilt) "
        "although the training split or the LLM embeddings differ from those the run "
        "recorded (WORKDIR/inputs.json); refused by default. The change is recorded in "
        "config_changes.json and printed in every evaluation result of the run.",
    ),
    "data.batch_size": (256, schema.POSITIVE, "Global batch size (all processes together)."),
    "data.crop_scale": ((0.5, 1.0), schema.CROP_SCALE, "RandomResizedCrop area range."),
    "data.brightness": (0.1, schema.NON_NEGATIVE, "Intensity augmentation: random brightness shift (fraction of 255)."),
    "data.contrast": (0.1, schema.NON_NEGATIVE, "Intensity augmentation: random contrast factor range 1 +- this."),
    "data.channels": (
        0,
        (0, 1, 3),
        "Image channels the encoder reads: 0 takes the training dataset's (1 grayscale, 3 "
        "colour; built with --channels), and a run records what it took. Programs compiled without "
        "a dataset (aot) read 0 as 1.",
    ),
    "data.max_views": (
        1,
        schema.POSITIVE,
        "Views per study the encoder reads as one sequence (1: one image at a "
        "time). Above 1 an example is a study (images grouped by study_id, frontal first, then "
        "laterals, then others; the rest left out, missing ones padded), the encoder gains a learned "
        "view-type embedding (a ViTDet windows each view, its global blocks span the study); "
        "objectives: mae, llm_contrastive, mflag, dino (its global crops from two different views).",
    ),
    "data.mean": (0.5, None, "Normalisation: (pixel / 255 - mean) / std."),
    "data.std": (0.25, schema.POSITIVE, "Normalisation std."),
    "data.num_threads": (8, schema.POSITIVE, "Decode/augment threads per process."),
    "data.num_workers": (0, schema.NON_NEGATIVE, "Decode/augment worker processes per process (0: threads only)."),
    "data.prefetch": (2, schema.NON_NEGATIVE, "Batches prefetched."),
    "optim.lr": (1.5e-4, schema.POSITIVE, "Peak learning rate (scaled by batch_size / 256)."),
    "optim.min_lr": (0.0, schema.NON_NEGATIVE, "Final learning rate of the cosine schedule."),
    "optim.warmup_steps": (5_000, schema.NON_NEGATIVE, "Linear warmup steps."),
    "optim.weight_decay": (
        0.05,
        schema.NON_NEGATIVE,
        "AdamW decay (not on norms, biases, position embeddings, tokens).",
    ),
    "optim.b1": (0.9, schema.FRACTION, "Adam beta1."),
    "optim.b2": (0.95, schema.FRACTION, "Adam beta2."),
    "optim.clip_norm": (1.0, schema.NON_NEGATIVE, "Global gradient-norm clipping (0: off)."),
    "optim.accum_steps": (
        1,
        schema.POSITIVE,
        "Gradient accumulation micro-steps per update (batch-wide losses per micro-batch).",
    ),
    "max_nonfinite_steps": (10, schema.POSITIVE, "Stop after this many skipped non-finite updates in a row."),
    "mesh.data": (-1, MESH_AXIS, "Data-parallel axis size (-1: the remaining devices)."),
    "mesh.fsdp": (1, MESH_AXIS, "Fully-sharded data-parallel axis (params sharded, batch split)."),
    "mesh.model": (1, MESH_AXIS, "Tensor-parallel axis (heads / MLP hidden sharded)."),
    "checkpoint.save_interval_steps": (1_000, schema.POSITIVE, "Save every this many steps (and at the end)."),
    "checkpoint.max_to_keep": (3, schema.POSITIVE, "Checkpoints kept."),
    "checkpoint.async_save": (True, None, "Save in the background while training goes on."),
    "log_every_steps": (50, schema.POSITIVE, "Metrics to TensorBoard and console every this many steps."),
    "log_images_every_steps": (
        0,
        schema.NON_NEGATIVE,
        "Pictures of what the run learned "
        "(mvlp_jax/pretrain/visualize.py: "
        "reconstructions, attention maps, query boxes, nearest reports by study id) to "
        "WORKDIR/plots/ and TensorBoard every this many steps and at the end; 0: off. "
        "Single-process runs; for others, python -m mvlp_jax.visualize on a checkpoint.",
    ),
    "peak_flops_per_device": (
        0.0,
        schema.NON_NEGATIVE,
        "For the MFU estimate; 0: known accelerators, or measured on CPU.",
    ),
    "compilation_cache_dir": (
        "",
        None,
        "JAX's persistent compilation cache, so a restarted run does not compile "
        "again: '' puts it beside a gs:// workdir (WORKDIR/compilation_cache) or in "
        "~/.cache/mvlp_jax/xla for a local one; 'none' turns it off; else a folder (local or "
        "gs://).",
    ),
    "profile_steps": (
        "",
        PROFILE_STEPS,
        "'START,END': a jax.profiler trace of those steps into "
        "WORKDIR/plugins/profile/ (TensorBoard's profile tab); '': none.",
    ),
}


def spec() -> schema.Table:
    """The pretraining table: the core rows and those of every objective registered now."""
    return {**CORE, **registry.config_rows()}


SPEC = spec()  # the table of the built-in objectives (docs/config.md)


def defaults() -> ml_collections.ConfigDict:
    """Every pretraining key at its default: what configs/*.py start from."""
    return schema.defaults(spec())


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    return schema.override(config, values)


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
    """A stored config with the keys added to the table since it was written, at their defaults (keys that do
    not change what a run computes, such as model.attention)."""
    table = spec()
    return schema.override(schema.defaults(table), schema.flatten(stored, table))


def flatten(config: Any) -> dict[str, Any]:
    return schema.flatten(config, spec())


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first unknown key or invalid value and the rule it breaks, or what the
    configured objectives cannot train with (their own checks)."""
    schema.validate(config, spec())
    registry.check(config)
    if config.model.encoder == "vit3d":
        check_volumes(config)


VOLUME_OBJECTIVES = ("mae",)  # what a ViT3D trains with so far


def check_volumes(config: ml_collections.ConfigDict) -> None:
    """What a volume encoder (model.encoder=vit3d) needs of the rest of the config."""
    m = config.model
    if m.volume_depth % m.tubelet:
        raise ValueError(f"model.volume_depth={m.volume_depth} must be a multiple of model.tubelet={m.tubelet}")
    other = sorted(set(config.objectives) - set(VOLUME_OBJECTIVES))
    if other:
        raise ValueError(f"model.encoder=vit3d trains with objectives {VOLUME_OBJECTIVES} so far, not {other}")
    if config.data.get("max_views", 1) > 1:
        raise ValueError("model.encoder=vit3d reads volumes, not studies of views: set data.max_views=1")
    if config.log_images_every_steps:
        raise ValueError("pictures of volumes are not drawn yet: set log_images_every_steps=0 for model.encoder=vit3d")


def save(config: ml_collections.ConfigDict, workdir: Any, target_dim: int) -> str:
    """Writes the resolved config to workdir/config.json (what this run really used) and the model's
    LLM target width to workdir/model.json (the evaluation binary rebuilds the model from both)."""
    path = storage.join(workdir, "config.json")
    storage.write_json(path, config.to_dict(), indent=2, sort_keys=True, default=list)
    storage.write_json(storage.join(workdir, "model.json"), {"target_dim": target_dim})
    return path


def load(workdir: Any) -> tuple[ml_collections.ConfigDict, int]:
    """(config, target_dim) of a pretraining workdir (local or gs://)."""
    folder = storage.path(workdir)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{workdir} is not a pretraining workdir (no config.json)")
    config = with_defaults(storage.read_json(folder / "config.json"))
    if (folder / "model.json").exists():
        return config, int(storage.read_json(folder / "model.json")["target_dim"])
    if not registry.needs_targets(config):
        return config, 0
    return config, int(storage.read_json(storage.join(config.data.embeddings_dir, "manifest.json"))["hidden_size"])
