"""Every pretraining config key in one table: default, allowed values and what it means.

`defaults()` builds the ml_collections ConfigDict that configs/*.py start from; `validate()` rejects
unknown keys and invalid values at start-up with a message naming the key and what is allowed;
`describe()` renders the table for the README. One table, so code, checks and docs cannot drift.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections

from mvlp_jax import storage
from mvlp_jax.kernels.attention_ops import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from mvlp_jax.models.dense_heads import DECODERS
from mvlp_jax.objectives import registry



@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on a value and the rule it states, shown when a value breaks it."""
    holds: Callable[[Any], bool]
    text: str


Check = tuple | Rule | None  # a tuple of allowed values, a rule, or any value of the type

_positive = Rule(lambda v: v > 0, "must be > 0")
_non_negative = Rule(lambda v: v >= 0, "must be >= 0")
_fraction = Rule(lambda v: 0 <= v < 1, "must lie in [0, 1)")
_mesh_axis = Rule(lambda v: v == -1 or v >= 1, "must be >= 1, or -1 for the remaining devices")
_crop_scale = Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must be (low, high) with 0 < low <= high <= 1")
_momentum = Rule(lambda v: 0 <= v <= 1, "must lie in [0, 1]")
_profile_steps = Rule(lambda v: v == "" or _profile_window(v), "must be 'START,END' with 1 <= START <= END, or ''")
_objective_weights = Rule(lambda v: bool(v) and all(k in registry.SPECS and w >= 0 for k, w in v.items()),
                          "must map registered objective names to weights >= 0")

def _profile_window(text: str) -> bool:
    parts = text.split(",")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1])


