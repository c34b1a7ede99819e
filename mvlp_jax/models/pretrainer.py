"""One module holding everything pretraining trains: the encoder, its masked-image model, pooling,
projections and the learnable loss scalars. The encoder is shared (bound once in `setup`), so MAE and
the contrastive path update the same weights."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax import kernels
from mvlp_jax.models.heads import BoxHead, DINOHead, Pool, ProjectionHead
from mvlp_jax.models.vit import MAE, ViT, variant
from mvlp_jax.models.vitdet import SimMIM, ViTDet


class Pretrainer(nn.Module):
    config: ml_collections.ConfigDict
    target_dim: int = 0  # hidden size of the stored LLM vectors (0: no contrastive path)

    def setup(self) -> None:
        m = self.config.model
        dtype = kernels.compute_dtype(m.dtype)
        size = variant(m.variant)
        if m.encoder == "vit":
            self.encoder = ViT(**size, image_size=m.image_size, drop_path=m.drop_path, dtype=dtype,
                               scan=m.scan, remat_policy=m.remat, attention=m.attention)
            self.masked_model = MAE(self.encoder, m.decoder_width, m.decoder_depth, m.decoder_heads,
                                    4 * m.decoder_width, m.mask_ratio, m.norm_pix_loss)
        else:
            self.encoder = ViTDet(**size, window_size=m.window_size, drop_path=m.drop_path, dtype=dtype,
                                  remat_policy=m.remat, attention=m.attention)
            self.masked_model = SimMIM(self.encoder, m.mask_ratio, m.norm_pix_loss)
        objectives = self.config.objectives
        if self.target_dim:
            self.pool = Pool(m.pool, has_cls=self.encoder.cls_token, num_heads=m.pool_heads, dtype=dtype,
                             attention=m.attention)
        if self.target_dim and "llm_contrastive" in objectives:
            c = self.config.contrastive
            embed_dim = c.embed_dim or self.target_dim
            if c.text_proj == "none" and embed_dim != self.target_dim:
                raise ValueError(f"contrastive.embed_dim={c.embed_dim} differs from the LLM hidden size "
                                 f"{self.target_dim}: set contrastive.text_proj to 'linear' or 'mlp'")
            self.image_proj = ProjectionHead(embed_dim, c.image_proj, dtype=dtype)
            self.text_proj = None if c.text_proj == "none" else ProjectionHead(embed_dim, c.text_proj, dtype=dtype)
            self.log_temperature = self.param("log_temperature", nn.initializers.constant(jnp.log(c.temperature)), ())
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.sigmoid_bias), ())
        if self.target_dim and "mflag" in objectives:
            f = self.config.mflag
            self.mflag_image_proj = ProjectionHead(f.embed_dim, "mlp", f.hidden_dim, norm="batch", out_norm=True)
            self.mflag_text_proj = ProjectionHead(f.embed_dim, "mlp", f.hidden_dim, norm="batch")

        if "dino" in objectives:
            d = self.config.dino
            self.dino_head = DINOHead(d.out_dim, d.hidden_dim, d.bottleneck_dim)
        if "query_box" in objectives:
            self.box_head = BoxHead()

    @property
    def global_pooling(self) -> str:
        """How DINO and the box head summarise an image: the CLS token, or the mean token without one."""
        return "cls" if self.encoder.cls_token else "mean"

    def dino_embed(self, images: jax.Array, train: bool = True) -> jax.Array:
        """Image (any size the encoder takes) -> DINO head logits, float32 (B, dino.out_dim)."""
        return self.dino_head(self.features(images, self.global_pooling, train)).astype(jnp.float32)

    def locate(self, images: jax.Array, queries: jax.Array, train: bool = True) -> jax.Array:
        """(image, augmented region of it) -> predicted normalised box (cx, cy, w, h) of the region."""
        pooled = jnp.concatenate([self.features(images, self.global_pooling, train),
                                  self.features(queries, self.global_pooling, train)], axis=-1)
        return self.box_head(pooled).astype(jnp.float32)

    def masked(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
        """MAE (ViT) or SimMIM (ViTDet) on a batch: dict with 'loss' and the reconstruction."""
        return self.masked_model(images, train=train)

    def embed_images(self, images: jax.Array, train: bool = True) -> jax.Array:
        """Full (unmasked) image -> encoder -> pooling -> projection, float32 (B, embed_dim)."""
        return self.image_proj(self.pool(self.encoder(images, train=train))).astype(jnp.float32)

    def features(self, images: jax.Array, pooling: str, train: bool = False) -> jax.Array:
        """Features for probes and fine-tuning: 'cls', 'mean' (patch tokens) or 'map' (the trained attention
        pooling); `train` turns on the encoder's dropout and stochastic depth (fine-tuning)."""
        tokens = self.encoder(images, train=train)
        if pooling == "map":
            if not self.target_dim:
                raise ValueError("pooling 'map' needs a checkpoint trained with llm_contrastive (it has no MAP head)")
            return self.pool(tokens).astype(jnp.float32)
        if pooling == "cls":
            if not self.encoder.cls_token:
                raise ValueError("pooling 'cls' needs an encoder with a CLS token (ViTDet has none)")
            return tokens[:, 0].astype(jnp.float32)
        patches = tokens[:, 1:] if self.encoder.cls_token else tokens
        return patches.mean(axis=1).astype(jnp.float32)

    def mflag_embed(self, images: jax.Array, targets: jax.Array, train: bool = True
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """M-FLAG: (pooled image features before projection, projected image, projected text), float32."""
        features = self.pool(self.encoder(images, train=train)).astype(jnp.float32)
        return features, self.mflag_image_proj(features), self.mflag_text_proj(targets.astype(jnp.float32))

    def embed_targets(self, targets: jax.Array) -> jax.Array:
        """Frozen LLM vectors through the optional trainable text projection, float32."""
        x = targets.astype(jnp.float32)
        return x if self.text_proj is None else self.text_proj(x).astype(jnp.float32)

    def init_all(self, images: jax.Array, targets: jax.Array | None = None) -> None:
        """Touches every submodule the configured objectives use, so `init` creates their parameters."""
        if "mae" in self.config.objectives:
            self.masked(images, train=False)
        if self.target_dim and "llm_contrastive" in self.config.objectives:
            self.embed_images(images, train=False)
            self.embed_targets(targets)
        if self.target_dim and "mflag" in self.config.objectives:
            self.mflag_embed(images, targets, train=False)
        if "dino" in self.config.objectives:
            self.dino_embed(images, train=False)
        if "query_box" in self.config.objectives:
            self.locate(images, images, train=False)
