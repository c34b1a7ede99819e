"""Image encoders (ViT, MAE, windowed ViTDet) and heads, as pure flax.linen modules."""
