"""The scaling table (docs/scaling.md): production configs compiled by the real TPU compiler for Cloud TPU slices and by
XLA's GPU compiler for 8 H100s (the GPU cases need the CUDA plugin: run them with .venv-gpu's python).

  python -m benchmarks.aot_scaling [--cases=b16_v4,b16_v5e,...] [--out=benchmarks/aot_scaling.json]

Each case AOT-compiles a config's train step (`mvlp_jax.pretrain.aot.compile_programs`; unrolled blocks, so the FLOPs
count every layer, except where a case scans them to compile faster: its FLOPs are then a lower bound and no
images/s is given) and records per chip: HBM (arguments + temporaries + outputs), FLOPs, arithmetic
intensity, images/s at 40% MFU and the Pallas kernel calls. Results go to a JSON file; the table printed last
is docs/scaling.md's (tests/test_readme.py holds the two equal). Compiling takes minutes per case on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os

PRETRAIN = "configs/pretrain.py"
# name -> (config file, variant, overrides, topology, programs)
CASES = {
    # The TPU rows below were compiled when `auto` meant the flash kernel: they name it (tpu_flash) explicitly.
    "b16_v4": (PRETRAIN, "", {"model.attention": "tpu_flash"}, "v4-32", ("train", "features")),
    # scanned: unrolled, the 64-chip compile ran past 35 minutes on 2 cores
    "b16_v5e": (PRETRAIN, "", {"model.scan": True, "model.attention": "tpu_flash"}, "v5e-64", ("train", "features")),
    "b16_v4_dots": (PRETRAIN, "", {"model.remat": "dots", "model.attention": "tpu_flash"}, "v4-32", ("train",)),
    # scanned blocks: the memory is the unrolled program's, the FLOPs a lower bound (XLA counts a loop body once)
    "b16_512_xla": (
        PRETRAIN,
        "",
        {"model.image_size": 512, "model.attention": "xla", "model.scan": True},
        "v4-32",
        ("train",),
    ),
    "b16_512_flash": (
        PRETRAIN,
        "",
        {"model.image_size": 512, "model.scan": True, "model.attention": "tpu_flash"},
        "v4-32",
        ("train",),
    ),
    "b16_512_splash": (
        PRETRAIN,
        "",
        {"model.image_size": 512, "model.scan": True, "model.attention": "tpu_splash"},
        "v4-32",
        ("train",),
    ),
    "l16_v4": (
        PRETRAIN,
        "",
        {"model.variant": "L/16", "model.scan": True, "model.attention": "tpu_flash"},
        "v4-32",
        ("train",),
    ),
    "l16_v4_dots": (
        PRETRAIN,
        "",
        {"model.variant": "L/16", "model.scan": True, "model.remat": "dots", "model.attention": "tpu_flash"},
        "v4-32",
        ("train",),
    ),
    # the largest per-chip batch: B/16 at 64 and 128 images per chip, without and with rematerialisation
    **{
        f"b16_v4_b{b}{'_dots' if remat == 'dots' else ''}": (
            PRETRAIN,
            "",
            {"data.batch_size": b, "model.remat": remat, "model.scan": True, "model.attention": "tpu_flash"},
            "v4-32",
            ("train",),
        )
        for b in (1024, 2048)
        for remat in ("none", "dots")
    },
    "vitdet_1024_xla": (
        PRETRAIN,
        "vitdet",
        {"model.image_size": 1024, "data.batch_size": 64, "model.remat": "dots", "model.attention": "xla"},
        "v4-32",
        ("train",),
    ),
    "vitdet_1024_flash": (
        PRETRAIN,
        "vitdet",
        {"model.image_size": 1024, "data.batch_size": 64, "model.remat": "dots", "model.attention": "tpu_flash"},
        "v4-32",
        ("train",),
    ),
    "vitdet_1024_splash": (
        PRETRAIN,
        "vitdet",
        {"model.image_size": 1024, "data.batch_size": 64, "model.remat": "dots", "model.attention": "tpu_splash"},
        "v4-32",
        ("train",),
    ),
    # 8 NVIDIA H100s on one host, XLA's GPU compiler (`make test-gpu`'s environment, .venv-gpu). FLOPs are counted
    # on one CPU with unrolled blocks (the GPU compiler has no cost analysis), so scanned cases keep them whole.
    "b16_h100": (PRETRAIN, "", {}, "h100-8", ("train",)),
    "b16_h100_dots": (PRETRAIN, "", {"model.remat": "dots"}, "h100-8", ("train",)),
    "l16_h100": (PRETRAIN, "", {"model.variant": "L/16", "model.scan": True}, "h100-8", ("train",)),
    "b16_h100_b8192_dots": (
        PRETRAIN,
        "",
        {"data.batch_size": 8192, "model.remat": "dots", "model.scan": True},
        "h100-8",
        ("train",),
    ),
    "b16_h100_b32768_dots": (
        PRETRAIN,
        "",
        {"data.batch_size": 32768, "model.remat": "dots", "model.scan": True},
        "h100-8",
        ("train",),
    ),
    "vitdet_1024_h100_xla": (
        PRETRAIN,
        "vitdet",
        {"model.image_size": 1024, "data.batch_size": 64, "model.remat": "dots", "model.attention": "xla"},
        "h100-8",
        ("train",),
    ),
    "vitdet_1024_h100": (
        PRETRAIN,
        "vitdet",
        {"model.image_size": 1024, "data.batch_size": 64, "model.remat": "dots"},
        "h100-8",
        ("train",),
    ),
}
TARGET_DIM = 4096  # Llama-2-7b's hidden size


def load(file: str, variant: str, overrides: dict):
    from mvlp_jax import configuration
    from mvlp_jax.tools.demo import load_config

    config = load_config(os.path.splitext(os.path.basename(file))[0], variant)
    config.unlock()
    return configuration.override(config, overrides)


def run_case(name: str) -> list[dict]:
    from mvlp_jax.pretrain import aot

    file, variant, overrides, topology, programs = CASES[name]
    config = load(file, variant, overrides)
    rows = []
    for report in aot.compile_programs(config, topology, TARGET_DIM, programs):
        print("\n".join(report.lines()), flush=True)
        rows.append(
            {
                "case": name,
                "config": f"{file}{':' + variant if variant else ''}",
                "overrides": overrides,
                "variant": config.model.variant,
                "encoder": config.model.encoder,
                "image_size": config.model.image_size,
                "batch": config.data.batch_size,
                "remat": config.model.remat,
                **report.summary(),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the recorded rows (docs/scaling.md's)."""
    lines = [
        "| encoder | px | batch (per device) | remat | attention | devices | program | memory per device | fits | "
        "FLOPs per device | FLOP/B | images/s per device at 40% MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        encoder = f"{'ViTDet' if r['encoder'] == 'vitdet' else 'ViT'}-{r['variant']}"
        head = (
            f"| {encoder} | {r['image_size']} | {r['batch']} ({r['batch'] // r['chips']}) | {r['remat']} | "
            f"{r['attention']} ({r['kernel_calls']} kernel calls) | {r['topology']} | {r['program']} | "
        )
        if r.get("refused"):
            lines.append(head + f"refused: {r['temp_bytes'] / 2**30:.1f} GiB of temporaries alone | no | - | - | - |")
            continue
        usable = r.get("usable_bytes", r["hbm_bytes"])
        limit = f"{r['hbm_bytes'] / 2**30:.0f} GiB" + (
            f" ({usable / 2**30:.0f} usable)" if usable < r["hbm_bytes"] else ""
        )
        lines.append(
            head + f"{r['total_bytes'] / 2**30:.2f} of {limit} | "
            f"{'yes' if r['fits'] else 'no'} | {r['flops']:.3g}{' (lower bound)' if r.get('loops') else ''} | "
            f"{r['intensity']:.0f} | {'-' if r.get('loops') else format(r['images_per_s_per_chip'], '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "aot_scaling.json"))
    args = parser.parse_args()
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = [r for r in json.load(f) if r["case"] in CASES]
    for name in args.cases.split(","):
        rows = [r for r in rows if r["case"] != name] + run_case(name)
        rows.sort(key=lambda r: (list(CASES).index(r["case"]), r["program"]))
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
