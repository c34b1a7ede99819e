"""MAE training-step throughput: this Flax MAE vs transformers' PyTorch ViTMAEForPreTraining.

  python -m benchmarks.encoder_throughput [--variants=S/16,B/16] [--batch=16] [--steps=3]

Same configuration for both (grayscale 224, mask 0.75, decoder 512 x 8 x 16, AdamW, batch 16): one step
= forward + backward + AdamW update. Also reports model FLOPs utilisation: the step's FLOPs (XLA cost
analysis) per second over the FLOP/s of a large float32 matmul measured in the same run. The last line
is the JAX / PyTorch images/s ratio of the last variant.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from mvlp_jax.models.vit import MAE, ViT, variant


def matmul_flops_per_s(n: int = 4096, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def jax_step_rate(name: str, batch: int, steps: int) -> tuple[float, float]:
    model = MAE(ViT(**variant(name)))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 1)), jnp.float32)
    params = jax.jit(lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)["params"])()
    tx = optax.adamw(1.5e-4, weight_decay=0.05)
    opt_state = tx.init(params)

    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(lambda p: model.apply({"params": p}, images, rngs={"masking": rng})["loss"])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    params, opt_state, loss = compiled(params, opt_state, jax.random.key(0))
    loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = compiled(params, opt_state, jax.random.key(i + 1))
    loss.block_until_ready()
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed, flops * steps / elapsed


def torch_step_rate(name: str, batch: int, steps: int) -> float:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    v = variant(name)
    cfg = ViTMAEConfig(hidden_size=v["width"], num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                       intermediate_size=v["mlp_dim"], patch_size=v["patch_size"], image_size=224, num_channels=1,
                       mask_ratio=0.75)
    model = ViTMAEForPreTraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)
    images = torch.randn(batch, 1, 224, 224)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=images).loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default="S/16,B/16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    peak = matmul_flops_per_s()
    print(f"large fp32 matmul: {peak / 1e9:.0f} GFLOP/s (the utilisation reference)")
    ratio = 0.0
    for name in args.variants.split(","):
        jax_rate, jax_flops = jax_step_rate(name, args.batch, args.steps)
        torch_rate = torch_step_rate(name, args.batch, args.steps)
        ratio = jax_rate / torch_rate
        print(f"MAE {name} @224 gray, batch {args.batch}: JAX {jax_rate:.2f} img/s "
              f"(MFU {jax_flops / peak:.0%} of matmul peak, {jax_flops / 1e9:.0f} GFLOP/s), "
              f"PyTorch {torch_rate:.2f} img/s, ratio {ratio:.2f}x")
    print(f"encoder_throughput: JAX/PyTorch MAE train-step images/s ratio ({name}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
