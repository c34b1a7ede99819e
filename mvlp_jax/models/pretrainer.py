"""One module holding everything pretraining trains: the encoder, its masked-image model, pooling, and the
heads and learnable scalars the configured objectives declare (`objectives/spec.py`). The encoder is shared
(bound once in `setup`), so every objective updates the same weights. Objectives run their own forward
passes as functions of the bound module (`Pretrainer.apply(..., method=fn)`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax import kernels
from mvlp_jax.models.heads import POOLINGS, Pool
from mvlp_jax.models.vit import MAE, VIEW_TYPES, ViT, study_token_mask, variant
from mvlp_jax.models.vit3d import MAE3D, ViT3D
from mvlp_jax.models.vitdet import SimMIM, ViTDet
from mvlp_jax.objectives import registry


class Pretrainer(nn.Module):
    config: ml_collections.ConfigDict
    target_dim: int = 0  # hidden size of the stored LLM vectors (0: no contrastive path)
    sow_attention: bool = False  # record attention weights in 'intermediates' (visualize.py's maps)

    def setup(self) -> None:
        m = self.config.model
        dtype = kernels.compute_dtype(m.dtype)
        size = variant(m.variant)
        view_types = len(VIEW_TYPES) if self.config.data.get("max_views", 1) > 1 else 0
        shared = dict(  # the encoder settings every kind takes
            **size,
            drop_path=m.drop_path,
            dtype=dtype,
            scan=m.scan,
            remat_policy=m.remat,
            attention=m.attention,
            sow_attention=self.sow_attention,
        )
        decoder = dict(  # MAE's decoder, in 2D and 3D
            decoder_width=m.decoder_width,
            decoder_depth=m.decoder_depth,
            decoder_heads=m.decoder_heads,
            decoder_mlp_dim=4 * m.decoder_width,
            mask_ratio=m.mask_ratio,
            norm_pix_loss=m.norm_pix_loss,
        )
        if m.encoder == "vit":
            self.encoder = ViT(**shared, image_size=m.image_size, view_types=view_types)
            self.masked_model = MAE(encoder=self.encoder, **decoder)
        elif m.encoder == "vit3d":
            self.encoder = ViT3D(**shared, tubelet=m.tubelet)
            self.masked_model = MAE3D(encoder=self.encoder, **decoder)
        else:
            self.encoder = ViTDet(**shared, window_size=m.window_size, view_types=view_types)
            self.masked_model = SimMIM(encoder=self.encoder, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss)
        if self.target_dim:
            self.pool = Pool(
                kind=m.pool,
                has_cls=self.encoder.cls_token,
                num_heads=m.pool_heads,
                dtype=dtype,
                attention=m.attention,
                sow_attention=self.sow_attention,
            )
        self.plain_pools = {kind: Pool(kind=kind, has_cls=self.encoder.cls_token) for kind in ("cls", "mean")}
        for spec in registry.configured(self.config):
            if spec.heads is not None and (self.target_dim or not spec.needs_targets):
                for name, head in spec.heads(self, self.config, dtype).items():
                    setattr(self, name, head)

    @property
    def global_pooling(self) -> str:
        """How DINO and the box head summarise an image: the CLS token, or the mean token without one."""
        return "cls" if self.encoder.cls_token else "mean"

    def features(
        self, images: jax.Array, pooling: str, train: bool = False, view_type: jax.Array | None = None
    ) -> jax.Array:
        """Features for probes and fine-tuning: 'cls', 'mean' (patch tokens) or 'map' (the trained attention
        pooling); `train` turns on the encoder's dropout and stochastic depth (fine-tuning); `view_type` (B,)
        gives a study encoder each image's vit.VIEW_TYPES (default: frontal)."""
        return self._pool(pooling)(self.encoder(images, train=train, view_type=view_type)).astype(jnp.float32)

    def _pool(self, pooling: str) -> Pool:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}; choose one of {POOLINGS}")
        if pooling == "map" and not self.target_dim:
            raise ValueError(
                "pooling 'map' needs a checkpoint trained with an LLM-target objective (it has no MAP head)"
            )
        if pooling == "cls" and not self.encoder.cls_token:
            raise ValueError("pooling 'cls' needs an encoder with a CLS token (ViTDet has none)")
        return self.pool if pooling == "map" else self.plain_pools[pooling]

    def pooled(
        self,
        images: jax.Array,
        train: bool = False,
        view_type: jax.Array | None = None,
        view_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The LLM-target objectives' pooling (`model.pool`) of an image, or of a study's present views."""
        if images.ndim == 4:
            return self.pool(self.encoder(images, train=train)).astype(jnp.float32)
        tokens = self.encoder(images, train=train, view_type=view_type, view_mask=view_mask)
        mask = None if view_mask is None else study_token_mask(view_mask, tokens.shape[1], self.encoder.cls_token)
        return self.pool(tokens, mask).astype(jnp.float32)

    def study_features(
        self, images: jax.Array, view_type: jax.Array, view_mask: jax.Array, pooling: str, train: bool = False
    ) -> jax.Array:
        """One feature per study: its views (B, V, H, W, C) read as one sequence (vit.ViT), `view_type` (B, V)
        indices of vit.VIEW_TYPES, `view_mask` (B, V) False for padding; pooled over the present views only. An
        encoder trained on single images (no view-type embedding) gives the mean of its present views' features."""
        if images.ndim != 5:
            raise ValueError(f"study_features takes (batch, views, height, width, channels), got {images.shape}")
        pool = self._pool(pooling)
        if not getattr(self.encoder, "view_types", 0):
            b, v = images.shape[:2]
            each = pool(self.encoder(images.reshape(b * v, *images.shape[2:]), train=train)).reshape(b, v, -1)
            weights = view_mask[..., None].astype(each.dtype)
            return ((each * weights).sum(1) / jnp.maximum(weights.sum(1), 1)).astype(jnp.float32)
        tokens = self.encoder(images, train=train, view_type=view_type, view_mask=view_mask)
        return pool(tokens, study_token_mask(view_mask, tokens.shape[1], self.encoder.cls_token)).astype(jnp.float32)

    def patch_grid(self, images: jax.Array, train: bool = False, view_type: jax.Array | None = None) -> jax.Array:
        """The last layer's patch tokens as a grid (B, H / patch, W / patch, D), float32: what dense heads
        (segmentation, detection) read; `view_type` as in `features`. Of volumes (B, depth, H, W, C) (a ViT3D),
        the grid has a plane per tubelet of slices: (B, depth / tubelet, H / patch, W / patch, D)."""
        tokens = self.encoder(images, train=train, view_type=view_type)
        tokens = tokens[:, 1:] if self.encoder.cls_token else tokens
        p = self.encoder.patch_size
        planes = (-1,) if images.ndim == 5 else ()
        grid = (images.shape[0], *planes, images.shape[-3] // p, images.shape[-2] // p, tokens.shape[-1])
        return tokens.reshape(grid).astype(jnp.float32)

    def init_all(self, images: jax.Array, targets: jax.Array | None = None) -> None:
        """Touches every submodule the configured objectives use, so `init` creates their parameters."""
        for spec in registry.configured(self.config):
            if spec.init is not None and (self.target_dim or not spec.needs_targets):
                spec.init(self, images, targets)
