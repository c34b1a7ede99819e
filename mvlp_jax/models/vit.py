"""Vision Transformer encoder and the masked autoencoder (MAE) around it.

ViT follows big_vision / MAE: conv patch embedding, fixed 2-D sin-cos (or learned, interpolated)
position embeddings, optional CLS token, pre-LN blocks. `MAE` masks per sample by argsort of
uniform noise, runs the encoder on the visible tokens only, and reconstructs the masked patches
with its own decoder; with the same noise it reproduces transformers' ViTMAEForPreTraining.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax import kernels
from mvlp_jax.kernels import patchify
from mvlp_jax.models.transformer import Backbone, Dtype, Encoder, constrain, encoder_of, logical, sincos_2d

# name -> (width, depth, num_heads, mlp_dim); the patch comes from the name ('B/16').
VARIANTS = {
    "mu": (64, 2, 2, 128),  # a micro model for tests and smoke runs
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
POSEMB = ("sincos2d", "learned")


def variant(name: str) -> dict[str, int]:
    """'B/16' -> dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
    match = re.fullmatch(r"(mu|Ti|S|B|L|H)/(\d+)", name)
    if not match:
        raise ValueError(f"unknown ViT variant {name!r}; use one of {sorted(VARIANTS)} + '/patch', e.g. 'B/16'")
    width, depth, heads, mlp = VARIANTS[match.group(1)]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(match.group(2)))


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch: int, channels: int) -> jax.Array:
    """Inverse of `patchify` for a (rows, cols) patch grid."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * patch, gw * patch, channels)


def random_masking(noise: jax.Array, mask_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample masking from uniform noise (B, N): (keep_ids (B,K), mask (B,N) 1=masked, ids_restore)."""
    n = noise.shape[1]
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = jnp.ones(noise.shape, jnp.float32).at[:, :len_keep].set(0.0)
    return ids_shuffle[:, :len_keep], jnp.take_along_axis(mask, ids_restore, axis=1), ids_restore


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool) -> jax.Array:
    """Mean squared error per patch, averaged over masked patches only (MAE).

    norm_pix normalises each target patch by its mean and (unbiased) variance, as MAE does; on chest
    X-rays it tends to give noise-like reconstructions, so it is a choice, off by default.
    """
    target = target.astype(jnp.float32)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class PatchConv(nn.Module):
    """nn.Conv with kernel = stride = patch, VALID padding: its parameters and values (`kernels.patch_conv`)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, channels = self.patch_size, images.shape[-1]
        kernel = self.param(
            "kernel",
            logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
            (p, p, channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.features,), self.param_dtype)
        images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        return kernels.patch_conv(images, kernel) + bias


class PatchEmbed(nn.Module):
    """Conv patch embedding and position embeddings: (B,H,W,C) -> tokens (B, N, D), pos (1, N, D).

    Returned apart, so masked-image modelling can replace tokens before position is added.
    """

    width: int
    patch_size: int
    posemb: str = "sincos2d"
    image_size: int = 224  # grid size of learned position embeddings
    cls_token: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None, tuple[int, int]]:
        """Returns (patch tokens, their position embeddings, cls position embedding or None, grid)."""
        if self.posemb not in POSEMB:
            raise ValueError(f"posemb={self.posemb!r}; choose one of {POSEMB}")
        x = PatchConv(
            features=self.width, patch_size=self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(images)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls_pos = None
        if self.posemb == "sincos2d":
            pos = jnp.asarray(sincos_2d(gh, gw, d))[None]
            if self.cls_token:
                cls_pos = jnp.zeros((1, 1, d), jnp.float32)
        else:
            g = self.image_size // self.patch_size
            table = self.param(
                "pos_embedding",
                logical(nn.initializers.normal(0.02), None, "length", "embed"),
                (1, g * g + int(self.cls_token), d),
                self.param_dtype,
            )
            if self.cls_token:
                cls_pos, table = table[:, :1], table[:, 1:]
            pos = table.reshape(1, g, g, d)
            if (gh, gw) != (g, g):  # interpolate learned embeddings to the new grid
                pos = jax.image.resize(pos, (1, gh, gw, d), method="bilinear")
            pos = pos.reshape(1, gh * gw, d)
        return x, pos.astype(x.dtype), cls_pos, (gh, gw)


VIEW_TYPES = ("frontal", "lateral", "other")  # a study's views, in the order its images are given


class ViT(Backbone):
    """ViT encoder. `keep_ids` (B, K) selects the visible patches (MAE); returns (B, [1+]N, width).

    A study of several views, images (B, V, H, W, C), is one sequence: each view's patch tokens get its
    position embedding and a learned view-type embedding (`view_types` > 0 creates it), and every token attends
    to the tokens of all the study's views, padded views (`view_mask` False) excepted; returns (B, [1+]V*N,
    width). A single image is a study of one frontal view."""

    image_size: int = 224
    posemb: str = "sincos2d"
    cls_token: bool = True
    view_types: int = 0  # > 0: a learned embedding per view type (multi-view studies)

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        keep_ids: jax.Array | None = None,
        train: bool = False,
        view_type: jax.Array | None = None,
        view_mask: jax.Array | None = None,
    ) -> jax.Array:
        flat, b, views = flatten_study(images, keep_ids, "keep_ids")
        x, pos, cls_pos, _ = PatchEmbed(
            width=self.width,
            patch_size=self.patch_size,
            posemb=self.posemb,
            image_size=self.image_size,
            cls_token=self.cls_token,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding",
        )(flat)
        x = x + pos
        if self.view_types:
            x = x + view_embedding(self, b * views, view_type)
        if keep_ids is not None:
            x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
        x = x.reshape(b, -1, self.width)
        if self.cls_token:
            cls = self.param(
                "cls", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width), self.param_dtype
            )
            cls = jnp.broadcast_to((cls + cls_pos).astype(x.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        mask = None if view_mask is None else study_token_mask(view_mask, x.shape[1], self.cls_token)[:, None, None]
        x = nn.Dropout(self.dropout)(constrain(x, "batch", "length", "embed"), deterministic=not train)
        return encoder_of(self)(x, train, mask=mask)


def flatten_study(images: jax.Array, patch_selection: jax.Array | None, name: str) -> tuple[jax.Array, int, int]:
    """A study (B, V, H, W, C) or images (B, H, W, C) -> (images (B*V, H, W, C), B, V (1 for images)). Masked
    modelling selects patches of single images (`patch_selection`, the argument `name`): refused for a study."""
    if images.ndim != 5:
        return images, images.shape[0], 1
    if patch_selection is not None:
        raise ValueError(f"{name} selects patches of single images: mask a study's views one by one")
    return images.reshape(-1, *images.shape[2:]), images.shape[0], images.shape[1]


def view_embedding(module: nn.Module, images: int, view_type: jax.Array | None) -> jax.Array:
    """(images, 1, width): each image's learned view-type embedding, a parameter of `module` (its `view_types`
    rows); without `view_type` every image is a frontal view (a single image is a study of one)."""
    table = module.param(
        "view_embedding",
        logical(nn.initializers.normal(0.02), None, "embed"),
        (module.view_types, module.width),
        module.param_dtype,
    )
    types = jnp.zeros((images,), jnp.int32) if view_type is None else view_type.reshape(-1)
    return table[types][:, None, :].astype(module.dtype)


def study_token_mask(view_mask: jax.Array, length: int, cls_token: bool) -> jax.Array:
    """(B, V) views present -> (B, length) tokens present: each view's patch tokens, and the CLS token."""
    b, views = view_mask.shape
    tokens = jnp.repeat(view_mask.astype(bool), (length - int(cls_token)) // views, axis=1)
    return jnp.concatenate([jnp.ones((b, 1), bool), tokens], axis=1) if cls_token else tokens


def decode_masked(
    mae: nn.Module, latent: jax.Array, ids_restore: jax.Array, positions: np.ndarray, outputs: int, train: bool
) -> jax.Array:
    """MAE's decoder, called inside a masked autoencoder's compact `__call__` (its parameters are the caller's:
    decoder_embed, mask_token, decoder, decoder_pred): the visible tokens `latent` (B, [1+]K, width) and a mask
    token for every hidden patch, put back in patch order (`ids_restore`), plus the fixed `positions` (N,
    decoder_width), through `decoder_depth` blocks -> (B, N, `outputs`) predicted pixels per patch."""
    enc = mae.encoder
    b, n = ids_restore.shape
    dense = lambda features, name, axes: nn.Dense(
        features,
        dtype=enc.dtype,
        param_dtype=enc.param_dtype,
        name=name,
        dot_general=kernels.dense_dot_general,
        kernel_init=logical(nn.initializers.xavier_uniform(), *axes),
        bias_init=logical(nn.initializers.zeros, axes[1]),
    )
    x = dense(mae.decoder_width, "decoder_embed", ("embed", "decoder_embed"))(latent)
    cls, visible = (x[:, :1], x[:, 1:]) if enc.cls_token else (None, x)
    mask_token = mae.param(
        "mask_token",
        logical(nn.initializers.normal(0.02), None, None, "decoder_embed"),
        (1, 1, mae.decoder_width),
        enc.param_dtype,
    )
    filler = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n - visible.shape[1], mae.decoder_width))
    x = jnp.take_along_axis(jnp.concatenate([visible, filler], axis=1), ids_restore[..., None], axis=1)
    x = x + jnp.asarray(positions)[None].astype(x.dtype)
    if cls is not None:
        x = jnp.concatenate([cls, x], axis=1)  # decoder cls position is zero, as in MAE
    x = Encoder(
        depth=mae.decoder_depth,
        num_heads=mae.decoder_heads,
        mlp_dim=mae.decoder_mlp_dim,
        layer_norm_eps=enc.layer_norm_eps,
        dtype=enc.dtype,
        param_dtype=enc.param_dtype,
        scan=enc.scan,
        remat_policy=enc.remat_policy,
        attention=enc.attention,
        name="decoder",
    )(x, train)
    pred = dense(outputs, "decoder_pred", ("decoder_embed", None))(x)
    return pred[:, 1:] if cls is not None else pred


