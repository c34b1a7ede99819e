"""The pretraining binary end to end, as a user runs it: exact resume after kill -9, SIGTERM saves and
exits 0, resume onto another mesh, two SLURM tasks (killed, resumed) = one process, bad config and runaway
loss stop cleanly."""

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mvlp_jax.pretrain import train
from mvlp_jax.runtime import observe
from tests.conftest import REPO
from tests.pretrain_setup import micro_config, write_config_file


def _main(config_file: str, workdir: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The binary in a subprocess; its output goes to a file (a pipe nobody reads would fill and block it)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvlp_jax.main", f"--config={config_file}", f"--workdir={workdir}", *extra],
        cwd=REPO,
        env=env or os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def _finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    proc.wait(timeout=timeout)
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def _params(workdir: str, like: dict | None = None) -> tuple:
    """(params, data state, step) of the newest checkpoint, on one local device; `like`: a restored state
    of the same model, to restore checkpoints written by devices this process does not have."""
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    step = mngr.latest_step()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh saved it
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        like if like is not None else mngr.item_metadata(step)["state"],
    )
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    if like is None and "params" in restored["state"]:
        _params.last_state = restored["state"]
    return restored["state"]["params"], restored["data"], step


def _losses(workdir: str) -> dict[int, float]:
    return {s: r["loss"] for s, r in observe.read_history(workdir).items()}


def _wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(_losses(workdir), default=0) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"run never reached step {step}: {_output(proc)[-2000:]}")


@pytest.fixture(scope="module")
def config_file(pretrain_data, tmp_path_factory):
    data_dir, emb_dir, _ = pretrain_data
    path = str(tmp_path_factory.mktemp("cfg") / "micro.py")
    return write_config_file(
        path, data_dir, emb_dir, **{"model.image_size": 64, "total_steps": 40, "checkpoint.save_interval_steps": 5}
    )


ONE_DEVICE = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: compiles faster


def test_resume_after_sigkill_mid_cycle_is_bitwise_exact(config_file, tmp_path):
    cyclic = "--config.task_schedule=cyclic"  # odd steps train MAE, even steps the LLM contrastive loss
    straight = str(tmp_path / "straight")
    _finish(_main(config_file, straight, cyclic, env=ONE_DEVICE))
    interrupted = str(tmp_path / "interrupted")
    odd_checkpoint = random.Random().choice([15, 25])  # resuming there restarts in the middle of a cycle
    proc = _main(config_file, interrupted, cyclic, env=ONE_DEVICE)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(interrupted, "checkpoints", str(odd_checkpoint))):
        assert proc.poll() is None and time.time() < deadline, (
            f"no checkpoint {odd_checkpoint}: {_output(proc)[-2000:]}"
        )
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # as soon as the odd checkpoint is complete, before the next one
    proc.wait()
    assert max(_losses(interrupted)) < 40, "the run finished before it could be killed"
    out = _finish(_main(config_file, interrupted, cyclic, env=ONE_DEVICE))
    assert f"resumed from {interrupted}/checkpoints/{odd_checkpoint}" in out, out[-2000:]
    ref, ref_data, ref_step = _params(straight)
    got, got_data, got_step = _params(interrupted)
    assert ref_step == got_step == 40 and ref_data == got_data == {"next_step": 40, "seed": 0}
    jax.tree.map(np.testing.assert_array_equal, got, ref)  # bitwise
    assert _losses(interrupted) == _losses(straight)  # same data order: the same loss at every step
    assert os.path.exists(os.path.join(interrupted, "loss_curve.png"))
    assert os.path.exists(os.path.join(interrupted, "config.json"))


def test_sigterm_saves_and_exits_zero_then_resumes_on_another_mesh(config_file, tmp_path):
    """Preempted on one device, resumed on a (data 2, fsdp 4) mesh of 8."""
    workdir = str(tmp_path / "w")
    proc = _main(config_file, workdir, "--config.total_steps=100000", "--config.mesh.data=1", env=ONE_DEVICE)
    _wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "SIGTERM received" in out and "preempted: saved" in out
    _, data, step = _params(workdir)
    assert 3 <= step < 100000 and data["next_step"] == step
    out = _finish(
        _main(config_file, workdir, f"--config.total_steps={step + 2}", "--config.mesh.data=2", "--config.mesh.fsdp=4")
    )
    assert f"resumed from {workdir}/checkpoints/{step}" in out and "'fsdp': 4" in out
    assert _params(workdir)[2] == step + 2


