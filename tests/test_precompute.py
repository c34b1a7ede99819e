"""The LLM embedding job against a direct transformers forward, worker split + verify, kill -9 + resume."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from data_prep.text_embeddings import plan
from mvlp_jax.data import embedding_shards
from tests.conftest import REPO, SHARED_DATA

IU_CSV = os.path.join(SHARED_DATA, "iu_xray_reports", "iuxray_chexpert_labels.csv")


def _reports(n: int) -> dict[str, str]:
    if os.path.exists(IU_CSV):  # real IU radiology reports
        out = {}
        with open(IU_CSV, newline="") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["subject_id"], " ".join(row["report"].split()))
                if len(out) == n:
                    return out
    return {str(i): " ".join(["lungs clear"] * (1 + i % 7)) for i in range(n)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama with a word-level tokenizer and no pad token, saved like a checkpoint."""
    root = tmp_path_factory.mktemp("llm")
    reports = _reports(40)
    reports["empty-1"] = "   "
    reports[sorted(reports)[0]] = " ".join(["effusion"] * 80)  # longer than --max_tokens below
    words = sorted({w for t in reports.values() for w in t.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        root / "model"
    )
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    ).save_pretrained(root / "model")
    csv_path = root / "reports.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "text"])
        writer.writerows(sorted(reports.items()))
    return str(root / "model"), str(csv_path), reports


def _job_flags(model, csv_path, out) -> list[str]:
    return [
        f"--reports_csv={csv_path}",
        "--id_column=uid",
        "--text_column=text",
        f"--model={model}",
        f"--output_dir={out}",
        "--store_dtype=float32",
        "--max_tokens=48",
        "--token_budget=200",
        "--records_per_shard=7",
    ]


def _run(model, csv_path, out, *extra, check=True):
    args = [sys.executable, "-m", "data_prep.precompute_text_embeddings", *_job_flags(model, csv_path, out), *extra]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(out):
    return {r["study_id"]: r for p in embedding_shards.shard_paths(out) for r in embedding_shards.read_shard(p)}


def test_stored_vectors_equal_a_direct_unpadded_forward(tiny_llama, tmp_path):
    model_dir, csv_path, reports = tiny_llama
    _run(model_dir, csv_path, tmp_path, "--store_tokens")
    stored = _records(tmp_path)
    manifest = embedding_shards.read_manifest(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    nonempty = [t for t in reports.values() if t.strip()]
    truncated = sum(len(tokenizer(t)["input_ids"]) > 48 for t in nonempty)
    assert manifest["counts"] == {
        "empty_skipped": len(reports) - len(nonempty),
        "truncated": truncated,
        "conflicting_duplicate_ids": 0,
    }
    assert truncated >= 1 and manifest["num_records"] == len(nonempty) == len(stored)
    assert manifest["hidden_size"] == 32 and manifest["source"]["kind"] == "csv"
    reference = AutoModel.from_pretrained(model_dir).eval()
    for study, text in reports.items():
        if not text.strip():
            assert study not in stored
            continue
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=48)
        with torch.inference_mode():
            states = reference(**ids, output_hidden_states=True).hidden_states[-1][0].numpy()
        np.testing.assert_allclose(stored[study]["mean"], states.mean(0), atol=1e-5)
        np.testing.assert_allclose(stored[study]["last"], states[-1], atol=1e-5)
        np.testing.assert_allclose(stored[study]["tokens"], states, atol=1e-5)
        assert stored[study]["words"] == [tokenizer.decode([i]) for i in ids["input_ids"][0].tolist()]