def masked_autoencode(
    mae: nn.Module,
    inputs: jax.Array,
    grid: tuple[int, ...],
    positions: np.ndarray,
    patches: jax.Array,
    noise: jax.Array | None,
    train: bool,
    present: jax.Array | None,
) -> dict[str, Any]:
    """MAE's forward for any patch geometry (images, volumes): mask per sample, encode the visible patches of
    `inputs`, decode every patch (`positions` (N, decoder_width) on the `grid`), score the masked ones against
    their pixels `patches` (B, N, pixels per patch). `present` (B,) leaves inputs where it is False out of the
    loss. -> dict(loss, pred, mask (B, N) 1 = masked, latent, ids_restore, grid)."""
    if noise is None:
        noise = jax.random.uniform(mae.make_rng("masking"), patches.shape[:2])
    keep_ids, mask, ids_restore = random_masking(noise, mae.mask_ratio)
    latent = mae.encoder(inputs, keep_ids=keep_ids, train=train)
    pred = decode_masked(mae, latent, ids_restore, positions, patches.shape[-1], train)
    scored = mask if present is None else mask * present[:, None].astype(mask.dtype)
    loss = reconstruction_loss(pred, patches, scored, mae.norm_pix_loss)
    return dict(loss=loss, pred=pred, mask=mask, latent=latent, ids_restore=ids_restore, grid=grid)


class MAE(nn.Module):
    """Masked autoencoder: ViT encoder on visible patches, a lighter decoder reconstructs the masked ones."""

    encoder: ViT
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        train: bool = False,
        present: jax.Array | None = None,
    ) -> dict[str, Any]:
        """images (B,H,W,C) -> dict(loss, pred (B,N,p*p*C), mask (B,N), latent, ids_restore).

        `noise` (B, N) fixes the masking (for parity tests); otherwise drawn from the 'masking' rng. `present`
        (B,) leaves the images where it is False (a study's padded views) out of the loss.
        """
        p = self.encoder.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        positions = sincos_2d(*grid, self.decoder_width)
        return masked_autoencode(self, images, grid, positions, patchify(images, p), noise, train, present)
