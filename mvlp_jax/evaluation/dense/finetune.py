"""Fine-tuning an encoder for a dense task (`mode=finetune` with evaluator=segmentation|detection): the encoder's
patch-token grid feeds the task's head, and both learn from the images. The classification fine-tuning recipe
(finetune.py) carries over: layer-wise lr decay over the encoder (`finetune.layer_decay`), stochastic depth
(`finetune.drop_path`), gradient clipping at norm 1 and a linear warmup (`finetune.warmup_epochs`); the task's own
lr, weight decay, batch, epochs and early stopping on the validation loss. Images are the evaluation view (centre
crop at the run's size), without augmentation: masks and boxes would have to follow every random crop."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mvlp_jax.evaluation import finetune
from mvlp_jax.evaluation.features import Encoder
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain import optim


class EncoderWithHead(nn.Module):
    """Images -> the encoder's patch-token grid -> the head; params {'model': {'encoder': ...}, 'head': ...}."""

    config: ml_collections.ConfigDict
    head: nn.Module

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Any:
        grid = Pretrainer(self.config, name="model").patch_grid(images, train=train)
        return self.head(grid, train=train)


def model(encoder: Encoder, head: nn.Module, settings: ml_collections.ConfigDict) -> EncoderWithHead:
    """The encoder of a checkpoint (with the fine-tuning stochastic depth) under `head`."""
    return EncoderWithHead(config=finetune.with_drop_path(encoder.config, settings.drop_path), head=head)


def pretrained(encoder: Encoder) -> dict:
    """The checkpoint's encoder weights, where `EncoderWithHead` keeps them."""
    return {"model": {"encoder": encoder.params["encoder"]}}


def optimizer(task: ml_collections.ConfigDict, settings: ml_collections.ConfigDict, steps_per_epoch: int):
    """params -> clip at norm 1, AdamW at the task's lr (warmed up linearly over `settings.warmup_epochs`, then
    constant), each encoder layer's update scaled by its layer-decay factor, the head's by 1."""
    warmup = settings.warmup_epochs * steps_per_epoch
    schedule = optax.linear_schedule(0.0, task.lr, warmup) if warmup else task.lr

    def make(params: Any) -> optax.GradientTransformation:
        depth = finetune.depth(params["model"])
        scales = {
            "model": finetune.layer_scales(params["model"], depth, settings.layer_decay),
            "head": jax.tree.map(lambda _: jnp.ones(()), params["head"]),
        }
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, weight_decay=task.weight_decay, mask=optim.decay_mask),
            finetune.scale_by_tree(scales),
        )

    return make