def _slurm_job_id() -> int:
    """A job id whose SLURM-derived coordinator port (jax: 61440 + id % 4096) is free now."""
    for _ in range(100):
        job = random.randrange(4096, 10**6)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 61440 + job % 4096))
                return job
            except OSError:
                continue
    raise AssertionError("no free port in 61440..65535")


def _srun(config_file: str, workdir: str, steps: list[str], tasks: int = 2) -> list[subprocess.Popen]:
    """What `srun` in launch/gpu_slurm.sh starts: `tasks` processes with SLURM's variables, no JAX flags."""
    job = _slurm_job_id()
    procs = []
    for task in range(tasks):
        env = dict(
            ONE_DEVICE,
            SLURM_JOB_ID=str(job),
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS=str(tasks),
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task),
            SLURM_STEP_NUM_NODES="1",
        )
        procs.append(_main(config_file, workdir, *steps, env=env))
    return procs


def test_slurm_tasks_train_like_one_process_and_resume_after_a_kill(config_file, tmp_path):
    steps = ["--config.total_steps=12", "--config.mesh.data=-1"]
    single = str(tmp_path / "single")
    _finish(_main(config_file, single, *steps, env=ONE_DEVICE))
    multi = str(tmp_path / "multi")
    procs = _srun(config_file, multi, steps)
    _wait_for_step(multi, 7, procs[0])
    procs[1].send_signal(signal.SIGKILL)  # one task dies; the scheduler then ends the whole step
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert max(_losses(multi)) < 12
    outs = [_finish(p) for p in _srun(config_file, multi, steps)]
    assert "distributed start-up: slurm, 2 processes, 2 devices" in outs[0], outs[0][-2000:]
    assert f"resumed from {multi}/checkpoints/" in outs[0] and "mesh {'data': 2" in outs[0]
    ref, _, _ = _params(single)
    got, data, step = _params(multi, like=_params.last_state)
    assert step == 12 and data == {"next_step": 12, "seed": 0}
    single_losses, multi_losses = _losses(single), _losses(multi)
    assert sorted(multi_losses) == sorted(single_losses) == list(range(1, 13))
    np.testing.assert_allclose(
        [multi_losses[s] for s in range(1, 13)], [single_losses[s] for s in range(1, 13)], rtol=1e-5
    )
    # gloo's all-reduce sums in another order than one device: ~1e-9 differences, which Adam turns into
    # lr-sized steps on parameters whose gradient is itself ~0, so those are compared at atol 5e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5), got, ref)


def test_bad_config_fails_at_start_up_naming_the_key(tmp_path):
    demo = os.path.join(REPO, "configs", "pretrain.py") + ":demo"
    bad_value = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvlp_jax.main",
            f"--config={demo}",
            f"--workdir={tmp_path}",
            "--config.contrastive.loss=cosine",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad_value.returncode == 2
    assert "'contrastive.loss' = 'cosine'; allowed values: 'infonce', 'sigmoid', 'margin'" in bad_value.stderr
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvlp_jax.main",
            f"--config={demo}",
            f"--workdir={tmp_path}",
            "--config.model.encodr=vit",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode != 0 and "encodr" in unknown.stderr
    assert not os.listdir(tmp_path)


def test_mae_only_config_trains(pretrain_data, tmp_path):
    from configs import mae

    data_dir, _, _ = pretrain_data
    config = micro_config(data_dir, "", total_steps=4, **{"optim.accum_steps": 2})  # 2 micro-batches of 8
    config.objectives = mae.get_config("demo").objectives
    outcome = train.train(config, str(tmp_path))
    assert outcome.last_step == 4 and not outcome.stopped_early
    history = observe.read_history(str(tmp_path))
    assert set(history) == {1, 2, 3, 4} and "mae/loss" in history[4] and "llm_contrastive/loss" not in history[4]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
