"""The pretraining loop: build everything from the config, resume, step, log, checkpoint, stop cleanly."""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np

from mvlp_jax import configuration
from mvlp_jax.data import pipeline
from mvlp_jax.kernels import host_memory
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain import optim, startup, train_step, visualize
from mvlp_jax.runtime import checkpointing, cli, distributed, lease, observe, run_inputs, sharding, storage


class NonFiniteError(RuntimeError):
    """Raised after config.max_nonfinite_steps skipped updates in a row; `first_bad_step` is the first step
    whose weights gave a non-finite loss."""

    def __init__(self, message: str, first_bad_step: int = -1):
        super().__init__(message)
        self.first_bad_step = first_bad_step


class Preemption:
    """SIGTERM sets a flag; the loop saves at the next step and exits 0. All hosts agree on it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        print("SIGTERM received: saving a checkpoint at the next step, then exiting", flush=True)
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


@dataclass
class Outcome:
    state: Any
    stopped_early: bool  # preempted (SIGTERM) before total_steps
    last_step: int


def train(config: ml_collections.ConfigDict, workdir: str) -> Outcome:
    """Trains `config` in `workdir` (local or gs://), resuming from its newest checkpoint; process 0 holds the
    workdir's lease (one writer) from the first write to the end."""
    configuration.validate(config)
    workdir = os.fspath(storage.check_writable_dir(workdir, "--workdir"))
    if jax.process_index() == 0 and (holder := lease.holder(workdir)) is not None:
        raise cli.UserError(
            f"{workdir} is being trained by {holder.describe()}: wait for it to finish or stop it "
            f"(SIGTERM saves and exits), or choose another --workdir"
        )
    cache = observe.use_compilation_cache(config.compilation_cache_dir, workdir)
    mesh = sharding.make_mesh(config)
    startup.check_batch(config, mesh)
    records = pipeline.open_records(config)
    target_dim = records.table.dim if records.table else 0
    if memory := startup.check_host_memory(config, target_dim, jax.process_count()):
        _log(f"note: {memory}")
    changes = startup.check_resume(config, workdir, target_dim)  # before anything is written
    changed_inputs = startup.check_inputs(config, workdir, records.inputs)
    held, refused = None, ""
    if jax.process_index() == 0:
        try:
            held = lease.Lease(workdir).take()
        except cli.UserError as error:
            refused = str(error)
    if refused := distributed.from_process_0("mvlp_jax:lease", refused):
        raise cli.UserError(refused)
    try:
        return _train(config, workdir, mesh, records, target_dim, changes, changed_inputs, cache)
    finally:
        if held is not None:
            held.release()


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    records: pipeline.TrainRecords,
    target_dim: int,
    changes: dict,
    changed_inputs: list[str],
    cache: str | None,
) -> Outcome:
    if jax.process_index() == 0:
        startup.record(config, workdir, target_dim, changes, records.inputs, changed_inputs)
    for change in changed_inputs:
        _log(f"resuming on changed inputs ({run_inputs.OVERRIDE}): {change}")
    for key, (old, new) in changes.items():
        _log(f"resuming with {key} changed: {old!r} -> {new!r} (recorded in {workdir}/config_changes.json)")
    model = Pretrainer(config, target_dim)
    tx = optim.make(config)
    distributed.barrier("mvlp_jax:start_up")  # before the first collective, whatever each host's start-up took
    state, state_sh = train_step.create_state(model, tx, config, mesh)
    store = checkpointing.Store(workdir, config)
    data_state = {"next_step": 0, "seed": config.seed}
    restored = store.restore(state, state_sh, fall_back=True)
    if restored is not None:
        state, data_state = restored
        _log(f"resumed from {workdir}/checkpoints/{int(state.step)}")
    start = int(state.step)
    if data_state["next_step"] != start:
        raise ValueError(f"checkpoint at step {start} holds data position {data_state['next_step']}")

    batches = pipeline.local_batches(records, config, jax.process_index(), jax.process_count())
    data = pipeline.TrainIterator(batches, config)
    data.set_state(data_state)
    shapes = {k: jax.ShapeDtypeStruct((config.data.batch_size, *v.shape[1:]), v.dtype) for k, v in batches[0].items()}
    hint = host_memory.huge_page_malloc_hint() if jax.default_backend() == "cpu" else None
    if hint:
        _log(hint)
    if storage.is_remote(config.data.data_dir) and config.data.num_threads < 32:
        _log(
            f"hint: data.data_dir is on {config.data.data_dir.split('/')[0]}//, read one request per record: "
            f"--config.data.num_threads=64 (now {config.data.num_threads}) keeps more requests in flight"
        )
    examples = "volumes" if config.model.encoder == "vit3d" else "studies" if config.data.max_views > 1 else "images"
    _log(
        f"{records.where}: {len(records.indices)} training {'series' if examples == 'volumes' else examples}; "
        f"mesh {dict(mesh.shape)}; "
        f"{configuration_summary(config)}; compiling the train step..."
    )
    with observe.CompileTimer() as timer:
        compiled = train_step.compile_train_step(
            train_step.make_train_step(model, tx, config), state, state_sh, mesh, shapes
        )
    _log(f"train step ready in {timer.seconds:.1f} s ({timer.describe(cache)})")
    flops = observe.step_flops(compiled) * train_step.cyclic_flops_share(
        model, tx, config, state, state_sh, mesh, shapes
    )
    reporter = observe.Reporter(
        workdir,
        config.total_steps,
        config.data.batch_size,
        flops,
        observe.peak_flops_per_device(config.peak_flops_per_device),
        start,
        examples,
    )
    if start == 0:
        reporter.write_hparams(configuration.flatten(config))
    draw = _image_logger(config, target_dim, records, workdir, reporter, mesh)
    profile = observe.ProfileWindow(config.profile_steps, workdir)
    preemption = Preemption()
    step, pending, stopped = start, None, False
    interval = observe.IntervalMeans()
    try:
        while step < config.total_steps:
            profile.before(step + 1)
            state, metrics = compiled(state, sharding.global_batch(next(data), mesh))
            step += 1
            profile.after(step, metrics)
            if pending is not None:  # last step's counter: checked one step late to keep dispatch async
                _check_finite(pending, config)
            pending = (step, metrics["nonfinite_run"])  # metrics are not donated; the state is
            interval.add(metrics)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                reporter.report(step, interval.means())
            if draw and (step % config.log_images_every_steps == 0 or step == config.total_steps):
                draw(step, state.params)
            if preemption.agreed() or store.mngr.reached_preemption(step):
                store.save(step, state, data.get_state(), force=True)
                stopped = step < config.total_steps
                break
            store.save(step, state, data.get_state(), force=step == config.total_steps)
        if pending is not None:
            _check_finite(pending, config)
        store.seal()
    except NonFiniteError as error:
        raise NonFiniteError(
            _set_aside_diverged(store, error.first_bad_step, str(error)), error.first_bad_step
        ) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _wait_quietly(store)
        partial = store.remove_partial_saves()
        what = os.strerror(error.errno) if error.errno else str(error)
        if error.strerror and error.strerror != what:
            what += f" ({error.strerror})"
        raise OSError(
            error.errno,
            f"{what} while saving a checkpoint; removed {len(partial)} unfinished "
            f"checkpoint folder(s); the last complete checkpoint is "
            f"{checkpointing.describe_latest(workdir)}: free space (or choose another --workdir), then "
            f"rerun to resume from it",
            error.filename,
        ) from error
    finally:
        _wait_quietly(store)
        preemption.restore()
        profile.close()
        reporter.close()
    if jax.process_index() == 0:
        plot = observe.plot_losses(workdir)
        _log(
            ("preempted: saved" if stopped else "done: saved")
            + f" step {step} in {workdir}/checkpoints"
            + (f"; loss curve {plot}" if plot else "")
        )
    store.close()
    return Outcome(state, stopped, step)


