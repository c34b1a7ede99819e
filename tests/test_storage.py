"""Every location on gs://, against a GCS-protocol server on 127.0.0.1 (tests/gcs_server.py): a 2-process run
killed and resumed in the bucket equals an uninterrupted local run leaf by leaf; evaluation, export, pictures and
the embedding job read and write there; a changed object is caught; an unreachable store is a clear error. Every
test here fails if any process it starts contacts a host other than this machine."""

import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import checkpointing, storage
from tests import gcs_server
from tests.conftest import REPO
from tests.pretrain_setup import micro_config, write_config_file
from tests.test_precompute import _job_flags, _records, tiny_llama  # noqa: F401 - the fixture, shared
from tests.test_pretrain_runs import ONE_DEVICE, _finish, _main, _output


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs")
    server = gcs_server.start(str(root))
    previous = {k: os.environ.get(k) for k in server.env}
    os.environ.update({k: v for k, v in server.env.items() if k != "PYTHONPATH"})
    storage.use_endpoint(server.endpoint)
    restore_sockets = gcs_server.install_socket_guard(server.egress_log)
    yield server
    restore_sockets()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for key in (
        "STORAGE_EMULATOR_HOST",
        "TENSORSTORE_GCS_HTTP_URL",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    ):
        os.environ.pop(key, None)
    server.stop()


@pytest.fixture(autouse=True)
def nothing_but_loopback(gcs):
    """After each test: no process contacted another host, and no local folder is named like a URL."""
    before = set(glob.glob(os.path.join(REPO, "gs:*")))
    yield
    assert gcs.contacts_elsewhere() == [], gcs.contacts_elsewhere()
    assert set(glob.glob(os.path.join(REPO, "gs:*"))) == before == set()


def _env(gcs, **extra) -> dict:
    return {**ONE_DEVICE, **gcs.env, **extra}


@pytest.fixture(scope="module")
def remote_data(pretrain_data, gcs):
    """The micro pretraining data in the bucket: the dataset built straight into it (the same records as the
    local build), the embeddings uploaded."""
    from data_prep.build_dataset import build
    from mvlp_jax.data import built
    from mvlp_jax.tools.demo import DATASETS

    data_dir, emb_dir, _ = pretrain_data
    options = dict(DATASETS["covid_notes"], image_size=64)
    report = build("csv", options.pop("input_dir"), gcs.url("tfds"), name="covid_notes", **options)
    assert report["dataset_dir"] == gcs.url("tfds", "covid_notes", "1.0.0")
    local, remote = (
        built.open_split(built.open_builder(d, "covid_notes")[0], "train") for d in (data_dir, gcs.url("tfds"))
    )
    assert len(remote) == len(local) == 178
    for i in (0, 77, 177):
        assert remote[i]["image"] == local[i]["image"] and remote[i]["study_id"] == local[i]["study_id"]
    storage.copy_tree(emb_dir, gcs.url("emb"))
    return gcs.url("tfds"), gcs.url("emb")


def _two_processes(config_file: str, workdir: str, env: dict, port: int) -> list[subprocess.Popen]:
    return [
        _main(
            config_file,
            workdir,
            "--num_processes=2",
            f"--process_id={i}",
            f"--coordinator_address=127.0.0.1:{port}",
            env=env,
        )
        for i in range(2)
    ]


def _newest_state(workdir: str) -> tuple[dict, dict, int]:
    """(train state, data state, step) of the newest checkpoint of `workdir` (local or gs://), on one device,
    whatever mesh of whatever processes saved it."""
    mngr = ocp.CheckpointManager(
        storage.join(workdir, "checkpoints"),
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )
    step = mngr.latest_step()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), mngr.item_metadata(step)["state"]
    )
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    mngr.close()
    return restored["state"], dict(restored["data"]), step


