"""Launch scripts: the exact commands of --dry_run, usage errors, and the multi-host start-up rule."""

import os
import subprocess

import pytest

from mvlp_jax.runtime import distributed
from tests.conftest import REPO


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def _commands(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run_creates_ships_installs_runs_on_all_workers_and_deletes():
    out = _launch(
        "tpu_pod.sh",
        "--name=mvlp",
        "--zone=us-central2-b",
        "--accelerator_type=v4-32",
        "--spot",
        "--config=configs/pretrain.py",
        "--workdir=gs://bucket/b16",
        "--delete",
        "--dry_run",
        "--",
        "--config.data.batch_size=4096",
        "--config.data.data_dir=gs://bucket/tfds",
    )
    where = "mvlp --zone=us-central2-b --worker=all"
    assert _commands(out) == [
        "gcloud compute tpus tpu-vm create mvlp --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot",
        f"git -C {REPO} archive --format=tar.gz -o /tmp/mvlp_jax-mvlp.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/mvlp_jax-mvlp.tar.gz mvlp:mvlp_jax.tar.gz --zone=us-central2-b "
        "--worker=all",
        f"gcloud compute tpus tpu-vm ssh {where} '--command=rm -rf ~/mvlp_jax && mkdir -p ~/mvlp_jax && "
        "tar -xzf ~/mvlp_jax.tar.gz -C ~/mvlp_jax'",
        f"gcloud compute tpus tpu-vm ssh {where} '--command=cd ~/mvlp_jax && (command -v python3.11 || "
        "(sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv)) && python3.11 -m venv "
        ".venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . "
        "'\\''jax[tpu]==0.10.2'\\'''",
        f"gcloud compute tpus tpu-vm ssh {where} '--command=cd ~/mvlp_jax && .venv/bin/python -m mvlp_jax.main "
        "--config=configs/pretrain.py --workdir=gs://bucket/b16 --config.data.batch_size=4096 "
        "--config.data.data_dir=gs://bucket/tfds 2>&1 | tee -a ~/mvlp_jax/train.log'",
        "gcloud compute tpus tpu-vm delete mvlp --zone=us-central2-b --quiet",
    ]


def test_tpu_pod_queued_resource_clone_and_delete_only():
    commands = _commands(
        _launch(
            "tpu_pod.sh",
            "--name",
            "p",
            "--zone",
            "europe-west4-a",
            "--queued",
            "--project=proj",
            "--accelerator_type=v5litepod-64",
            "--version=v2-alpha-tpuv5-lite",
            "--repo=https://example.org/mvlp_jax.git",
            "--config=configs/mae.py",
            "--workdir=gs://b/mae",
            "--dry_run",
        )
    )
    assert commands[0] == (
        "gcloud compute tpus queued-resources create p --node-id=p --zone=europe-west4-a "
        "--project=proj --accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite"
    )
    assert commands[1] == (
        "gcloud compute tpus tpu-vm ssh p --zone=europe-west4-a --project=proj --worker=all "
        "'--command=rm -rf ~/mvlp_jax && git clone --depth=1 https://example.org/mvlp_jax.git "
        "~/mvlp_jax'"
    )
    assert "--config=configs/mae.py --workdir=gs://b/mae" in commands[-1] and len(commands) == 4
    assert _commands(_launch("tpu_pod.sh", "--name=p", "--zone=z", "--queued", "--delete_only", "--dry_run")) == [
        "gcloud compute tpus queued-resources delete p --zone=z --force --quiet"
    ]


def test_gpu_slurm_dry_run_writes_the_batch_script_per_gpu_and_per_node():
    out = _launch(
        "gpu_slurm.sh",
        "--nodes=2",
        "--gpus_per_node=4",
        "--config=configs/pretrain.py",
        "--workdir=/shared/runs/b16",
        "--partition=gpu",
        "--venv=/opt/venv",
        "--dry_run",
        "--",
        "--config.data.batch_size=1024",
    )
    lines = out.stdout.splitlines()
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--signal=TERM@120",
        "--output=/shared/runs/b16/slurm/%j.log",
    ):
        assert f"#SBATCH {directive}" in lines
    assert (
        "srun --kill-on-bad-exit=1 /opt/venv/bin/python -m mvlp_jax.main --config=configs/pretrain.py "
        "--workdir=/shared/runs/b16 --config.data.batch_size=1024"
    ) in lines
    assert not any("JAX_LOCAL_DEVICE_IDS" in line for line in lines)  # jax gives task i GPU SLURM_LOCALID
    assert _commands(out) == ["sbatch /shared/runs/b16/slurm/pretrain.sbatch"]
    per_node = _launch(
        "gpu_slurm.sh",
        "--nodes=3",
        "--gpus_per_node=8",
        "--per=node",
        "--config=c.py",
        "--workdir=/w",
        "--script=/tmp/x.sbatch",
        "--dry_run",
    ).stdout.splitlines()
    assert {
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=64",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
        "+ sbatch /tmp/x.sbatch",
    } <= set(per_node)


