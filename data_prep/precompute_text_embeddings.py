"""Offline job: a frozen LLM reads every report once; its hidden states are stored as ArrayRecord shards.

  python -m data_prep.precompute_text_embeddings --data_dir=runs/tfds --dataset=covid_notes \
      --model=smollm2 --output_dir=runs/emb/covid_smollm2
  python -m data_prep.precompute_text_embeddings --reports_csv=reports.csv --id_column=uid \
      --text_column=report --model=/models/Llama-2-7b-hf --dtype=bfloat16 --output_dir=...

One record per study (see text_embeddings/embedding_shards.py). Shards are written under a temporary name and
renamed when complete, each with a record of its inputs and bytes beside it; a rerun skips a shard only
when its bytes are intact and its reports and settings are the ones of this run, and redoes the rest.
`--num_workers` / `--worker_index` split the shards between hosts; `--verify` checks that every study
has exactly one record and every shard matches its record and the source, naming any that does not.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from data_prep.text_embeddings import plan, sources
from mvlp_jax.data import embedding_shards
from mvlp_jax.runtime import cli, storage

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "", "TFDS data dir of a dataset built by data_prep.build_dataset.")
flags.DEFINE_string("dataset", "", "Dataset name (optionally name:version) under --data_dir.")
flags.DEFINE_list("splits", [], "Splits to embed (default: all).")
flags.DEFINE_string("reports_csv", "", "Alternatively: a CSV of reports (text only).")
flags.DEFINE_string("id_column", "study_id", "CSV: the study id column.")
flags.DEFINE_string("text_column", "report", "CSV: the report text column.")
flags.DEFINE_string(
    "text_template", sources.DEFAULT_TEMPLATE, "What is read, from the fields {findings} {impression} {report}."
)
flags.DEFINE_string("model", "smollm2", "HF checkpoint dir, a .gguf file, or 'smollm2' (embedded default).")
flags.DEFINE_integer("layer", -1, "Hidden-state index (-1: the last layer).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype of the LM.")
flags.DEFINE_string("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
flags.DEFINE_boolean("trust_remote_code", False, "Allow a checkpoint's own Python code (off unless asked).")
flags.DEFINE_string("output_dir", "", "Where shards and manifest.json go.")
flags.DEFINE_boolean("store_tokens", False, "Also store per-token states (up to --max_tokens).")
flags.DEFINE_enum("store_dtype", "float16", ["float16", "float32"], "Dtype of stored vectors.")
flags.DEFINE_integer("max_tokens", 512, "Reports are truncated to this many tokens (counted).")
flags.DEFINE_integer("token_budget", 8192, "Padded tokens per batch (batches formed longest first).")
flags.DEFINE_integer("max_batch", 64, "At most this many reports per batch.")
flags.DEFINE_float("max_padding", 0.1, "A batch closes before its padding fraction would exceed this.")
flags.DEFINE_integer("records_per_shard", 1024, "Studies per output shard.")
flags.DEFINE_integer("num_workers", 1, "Workers splitting the shards (hosts or processes).")
flags.DEFINE_integer("worker_index", 0, "This worker's index in [0, num_workers).")
flags.DEFINE_boolean("verify", False, "Check the output covers every study exactly once, then exit.")
flags.DEFINE_boolean("overwrite", False, "Replace output written with other settings.")

SETTINGS_KEYS = (
    "schema_version",
    "model",
    "weights_sha256",
    "layer",
    "hidden_size",
    "compute_dtype",
    "store_dtype",
    "max_tokens",
    "store_tokens",
    "text_template",
    "source",
    "records_per_shard",
)


def load_texts() -> tuple[dict[str, str], dict]:
    if FLAGS.reports_csv:
        return sources.from_csv(FLAGS.reports_csv, FLAGS.id_column, FLAGS.text_column)
    if not (FLAGS.data_dir and FLAGS.dataset):
        raise app.UsageError("give --data_dir and --dataset, or --reports_csv")
    return sources.from_dataset(FLAGS.data_dir, FLAGS.dataset, FLAGS.splits or None, FLAGS.text_template)


def check_existing(output_dir: str, manifest: dict) -> None:
    if not storage.path(output_dir).joinpath("manifest.json").exists():
        return
    old = embedding_shards.read_manifest(output_dir)
    mismatched = [k for k in SETTINGS_KEYS if old.get(k) != manifest.get(k)]
    if not mismatched:
        return
    if not FLAGS.overwrite:
        details = "; ".join(f"{k}: stored {old.get(k)!r} vs now {manifest.get(k)!r}" for k in mismatched)
        raise cli.UserError(
            f"{output_dir} holds embeddings made with other settings ({details}); pass "
            "--overwrite to replace them or choose another --output_dir"
        )
    for p in embedding_shards.shard_paths(output_dir):
        remove_shard(p)


def remove_shard(path: str) -> None:
    storage.path(path).unlink(missing_ok=True)
    storage.path(f"{path}.json").unlink(missing_ok=True)


def verify(output_dir: str, texts: dict[str, str]) -> int:
    manifest = embedding_shards.read_manifest(output_dir)
    texts = {s: t for s, t in texts.items() if t}
    expected = set(texts)
    paths = embedding_shards.shard_paths(output_dir)
    problems = []
    if len(paths) != manifest["num_shards"]:
        problems.append(f"{len(paths)} of {manifest['num_shards']} shards present")
    seen: dict[str, int] = {}
    planned = plan.shards(sorted(texts), manifest["records_per_shard"])
    for path in paths:
        index, count = embedding_shards.shard_position(path)
        problem = (
            f"one of {count} shards, the source now makes {len(planned)}"
            if count != len(planned)
            else embedding_shards.shard_problem(
                path,
                embedding_shards.inputs_sha256(planned[index], texts),
                embedding_shards.settings_sha256(manifest, SETTINGS_KEYS),
            )
        )
        if problem:
            problems.append(f"shard {os.path.basename(path)}: {problem}")
            continue
        for study in embedding_shards.read_shard(path):
            seen[study["study_id"]] = seen.get(study["study_id"], 0) + 1
    missing = sorted(expected - seen.keys())
    extra = sorted(seen.keys() - expected)
    duplicated = sorted(s for s, n in seen.items() if n > 1)
    for label, ids in (("missing", missing), ("not in the source", extra), ("duplicated", duplicated)):
        if ids:
            problems.append(f"{len(ids)} studies {label} (first: {ids[:5]})")
    if manifest["num_records"] != len(expected):
        problems.append(f"manifest says {manifest['num_records']} records, the source has {len(expected)}")
    if problems:
        print(
            "verify: FAILED: " + "; ".join(problems) + ". Rerun the same command without --verify to redo "
            "the shards named",
            file=sys.stderr,
        )
        return 1
    print(
        f"verify: OK: {len(seen)} studies, each exactly once, in {len(paths)} shards matching their records "
        f"and the source; manifest matches"
    )
    return 0


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required")
    if not FLAGS.verify:
        cli.require_extra("llm", "the embedding job")
    for flag in ("reports_csv", "model"):
        if storage.is_remote(FLAGS[flag].value):
            raise cli.UserError(
                f"--{flag}={FLAGS[flag].value}: must be local (read by the operating system or "
                f"transformers): copy it down first (gcloud storage cp -r ...)"
            )
    texts, source_info = load_texts()
    if FLAGS.verify:
        if not storage.path(FLAGS.output_dir).joinpath("manifest.json").exists():
            raise FileNotFoundError(f"--output_dir={FLAGS.output_dir} holds no embeddings (no manifest.json) to verify")
        sys.exit(verify(FLAGS.output_dir, texts))
    storage.check_writable_dir(FLAGS.output_dir, "--output_dir")
    conflicts = {
        k: source_info.pop(k)
        for k in ("conflicting_duplicate_ids", "conflicting_examples", "notes", "fingerprint")
        if k in source_info
    }  # counts and the build's state, not identity: out of the settings compared
    for note in conflicts.get("notes", []):
        print(f"note: {note}")
    from tqdm import tqdm

    from mvlp_jax.models.frozen_lm import FrozenLM

    empty = sorted(s for s, t in texts.items() if not t)
    texts = {s: t for s, t in texts.items() if t}
    if not texts:
        raise cli.UserError("no non-empty reports to embed")
    lm = FrozenLM(FLAGS.model, FLAGS.layer, FLAGS.dtype, FLAGS.device, FLAGS.trust_remote_code)
    ids = sorted(texts)
    full_lengths = dict(zip(ids, lm.token_lengths([texts[s] for s in ids])))
    lengths = {s: min(n, FLAGS.max_tokens) for s, n in full_lengths.items()}
    shard_ids = plan.shards(ids, FLAGS.records_per_shard)
    manifest = {
        "schema_version": embedding_shards.SCHEMA_VERSION,
        "model": lm.model_id,
        "weights_sha256": lm.hash,
        "layer": FLAGS.layer,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "poolings": ["mean", "last"] + (["tokens"] if FLAGS.store_tokens else []),
        "compute_dtype": FLAGS.dtype,
        "store_dtype": FLAGS.store_dtype,
        "max_tokens": FLAGS.max_tokens,
        "store_tokens": FLAGS.store_tokens,
        "tokenizer": lm.tokenizer_name,
        "text_template": FLAGS.text_template,
        "source": source_info,
        "records_per_shard": FLAGS.records_per_shard,
        "num_shards": len(shard_ids),
        "num_records": len(texts),
        "counts": {
            "empty_skipped": len(empty),
            "truncated": sum(n > FLAGS.max_tokens for n in full_lengths.values()),
            "conflicting_duplicate_ids": conflicts.get("conflicting_duplicate_ids", 0),
        },
        "conflicting_duplicate_ids": conflicts.get("conflicting_examples", []),
        "empty_study_ids": empty[:100],
        "source_fingerprint": conflicts.get("fingerprint"),  # the dataset as embedded (built.fingerprint)
        "command": " ".join(a for a in sys.argv if not a.startswith(("--worker_index", "--num_workers"))),
    }
    storage.path(FLAGS.output_dir).mkdir(parents=True, exist_ok=True)
    check_existing(FLAGS.output_dir, manifest)
    storage.write_json(storage.join(FLAGS.output_dir, "manifest.json"), manifest, indent=2)

    current = {
        storage.join(FLAGS.output_dir, embedding_shards.SHARD_PATTERN.format(index=s, count=len(shard_ids)))
        for s in range(len(shard_ids))
    }
    for stale in set(embedding_shards.shard_paths(FLAGS.output_dir)) - current:  # a plan of another shard count
        remove_shard(stale)
    settings = embedding_shards.settings_sha256(manifest, SETTINGS_KEYS)
    mine = plan.worker_shards(len(shard_ids), FLAGS.num_workers, FLAGS.worker_index)
    todo = []
    for s in mine:
        path = storage.join(FLAGS.output_dir, embedding_shards.SHARD_PATTERN.format(index=s, count=len(shard_ids)))
        inputs = embedding_shards.inputs_sha256(shard_ids[s], texts)
        problem = embedding_shards.shard_problem(path, inputs, settings)
        if problem is None:
            print(f"shard {s}: complete, skipped")
            continue
        if problem != "missing":
            print(f"shard {s}: redone: {problem}")
        todo.append((s, path, {"study_ids": shard_ids[s], "inputs_sha256": inputs, "settings_sha256": settings}))
    total = sum(len(shard_ids[s]) for s, _, _ in todo)
    real_tokens = padded_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total, unit="report", desc=f"worker {FLAGS.worker_index}/{FLAGS.num_workers}", dynamic_ncols=True)
    for s, path, provenance in todo:
        records: dict[str, bytes] = {}
        for batch in plan.token_budget_batches(
            {i: lengths[i] for i in shard_ids[s]}, FLAGS.token_budget, FLAGS.max_batch, FLAGS.max_padding
        ):
            reports = [texts[i] for i in batch]
            words = lm.token_words(reports, FLAGS.max_tokens) if FLAGS.store_tokens else [None] * len(batch)
            for study, (mean, last, tokens), said in zip(
                batch, lm.embed(reports, FLAGS.max_tokens, FLAGS.store_tokens), words
            ):
                records[study] = embedding_shards.encode(study, mean, last, FLAGS.store_dtype, tokens, said)
            real_tokens += sum(lengths[i] for i in batch)
            padded_tokens += max(lengths[i] for i in batch) * len(batch)
            bar.update(len(batch))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{real_tokens / elapsed:.0f} tok/s")
        embedding_shards.write_shard(path, [records[i] for i in shard_ids[s]], provenance)
    bar.close()
    elapsed = time.perf_counter() - start
    padding = 1 - real_tokens / padded_tokens if padded_tokens else 0.0
    print(
        f"embedded {total} reports in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.1f} reports/s, "
        f"{real_tokens / max(elapsed, 1e-9):.0f} tokens/s); skipped {len(empty)} empty, "
        f"truncated {manifest['counts']['truncated']}; padding fraction {padding:.1%}"
    )


def run_binary() -> None:
    """`python -m data_prep.precompute_text_embeddings` (`mvlp-precompute`)."""
    cli.run("precompute_text_embeddings", main)


if __name__ == "__main__":
    run_binary()
