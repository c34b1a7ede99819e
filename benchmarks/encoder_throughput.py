"""MAE training-step throughput: this Flax MAE vs transformers' PyTorch ViTMAEForPreTraining.

  python -m benchmarks.encoder_throughput [--variants=S/16,B/16] [--batch=16] [--steps=3] [--rounds=2]
                                          [--no-huge_page_malloc] [--blocks]

Same configuration for both (grayscale 224, mask 0.75, decoder 512 x 8 x 16, AdamW, batch 16): one step
= forward + backward + AdamW update. Each framework runs in its own process (a process that has loaded
torch runs JAX ~15% slower here: their thread pools compete), and the two alternate for `rounds` rounds
so that a noisy neighbour on a shared machine slows both; the figure is the ratio of median step times.
The JAX worker is a single-device CPU process and compiles under the backend of its device
(mvlp_jax/kernels/backend.py), as training does: MKL's fused attention, and MKL's GEMMs where they beat XLA's
dots on this machine (gemm_choice.py; the line names the GEMM library; MVLP_JAX_CPU_BLAS=off in the environment
times XLA's own ops alone). Also reports model
FLOPs utilisation: the step's FLOPs (XLA cost analysis of the XLA-op program) per second over the FLOP/s
of a large float32 matmul (XLA's own) measured in the JAX process. Both workers start with the malloc
tunables of `mvlp_jax/kernels/host_memory.py` (huge pages, one reused heap; --no-huge_page_malloc: glibc's
defaults, or whatever GLIBC_TUNABLES the caller set). The last line is the JAX / PyTorch ratio of the last
variant. --blocks instead times one transformer block forward + backward (loss sum y^2) in each framework:
B/16's encoder block on the 50 tokens it sees at mask 0.75, and the MAE decoder's block (197 tokens, 512
wide, 16 heads) against transformers' ViTMAELayer with SDPA attention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from mvlp_jax.kernels.host_memory import with_huge_page_malloc

# (name, tokens, width, heads, mlp_dim) of MAE B/16's encoder and decoder blocks at 224, mask 0.75.
BLOCKS = (("encoder", 50, 768, 12, 3072), ("decoder", 197, 512, 16, 2048))


def matmul_flops_per_s(n: int = 4096, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def jax_step_times(name: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from mvlp_jax.kernels import backend
    from mvlp_jax.models.vit import MAE, ViT, variant

    chosen = backend.select(jax.devices())
    model = MAE(ViT(**variant(name)))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 1)), jnp.float32)
    keys = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    params = jax.jit(lambda: model.init(keys, images)["params"])()
    tx = optax.adamw(1.5e-4, weight_decay=0.05)
    opt_state = tx.init(params)

    def step(params, opt_state, rng):
        loss_of = lambda p: model.apply({"params": p}, images, rngs={"masking": rng})["loss"]
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    flops = step_flops(step, params, opt_state)
    with backend.use(chosen):
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.key(0)).compile()
    state, keys = (params, opt_state), iter(jax.random.split(jax.random.key(0), steps + 1))

    def run() -> None:
        nonlocal state
        *state, loss = compiled(*state, next(keys))
        loss.block_until_ready()

    return {
        "times": step_seconds(run, steps),
        "flops": flops,
        "peak": matmul_flops_per_s(),
        "gemm": "mkl" if chosen.mkl_gemm else "xla",
    }


def step_flops(step, *args) -> float:
    """The step's FLOPs by XLA's cost analysis of the program with XLA's own ops (the portable backend): it
    cannot see inside the MKL custom calls (mvlp_jax.kernels.cpu_blas) that the timed program makes instead."""
    import jax

    from mvlp_jax.kernels import backend

    with backend.use(backend.PORTABLE):
        cost = jax.jit(lambda *a: step(*a)).lower(*args, jax.random.key(0)).cost_analysis()  # a fresh trace
    return float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))


def torch_step_times(name: str, batch: int, steps: int) -> dict:
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from mvlp_jax.models.vit import variant

    v = variant(name)
    cfg = ViTMAEConfig(
        hidden_size=v["width"],
        num_hidden_layers=v["depth"],
        num_attention_heads=v["num_heads"],
        intermediate_size=v["mlp_dim"],
        patch_size=v["patch_size"],
        image_size=224,
        num_channels=1,
        mask_ratio=0.75,
    )
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)
    images = torch.randn(batch, 1, 224, 224)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=images).loss.backward()
        opt.step()

    return {"times": step_seconds(step, steps)}


def step_seconds(run, steps: int) -> list[float]:
    """Wall seconds of each of `steps` calls of `run`, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def jax_block_times(name: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mvlp_jax.kernels import backend
    from mvlp_jax.models.transformer import Block

    del name
    out = {}
    for block_name, tokens, width, heads, mlp_dim in BLOCKS:
        block = Block(num_heads=heads, mlp_dim=mlp_dim)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, tokens, width)), jnp.float32)
        params = block.init(jax.random.key(0), x)
        grad = jax.jit(jax.grad(lambda p, x, block=block: jnp.sum(block.apply(p, x)[0] ** 2), argnums=(0, 1)))
        with backend.use(backend.select(jax.devices())):
            grad = grad.lower(params, x).compile()
        out[block_name] = float(
            np.median(step_seconds(lambda grad=grad, params=params, x=x: jax.block_until_ready(grad(params, x)), steps))
        )
    return out


