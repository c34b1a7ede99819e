"""Parity of the Flax ViT / MAE with transformers' PyTorch ViTMAE (an independent reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from mvlp_jax.models.convert_hf import mae_params_from_hf, vit_params_from_hf
from mvlp_jax.models.transformer import count_params
from mvlp_jax.models.vit import MAE, ViT, variant

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_channels=1,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=64,
    layer_norm_eps=1e-6,
    mask_ratio=0.75,
)


def _flax_vit(cfg: ViTMAEConfig) -> ViT:
    return ViT(
        width=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_dim=cfg.intermediate_size,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )


def _reference(model_cls, cfg):
    """A transformers model with its fixed sin-cos tables filled by transformers' own initialisers."""
    model = model_cls(cfg).eval()
    vit = model.vit if hasattr(model, "vit") else model
    vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    with torch.no_grad():
        vit.embeddings.initialize_weights()
        if hasattr(model, "decoder"):
            model.decoder.initialize_weights(vit.embeddings.patch_embeddings.num_patches)
    assert vit.embeddings.position_embeddings.abs().max() > 0.5
    return model


def _inputs(cfg, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.num_channels)).astype(np.float32)
    noise = rng.uniform(size=(batch, (cfg.image_size // cfg.patch_size) ** 2)).astype(np.float32)
    return images, noise


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_encoder_output_and_loss_match_transformers(norm_pix):
    torch.manual_seed(0)
    cfg = ViTMAEConfig(**SMALL, norm_pix_loss=norm_pix)
    ref = _reference(ViTMAEForPreTraining, cfg)
    with torch.no_grad():  # peaked attention, so that its backward matters (at init it is near uniform)
        for name, weight in ref.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                weight.mul_(6.0)
    images, noise = _inputs(cfg)
    out = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
    out.loss.backward()
    model = MAE(
        _flax_vit(cfg),
        decoder_width=32,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=64,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix,
    )
    params = mae_params_from_hf(ref.state_dict(), 4, 2, 4, 2)
    ours = model.apply({"params": params}, jnp.asarray(images), noise=jnp.asarray(noise))
    # Gradients too (the attention backward and GELU are written by hand): torch's, mapped like the weights.
    loss_of = lambda p: model.apply({"params": p}, jnp.asarray(images), noise=jnp.asarray(noise))["loss"]
    grads = jax.grad(loss_of)(params)
    want = mae_params_from_hf({n: p.grad for n, p in ref.named_parameters() if p.grad is not None}, 4, 2, 4, 2)
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        # Per-leaf scale, with a floor for leaves whose exact gradient is 0 (key biases: softmax is shift-invariant).
        np.testing.assert_allclose(
            np.asarray(got),
            expected,
            rtol=0,
            atol=1e-4 * np.abs(expected).max() + 1e-7,
            err_msg=jax.tree_util.keystr(path),
        )
    np.testing.assert_array_equal(np.asarray(ours["mask"]), out.mask.numpy())
    np.testing.assert_allclose(np.asarray(ours["pred"]), out.logits.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(float(ours["loss"]), out.loss.item(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        latent = ref.vit(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise)
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours["latent"]), latent, atol=1e-4)


def test_vit_unmasked_encoder_matches_transformers():
    torch.manual_seed(1)
    cfg = ViTMAEConfig(**{**SMALL, "mask_ratio": 0.0})
    ref = _reference(ViTMAEModel, cfg)
    images, noise = _inputs(cfg, seed=1)
    with torch.no_grad():
        expected = ref(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise)
        ).last_hidden_state.numpy()
    keep = np.argsort(noise, axis=1)  # HF keeps all tokens, shuffled by the noise
    params = vit_params_from_hf(ref.state_dict(), 4, 2, prefix="")
    ours = _flax_vit(cfg).apply({"params": params}, jnp.asarray(images), keep_ids=jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_parameter_counts_match_the_standard_b16_and_mae_decoder():
    images = jnp.zeros((1, 224, 224, 3))
    b16 = ViT(**variant("B/16"), posemb="learned")
    shapes = jax.eval_shape(lambda: b16.init(jax.random.key(0), images))
    assert count_params(shapes["params"]) == 85_798_656  # timm/ViT-B/16 without head: 85.8M
    mae = MAE(ViT(**variant("B/16")))
    shapes = jax.eval_shape(lambda: mae.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images))
    ours_encoder = count_params(shapes["params"]["encoder"])
    ours_decoder = count_params(shapes["params"]) - ours_encoder
    ref = ViTMAEForPreTraining(ViTMAEConfig())  # B/16, RGB, decoder 512 x 8 x 16: the standard MAE
    trainable = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert ours_encoder == trainable(ref.vit)  # fixed sin-cos position embeddings are not parameters
    assert ours_decoder == trainable(ref.decoder) == 26_008_320