def test_two_processes_train_killed_and_resumed_in_a_bucket_equal_an_uninterrupted_local_run(
    remote_data, gcs, tmp_path
):
    data_dir, emb_dir = remote_data
    steps = {"total_steps": 10, "checkpoint.save_interval_steps": 2, "log_every_steps": 1}
    remote_config = write_config_file(str(tmp_path / "remote.py"), data_dir, emb_dir, **steps)
    local_data, local_emb = tmp_path / "local_tfds", tmp_path / "local_emb"
    local_config = write_config_file(
        str(tmp_path / "local.py"),
        os.fspath(_download(data_dir, local_data)),
        os.fspath(_download(emb_dir, local_emb)),
        **steps,
    )
    env = _env(gcs)
    local = str(tmp_path / "local_run")
    for proc in _two_processes(local_config, local, env, gcs_server._free_port()):
        _finish(proc)
    workdir = gcs.url("runs", "two_processes")
    procs = _two_processes(remote_config, workdir, env, gcs_server._free_port())
    deadline = time.time() + 300
    while not [s for s in checkpointing.finished_steps(workdir) if s >= 4]:
        assert all(p.poll() is None for p in procs) and time.time() < deadline, _output(procs[0])[-3000:]
        time.sleep(0.2)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(checkpointing.finished_steps(workdir)) < 10, "the run finished before it could be killed"
    outs = [_finish(p) for p in _two_processes(remote_config, workdir, env, gcs_server._free_port())]
    assert f"resumed from {workdir}/checkpoints/" in outs[0], outs[0][-3000:]
    ref, ref_data, ref_step = _newest_state(local)
    got, got_data, got_step = _newest_state(workdir)
    assert ref_step == got_step == 10 and ref_data == got_data == {"next_step": 10, "seed": 0}
    jax.tree.map(np.testing.assert_array_equal, got, ref)  # every leaf of the train state, bitwise
    files = {p.name for p in storage.path(workdir).iterdir()}
    assert {"config.json", "metrics.jsonl", "loss_curve.png", "checkpoints", "checksums"} <= files
    events = [name for name in files if name.startswith("events.out.tfevents")]
    assert len(events) == 2  # one per start of process 0 (the killed one and the resumed one); none of process 1
    history = storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    steps_logged = [json.loads(line)["step"] for line in history]
    assert sorted(set(steps_logged)) == list(range(1, 11))
    assert steps_logged.count(1) == steps_logged.count(10) == 1  # process 0 alone writes the history
    assert sorted(checkpointing.sealed_steps(workdir)) == checkpointing.finished_steps(workdir)


def _download(remote: str, local) -> str:
    for name in storage.file_digests(remote):
        target = os.path.join(local, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(storage.path(f"{remote}/{name}").read_bytes())
    return local


@pytest.fixture(scope="module")
def remote_run(remote_data, gcs):
    """A micro run trained in-process on gs:// data into a gs:// workdir."""
    from mvlp_jax.pretrain import train

    workdir = gcs.url("runs", "in_process")
    train.train(micro_config(*remote_data, total_steps=4), workdir)
    return workdir


def test_evaluation_export_and_pictures_read_a_remote_workdir(remote_run, nih_and_workdir, gcs, tmp_path):
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.pretrain import visualize
    from mvlp_jax.runtime import sharding
    from mvlp_jax.tools import export
    from tests.test_evaluate import _probe_config

    nih_dir, _ = nih_and_workdir
    config = _probe_config(nih_dir, f"{remote_run},random_init")
    config.label_fractions, config.bootstrap = (1.0,), 50
    output = gcs.url("eval", "probe")
    results = evaluate.evaluate(config, output)
    assert [r["name"] for r in results["checkpoints"]] == ["in_process", "random_init"]
    assert results["checkpoints"][0]["workdir"] == remote_run
    written = {p.name for p in storage.path(output).iterdir()}
    assert {"results.json", "results.md", "auc_per_label.png", "features"} <= written
    assert storage.read_json(f"{output}/results.json")["checkpoints"][0]["step"] == 4
    cached = sorted(p.name for p in storage.path(f"{output}/features").iterdir())
    assert any(n.startswith("in_process-4-") and n.endswith(".npy") for n in cached)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(remote_run, -1, mesh)
    assert encoder.source == f"{remote_run}/checkpoints/4"
    card = export.export(encoder, gcs.url("exports", "in_process"), results=f"{output}/results.json")
    assert card == gcs.url("exports", "in_process", "README.md")
    text = storage.path(card).read_text()
    assert f"Exported from `{remote_run}/checkpoints/4`" in text and "mAUC" in text
    exported = {p.name for p in storage.path(gcs.url("exports", "in_process")).iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "heads.safetensors"} <= exported

    paths = visualize.draw_checkpoint(remote_run, count=2)
    assert paths and all(p.startswith(f"{remote_run}/plots/") for p in paths)
    from PIL import Image

    assert Image.open(io.BytesIO(storage.path(paths[0]).read_bytes())).size[0] > 100


def test_a_changed_object_in_a_remote_checkpoint_is_caught(remote_run):
    from mvlp_jax import configuration

    steps = checkpointing.finished_steps(remote_run)
    assert steps and checkpointing.sealed_steps(remote_run) == steps
    assert checkpointing.verify(remote_run, steps[-1]) is None
    sealed = storage.read_json(f"{remote_run}/checksums/{steps[-1]}.json")
    victim = max(sealed, key=lambda name: sealed[name][0])  # the largest file: array data
    target = storage.path(f"{remote_run}/checkpoints/{steps[-1]}/{victim}")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    target.write_bytes(bytes(data))
    assert checkpointing.verify(remote_run, steps[-1]) == f"file {victim} has changed since it was saved (md5 differs)"
    config, target_dim = configuration.load(remote_run)
    from mvlp_jax.runtime import sharding

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    with pytest.raises(ValueError, match=f"checkpoint {remote_run}/checkpoints/{steps[-1]} is damaged: file "):
        encoder_lib.load(remote_run, -1, mesh)
    target.write_bytes(
        bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1 :])
    )
    assert checkpointing.verify(remote_run, steps[-1]) is None  # the original bytes again
    del config, target_dim