# key -> (default, check, description)
SPEC: dict[str, tuple[Any, Check, str]] = {
    "seed": (0, None, "Seed of parameter init, masking, dropout and the data order."),
    "total_steps": (100_000, _positive, "Optimizer steps to train."),
    "objectives": (dict(registry.DEFAULT), _objective_weights,
                   f"Objective name -> loss weight (>= 0); names from {tuple(registry.SPECS)} (mvlp_jax/objectives/)."),
    "task_schedule": ("sum", ("sum", "cyclic"),
                      "'sum': every step optimises the weighted sum; 'cyclic': step s trains objective s mod n only."),
    "model.encoder": ("vit", ("vit", "vitdet"), "Image encoder: plain ViT (MAE) or windowed ViTDet (SimMIM)."),
    "model.variant": ("B/16", None, "Encoder size/patch, e.g. 'S/16', 'B/16', 'L/16'."),
    "model.image_size": (224, _positive, "Training resolution (square crops)."),
    "model.dtype": ("auto", ("auto", "float32", "bfloat16"),
                    "Compute dtype; 'auto': bfloat16 on TPU and GPU, float32 on CPU (where bfloat16 is slower). "
                    "Parameters, optimizer state, softmax and losses stay float32."),
    "model.attention": ("auto", ATTENTION_IMPLEMENTATIONS,
                        "Attention kernel; 'auto': Pallas splash on TPU, cuDNN on GPU, MKL on one CPU device, XLA's "
                        "formula where a kernel does not apply (mvlp_jax/kernels/attention_ops.py)."),
    "model.remat": ("none", ("none", "full", "dots", "dots_no_batch"), "Activation rematerialisation policy."),
    "model.scan": (False, None, "Scan the encoder blocks (faster compile for deep models)."),
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
    "mflag.ortho_lambda": (0.0051, _non_negative,
                           "M-FLAG: weight of the off-diagonal terms in the orthogonality loss."),
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
    "data.allow_changed_inputs": (False, None, "Resume (or train on embeddings made before the dataset was rebuilt) "
                                  "although the training split or the LLM embeddings differ from those the run "
                                  "recorded (WORKDIR/inputs.json); refused by default. The change is recorded in "
                                  "config_changes.json and printed in every evaluation result of the run."),
    "data.batch_size": (256, _positive, "Global batch size (all processes together)."),
    "data.crop_scale": ((0.5, 1.0), _crop_scale, "RandomResizedCrop area range."),
    "data.brightness": (0.1, _non_negative, "Intensity augmentation: random brightness shift (fraction of 255)."),
    "data.contrast": (0.1, _non_negative, "Intensity augmentation: random contrast factor range 1 +- this."),
    "data.channels": (0, (0, 1, 3), "Image channels the encoder reads: 0 takes the training dataset's (1 grayscale, 3 "
                      "colour; built with --channels), and a run records what it took. Programs compiled without "
                      "a dataset (aot) read 0 as 1."),
    "data.max_views": (1, _positive, "Views per study the encoder reads as one sequence (1: one image at a "
                       "time). Above 1 an example is a study (images grouped by study_id, frontal first, then "
                       "laterals, then others; the rest left out, missing ones padded), the encoder gains a learned "
                       "view-type embedding (a ViTDet windows each view, its global blocks span the study); "
                       "objectives: mae, llm_contrastive, mflag, dino (its global crops from two different views)."),
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
    "optim.accum_steps": (1, _positive,
                          "Gradient accumulation micro-steps per update (batch-wide losses per micro-batch)."),
    "max_nonfinite_steps": (10, _positive, "Stop after this many skipped non-finite updates in a row."),
    "mesh.data": (-1, _mesh_axis, "Data-parallel axis size (-1: the remaining devices)."),
    "mesh.fsdp": (1, _mesh_axis, "Fully-sharded data-parallel axis (params sharded, batch split)."),
    "mesh.model": (1, _mesh_axis, "Tensor-parallel axis (heads / MLP hidden sharded)."),
    "checkpoint.save_interval_steps": (1_000, _positive, "Save every this many steps (and at the end)."),
    "checkpoint.max_to_keep": (3, _positive, "Checkpoints kept."),
    "checkpoint.async_save": (True, None, "Save in the background while training goes on."),
    "log_every_steps": (50, _positive, "Metrics to TensorBoard and console every this many steps."),
    "log_images_every_steps": (0, _non_negative, "Pictures of what the run learned (mvlp_jax/visualize.py: "
                               "reconstructions, attention maps, query boxes, nearest reports by study id) to "
                               "WORKDIR/plots/ and TensorBoard every this many steps and at the end; 0: off. "
                               "Single-process runs; for others, python -m mvlp_jax.visualize on a checkpoint."),
    "peak_flops_per_device": (0.0, _non_negative, "For the MFU estimate; 0: known accelerators, or measured on CPU."),
    "compilation_cache_dir": ("", None, "JAX's persistent compilation cache, so a restarted run does not compile "
                              "again: '' puts it beside a gs:// workdir (WORKDIR/compilation_cache) or in "
                              "~/.cache/mvlp_jax/xla for a local one; 'none' turns it off; else a folder (local or "
                              "gs://)."),
    "profile_steps": ("", _profile_steps, "'START,END': a jax.profiler trace of those steps into "
                      "WORKDIR/plugins/profile/ (TensorBoard's profile tab); '': none."),
}

_widths = Rule(lambda v: len(v) > 0 and all(int(c) > 0 for c in v), "must be positive widths")
_label_fractions = Rule(lambda v: len(v) > 0 and all(0 < f <= 1 for f in v), "must be fractions in (0, 1]")

