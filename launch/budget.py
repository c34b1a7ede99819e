"""Storage and throughput budget of MIMIC-CXR pretraining, computed (README "Scaling up").

  python -m launch.budget [--epochs=100 --mfu=0.4]

Embedding bytes are those of a real record (mvlp_jax/data/embedding_shards.py) at Llama-2-7b's width;
tokens per report are measured on the real IU reports with SmolLM2's tokenizer (a proxy for Llama-2's);
FLOPs per image come from XLA's cost analysis of the compiled pretraining step (configs/pretrain.py,
ViT-B/16 at 224, LLM contrastive + MAE). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np

from mvlp_jax.data import embedding_shards

MIMIC_STUDIES = 227_835
MIMIC_TRAIN_IMAGES = 368_960  # official MIMIC-CXR-JPG split: train 368,960 / validate 2,991 / test 5,159
LLAMA2_7B_HIDDEN = 4096
MAX_TOKENS = 512  # the job's --max_tokens default
IU_CSV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "data",
    "iu_xray_reports",
    "iuxray_chexpert_labels.csv",
)
# (name, hosts, chips, peak bf16 FLOP/s per chip)
SYSTEMS = [("TPU v4-32", 4, 16, 275e12), ("TPU v5e-64", 16, 64, 197e12), ("8x A100 (1 host)", 1, 8, 312e12)]


def record_bytes(hidden: int, dtype: str = "float16", tokens: int = 0, study_id: str = "s50000000") -> int:
    """Bytes of one stored record (msgpack), as the precompute job writes it."""
    zeros = np.zeros(hidden)
    return len(embedding_shards.encode(study_id, zeros, zeros, dtype, np.zeros((tokens, hidden)) if tokens else None))


def mean_report_tokens(csv_path: str = IU_CSV, limit: int = 1000) -> float:
    """Mean SmolLM2 token count (with BOS) of the first `limit` distinct real IU reports."""
    from transformers import AutoTokenizer

    from mvlp_jax.models.frozen_lm import resolve

    directory, gguf_file, _ = resolve("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    reports = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["report"].strip():
                reports.setdefault(row["subject_id"], " ".join(row["report"].split()))
            if len(reports) == limit:
                break
    return float(np.mean([len(tokenizer(t)["input_ids"]) for t in reports.values()]))


def train_flops_per_image() -> float:
    """XLA's FLOPs of one pretraining step of configs/pretrain.py (B/16 at 224) per image, on one device."""
    import jax

    from mvlp_jax.models.pretrainer import Pretrainer
    from mvlp_jax.pretrain import optim, train_step
    from mvlp_jax.runtime import observe, sharding
    from mvlp_jax.tools import demo

    config = demo.load_config("pretrain", None)
    config.data.batch_size = 8
    config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, 1, 1
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    model, tx = Pretrainer(config, LLAMA2_7B_HIDDEN), optim.make(config)
    _, abstract, state_sh = train_step.state_layout(model, tx, config, mesh)
    shapes = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype)
        for k, v in train_step.example_batch(config, LLAMA2_7B_HIDDEN, config.data.batch_size).items()
    }
    compiled = train_step.compile_train_step(
        train_step.make_train_step(model, tx, config), abstract, state_sh, mesh, shapes
    )
    return observe.step_flops(compiled) / config.data.batch_size