def _image_logger(
    config: ml_collections.ConfigDict,
    target_dim: int,
    records: pipeline.TrainRecords,
    workdir: str,
    reporter: observe.Reporter,
    mesh: jax.sharding.Mesh,
):
    """(step, params) -> draws visualize.py's pictures; None when log_images_every_steps is 0 or several
    processes train (the pictures are drawn by one process from whole arrays: use the visualize command)."""
    if not config.log_images_every_steps:
        return None
    if jax.process_count() > 1:
        _log(
            "log_images_every_steps: pictures are drawn in single-process runs only; run python -m "
            "mvlp_jax.visualize --workdir=... on a checkpoint instead"
        )
        return None

    painter = visualize.Painter(config, target_dim)
    shown = visualize.shown_images(config, 8, "", records.table)

    def draw(step: int, params) -> None:
        with sharding.active(mesh):
            visualize.save(painter.draw(params, shown), workdir, step, reporter.writer)

    return draw


def _check_finite(pending: tuple, config: ml_collections.ConfigDict) -> None:
    step, run = pending
    run = int(run)
    if run >= config.max_nonfinite_steps:
        # Step `step - run + 1` was the first with a non-finite loss, computed on the weights of step `step - run`:
        # those weights, and every checkpoint from them on, are bad.
        raise NonFiniteError(
            f"{run} updates in a row up to step {step} had a non-finite loss or gradient and were "
            f"skipped (max_nonfinite_steps={config.max_nonfinite_steps})",
            first_bad_step=step - run,
        )


def _set_aside_diverged(store: checkpointing.Store, first_bad: int, what: str) -> str:
    """Moves the checkpoints holding weights that gave a non-finite loss out of the run; says what to do."""
    _wait_quietly(store)  # a save still in flight may be one of them
    store.mngr.reload()
    moved = store.set_aside([s for s in store.mngr.all_steps() if s >= first_bad], "nonfinite_checkpoints")
    good = [s for s in store.mngr.all_steps() if s < first_bad]
    store.seal()
    aside = (
        f"; checkpoints from step {first_bad} on hold the diverged weights and were moved to "
        f"{moved[0].rsplit('/', 1)[0]}"
        if moved
        else ""
    )
    if good:
        return (
            f"{what}{aside}. The last checkpoint written before the loss went bad is "
            f"{checkpointing.checkpoints_dir(store.workdir)}/{good[-1]}: lower --config.optim.lr (or check the "
            f"data), then rerun with the same --workdir to resume from it"
        )
    return (
        f"{what}{aside}. No checkpoint was written before the loss went bad: lower --config.optim.lr (or check "
        f"the data) and start again"
    )


def _wait_quietly(store: checkpointing.Store) -> None:
    try:
        store.mngr.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - already reported by the error being raised
        print(f"(the background save failed too: {type(error).__name__})", flush=True)


def configuration_summary(config: ml_collections.ConfigDict) -> str:
    weights = ", ".join(f"{k} x{v}" for k, v in sorted(config.objectives.items()))
    schedule = f" ({config.task_schedule})" if len(config.objectives) > 1 else ""  # one objective: no schedule
    return (
        f"{config.model.encoder} {config.model.variant} @ {config.model.image_size}, {weights}{schedule}, "
        f"batch {config.data.batch_size}, {config.total_steps} steps"
    )


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