def torch_block_times(name: str, batch: int, steps: int) -> dict:
    import torch
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    del name
    out = {}
    for block_name, tokens, width, heads, mlp_dim in BLOCKS:
        cfg = ViTMAEConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=mlp_dim)
        cfg._attn_implementation = "sdpa"
        layer = ViTMAELayer(cfg).train()
        x = torch.randn(batch, tokens, width, requires_grad=True)

        def step(layer=layer, x=x):
            y = layer(x)
            (y[0] if isinstance(y, tuple) else y).square().sum().backward()

        out[block_name] = float(np.median(step_seconds(step, steps)))
    return out


WORKERS = {
    "jax": jax_step_times,
    "torch": torch_step_times,
    "jax_blocks": jax_block_times,
    "torch_blocks": torch_block_times,
}


def run_worker(framework: str, name: str, batch: int, steps: int, huge_page_malloc: bool) -> dict:
    """One framework's measurement in a fresh process (its result is the last line, as JSON)."""
    env = with_huge_page_malloc(os.environ) if huge_page_malloc else dict(os.environ)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.encoder_throughput",
            f"--worker={framework}",
            f"--variants={name}",
            f"--batch={batch}",
            f"--steps={steps}",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU this ran on (/proc/cpuinfo's model name) and its cores: the ratio differs between CPU families."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default="S/16,B/16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--huge_page_malloc", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--blocks", action="store_true", help="time single blocks instead of the MAE step")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.variants, args.batch, args.steps)))
        return
    if args.blocks:
        compare_blocks(args)
        return
    print(f"CPU: {cpu_model()}", flush=True)
    ratio = 0.0
    for name in args.variants.split(","):
        jax_times, torch_times, flops, peaks, gemm = [], [], 0.0, [], ""
        for _ in range(args.rounds):
            result = run_worker("jax", name, args.batch, args.steps, args.huge_page_malloc)
            jax_times += result["times"]
            flops, gemm = result["flops"], result["gemm"]
            peaks.append(result["peak"])
            torch_times += run_worker("torch", name, args.batch, args.steps, args.huge_page_malloc)["times"]
        jax_step, torch_step, peak = np.median(jax_times), np.median(torch_times), np.median(peaks)
        ratio = torch_step / jax_step
        print(
            f"MAE {name} @224 gray, batch {args.batch}, median of {len(jax_times)} steps each: "
            f"JAX {args.batch / jax_step:.2f} img/s (MFU {flops / jax_step / peak:.0%} of a "
            f"{peak / 1e9:.0f} GFLOP/s fp32 matmul; GEMMs by {gemm}), PyTorch {args.batch / torch_step:.2f} img/s, "
            f"ratio {ratio:.2f}x",
            flush=True,
        )
    print(f"encoder_throughput: JAX/PyTorch MAE train-step images/s ratio ({name}, {cpu_model()}): {ratio:.2f}x")


def compare_blocks(args: argparse.Namespace) -> None:
    times = {"jax_blocks": [], "torch_blocks": []}
    for _ in range(args.rounds):
        for framework, results in times.items():
            results.append(run_worker(framework, "", args.batch, args.steps, args.huge_page_malloc))
    ratio = 0.0
    for block_name, tokens, width, heads, _ in BLOCKS:
        jax_s, torch_s = (np.median([r[block_name] for r in times[f]]) for f in times)
        ratio = torch_s / jax_s
        print(
            f"{block_name} block ({tokens} tokens, {width} wide, {heads} heads), batch {args.batch}, fwd + bwd: "
            f"JAX {jax_s * 1e3:.0f} ms, PyTorch {torch_s * 1e3:.0f} ms, ratio {ratio:.2f}x",
            flush=True,
        )
    print(f"encoder_throughput --blocks: JAX/PyTorch speed ratio of the decoder block ({cpu_model()}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