def local_alignment_table(record_with_tokens: int, batch: int, length: int) -> None:
    """What reading per-token states costs the hosts (objective local_alignment, data/report_tokens.py): the
    batch entries it adds (float16 states + mask, from report_tokens.entries) and the index kept per study."""
    from mvlp_jax.data import report_tokens

    entry = sum(
        int(np.prod(shape)) * np.dtype(dtype).itemsize
        for shape, dtype in report_tokens.entries(length, LLAMA2_7B_HIDDEN).values()
    )
    index = 2 * np.dtype(np.int32).itemsize  # one study's row of TargetTable.locations
    print(
        f"\nLocal alignment (objective local_alignment, local_alignment.max_tokens={length}): states are read record "
        "by record as examples are made, never held whole\n"
    )
    print("| cost | per study / example | arithmetic | MIMIC-CXR / global batch |\n| --- | --- | --- | --- |")
    print(
        f"| host memory: record index | {index} B | (shard, record) int32 | "
        f"{index * MIMIC_STUDIES / 2**20:,.1f} MiB per host |"
    )
    print(
        f"| batch entries | {entry:,} B | {length} x {LLAMA2_7B_HIDDEN} x 2 B + {length} B mask | "
        f"{entry * batch / 2**20:,.0f} MiB per global batch of {batch} (split over the hosts) |"
    )
    print(
        f"| start-up read (every record once, with the pooled vectors) | {record_with_tokens:,} B | the record "
        f"with tokens, mean report | {gib(record_with_tokens * MIMIC_STUDIES)} per host |"
    )


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=100)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    parser.add_argument("--mean_tokens", type=float, default=0, help="skip measuring on the IU reports")
    parser.add_argument("--flops_per_image", type=float, default=0, help="skip compiling the step")
    parser.add_argument("--batch", type=int, default=256, help="global batch (configs/pretrain.py)")
    parser.add_argument("--report_tokens", type=int, default=128, help="local_alignment.max_tokens")
    args = parser.parse_args()
    tokens = args.mean_tokens or mean_report_tokens()
    pooled = record_bytes(LLAMA2_7B_HIDDEN)
    with_tokens_mean = record_bytes(LLAMA2_7B_HIDDEN, tokens=round(tokens))
    with_tokens_max = record_bytes(LLAMA2_7B_HIDDEN, tokens=MAX_TOKENS)
    print(
        f"Embedding storage, Llama-2-7b (hidden {LLAMA2_7B_HIDDEN}), float16, {MIMIC_STUDIES:,} studies; "
        f"mean report length {tokens:.1f} tokens (measured)\n"
    )
    print("| stored | bytes per study | arithmetic | MIMIC-CXR total |\n| --- | --- | --- | --- |")
    print(
        f"| `mean` + `last` | {pooled:,} | 2 vectors x {LLAMA2_7B_HIDDEN} x 2 B = {2 * LLAMA2_7B_HIDDEN * 2:,} "
        f"+ {pooled - 2 * LLAMA2_7B_HIDDEN * 2} B record | {gib(pooled * MIMIC_STUDIES)} |"
    )
    print(
        f"| + tokens, mean report | {with_tokens_mean:,} | + {round(tokens)} x {LLAMA2_7B_HIDDEN} x 2 B | "
        f"{gib(with_tokens_mean * MIMIC_STUDIES)} |"
    )
    print(
        f"| + tokens, every report at --max_tokens | {with_tokens_max:,} | + {MAX_TOKENS} x {LLAMA2_7B_HIDDEN} "
        f"x 2 B | {gib(with_tokens_max * MIMIC_STUDIES)} |"
    )
    local_alignment_table(with_tokens_mean, args.batch, args.report_tokens)
    flops = args.flops_per_image or train_flops_per_image()
    print(
        f"\nThroughput: one training image (B/16 at 224, LLM contrastive + MAE) = {flops / 1e9:,.1f} GFLOP "
        f"(XLA cost analysis); {args.epochs:g} epochs = {MIMIC_TRAIN_IMAGES:,} x {args.epochs:g} images\n"
    )
    print(
        f"| system | hosts | images/s the chips sustain at {args.mfu:.0%} MFU | images/s each host must decode "
        f"| hours for {args.epochs:g} epochs |\n| --- | --- | --- | --- | --- |"
    )
    for name, hosts, chips, peak in SYSTEMS:
        sustain = chips * peak * args.mfu / flops
        print(
            f"| {name} | {hosts} | {sustain:,.0f} = {chips} x {peak / 1e12:g}e12 x {args.mfu} / {flops / 1e9:.1f}e9 "
            f"| {sustain / hosts:,.0f} | {MIMIC_TRAIN_IMAGES * args.epochs / sustain / 3600:,.1f} |"
        )


if __name__ == "__main__":
    main()