def test_precompute_dry_run_splits_workers_then_verifies():
    flags = ["--data_dir=/d/tfds", "--dataset=mimic_cxr", "--model=/m/Llama-2-7b-hf", "--output_dir=/d/emb"]
    job = f"{REPO}/.venv/bin/python -m data_prep.precompute_text_embeddings {' '.join(flags)}"
    assert _commands(
        _launch("precompute.sh", "--num_workers=4", "--slurm", "--partition=gpu", "--dry_run", "--", *flags)
    ) == [
        "sbatch --parsable --job-name=mvlp_jax_embed --time=12:00:00 --partition=gpu --array=0-3 --gpus-per-task=1 "
        f"'--wrap=cd {REPO} && {job} --num_workers=4 --worker_index=$SLURM_ARRAY_TASK_ID'",
        "sbatch --parsable --job-name=mvlp_jax_embed --time=12:00:00 --partition=gpu "
        f"'--dependency=afterok:$ARRAY_JOB_ID' '--wrap=cd {REPO} && {job} --verify'",
    ]
    assert _commands(
        _launch(
            "precompute.sh",
            "--num_workers=3",
            "--hosts=gpu1,gpu2",
            "--remote_dir=/srv/mvlp",
            "--python=python3",
            "--dry_run",
            "--",
            *flags,
        )
    ) == [
        f"ssh gpu1 'cd /srv/mvlp && python3 -m data_prep.precompute_text_embeddings {' '.join(flags)} "
        "--num_workers=3 --worker_index=0'",
        f"ssh gpu2 'cd /srv/mvlp && python3 -m data_prep.precompute_text_embeddings {' '.join(flags)} "
        "--num_workers=3 --worker_index=1'",
        f"ssh gpu1 'cd /srv/mvlp && python3 -m data_prep.precompute_text_embeddings {' '.join(flags)} "
        "--num_workers=3 --worker_index=2'",
        f"python3 -m data_prep.precompute_text_embeddings {' '.join(flags)} --verify",
    ]


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_pod.sh", ["--zone=z", "--config=c", "--workdir=gs://w"], "--name is required"),
        ("tpu_pod.sh", ["--name=n", "--zone=z", "--config=c", "--workdir=/local"], "must be a gs:// path"),
        (
            "tpu_pod.sh",
            ["--name=n", "--zone=z", "--accelerator_type=big", "--config=c", "--workdir=gs://w"],
            "is not like v4-32",
        ),
        ("tpu_pod.sh", ["--name=n", "--zone=z", "--bogus"], "unknown argument '--bogus'"),
        ("gpu_slurm.sh", ["--nodes=0", "--gpus_per_node=4", "--config=c", "--workdir=w"], "--nodes must be a positive"),
        (
            "gpu_slurm.sh",
            ["--nodes=1", "--gpus_per_node=4", "--per=rack", "--config=c", "--workdir=w"],
            "--per must be",
        ),
        ("gpu_slurm.sh", ["--nodes=1", "--gpus_per_node=4", "--config=c"], "--workdir is required"),
        ("precompute.sh", ["--num_workers=2", "--", "--output_dir=o"], "choose where the workers run"),
        ("precompute.sh", ["--num_workers=2", "--slurm", "--local", "--", "--output_dir=o"], "choose one of"),
        ("precompute.sh", ["--num_workers=2", "--local", "--", "--model=m"], "need --output_dir"),
        (
            "precompute.sh",
            ["--num_workers=2", "--local", "--", "--output_dir=o", "--worker_index=1"],
            "--worker_index=1 is set by this script",
        ),
    ],
)
def test_bad_arguments_give_a_usage_error(script, args, message):
    result = _launch(script, *args, "--dry_run")
    assert result.returncode == 2 and message in result.stderr and "usage: launch/" in result.stderr, result.stderr
    assert not result.stdout


