"""DINO-style contrastive embedding: a student matches an EMA teacher across crops of the same image, or of
the same study.

The student sees 2 global + N local crops, the teacher the 2 global ones; the loss is the cross-entropy
between the teacher's centred, sharpened softmax and the student's softmax over every (teacher crop,
other student crop) pair. On studies (data.max_views > 1) the two global crops come from two different views
when the study has several (a patient's frontal and lateral should map to the same prototypes), each local crop
from a view drawn at random, and every crop is encoded as one image with its view's type embedding.

The teacher (encoder + DINO head) and the center live in the train state's `extra`, outside the optimizer:
`update_extra` moves them after each step, and they are checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import views as views_lib
from mvlp_jax.models.heads import DINOHead
from mvlp_jax.objectives.spec import LossFn, Spec, ViewInputs, check_patch_multiple
from mvlp_jax.runtime import schema

TEACHER = ("encoder", "dino_head")  # the params the teacher keeps its own (EMA) copy of


def heads(model: nn.Module, config: ml_collections.ConfigDict, dtype: Any) -> dict[str, Any]:
    del model, dtype
    d = config.dino
    return {"dino_head": DINOHead(out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim)}


def embed(model: nn.Module, images: jax.Array, train: bool = True, view_type: jax.Array | None = None) -> jax.Array:
    """Images (any size the encoder takes; `view_type` (B,) their vit.VIEW_TYPES on a study encoder) -> DINO
    head logits, float32 (B, dino.out_dim); a `method` of `Pretrainer.apply`."""
    return model.dino_head(model.features(images, model.global_pooling, train, view_type)).astype(jnp.float32)


def entries(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    s, d, c = config.model.image_size, config.dino, views_lib.channels(config)
    out = {
        "global_views": ((2, s, s, c), np.float32),
        "local_views": ((d.num_local_crops, d.local_size, d.local_size, c), np.float32),
    }
    if config.data.get("max_views", 1) > 1:  # the view type of the study's image each crop was cut from
        out.update(global_view_types=((2,), np.int32), local_view_types=((d.num_local_crops,), np.int32))
    return out


def _crops(inputs: list[ViewInputs], global_from: tuple[int, int], local_from: list[int]) -> dict[str, np.ndarray]:
    """The normalised crops, each of the view `global_from` / `local_from` names (an index into `inputs`)."""
    c, d = inputs[0].config, inputs[0].config.dino
    global_views, local_views = views_lib.multi_crop(
        [i.decoded for i in inputs],
        global_from,
        local_from,
        c.model.image_size,
        d.local_size,
        tuple(d.global_scale),
        tuple(d.local_scale),
        c.data.brightness,
        c.data.contrast,
        inputs[0].rng,
    )
    return {"global_views": inputs[0].normalise(global_views), "local_views": inputs[0].normalise(local_views)}


def views(inputs: ViewInputs) -> dict[str, np.ndarray]:
    """2 global crops at the training size and N local crops, each with its own crop and intensity jitter."""
    return _crops([inputs], (0, 0), [0] * inputs.config.dino.num_local_crops)


def study_views(inputs: list[ViewInputs], types: np.ndarray) -> dict[str, np.ndarray]:
    """A study's crops: the 2 global ones from two different views (the same one when it has one), each local
    one from a view drawn at random; with each crop's view type."""
    rng, n = inputs[0].rng, len(inputs)
    global_from = tuple(int(i) for i in rng.choice(n, size=2, replace=n < 2))
    local_from = [int(i) for i in rng.integers(n, size=inputs[0].config.dino.num_local_crops)]
    types = np.asarray(types, np.int32)
    return {
        **_crops(inputs, global_from, local_from),
        "global_view_types": types[list(global_from)],
        "local_view_types": types[local_from],
    }


