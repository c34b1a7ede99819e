"""MAE training-step throughput: this Flax MAE vs transformers' PyTorch ViTMAEForPreTraining.

  python -m benchmarks.encoder_throughput [--variants=S/16,B/16] [--batch=16] [--steps=3] [--rounds=2]
                                          [--no-huge_page_malloc]

Same configuration for both (grayscale 224, mask 0.75, decoder 512 x 8 x 16, AdamW, batch 16): one step
= forward + backward + AdamW update. Each framework runs in its own process (a process that has loaded
torch runs JAX ~15% slower here: their thread pools compete), and the two alternate for `rounds` rounds
so that a noisy neighbour on a shared machine slows both; the figure is the ratio of median step times.
Also reports model FLOPs utilisation: the step's FLOPs (XLA cost analysis) per second over the FLOP/s of
a large float32 matmul measured in the JAX process. Both workers start with huge-page malloc
(`mvlp_jax/host_memory.py`; --no-huge_page_malloc: glibc's defaults). The last line is the JAX / PyTorch
ratio of the last variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def matmul_flops_per_s(n: int = 4096, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def jax_step_times(name: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from mvlp_jax.models.vit import MAE, ViT, variant

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
    times = []
    for i in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, jax.random.key(i + 1))
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return {"times": times, "flops": flops, "peak": matmul_flops_per_s()}


def torch_step_times(name: str, batch: int, steps: int) -> dict:
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from mvlp_jax.models.vit import variant

    v = variant(name)
    cfg = ViTMAEConfig(hidden_size=v["width"], num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                       intermediate_size=v["mlp_dim"], patch_size=v["patch_size"], image_size=224, num_channels=1,
                       mask_ratio=0.75)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)
    images = torch.randn(batch, 1, 224, 224)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=images).loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"times": times}


def run_worker(framework: str, name: str, batch: int, steps: int, huge_page_malloc: bool) -> dict:
    """One framework's measurement in a fresh process (its result is the last line, as JSON)."""
    from mvlp_jax.host_memory import with_huge_page_malloc

    env = with_huge_page_malloc(os.environ) if huge_page_malloc else dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "benchmarks.encoder_throughput", f"--worker={framework}",
                          f"--variants={name}", f"--batch={batch}", f"--steps={steps}"],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default="S/16,B/16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--huge_page_malloc", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure = jax_step_times if args.worker == "jax" else torch_step_times
        print(json.dumps(measure(args.variants, args.batch, args.steps)))
        return
    ratio = 0.0
    for name in args.variants.split(","):
        jax_times, torch_times, flops, peaks = [], [], 0.0, []
        for _ in range(args.rounds):
            result = run_worker("jax", name, args.batch, args.steps, args.huge_page_malloc)
            jax_times += result["times"]
            flops = result["flops"]
            peaks.append(result["peak"])
            torch_times += run_worker("torch", name, args.batch, args.steps, args.huge_page_malloc)["times"]
        jax_step, torch_step, peak = np.median(jax_times), np.median(torch_times), np.median(peaks)
        ratio = torch_step / jax_step
        print(f"MAE {name} @224 gray, batch {args.batch}, median of {len(jax_times)} steps each: "
              f"JAX {args.batch / jax_step:.2f} img/s (MFU {flops / jax_step / peak:.0%} of a "
              f"{peak / 1e9:.0f} GFLOP/s fp32 matmul), PyTorch {args.batch / torch_step:.2f} img/s, "
              f"ratio {ratio:.2f}x", flush=True)
    print(f"encoder_throughput: JAX/PyTorch MAE train-step images/s ratio ({name}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
