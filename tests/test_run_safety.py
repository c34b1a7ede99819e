"""A run never trusts what it should not: a resume under another layout is refused before anything is
written, checkpoints of diverged weights leave the run, a damaged checkpoint is caught by its checksums,
a full disk ends in a message with no half-written checkpoint left behind, and a workdir has one writer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import checkpointing, observe, sharding
from tests.conftest import REPO
from tests.pretrain_setup import micro_config


def _snapshot(workdir: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


@pytest.fixture(scope="module")
def trained(pretrain_data, tmp_path_factory):
    """A micro run of 4 steps (checkpoints up to 2 and 4); tests work on copies of it."""
    data_dir, emb_dir, _ = pretrain_data
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train(micro_config(data_dir, emb_dir, total_steps=4), workdir)
    return workdir


def _copy(workdir: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(workdir, str(tmp_path / "run"))


def test_a_resume_that_changes_the_layout_is_refused_before_anything_is_written(pretrain_data, trained, tmp_path):
    data_dir, emb_dir, _ = pretrain_data
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    wider = micro_config(data_dir, emb_dir, total_steps=6, **{"model.variant": "Ti/8", "seed": 3})
    with pytest.raises(ValueError, match=r"cannot resume: model.variant: 'mu/8' -> 'Ti/8'; seed: 0 -> 3\."):
        train.train(wider, workdir)
    assert _snapshot(workdir) == before  # config.json and everything else untouched
    # harmless changes resume, and are recorded
    outcome = train.train(micro_config(data_dir, emb_dir, total_steps=5, **{"optim.lr": 1e-4}), workdir)
    assert outcome.last_step == 5
    changes = json.load(open(os.path.join(workdir, "config_changes.json")))
    assert changes[-1]["resumed_at_step"] == 4
    assert changes[-1]["changes"]["total_steps"] == {"stored": 4, "now": 5} and "optim.lr" in changes[-1]["changes"]
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 5


def test_a_failed_start_writes_nothing(pretrain_data, tmp_path):
    data_dir, emb_dir, _ = pretrain_data
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match=r"data.batch_size=12 does not divide over the mesh's 8 data-parallel"):
        train.train(micro_config(data_dir, emb_dir, **{"data.batch_size": 12}), str(workdir))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        train.train(micro_config(data_dir, str(tmp_path / "no_embeddings")), str(workdir))
    assert not workdir.exists()


def test_diverged_checkpoints_leave_the_run_and_the_guard_names_the_last_good_one(pretrain_data, tmp_path):
    data_dir, emb_dir, _ = pretrain_data
    workdir = str(tmp_path / "run")
    # lr 1e6 after a warmup: a few sane steps, then weights that are finite but huge, then a non-finite loss
    config = micro_config(
        data_dir,
        emb_dir,
        **{
            "optim.lr": 1e6,
            "optim.warmup_steps": 6,
            "optim.clip_norm": 0.0,
            "max_nonfinite_steps": 2,
            "total_steps": 30,
            "checkpoint.save_interval_steps": 1,
            "checkpoint.max_to_keep": 50,
        },
    )
    with pytest.raises(train.NonFiniteError) as caught:
        train.train(config, workdir)
    message = str(caught.value)
    history = observe.read_history(workdir)
    kept = checkpointing.finished_steps(workdir)
    assert kept, message
    named = int(message.split("went bad is ")[1].split(":")[0].rsplit("/", 1)[1])
    assert named == kept[-1]
    # every checkpoint left gave a finite loss and finite gradients on the next step; the first that did not is gone
    for step in kept:
        assert np.isfinite(history[step + 1]["loss"]) and np.isfinite(history[step + 1]["grad_norm"]), step
    first_bad = caught.value.first_bad_step
    assert not np.isfinite(history[first_bad + 1]["grad_norm"]) or not np.isfinite(history[first_bad + 1]["loss"])
    assert sorted(map(int, os.listdir(os.path.join(workdir, "nonfinite_checkpoints"))))[0] == first_bad
    # a rerun at a sane learning rate resumes from the named checkpoint and trains on
    sane = micro_config(
        data_dir,
        emb_dir,
        **{
            "optim.lr": 1e-3,
            "optim.warmup_steps": 6,
            "optim.clip_norm": 0.0,
            "max_nonfinite_steps": 2,
            "total_steps": named + 2,
            "checkpoint.save_interval_steps": 1,
            "checkpoint.max_to_keep": 50,
        },
    )
    assert train.train(sane, workdir).last_step == named + 2


def _damage(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _largest_file(directory: str) -> str:
    files = [os.path.join(r, n) for r, _, ns in os.walk(directory) for n in ns]
    return max(files, key=os.path.getsize)


def test_a_damaged_checkpoint_is_caught_and_the_previous_good_one_is_offered(pretrain_data, trained, tmp_path):
    data_dir, emb_dir, _ = pretrain_data
    workdir = _copy(trained, tmp_path)
    steps = checkpointing.finished_steps(workdir)
    assert steps[-2:] == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, checkpointing.CHECKSUMS))) == [f"{s}.json" for s in steps]
    victim = _largest_file(os.path.join(workdir, "checkpoints", "4"))
    _damage(victim, 64, os.urandom(4096))  # the same size, other bytes: only a checksum can tell
    assert "changed since it was saved" in checkpointing.verify(workdir, 4)
    assert checkpointing.verify(workdir, 2) is None
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    with pytest.raises(
        ValueError,
        match=r"checkpoints/4 is damaged: file .* has changed since it was saved .*; "
        r"checkpoint 2 verifies: pass --config.step=2 to use it",
    ):
        encoder_lib.load(workdir, -1, mesh)
    assert encoder_lib.load(workdir, 2, mesh).step == 2
    # resuming training falls back to checkpoint 2 with a warning and sets the damaged one aside
    outcome = train.train(micro_config(data_dir, emb_dir, total_steps=4), workdir)
    assert outcome.last_step == 4 and os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
    assert checkpointing.verify(workdir, 4) is None  # the new checkpoint 4, sealed anew
    # a cut-short file is caught the same way
    victim = _largest_file(os.path.join(workdir, "checkpoints", "4"))
    os.truncate(victim, os.path.getsize(victim) // 2)
    assert "bytes" in checkpointing.verify(workdir, 4)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_while_saving_ends_cleanly_without_partial_checkpoints(pretrain_data, small_disk):
    data_dir, emb_dir, _ = pretrain_data
    workdir = os.path.join(small_disk, "run")
    config = micro_config(data_dir, emb_dir, total_steps=6, **{"checkpoint.save_interval_steps": 1})
    with pytest.raises(OSError) as caught:
        train.train(config, workdir)
    assert "No space left on device" in str(caught.value) and "rerun to resume" in str(caught.value)
    leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
    assert all(name.isdigit() for name in leftovers), leftovers


def test_a_second_start_on_a_live_workdir_refuses_naming_the_holder_and_readers_take_sealed_checkpoints(
    pretrain_data, trained, tmp_path
):
    import signal
    import socket

    from mvlp_jax.runtime import lease
    from tests.pretrain_setup import write_config_file
    from tests.test_pretrain_runs import ONE_DEVICE, _finish, _main, _wait_for_step

    data_dir, emb_dir, _ = pretrain_data
    config = write_config_file(
        str(tmp_path / "c.py"), data_dir, emb_dir, total_steps=100000, **{"checkpoint.save_interval_steps": 3}
    )
    workdir = str(tmp_path / "live")
    first = _main(config, workdir, env=ONE_DEVICE)
    _wait_for_step(workdir, 4, first)
    held = lease.holder(workdir)
    assert held is not None and held.pid == first.pid and held.host == socket.gethostname()
    events = sorted(n for n in os.listdir(workdir) if n.startswith("events"))
    second = subprocess.run(
        [sys.executable, "-m", "mvlp_jax.main", f"--config={config}", f"--workdir={workdir}"],
        cwd=REPO,
        env=ONE_DEVICE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is being trained by process {first.pid} on {socket.gethostname()}" in " ".join(second.stderr.split())
    assert "Traceback" not in second.stderr and "remove" not in second.stderr
    assert sorted(n for n in os.listdir(workdir) if n.startswith("events")) == events  # it wrote nothing
    first.send_signal(signal.SIGTERM)
    _finish(first)
    assert lease.holder(workdir) is None and not os.path.exists(os.path.join(workdir, lease.FILE))
    # while a run holds the lease, a reader takes the newest sealed checkpoint, never one not sealed yet
    steps = checkpointing.finished_steps(workdir)
    os.remove(os.path.join(workdir, checkpointing.CHECKSUMS, f"{steps[-1]}.json"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    assert encoder_lib.load(workdir, -1, mesh).step == steps[-1]  # no run: every finished checkpoint
    held = lease.Lease(workdir).take()  # this process as the live writer
    try:
        assert encoder_lib.load(workdir, -1, mesh).step == steps[-2]
    finally:
        held.release()


def test_a_lease_left_by_a_dead_run_is_taken_over_and_a_fresh_one_from_another_host_is_not(
    pretrain_data, trained, tmp_path, capsys
):
    import socket
    import time

    from mvlp_jax.runtime import cli, lease

    data_dir, emb_dir, _ = pretrain_data
    workdir = _copy(trained, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = os.path.join(workdir, lease.FILE)
    stale = {
        "host": socket.gethostname(),
        "pid": dead.pid,
        "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": time.time(),
        "token": "killed-run",
    }
    with open(path, "w") as f:
        json.dump(stale, f)
    train.train(micro_config(data_dir, emb_dir, total_steps=6), workdir)
    assert f"taking over the lease of {workdir} from process {dead.pid}" in capsys.readouterr().out
    assert not os.path.exists(path)  # released at the end
    elsewhere = dict(stale, host="another-host", pid=1)
    with open(path, "w") as f:
        json.dump(elsewhere, f)
    with pytest.raises(cli.UserError, match="is being trained by process 1 on another-host"):
        train.train(micro_config(data_dir, emb_dir, total_steps=8), workdir)
    with open(path, "w") as f:
        json.dump(dict(elsewhere, heartbeat=time.time() - lease.STALE_AFTER_S - 1), f)
    assert train.train(micro_config(data_dir, emb_dir, total_steps=8), workdir).last_step == 8
