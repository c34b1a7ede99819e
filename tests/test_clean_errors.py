"""Bad input to every binary ends in one paragraph naming the bad input and what to do, exit code 2, and
no traceback (MVLP_JAX_DEBUG=1 shows it). `python -m tests.test_clean_errors` prints the table of messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py") + ":demo"
PROBE = os.path.join(REPO, "configs", "linear_probe.py")


def _files(root: str, data_dir: str, emb_dir: str) -> dict[str, str]:
    """The bad inputs, made in `root`."""
    paths = {k: os.path.join(root, k) for k in ("latin1", "a_file", "reports.csv", "no_tokenizer", "images")}
    os.makedirs(paths["images"], exist_ok=True)
    with open(paths["latin1"], "wb") as f:
        f.write("image,notes\nx.png,pleural effusion \u00e9panchement\n".encode("latin1"))
    open(paths["a_file"], "w").close()
    with open(paths["reports.csv"], "w") as f:
        f.write("uid,text\n1,lungs clear\n")
    with open(os.path.join(root, "images.csv"), "w") as f:
        f.write("image\nx.png\n")
    with open(os.path.join(root, "boxes.csv"), "w") as f:
        f.write("image,label,x,y,w,h\nx.png,,1,1,4,4\n")
    os.makedirs(paths["no_tokenizer"], exist_ok=True)
    with open(os.path.join(paths["no_tokenizer"], "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f)
    return {**paths, "data_dir": data_dir, "emb_dir": emb_dir, "root": root}


def _cases(p: dict[str, str]) -> list[tuple[str, list[str], str]]:
    """(what is wrong, command, text the message must contain)."""
    build = [sys.executable, "-m", "data_prep.build_dataset", "--source=csv", f"--input_dir={p['root']}"]
    embed = [sys.executable, "-m", "data_prep.precompute_text_embeddings"]
    train = [
        sys.executable,
        "-m",
        "mvlp_jax.main",
        f"--config={PRETRAIN}",
        f"--config.data.data_dir={p['data_dir']}",
        "--config.data.dataset=covid_notes",
        f"--config.data.embeddings_dir={p['emb_dir']}",
        "--config.model.image_size=32",
        "--config.model.variant=mu/8",
    ]
    return [
        (
            "manifest not UTF-8",
            [*build, "--manifest=latin1", "--text_column=notes", f"--output_dir={p['root']}/o1"],
            "is not UTF-8 text",
        ),
        (
            "output dir is a file (build)",
            [*build, "--manifest=latin1", f"--output_dir={p['a_file']}"],
            "is a file, not a folder",
        ),
        (
            "--image_size negative",
            [*build, "--manifest=latin1", "--image_size=-5", f"--output_dir={p['root']}/o2"],
            "--image_size=-5",
        ),
        (
            "output dir is a file (embed)",
            [
                *embed,
                f"--reports_csv={p['reports.csv']}",
                "--id_column=uid",
                "--text_column=text",
                f"--output_dir={p['a_file']}/emb",
            ],
            "is a file, not a folder",
        ),
        (
            "--model path does not exist",
            [
                *embed,
                f"--reports_csv={p['reports.csv']}",
                "--id_column=uid",
                "--text_column=text",
                "--model=/no/such/model",
                f"--output_dir={p['root']}/e1",
            ],
            "no such directory or .gguf file",
        ),
        (
            "model dir without tokenizer files",
            [
                *embed,
                f"--reports_csv={p['reports.csv']}",
                "--id_column=uid",
                "--text_column=text",
                f"--model={p['no_tokenizer']}",
                f"--output_dir={p['root']}/e2",
            ],
            "has no tokenizer files",
        ),
        (
            "unknown --splits name",
            [
                *embed,
                f"--data_dir={p['data_dir']}",
                "--dataset=covid_notes",
                "--splits=tarin",
                f"--output_dir={p['root']}/e3",
            ],
            "has no split 'tarin'",
        ),
        (
            "reports CSV without the id column",
            [
                *embed,
                f"--reports_csv={p['reports.csv']}",
                "--id_column=study",
                "--text_column=text",
                f"--output_dir={p['root']}/e4",
            ],
            "missing required column(s) ['study']",
        ),
        (
            "unknown config key",
            [*train, f"--workdir={p['root']}/w1", "--config.model.varaint=S/16"],
            "unknown config key 'model.varaint' (in --config.model.varaint=S/16); did you mean 'model.variant'?",
        ),
        (
            "misspelt config group",
            [*train, f"--workdir={p['root']}/w4", "--config.dataa.batch_size=2"],
            "unknown config key 'dataa.batch_size' (in --config.dataa.batch_size=2); did you mean 'data.batch_size'?",
        ),
        (
            "a slice shape libtpu does not make",
            [sys.executable, "-m", "mvlp_jax.aot", f"--config={PRETRAIN}", "--topology=v5e:3x5"],
            "--topology=v5e:3x5: libtpu makes no such slice",
        ),
        (
            "a window that is not a number",
            [*build, "--manifest=latin1", "--window=nan,100", f"--output_dir={p['root']}/o3"],
            "--window='nan,100': both numbers must be",
        ),
        (
            "a box without a label",
            [*build, "--manifest=images.csv", "--boxes_csv=boxes.csv", f"--output_dir={p['root']}/o4"],
            "boxes.csv:2: the box has no label",
        ),
        (
            "batch not divisible by the data-parallel devices",
            [*train, f"--workdir={p['root']}/w2", "--config.data.batch_size=12"],
            "does not divide over the mesh's 8 data-parallel devices",
        ),
        (
            "missing embeddings dir",
            [*train, f"--workdir={p['root']}/w3", f"--config.data.embeddings_dir={p['root']}/no_emb"],
            "holds no manifest.json",
        ),
        (
            "output dir is a file (evaluate)",
            [
                sys.executable,
                "-m",
                "mvlp_jax.evaluate",
                f"--config={PROBE}",
                "--config.workdirs=random_init",
                f"--output_dir={p['a_file']}",
            ],
            "is a file, not a folder",
        ),
    ]


def run_case(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def cases(pretrain_data, tmp_path_factory):
    data_dir, emb_dir, _ = pretrain_data
    return _cases(_files(str(tmp_path_factory.mktemp("bad")), data_dir, emb_dir))


@pytest.mark.parametrize("index", range(16))
def test_bad_input_ends_in_a_clean_message(cases, index):
    what, command, expected = cases[index]
    result = run_case(command)
    assert result.returncode == 2, (what, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (what, result.stderr[-2000:])
    assert "error: " in result.stderr and expected in " ".join(result.stderr.split()), (what, result.stderr[-2000:])


def test_the_traceback_is_there_when_asked_for(cases):
    _, command, _ = cases[0]
    result = run_case(command, env={**os.environ, "MVLP_JAX_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def message_of(stderr: str) -> str:
    lines = [
        line
        for line in stderr.splitlines()
        if "error: " in line or (line and not line.startswith(("(set", "W0", "I0", "WARNING", "E0")))
    ]
    start = next(i for i, line in enumerate(lines) if "error: " in line)
    return " ".join(" ".join(lines[start:]).split())


if __name__ == "__main__":  # the table for the README / notes: python -m tests.test_clean_errors DATA_DIR EMB_DIR
    import tempfile

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as root:
        print("| bad input | exit | message |\n| --- | --- | --- |")
        for what, command, _ in _cases(_files(root, sys.argv[1], sys.argv[2])):
            result = run_case(command)
            print(f"| {what} | {result.returncode} | {message_of(result.stderr)} |", flush=True)
