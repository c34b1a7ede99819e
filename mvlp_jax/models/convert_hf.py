"""transformers' PyTorch ViT / ViTMAE weights <-> this package's Flax ViT / MAE parameter trees.

From transformers: the parity tests, and users who start from a public MAE checkpoint
(`ViTMAEForPreTraining.from_pretrained(local_dir).state_dict()`; loop layout). To transformers: `mvlp_jax.export`
(loop or scanned layout; ViTModel and ViTMAEModel share their state-dict names).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


def _block(sd: Mapping[str, np.ndarray], prefix: str, heads: int) -> dict:
    width = sd[f"{prefix}.attention.q_proj.weight"].shape[0]
    head_dim = width // heads

    def qkv(name: str) -> dict:
        return {
            "kernel": sd[f"{prefix}.attention.{name}.weight"].T.reshape(width, heads, head_dim),
            "bias": sd[f"{prefix}.attention.{name}.bias"].reshape(heads, head_dim),
        }

    def dense(name: str) -> dict:
        return {"kernel": sd[f"{prefix}.{name}.weight"].T, "bias": sd[f"{prefix}.{name}.bias"]}

    def norm(name: str) -> dict:
        return {"scale": sd[f"{prefix}.{name}.weight"], "bias": sd[f"{prefix}.{name}.bias"]}

    return {
        "norm1": norm("layernorm_before"),
        "norm2": norm("layernorm_after"),
        "attention": {
            "query": qkv("q_proj"),
            "key": qkv("k_proj"),
            "value": qkv("v_proj"),
            "out": {
                "kernel": sd[f"{prefix}.attention.o_proj.weight"].T.reshape(heads, head_dim, width),
                "bias": sd[f"{prefix}.attention.o_proj.bias"],
            },
        },
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
        "embedding": {
            "conv": {
                "kernel": sd[f"{p}embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
                "bias": sd[f"{p}embeddings.patch_embeddings.projection.bias"],
            }
        },
        "cls": sd[f"{p}embeddings.cls_token"],
        "encoder": _stack(sd, f"{p}layers", depth, num_heads, f"{p}layernorm"),
    }


def mae_params_from_hf(state_dict: Mapping, num_heads: int, depth: int, decoder_heads: int, decoder_depth: int) -> dict:
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


def unstack_blocks(encoder: dict) -> dict:
    """A scanned stack ({'blocks': stacked, 'norm'}) in the loop layout ({'block_00', ..., 'norm'})."""
    if "blocks" not in encoder:
        return encoder
    depth = jax.tree.leaves(encoder["blocks"])[0].shape[0]
    blocks = {f"block_{i:02d}": jax.tree.map(lambda x, i=i: x[i], encoder["blocks"]) for i in range(depth)}
    return {**blocks, "norm": encoder["norm"]}


def vit_params_to_hf(params: Mapping, position_embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of `vit_params_from_hf(prefix="")`: a ViTModel / ViTMAEModel state dict (float32 numpy) from
    `ViT(cls_token=True)` params; `position_embeddings` (1, 1 + N, width) is the table the ViT adds (its
    sin-cos table after a zero CLS row, or the learned one)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    encoder = unstack_blocks(p["encoder"])
    sd = {
        "embeddings.cls_token": p["cls"],
        "embeddings.position_embeddings": np.asarray(position_embeddings, np.float32),
        "embeddings.patch_embeddings.projection.weight": p["embedding"]["conv"]["kernel"].transpose(3, 2, 0, 1),
        "embeddings.patch_embeddings.projection.bias": p["embedding"]["conv"]["bias"],
        "layernorm.weight": encoder["norm"]["scale"],
        "layernorm.bias": encoder["norm"]["bias"],
    }
    depth = sum(k.startswith("block_") for k in encoder)
    for i in range(depth):
        block, prefix = encoder[f"block_{i:02d}"], f"layers.{i}"
        attention = block["attention"]
        width = attention["out"]["bias"].shape[0]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            sd[f"{prefix}.attention.{theirs}.weight"] = attention[ours]["kernel"].reshape(width, width).T
            sd[f"{prefix}.attention.{theirs}.bias"] = attention[ours]["bias"].reshape(width)
        sd[f"{prefix}.attention.o_proj.weight"] = attention["out"]["kernel"].reshape(width, width).T
        sd[f"{prefix}.attention.o_proj.bias"] = attention["out"]["bias"]
        for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            sd[f"{prefix}.{theirs}.weight"], sd[f"{prefix}.{theirs}.bias"] = block[ours]["scale"], block[ours]["bias"]
        for fc in ("fc1", "fc2"):
            sd[f"{prefix}.mlp.{fc}.weight"] = block["mlp"][fc]["kernel"].T
            sd[f"{prefix}.mlp.{fc}.bias"] = block["mlp"][fc]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