def teacher_temperature(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Linear warmup from warmup_teacher_temp to teacher_temp, then constant."""
    d = config.dino
    if not d.teacher_temp_warmup_steps:
        return jnp.asarray(d.teacher_temp, jnp.float32)
    frac = jnp.clip(step / d.teacher_temp_warmup_steps, 0.0, 1.0)
    return d.warmup_teacher_temp + frac * (d.teacher_temp - d.warmup_teacher_temp)


def teacher_momentum(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Cosine from dino.momentum at step 0 to 1 at total_steps."""
    m0 = config.dino.momentum
    return 1.0 - (1.0 - m0) * (jnp.cos(math.pi * jnp.minimum(step, config.total_steps) / config.total_steps) + 1) / 2


def loss(
    student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float, teacher_temp: jax.Array
) -> jax.Array:
    """student (V, B, K) logits of V crops (the first 2 global), teacher (2, B, K) logits of the global crops."""
    targets = jax.lax.stop_gradient(jax.nn.softmax((teacher - center) / teacher_temp, axis=-1))
    log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)
    total, pairs = 0.0, 0
    for t in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v != t:  # the same crop is not its own target
                total = total + jnp.mean(-jnp.sum(targets[t] * log_probs[v], axis=-1))
                pairs += 1
    return total / pairs


def init_extra(params: Any, config: ml_collections.ConfigDict) -> dict:
    """The teacher starts as a copy of the student. The center has no value before the first DINO step
    (`center_steps` = 0): that step centres by its own batch mean, which then becomes the center."""
    return {
        "teacher": {k: params[k] for k in TEACHER},
        "center": jnp.zeros((config.dino.out_dim,), jnp.float32),
        "center_steps": jnp.zeros((), jnp.int32),
    }


def update_extra(
    extra: dict,
    params: Any,
    batch_center: jax.Array,
    active: jax.Array,
    step: jax.Array,
    config: ml_collections.ConfigDict,
) -> dict:
    """EMA of the student into the teacher; EMA of the teacher's batch mean into the center (only on steps
    where the DINO objective ran: `active` is 0 on the other steps of a cyclic schedule). Other objectives' extra
    state passes through."""
    m = teacher_momentum(config, step)
    teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s, extra["teacher"], {k: params[k] for k in TEACHER})
    c = jnp.where(extra["center_steps"] > 0, config.dino.center_momentum, 0.0)  # the first DINO step sets it
    center = jnp.where(active > 0, c * extra["center"] + (1 - c) * batch_center, extra["center"])
    return {**extra, "teacher": teacher, "center": center, "center_steps": extra["center_steps"] + (active > 0)}


