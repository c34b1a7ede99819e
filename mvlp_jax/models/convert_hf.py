"""Loads transformers' PyTorch ViTMAE weights into this package's Flax ViT / MAE parameter trees.

Used by the parity tests, and by users who start from a public MAE checkpoint
(`ViTMAEForPreTraining.from_pretrained(local_dir).state_dict()`). Loop (non-scanned) layout only.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _block(sd: Mapping[str, np.ndarray], prefix: str, heads: int) -> dict:
    width = sd[f"{prefix}.attention.q_proj.weight"].shape[0]
    head_dim = width // heads

    def qkv(name: str) -> dict:
        return {"kernel": sd[f"{prefix}.attention.{name}.weight"].T.reshape(width, heads, head_dim),
                "bias": sd[f"{prefix}.attention.{name}.bias"].reshape(heads, head_dim)}

    def dense(name: str) -> dict:
        return {"kernel": sd[f"{prefix}.{name}.weight"].T, "bias": sd[f"{prefix}.{name}.bias"]}

    def norm(name: str) -> dict:
        return {"scale": sd[f"{prefix}.{name}.weight"], "bias": sd[f"{prefix}.{name}.bias"]}

    return {
        "norm1": norm("layernorm_before"), "norm2": norm("layernorm_after"),
        "attention": {"query": qkv("q_proj"), "key": qkv("k_proj"), "value": qkv("v_proj"),
                      "out": {"kernel": sd[f"{prefix}.attention.o_proj.weight"].T.reshape(heads, head_dim, width),
                              "bias": sd[f"{prefix}.attention.o_proj.bias"]}},
        "mlp": {"fc1": dense("mlp.fc1"), "fc2": dense("mlp.fc2")},
    }


def _stack(sd, prefix: str, depth: int, heads: int, norm_prefix: str) -> dict:
    out = {f"block_{i:02d}": _block(sd, f"{prefix}.{i}", heads) for i in range(depth)}
    out["norm"] = {"scale": sd[f"{norm_prefix}.weight"], "bias": sd[f"{norm_prefix}.bias"]}
    return out


def vit_params_from_hf(state_dict: Mapping, num_heads: int, depth: int, prefix: str = "vit") -> dict:
    """Encoder params for `ViT(posemb='sincos2d', cls_token=True)` from a ViTMAEModel state dict."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    p = f"{prefix}." if prefix else ""
    return {
        "embedding": {"conv": {"kernel": sd[f"{p}embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
                               "bias": sd[f"{p}embeddings.patch_embeddings.projection.bias"]}},
        "cls": sd[f"{p}embeddings.cls_token"],
        "encoder": _stack(sd, f"{p}layers", depth, num_heads, f"{p}layernorm"),
    }


def mae_params_from_hf(state_dict: Mapping, num_heads: int, depth: int, decoder_heads: int,
                       decoder_depth: int) -> dict:
    """Full `MAE` params from a ViTMAEForPreTraining state dict."""
    sd = {k: np.asarray(v.detach().cpu().numpy()) for k, v in state_dict.items()}
    dense = lambda name: {"kernel": sd[f"decoder.{name}.weight"].T, "bias": sd[f"decoder.{name}.bias"]}
    return {
        "encoder": vit_params_from_hf(sd, num_heads, depth),
        "decoder_embed": dense("decoder_embed"),
        "mask_token": sd["decoder.mask_token"],
        "decoder": _stack(sd, "decoder.decoder_layers", decoder_depth, decoder_heads, "decoder.decoder_norm"),
        "decoder_pred": dense("decoder_pred"),
    }