# The evaluation binary's keys (configs/linear_probe.py starts from these): key -> (default, check, description)
EVAL_SPEC: dict[str, tuple[Any, Check, str]] = {
    "workdirs": ("", None, "Comma-separated pretraining workdirs; 'random_init' adds the untrained floor."),
    "random_init_like": ("", None, "Architecture of random_init when no real workdir is listed (a workdir)."),
    "step": (-1, None, "Checkpoint step of every workdir (-1: the newest)."),
    "teacher": (False, None, "Probe a DINO run's EMA teacher encoder (the network DINO evaluates) instead of the "
                "student; refused for a run without one."),
    "mode": ("linear", ("linear", "finetune", "retrieval", "zero_shot"),
             "'linear': frozen encoder + logistic regression; 'finetune': the whole network; 'retrieval': image <-> "
             "report Recall@k on test_split, in the run's image-text space (reports from `embeddings`, default the "
             "run's own); 'zero_shot': per-label AUC on test_split from text prompts, no training."),
    "prompts": ("pair", ("pair", "ensemble"),
                "zero_shot: CheXzero's '{label}' vs 'no {label}', or BioViL-style ensembles of phrasings "
                "(configs/zero_shot_prompts.py)."),
    "llm": ("", None, "zero_shot: the frozen LLM that reads the prompts (checkpoint dir, .gguf, or 'smollm2'); '' "
            "takes the one named in the run's embedding manifest where it can be found (the embedded SmolLM2). A "
            "model whose weights differ from those the run's targets came from is refused."),
    "features_from": ("image", ("image", "text_embeddings"),
                      "'image': the workdirs' encoders; 'text_embeddings': the stored LLM vectors."),
    "embeddings": ("", None, "text_embeddings: comma-separated precompute output dirs (study ids must match); "
                   "retrieval: the precompute output holding the test split's reports."),
    "text_pooling": ("mean", ("mean", "last"), "text_embeddings: which stored vector."),
    "pooling": ("mean", ("mean", "cls", "map"), "Image features: mean of patch tokens, CLS, or the trained MAP."),
    "study_views": (0, _non_negative, "0: one feature per image. N: one per study (images grouped by study_id, "
                    "frontal first, up to N), labelled by its first view: a study encoder (data.max_views > 1) "
                    "reads the views as one sequence, a single-image encoder averages their features."),
    "data_dir": ("~/tensorflow_datasets", None, "TFDS data dir of the labelled dataset."),
    "dataset": ("mimic_cxr", None, "Labelled dataset (optionally name:version)."),
    "train_split": ("train", None, "Split the probes are fitted on."),
    "val_split": ("validate", None, "Model-selection split; '' carves 10% of the training patients out."),
    "test_split": ("test", None, "Split the reported numbers come from."),
    "label_fractions": ((1.0, 0.1, 0.01), _label_fractions,
                        "Fractions of training patients labelled (fixed seed), as in label-efficiency studies."),
    "uncertain": ("ignore", ("ignore", "ones", "zeros"), "-1 labels: masked out of loss and metrics, or 1, or 0."),
    "unmentioned": ("negative", ("negative", "ignore"), "-2 labels: negative, or masked out."),
    "batch_size": (64, _positive, "Feature extraction batch, all devices."),
    "allow_changed_inputs": (False, None, "Retrieval, zero-shot: use a run's embeddings although they changed since "
                             "it trained on them (another layer, re-embedded reports); refused by default, and "
                             "printed in every result when allowed."),
    "bootstrap": (1000, _non_negative, "Patient-level resamples for the 95% intervals."),
    "seed": (0, None, "Seed of label fractions, probes and bootstrap."),
    "seeds": (0, _non_negative, "Heads trained per checkpoint and label fraction, seeds seed, seed+1, ... (each its "
              "own label subset and initialisation); 0: auto, 3 where a head learns from few cases (a fraction under "
              "100%, or fewer than 300 training cases) and its seed changes something (a linear probe on all the "
              "labels is deterministic), else 1. Results give the mean over seeds, their spread, and intervals whose "
              "draws resample test patients and pick a seed."),
    "task": ("classification", ("classification", "segmentation", "detection"),
             "'classification': the labels (probes, fine-tuning, zero-shot, retrieval); 'segmentation': a SETR "
             "progressive-upsampling head on the encoder's patch tokens learns the dataset's masks (built with "
             "--mask_column), test Dice per image; 'detection': a CenterNet head learns its boxes (--boxes_csv), "
             "test mAP over IoU 0.40:0.75. mode='linear' trains the head on the frozen encoder, 'finetune' the "
             "encoder with it (layer decay, drop path and warmup from finetune.*, the rest from the task's keys)."),
    "segmentation.epochs": (50, _positive, "Segmentation: passes over the training images (early stopping)."),
    "segmentation.batch_size": (16, _positive, "Segmentation: head training batch."),
    "segmentation.lr": (5e-4, _positive, "Segmentation: AdamW learning rate (MGCA's)."),
    "segmentation.weight_decay": (0.05, _non_negative, "Segmentation: AdamW decay."),
    "segmentation.patience": (10, _positive, "Segmentation: epochs without a lower validation loss before stopping."),
    "segmentation.channels": ((512, 256, 128, 64), _widths,
                              "Segmentation: widths of the decoder's upsampling stages (SETR-PUP / MGCA's)."),
    "segmentation.decoder": ("auto", ("auto",) + DECODERS,
                             "Segmentation: from the stride-patch token grid to a quarter of the patch by SETR's "
                             "'upsampling' stages or ViTDet's simple feature 'pyramid'; 'auto': upsampling for a ViT, "
                             "the pyramid for a ViTDet. The pyramid's levels take the first width of channels."),
    "segmentation.plot_images": (6, _non_negative, "Segmentation: test images drawn in segmentation.png."),
    "detection.epochs": (80, _positive, "Detection: passes over the training images (early stopping)."),
    "detection.batch_size": (16, _positive, "Detection: head training batch."),
    "detection.lr": (5e-4, _positive, "Detection: AdamW learning rate."),
    "detection.weight_decay": (0.05, _non_negative, "Detection: AdamW decay."),
    "detection.patience": (15, _positive, "Detection: epochs without a lower validation loss before stopping."),
    "detection.channels": ((256, 128), _widths,
                           "Detection: widths of the two upsampling stages before the CenterNet branches (the "
                           "pyramid's levels take the first)."),
    "detection.decoder": ("auto", ("auto",) + DECODERS,
                          "Detection: as segmentation.decoder, before the CenterNet branches."),
    "detection.images": ("boxed", ("boxed", "all"),
                         "Detection: images with at least one box (an image without one may be unannotated, as most "
                         "of NIH's), or every image (a box-free image then counts as normal: false alarms on it "
                         "count)."),
    "detection.plot_images": (6, _non_negative, "Detection: test images drawn in detection.png."),
    "finetune.epochs": (10, _positive, "Fine-tuning: passes over the labelled training cases."),
    "finetune.batch_size": (64, _positive, "Fine-tuning batch."),
    "finetune.lr": (5e-4, _positive, "Fine-tuning: peak lr, scaled by batch_size / 256 (MAE fine-tuning's base)."),
    "finetune.layer_decay": (0.75, Rule(lambda v: 0 < v <= 1, "must lie in (0, 1]"),
                             "Fine-tuning: block i of L learns at layer_decay ** (L - i) of the head's rate."),
    "finetune.weight_decay": (0.05, _non_negative, "Fine-tuning: AdamW decay."),
    "finetune.warmup_epochs": (1, _non_negative, "Fine-tuning: linear warmup epochs."),
    "finetune.drop_path": (0.1, _fraction, "Fine-tuning: stochastic depth rate."),
    "finetune.patience": (3, _positive, "Fine-tuning: epochs without a better validation mAUC before stopping."),
}

