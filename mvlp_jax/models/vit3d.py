"""ViT over volumes and MAE in 3D: a volume (D, H, W, C) is cut into tubelets of `tubelet` slices x p x p pixels,
each embedded by one linear map (a 3D convolution with kernel = stride), with fixed factorised position
embeddings: the 2D sine-cosine of the tubelet's (row, column) plus a sine-cosine of its depth index minus that of
depth 0. The first tubelet's depth term is zero, so a one-slice volume with `tubelet`=1 is the 2D ViT exactly
(the same parameters, reshaped, give the same tokens): a 2D-pretrained encoder can start a 3D one. `MAE3D` masks
tubelets across the whole volume and reconstructs their voxels with MAE's decoder (vit.decode_masked).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax.models.transformer import Backbone, constrain, encoder_of, logical, sincos_2d
from mvlp_jax.models.vit import MAE, masked_autoencode


def tubelets(volumes: jax.Array, tubelet: int, patch: int) -> jax.Array:
    """(B, D, H, W, C) -> (B, D/t * H/p * W/p, t*p*p*C): tubelets in (depth, row, column) order, their voxels in
    (slice, row, column, channel) order (with t=1, vit's `patchify` of each slice)."""
    b, d, h, w, c = volumes.shape
    if d % tubelet or h % patch or w % patch:
        raise ValueError(f"volume {d}x{h}x{w} is not divisible into tubelets of {tubelet}x{patch}x{patch}")
    x = volumes.reshape(b, d // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (d // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch * c)


def sincos_1d(positions: np.ndarray, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """(P,) positions -> (P, dim) [sin | cos] embeddings (dim even)."""
    omega = 1.0 / temperature ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    angles = np.asarray(positions, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(depth: int, height: int, width: int, dim: int) -> np.ndarray:
    """(depth * height * width, dim) float32: 2D sine-cosine of (row, column) + depth term, zero at depth 0."""
    planar = sincos_2d(height, width, dim).reshape(1, height * width, dim)
    along = sincos_1d(np.arange(depth), dim) - sincos_1d(np.zeros(1), dim)
    return (planar + along[:, None, :]).reshape(depth * height * width, dim).astype(np.float32)


class ViT3D(Backbone):
    """ViT encoder of volumes (B, D, H, W, C); `keep_ids` (B, K) selects the visible tubelets (MAE3D); returns
    (B, [1+]N, width) with N = D/t * H/p * W/p."""

    tubelet: int = 2
    cls_token: bool = True
    volumetric = True  # read by objectives: a 5-D input is one volume, not a study of views

    @nn.compact
    def __call__(
        self,
        volumes: jax.Array,
        *,
        keep_ids: jax.Array | None = None,
        train: bool = False,
        view_type: jax.Array | None = None,
        view_mask: jax.Array | None = None,
    ) -> jax.Array:
        if volumes.ndim != 5 or view_type is not None or view_mask is not None:
            raise ValueError(f"ViT3D reads volumes (batch, depth, height, width, channels), got {volumes.shape}")
        b, d, h, w, _ = volumes.shape
        p, t = self.patch_size, self.tubelet
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), None, "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"),
            name="embedding",
        )(tubelets(volumes, t, p).astype(self.dtype))
        x = x + jnp.asarray(sincos_3d(d // t, h // p, w // p, self.width))[None].astype(x.dtype)
        if keep_ids is not None:
            x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
        if self.cls_token:
            cls = self.param(
                "cls", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width), self.param_dtype
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
        x = nn.Dropout(self.dropout)(constrain(x, "batch", "length", "embed"), deterministic=not train)
        return encoder_of(self)(x, train)


class MAE3D(MAE):
    """Masked autoencoder of volumes: ViT3D on the visible tubelets, MAE's decoder reconstructs the masked ones
    (MAE's fields and parameters, with `encoder` a ViT3D)."""

    @nn.compact
    def __call__(
        self,
        volumes: jax.Array,
        *,
        noise: jax.Array | None = None,
        train: bool = False,
        present: jax.Array | None = None,
    ) -> dict[str, Any]:
        """volumes (B, D, H, W, C) -> dict(loss, pred (B, N, t*p*p*C), mask (B, N), latent, ids_restore, grid)."""
        p, t = self.encoder.patch_size, self.encoder.tubelet
        grid = (volumes.shape[1] // t, volumes.shape[2] // p, volumes.shape[3] // p)
        positions = sincos_3d(*grid, self.decoder_width)
        return masked_autoencode(self, volumes, grid, positions, tubelets(volumes, t, p), noise, train, present)
