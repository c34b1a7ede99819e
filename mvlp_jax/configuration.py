"""Every pretraining config key in one table: default, allowed values and what it means.

`defaults()` builds the ml_collections ConfigDict that configs/*.py start from; `validate()` rejects
unknown keys and invalid values at start-up with a message naming the key and what is allowed;
`describe()` renders the table for the README. One table, so code, checks and docs cannot drift.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections

from mvlp_jax.kernels.attention_ops import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

Check = tuple | Callable[[Any], bool] | None  # a tuple of allowed values, a predicate, or any value of the type

_positive = lambda v: v > 0
_non_negative = lambda v: v >= 0
_fraction = lambda v: 0 <= v < 1
_mesh_axis = lambda v: v == -1 or v >= 1
_crop_scale = lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1
_momentum = lambda v: 0 <= v <= 1
_objective_weights = lambda v: bool(v) and all(k in OBJECTIVES and w >= 0 for k, w in v.items())
OBJECTIVES = ("llm_contrastive", "mae", "mflag", "dino", "query_box")

# key -> (default, check, description)
SPEC: dict[str, tuple[Any, Check, str]] = {
    "seed": (0, None, "Seed of parameter init, masking, dropout and the data order."),
    "total_steps": (100_000, _positive, "Optimizer steps to train."),
    "objectives": ({"llm_contrastive": 1.0, "mae": 1.0}, _objective_weights,
                   f"Objective name -> loss weight; names from {OBJECTIVES}."),
    "task_schedule": ("sum", ("sum", "cyclic"),
                      "'sum': every step optimises the weighted sum; 'cyclic': step s trains objective s mod n only."),
    "model.encoder": ("vit", ("vit", "vitdet"), "Image encoder: plain ViT (MAE) or windowed ViTDet (SimMIM)."),
    "model.variant": ("B/16", None, "Encoder size/patch, e.g. 'S/16', 'B/16', 'L/16'."),
    "model.image_size": (224, _positive, "Training resolution (square crops)."),
    "model.dtype": ("auto", ("auto", "float32", "bfloat16"),
                    "Compute dtype; 'auto': bfloat16 on TPU and GPU, float32 on CPU (where bfloat16 is slower). "
                    "Parameters, optimizer state, softmax and losses stay float32."),
    "model.attention": ("auto", ATTENTION_IMPLEMENTATIONS,
                        "Attention kernel; 'auto': Pallas flash on TPU, cuDNN on GPU, MKL on one CPU device, XLA's "
                        "formula where a kernel does not apply (mvlp_jax/kernels/attention_ops.py)."),
    "model.remat": ("none", ("none", "full", "dots", "dots_no_batch"), "Activation rematerialisation policy."),
    "model.scan": (False, None, "Scan the encoder blocks (faster compile for deep models; ViT only)."),
    "model.drop_path": (0.0, _fraction, "Stochastic depth rate of the last block."),
    "model.window_size": (14, _positive, "ViTDet window (in patches)."),
    "model.mask_ratio": (0.75, _fraction, "Fraction of patches masked for MAE / SimMIM."),
    "model.norm_pix_loss": (False, None, "Per-patch normalised MAE targets (noise-like reconstructions on X-rays)."),
    "model.decoder_width": (512, _positive, "MAE decoder width."),
    "model.decoder_depth": (8, _positive, "MAE decoder depth."),
    "model.decoder_heads": (16, _positive, "MAE decoder heads."),
    "model.pool": ("map", ("map", "mean", "cls"), "Image embedding pooling (MAP = attention pooling)."),
    "model.pool_heads": (8, _positive, "Heads of the MAP pooling."),
    "contrastive.loss": ("infonce", ("infonce", "sigmoid", "margin"),
                         "Batch-wide loss between image and report embeddings (over the global batch)."),
    "contrastive.target": ("mean", ("mean", "last"), "Which stored LLM vector is the target."),
    "contrastive.embed_dim": (0, _non_negative, "Shared embedding size; 0 = the LLM hidden size (needs no text proj)."),
    "contrastive.image_proj": ("mlp", ("linear", "mlp"), "Projection after pooling."),
    "contrastive.text_proj": ("none", ("none", "linear", "mlp"), "Trainable projection of the frozen LLM vector."),
    "contrastive.temperature": (0.07, _positive, "Initial temperature (infonce, sigmoid); learnable."),
    "contrastive.sigmoid_bias": (-10.0, None, "Initial logit bias of the sigmoid loss; learnable."),
    "contrastive.margin": (1.0, _positive, "eps of the margin loss: non-matching pairs are pushed this far apart."),
    "mflag.embed_dim": (512, _positive, "M-FLAG: size of the aligned image/text embeddings."),
    "mflag.hidden_dim": (2048, _positive, "M-FLAG: hidden width of the projection MLPs (with batch norm)."),
    "mflag.ortho_weight": (1.0, _non_negative, "M-FLAG: weight of the orthogonality loss beside the alignment loss."),
    "mflag.ortho_lambda": (0.0051, _non_negative, "M-FLAG: weight of the off-diagonal terms in the orthogonality loss."),
    "dino.out_dim": (65536, _positive, "DINO: prototypes (output size of the DINO head)."),
    "dino.hidden_dim": (2048, _positive, "DINO: hidden width of the head's MLP."),
    "dino.bottleneck_dim": (256, _positive, "DINO: L2-normalised bottleneck before the weight-normalised last layer."),
    "dino.num_local_crops": (6, _non_negative, "DINO: local crops per image (besides the 2 global crops)."),
    "dino.local_size": (96, _positive, "DINO: local crop size in pixels (global crops: model.image_size)."),
    "dino.global_scale": ((0.4, 1.0), _crop_scale, "DINO: area range of the global crops."),
    "dino.local_scale": ((0.05, 0.4), _crop_scale, "DINO: area range of the local crops."),
    "dino.student_temp": (0.1, _positive, "DINO: student softmax temperature."),
    "dino.teacher_temp": (0.04, _positive, "DINO: teacher softmax temperature after warmup (sharpening)."),
    "dino.warmup_teacher_temp": (0.04, _positive, "DINO: teacher temperature at step 0."),
    "dino.teacher_temp_warmup_steps": (0, _non_negative, "DINO: linear warmup of the teacher temperature."),
    "dino.momentum": (0.996, _momentum, "DINO: EMA momentum of the teacher at step 0, cosine to 1 at the end."),
    "dino.center_momentum": (0.9, _momentum, "DINO: EMA momentum of the center subtracted from teacher outputs."),
    "query_box.size": (96, _positive, "Query box: the cropped region is resized to this many pixels."),
    "query_box.scale": ((0.05, 0.3), _crop_scale, "Query box: area range of the region, of the training image."),
    "query_box.l1_weight": (5.0, _non_negative, "Query box: weight of the L1 loss on (cx, cy, w, h)."),
    "query_box.giou_weight": (2.0, _non_negative, "Query box: weight of the generalised-IoU loss."),
    "data.data_dir": ("", None, "TFDS data dir written by data_prep.build_dataset."),
    "data.dataset": ("mimic_cxr", None, "Dataset name (optionally name:version) under data.data_dir."),
    "data.train_split": ("train", None, "Split to train on."),
    "data.embeddings_dir": ("", None, "Output dir of data_prep.precompute_text_embeddings."),
    "data.allow_missing_embeddings": (False, None, "Drop images whose study has no embedding instead of failing."),
    "data.embeddings_any_source": (False, None, "Accept embeddings made from another source (a reports CSV, another "
                                   "dataset) whose study ids are this dataset's; refused by default."),
    "data.batch_size": (256, _positive, "Global batch size (all processes together)."),
    "data.crop_scale": ((0.5, 1.0), _crop_scale, "RandomResizedCrop area range."),
    "data.brightness": (0.1, _non_negative, "Intensity augmentation: random brightness shift (fraction of 255)."),
    "data.contrast": (0.1, _non_negative, "Intensity augmentation: random contrast factor range 1 +- this."),
    "data.mean": (0.5, None, "Normalisation: (pixel / 255 - mean) / std."),
    "data.std": (0.25, _positive, "Normalisation std."),
    "data.num_threads": (8, _positive, "Decode/augment threads per process."),
    "data.num_workers": (0, _non_negative, "Decode/augment worker processes per process (0: threads only)."),
    "data.prefetch": (2, _non_negative, "Batches prefetched."),
    "optim.lr": (1.5e-4, _positive, "Peak learning rate (scaled by batch_size / 256)."),
    "optim.min_lr": (0.0, _non_negative, "Final learning rate of the cosine schedule."),
    "optim.warmup_steps": (5_000, _non_negative, "Linear warmup steps."),
    "optim.weight_decay": (0.05, _non_negative, "AdamW decay (not on norms, biases, position embeddings, tokens)."),
    "optim.b1": (0.9, _fraction, "Adam beta1."),
    "optim.b2": (0.95, _fraction, "Adam beta2."),
    "optim.clip_norm": (1.0, _non_negative, "Global gradient-norm clipping (0: off)."),
    "optim.accum_steps": (1, _positive, "Gradient accumulation micro-steps per update (batch-wide losses per micro-batch)."),
    "max_nonfinite_steps": (10, _positive, "Stop after this many skipped non-finite updates in a row."),
    "mesh.data": (-1, _mesh_axis, "Data-parallel axis size (-1: the remaining devices)."),
    "mesh.fsdp": (1, _mesh_axis, "Fully-sharded data-parallel axis (params sharded, batch split)."),
    "mesh.model": (1, _mesh_axis, "Tensor-parallel axis (heads / MLP hidden sharded)."),
    "checkpoint.save_interval_steps": (1_000, _positive, "Save every this many steps (and at the end)."),
    "checkpoint.max_to_keep": (3, _positive, "Checkpoints kept."),
    "checkpoint.async_save": (True, None, "Save in the background while training goes on."),
    "log_every_steps": (50, _positive, "Metrics to TensorBoard and console every this many steps."),
    "peak_flops_per_device": (0.0, _non_negative, "For the MFU estimate; 0: known accelerators, or measured on CPU."),
}


def defaults() -> ml_collections.ConfigDict:
    """The ConfigDict holding every key of SPEC at its default."""
    tree: dict[str, Any] = {}
    for key, (default, _, _) in SPEC.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = default
    return ml_collections.ConfigDict(tree)


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys ('model.image_size') of `config` in place, as --config.KEY=VALUE flags do, creating
    missing groups (`validate` rejects unknown keys); returns it."""
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = value
    return config


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
    """A stored config with the keys added to SPEC since it was written, at their defaults (keys that do not
    change what a run computes, such as model.attention)."""
    return override(defaults(), flatten(stored))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in SPEC:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    kinds = {float: (int, float), tuple: (tuple, list), dict: (dict, ml_collections.ConfigDict)}
    return isinstance(value, kinds.get(type(default), type(default)))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first unknown key or invalid value."""
    flat = flatten(config)
    for key in flat:
        if key not in SPEC:
            close = [k for k in SPEC if k.split(".")[-1] == key.split(".")[-1]]
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    for key, (default, check, _) in SPEC.items():
        if key not in flat:
            raise ValueError(f"config key {key!r} is missing (default {default!r})")
        value = flat[key]
        if not _same_kind(default, value):
            raise ValueError(f"config key {key!r} = {value!r} must be of type {type(default).__name__}")
        if isinstance(check, tuple) and value not in check:
            raise ValueError(f"config key {key!r} = {value!r}; allowed values: {', '.join(map(repr, check))}")
        if callable(check) and not check(value):
            raise ValueError(f"config key {key!r} = {value!r} is invalid: {SPEC[key][2]}")


def save(config: ml_collections.ConfigDict, workdir: str, target_dim: int) -> str:
    """Writes the resolved config to workdir/config.json (what this run really used) and the model's
    LLM target width to workdir/model.json (the evaluation binary rebuilds the model from both)."""
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump({"target_dim": target_dim}, f)
    return path


def load(workdir: str) -> tuple[ml_collections.ConfigDict, int]:
    """(config, target_dim) of a pretraining workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a pretraining workdir (no config.json)")
    with open(path) as f:
        config = with_defaults(json.load(f))
    model_json = os.path.join(workdir, "model.json")
    if os.path.exists(model_json):
        with open(model_json) as f:
            return config, int(json.load(f)["target_dim"])
    if "llm_contrastive" not in config.objectives:
        return config, 0
    with open(os.path.join(config.data.embeddings_dir, "manifest.json")) as f:
        return config, int(json.load(f)["hidden_size"])


def describe() -> str:
    """Markdown table of every key (README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, (default, check, doc) in SPEC.items():
        allowed = f" One of {', '.join(map(repr, check))}." if isinstance(check, tuple) else ""
        rows.append(f"| `{key}` | `{default!r}` | {doc}{allowed} |")
    return "\n".join(rows)