# Rules between evaluation keys: (holds, the message when it does not)
EVAL_RULES: tuple[tuple[Callable[[Any], bool], str], ...] = (
    (lambda c: c.features_from != "image" or bool(c.workdirs),
     "config.workdirs is empty: list pretraining workdirs (and/or random_init)"),
    (lambda c: c.features_from != "text_embeddings" or bool(c.embeddings),
     "features_from='text_embeddings' needs config.embeddings: comma-separated output dirs of "
     "data_prep.precompute_text_embeddings"),
    (lambda c: c.features_from != "text_embeddings" or c.mode == "linear",
     "features_from='text_embeddings' probes stored vectors: it needs mode='linear'"),
    (lambda c: c.task == "classification" or (c.mode in ("linear", "finetune") and c.features_from == "image"),
     "task='segmentation' and 'detection' train a head on the encoders' patch tokens: they need "
     "mode='linear' (frozen encoder) or 'finetune', and features_from='image'"),
    (lambda c: not c.study_views or (c.mode == "linear" and c.task == "classification"
                                     and c.features_from == "image"),
     "config.study_views (study-level features) is built for linear probes of image encoders on classification"),
    (lambda c: c.mode not in ("retrieval", "zero_shot") or c.features_from == "image",
     "mode='retrieval' and 'zero_shot' compare the workdirs' image embeddings with text: they need "
     "features_from='image'"),
)