def test_three_workers_cover_every_study_once_and_match_one_worker(tiny_llama, tmp_path):
    model_dir, csv_path, _ = tiny_llama
    # the scale-out launcher, for real: 3 local worker processes in parallel, then its --verify pass
    launched = subprocess.run(
        [
            "bash",
            "launch/precompute.sh",
            "--num_workers=3",
            "--local",
            f"--python={sys.executable}",
            "--",
            *_job_flags(model_dir, csv_path, tmp_path / "multi"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("--num_workers=3 --worker_index=") == 3
    assert "verify: OK:" in launched.stdout and "each exactly once" in launched.stdout
    _run(model_dir, csv_path, tmp_path / "single")
    multi, single = _records(tmp_path / "multi"), _records(tmp_path / "single")
    assert multi.keys() == single.keys()
    for study in single:
        np.testing.assert_array_equal(multi[study]["mean"], single[study]["mean"])
    os.remove(embedding_shards.shard_paths(tmp_path / "multi")[1])
    failed = _run(model_dir, csv_path, tmp_path / "multi", "--verify", check=False)
    assert failed.returncode != 0 and "missing" in failed.stderr and "5 of 6 shards" in failed.stderr


def test_killed_run_resumes_to_the_same_records(tiny_llama, tmp_path):
    model_dir, csv_path, _ = tiny_llama
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "data_prep.precompute_text_embeddings",
        f"--reports_csv={csv_path}",
        "--id_column=uid",
        "--text_column=text",
        f"--model={model_dir}",
        f"--output_dir={out}",
        "--store_dtype=float32",
        "--max_tokens=48",
        "--token_budget=60",
        "--records_per_shard=2",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(embedding_shards.shard_paths(out)) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(embedding_shards.shard_paths(out))
    assert 0 < done_before < 20, "the run should have been killed part-way"
    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and resumed.stdout.count("complete, skipped") >= done_before
    clean = [f"--output_dir={tmp_path / 'clean'}" if a.startswith("--output_dir") else a for a in args]
    subprocess.run(clean, cwd=REPO, check=True, capture_output=True, timeout=600)
    a, b = _records(out), _records(tmp_path / "clean")
    assert a.keys() == b.keys() and len(a) >= 39
    for study in a:
        np.testing.assert_array_equal(a[study]["mean"], b[study]["mean"])
        np.testing.assert_array_equal(a[study]["last"], b[study]["last"])


def test_bad_inputs_are_refused_clearly(tiny_llama, tmp_path):
    model_dir, csv_path, _ = tiny_llama
    missing = _run(str(tmp_path / "nope"), csv_path, tmp_path / "o1", check=False)
    assert missing.returncode != 0 and "no such directory" in missing.stderr
    layer = _run(model_dir, csv_path, tmp_path / "o2", "--layer=7", check=False)
    assert layer.returncode != 0 and "--layer=7 out of range" in layer.stderr
    _run(model_dir, csv_path, tmp_path / "o3")
    other = _run(model_dir, csv_path, tmp_path / "o3", "--max_tokens=16", check=False)
    assert other.returncode == 2 and "max_tokens" in other.stderr and "--overwrite" in other.stderr


def test_token_budget_batches_and_worker_plan():
    lengths = {f"s{i}": n for i, n in enumerate([5, 50, 7, 48, 6, 49])}
    loose = plan.token_budget_batches(lengths, budget=100, max_batch=8, max_padding=1.0)
    assert loose == [["s1", "s5"], ["s3", "s2"], ["s4", "s0"]]  # longest first, <= 100 padded tokens each
    batches = plan.token_budget_batches(lengths, budget=100, max_batch=8)  # and <= 10% padding each
    assert batches == [["s1", "s5"], ["s3"], ["s2", "s4"], ["s0"]]
    assert all(plan.padding_fraction(lengths, [b]) <= 0.1 for b in batches)
    assert plan.padding_fraction(lengths, batches) < plan.padding_fraction(lengths, loose)
    assert sorted(s for b in batches for s in b) == sorted(lengths)
    assert plan.worker_shards(7, 3, 1) == [1, 4]
    with pytest.raises(ValueError):
        plan.worker_shards(7, 3, 3)


def _rewrite_csv(csv_path: str, out_path: str, change: dict[str, str]) -> None:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    with open(out_path, "w", newline="") as f:
        csv.writer(f).writerows([[r[0], change.get(r[0], r[1])] for r in rows])


def test_a_changed_source_or_a_damaged_shard_is_redone_and_verify_names_it(tiny_llama, tmp_path):
    model_dir, csv_path, reports = tiny_llama
    source = str(tmp_path / "reports.csv")
    _rewrite_csv(csv_path, source, {})
    out = tmp_path / "emb"
    _run(model_dir, source, out)
    before = _records(out)
    # 1. a report edited in place: its shard no longer matches its inputs
    study = sorted(s for s, t in reports.items() if t.strip())[10]  # in shard 1 of 7 studies each
    _rewrite_csv(csv_path, source, {study: "effusion " + reports[study]})
    failed = _run(model_dir, source, out, "--verify", check=False)
    assert failed.returncode == 1
    assert "shard embeddings-00001-of-00006.array_record: the reports it was made from have changed" in failed.stderr
    rerun = _run(model_dir, source, out)
    assert "shard 1: redone: the reports it was made from have changed" in rerun.stdout
    assert rerun.stdout.count("complete, skipped") == 5
    after = _records(out)
    assert not np.array_equal(after[study]["mean"], before[study]["mean"])
    for other in set(before) - {study}:
        np.testing.assert_array_equal(after[other]["mean"], before[other]["mean"])
    assert "verify: OK" in _run(model_dir, source, out, "--verify").stdout
    # 2. a shard cut short: verify and training name it, a rerun redoes it
    victim = embedding_shards.shard_paths(out)[3]
    os.truncate(victim, os.path.getsize(victim) - 100)
    failed = _run(model_dir, source, out, "--verify", check=False)
    assert failed.returncode == 1 and f"shard {os.path.basename(victim)}: " in failed.stderr
    assert "bytes on disk" in failed.stderr
    from mvlp_jax.data import targets

    with pytest.raises(ValueError, match=f"embedding shard .*{os.path.basename(victim)}: .* bytes on disk"):
        targets.load_targets(str(out), "mean")
    rerun = _run(model_dir, source, out)
    assert "shard 3: redone:" in rerun.stdout and rerun.stdout.count("complete, skipped") == 5
    assert _records(out).keys() == after.keys()
    assert "verify: OK" in _run(model_dir, source, out, "--verify").stdout


def test_conflicting_duplicate_report_ids_are_counted_and_reported(tmp_path):
    from data_prep.text_embeddings import sources

    path = tmp_path / "reports.csv"
    path.write_text("uid,text\n1,lungs clear\n2,effusion\n1,lungs  clear\n2,no effusion\n3,edema\n3,edema\n")
    texts, info = sources.from_csv(str(path), "uid", "text")
    assert texts == {"1": "lungs clear", "2": "effusion", "3": "edema"}  # the first row of an id wins
    assert info["conflicting_duplicate_ids"] == 1 and info["conflicting_examples"] == ["2"]  # 1 and 3 agree
    assert "1 ids of" in info["notes"][0]


def test_images_of_one_study_with_different_reports_are_counted_from_a_dataset_too(tmp_path):
    """Built datasets were read without the check the CSV source had: 40 of 124 COVID studies kept their first
    image's note while the manifest counted 0 conflicts."""
    from PIL import Image

    from data_prep.build_dataset import build
    from data_prep.text_embeddings import sources

    root = tmp_path / "raw"
    root.mkdir()
    for name in "abc":
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / f"{name}.png")
    (root / "manifest.csv").write_text(
        "image,study,notes,split\na.png,s1,effusion,train\nb.png,s1,no effusion,train\nc.png,s2,clear,train\n"
    )
    build(
        "csv",
        str(root),
        str(tmp_path / "tfds"),
        name="notes",
        image_size=0,
        study_column="study",
        text_column="notes",
        split_column="split",
    )
    texts, info = sources.from_dataset(str(tmp_path / "tfds"), "notes", None, sources.DEFAULT_TEMPLATE)
    assert len(texts) == 2 and info["conflicting_duplicate_ids"] == 1 and info["conflicting_examples"] == ["s1"]
    assert "1 ids of notes:1.0.0 have rows with different report texts" in info["notes"][0]
    assert info["fingerprint"]["splits"]["train"]["examples"] == 3