def test_the_embedding_job_writes_and_resumes_its_shards_in_a_bucket(tiny_llama, gcs, tmp_path):  # noqa: F811
    model_dir, csv_path, _ = tiny_llama
    out = gcs.url("emb", "job")
    flags = [*_job_flags(model_dir, csv_path, out), "--records_per_shard=2", "--token_budget=60"]
    command = [sys.executable, "-m", "data_prep.precompute_text_embeddings", *flags]
    from mvlp_jax.data import embedding_shards

    proc = subprocess.Popen(command, cwd=REPO, env=_env(gcs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(embedding_shards.shard_paths(out)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(embedding_shards.shard_paths(out))
    assert 0 < done_before < 20, "the job should have been killed part-way"
    resumed = subprocess.run(command, cwd=REPO, env=_env(gcs), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("complete, skipped") == done_before
    clean = [f"--output_dir={tmp_path / 'clean'}" if a.startswith("--output_dir") else a for a in command]
    subprocess.run(clean, cwd=REPO, env=_env(gcs), check=True, capture_output=True, timeout=600)
    remote, local = _records(out), _records(tmp_path / "clean")
    assert remote.keys() == local.keys() and len(remote) >= 39
    for study in local:
        np.testing.assert_array_equal(remote[study]["mean"], local[study]["mean"])
    verified = subprocess.run([*command, "--verify"], cwd=REPO, env=_env(gcs), capture_output=True, text=True)
    assert verified.returncode == 0 and "verify: OK" in verified.stdout


def test_an_unreachable_store_is_a_clear_error_and_no_local_folder(remote_data, gcs, tmp_path, monkeypatch):
    data_dir, emb_dir = remote_data
    config_file = write_config_file(str(tmp_path / "c.py"), data_dir, emb_dir, total_steps=2)
    run = subprocess.run(
        [sys.executable, "-m", "mvlp_jax.main", f"--config={config_file}", "--workdir=gs://no-such-bucket/runs/x"],
        cwd=tmp_path,
        env=_env(gcs),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "--workdir=gs://no-such-bucket/runs/x: bucket gs://no-such-bucket does not exist" in run.stderr
    assert "Traceback" not in run.stderr and not glob.glob(str(tmp_path / "gs:*"))

    import gcsfs.retry

    async def no_wait(seconds):  # the client's backoff between its 6 tries, skipped
        return None

    monkeypatch.setattr(gcsfs.retry.asyncio, "sleep", no_wait)
    down = f"http://127.0.0.1:{gcs_server._free_port()}"
    storage.use_endpoint(down)
    try:
        from mvlp_jax.runtime import cli

        with pytest.raises(
            cli.UserError,
            match=r"--workdir=gs://mvlp-test/x: gs://mvlp-test/x cannot be reached "
            r"\(ClientConnectorError.*check the bucket name",
        ):
            storage.check_writable_dir(gcs.url("x"), "--workdir")
        with pytest.raises(cli.UserError, match="dataset gs://mvlp-test/tfds/covid_notes cannot be reached"):
            from mvlp_jax.data import built

            built.open_builder(data_dir, "covid_notes")
    finally:
        storage.use_endpoint(gcs.endpoint)
    assert not glob.glob("gs:*")