def defaults(spec: dict[str, tuple] = SPEC) -> ml_collections.ConfigDict:
    """The ConfigDict holding every key of `spec` (SPEC or EVAL_SPEC) at its default."""
    tree: dict[str, Any] = {}
    for key, (default, _, _) in spec.items():
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


def flatten(config: Any, prefix: str = "", spec: dict[str, tuple] = SPEC) -> dict[str, Any]:
    """{'model.image_size': 224, ...}; a dict that is a key's value (config.objectives) stays whole."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in spec:
            out.update(flatten(value, name + ".", spec))
        else:
            out[name] = value
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    kinds = {float: (int, float), tuple: (tuple, list), dict: (dict, ml_collections.ConfigDict)}
    return isinstance(value, kinds.get(type(default), type(default)))


def validate(config: ml_collections.ConfigDict, spec: dict[str, tuple] = SPEC) -> None:
    """Raises ValueError naming the first unknown key or invalid value, with the rule it breaks; then the rules
    between keys (the objectives' own checks for SPEC, EVAL_RULES for EVAL_SPEC)."""
    flat = flatten(config, spec=spec)
    for key in flat:
        if key not in spec:
            close = [k for k in spec if k.split(".")[-1] == key.split(".")[-1]]
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    for key, (default, check, _) in spec.items():
        if key not in flat:
            raise ValueError(f"config key {key!r} is missing (default {default!r})")
        value = flat[key]
        if not _same_kind(default, value):
            raise ValueError(f"config key {key!r} = {value!r} must be of type {type(default).__name__}")
        if isinstance(check, tuple) and value not in check:
            raise ValueError(f"config key {key!r} = {value!r}; allowed values: {', '.join(map(repr, check))}")
        if isinstance(check, Rule) and not check.holds(value):
            shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            raise ValueError(f"config key {key!r} = {shown!r} {check.text}" + (
                f" (registered: {', '.join(registry.SPECS)})" if key == "objectives" else "") + f": {spec[key][2]}")
    if spec is SPEC:
        registry.check(config)
    for holds, message in EVAL_RULES if spec is EVAL_SPEC else ():
        if not holds(config):
            raise ValueError(message)


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


def describe(spec: dict[str, tuple] = SPEC) -> str:
    """Markdown table of every key of `spec` (docs/config.md)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, (default, check, doc) in spec.items():
        allowed = (f" One of {', '.join(map(repr, check))}." if isinstance(check, tuple) else
                   f" Value {check.text}." if isinstance(check, Rule) else "")
        rows.append(f"| `{key}` | `{default!r}` | {doc}{allowed} |")
    return "\n".join(rows)


DOC = os.path.join("docs", "config.md")


def config_doc() -> str:
    """The text of docs/config.md: `python -m mvlp_jax.configuration` writes it (a test keeps it current)."""
    return ("# Config keys\n\n"
            "Generated from `mvlp_jax/configuration.py` by `python -m mvlp_jax.configuration`. Configs "
            "(`configs/*.py`) start from these defaults; an unknown key or a value that breaks its rule stops the run "
            "at start-up, naming the key and the rule. Override any key on the command line "
            "(`--config.optim.lr=3e-4`).\n\n"
            "## Pretraining (`python -m mvlp_jax.main`, `python -m mvlp_jax.aot`)\n\n" + describe() + "\n\n"
            "## Evaluation (`python -m mvlp_jax.evaluate`)\n\n" + describe(EVAL_SPEC) + "\n\n"
            "Rules between evaluation keys:\n\n" + "".join(f"- {message}\n" for _, message in EVAL_RULES))


if __name__ == "__main__":
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(config_doc())
    print(f"wrote {DOC}")