def update_after_step(
    extra: dict, params: Any, metrics: dict, step: jax.Array, config: ml_collections.ConfigDict
) -> tuple[dict, dict]:
    """After the student's update, as DINO does; the teacher's batch mean leaves the logged metrics."""
    metrics = dict(metrics)
    batch_center = metrics.pop("dino/teacher_center")
    return update_extra(extra, params, batch_center, metrics["dino/active"], step, config), metrics


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    d = config.dino

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        extra, step = context["extra"], context["step"]
        global_views, local_views = batch["global_views"], batch["local_views"]
        b = global_views.shape[0]
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # (B, V, ...) -> (B * V, ...), crop-major below
        by_crop = lambda logits, v: logits.reshape(b, v, -1).swapaxes(0, 1)
        # on studies, each crop's view type (B, crops); None on single images
        global_types, local_types = (batch.get(k) for k in ("global_view_types", "local_view_types"))
        flat_types = lambda t: None if t is None else t.reshape(-1)
        apply = lambda p, x, t, r: model.apply(
            {"params": p}, x, train=True, view_type=flat_types(t), rngs={"dropout": r}, method=embed
        )
        student = [by_crop(apply(params, flat(global_views), global_types, jax.random.fold_in(rng, 0)), 2)]
        if local_views.shape[1]:
            student.append(
                by_crop(apply(params, flat(local_views), local_types, jax.random.fold_in(rng, 1)), local_views.shape[1])
            )
        teacher_params = {**params, **jax.lax.stop_gradient(extra["teacher"])}
        teacher = by_crop(
            model.apply(
                {"params": teacher_params},
                flat(global_views),
                train=False,
                view_type=flat_types(global_types),
                method=embed,
            ),
            2,
        )
        teacher = jax.lax.stop_gradient(teacher)
        temperature = teacher_temperature(config, step)
        batch_center = teacher.mean(axis=(0, 1))
        # before any center exists, centre by this batch's mean: a zero center would make the first targets all
        # pick the one prototype a random network favours, a trivially low loss no later step can match
        center = jnp.where(extra["center_steps"] > 0, extra["center"], batch_center)
        value = loss(jnp.concatenate(student, axis=0), teacher, center, d.student_temp, temperature)
        targets = jax.nn.softmax((teacher - center) / temperature, axis=-1)
        entropy_of = lambda p: -jnp.sum(p * jnp.log(p + 1e-12), axis=-1)
        entropy = jnp.mean(entropy_of(targets))
        # every teacher crop is the target of the same number of pairs, so loss = entropy + mean KL: the KL is
        # what the student learns to close, the entropy what centering (up) and sharpening (down) set
        # DINO's collapse diagnostics: one shared target for every image gives batch entropy = entropy; uniform
        # targets give entropy = ln(out_dim); learning shows as a batch entropy well above a low entropy
        return value, {
            "loss": value,
            "kl": value - entropy,
            "teacher_entropy": entropy,
            "teacher_temp": temperature,
            "batch_target_entropy": entropy_of(targets.mean(axis=(0, 1))),
            "teacher_center": batch_center,
        }

    return objective


# Its config keys (docs/config.md): key -> (default, check, description)
CONFIG_ROWS: schema.Table = {
    "dino.out_dim": (65536, schema.POSITIVE, "DINO: prototypes (output size of the DINO head)."),
    "dino.hidden_dim": (2048, schema.POSITIVE, "DINO: hidden width of the head's MLP."),
    "dino.bottleneck_dim": (
        256,
        schema.POSITIVE,
        "DINO: L2-normalised bottleneck before the weight-normalised last layer.",
    ),
    "dino.num_local_crops": (6, schema.NON_NEGATIVE, "DINO: local crops per image (besides the 2 global crops)."),
    "dino.local_size": (96, schema.POSITIVE, "DINO: local crop size in pixels (global crops: model.image_size)."),
    "dino.global_scale": ((0.4, 1.0), schema.CROP_SCALE, "DINO: area range of the global crops."),
    "dino.local_scale": ((0.05, 0.4), schema.CROP_SCALE, "DINO: area range of the local crops."),
    "dino.student_temp": (0.1, schema.POSITIVE, "DINO: student softmax temperature."),
    "dino.teacher_temp": (0.04, schema.POSITIVE, "DINO: teacher softmax temperature after warmup (sharpening)."),
    "dino.warmup_teacher_temp": (0.04, schema.POSITIVE, "DINO: teacher temperature at step 0."),
    "dino.teacher_temp_warmup_steps": (0, schema.NON_NEGATIVE, "DINO: linear warmup of the teacher temperature."),
    "dino.momentum": (
        0.996,
        schema.UNIT_INTERVAL,
        "DINO: EMA momentum of the teacher at step 0, cosine to 1 at the end.",
    ),
    "dino.center_momentum": (
        0.9,
        schema.UNIT_INTERVAL,
        "DINO: EMA momentum of the center subtracted from teacher outputs.",
    ),
}


SPEC = Spec(
    name="dino",
    make_loss=make,
    uses_image=False,
    entries=entries,
    views=views,
    study_views=study_views,
    heads=heads,
    init=lambda model, images, targets: embed(model, images, train=False),
    init_extra=init_extra,
    update_extra=update_after_step,
    check=lambda config: check_patch_multiple(config, "dino.local_size"),
    config_rows=CONFIG_ROWS,
)