def test_start_up_rule_picks_explicit_slurm_tpu_forced_or_nothing():
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "3",
    }
    assert distributed.detect(2, False, slurm, tpu=False) == "explicit"
    assert distributed.detect(1, False, slurm, tpu=False) == "slurm"
    assert distributed.detect(1, False, dict(slurm, SLURM_NTASKS="1"), tpu=False) == "none"  # one task: one host
    assert distributed.detect(1, False, {"SLURM_JOB_ID": "7"}, tpu=False) == "none"  # sbatch shell, not an srun task
    assert distributed.detect(1, False, {}, tpu=True) == "tpu"
    assert distributed.detect(1, False, {"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
    assert distributed.detect(1, True, {}, tpu=False) == "forced"
    assert distributed.detect(1, False, {}, tpu=False) == "none"
    assert distributed.initialize() == "none"  # this machine: one host, nothing to initialise


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stands in for gcloud: records each call; runs the training command of `tpu-vm ssh` in a fake worker home.
printf '%s\n' "$*" >> "$FAKE_LOG"
for arg in "$@"; do
  case $arg in --command=*mvlp_jax.main*) HOME="$FAKE_HOME" bash -c "${arg#--command=}" ;; esac
done
exit 0
"""


def test_tpu_pod_passes_hostile_values_to_the_workers_as_single_words(tmp_path):
    """Values with `;`, spaces and `$` reach the remote binary as the same single arguments, running nothing."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "mvlp_jax" / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    python = home / "mvlp_jax" / ".venv" / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv"\n')
    for f in (bin_dir / "gcloud", python):
        f.chmod(0o755)
    hostile = {
        "config": "configs/pretrain.py; touch $HOME/pwned_config",
        "workdir": "gs://bucket/run $(touch $HOME/pwned_workdir); echo `id`",
        "extra": "--config.data.dataset=a b;c $USER",
    }
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "log"),
        "FAKE_HOME": str(home),
    }
    result = subprocess.run(
        [
            "bash",
            "launch/tpu_pod.sh",
            "--name=n",
            "--zone=z",
            f"--config={hostile['config']}",
            f"--workdir={hostile['workdir']}",
            "--",
            hostile["extra"],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    argv = (home / "argv").read_text().splitlines()
    assert argv == [
        "-m",
        "mvlp_jax.main",
        f"--config={hostile['config']}",
        f"--workdir={hostile['workdir']}",
        hostile["extra"],
    ]
    assert not [p for p in os.listdir(home) if p.startswith("pwned")]


def test_gpu_slurm_refuses_values_that_would_inject_lines_into_the_batch_script():
    for flag in ("--job_name=x\nrm -rf ~", "--time=1:00 --wrap=id", "--partition=a;b"):
        result = _launch(
            "gpu_slurm.sh", "--nodes=1", "--gpus_per_node=1", "--config=c", "--workdir=w", flag, "--dry_run"
        )
        assert result.returncode == 2 and "must be one word" in result.stderr, (flag, result.stderr)
