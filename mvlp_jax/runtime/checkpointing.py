"""The one place that writes and reads checkpoints: orbax, holding the train state and data position.

A checkpoint is complete or absent (orbax finalises a local save by rename, a gs:// one by a commit marker), so
a run killed mid-save resumes from the previous one. Once a save has finished, the digests of its files are
sealed in `WORKDIR/checksums/STEP.json` (sha256 of a local file; the store's own MD5 of an object, read from a
listing); a restore verifies them first, so a checkpoint changed or cut short is never read as good. Restoring
takes the shardings of the *current* mesh, so a run can resume on a different mesh shape or device count. The
workdir may be local or `gs://` (mvlp_jax/runtime/storage.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import temporary_paths  # the pinned orbax's finder of unfinished saves

from mvlp_jax.runtime import lease, storage

CHECKSUMS = "checksums"


def checkpoints_dir(workdir: Any) -> epath.Path:
    return storage.path(workdir) / "checkpoints"


def finished_steps(workdir: Any) -> list[int]:
    """Steps of the finalised checkpoints (orbax's own test: renamed into place, or committed on gs://)."""
    return sorted(ocp.path.step.checkpoint_steps(checkpoints_dir(workdir)))


def sealed_steps(workdir: Any) -> list[int]:
    """Steps whose checksums were sealed after their save finished."""
    folder = storage.path(workdir) / CHECKSUMS
    names = [p.name[:-5] for p in folder.iterdir()] if folder.exists() else []
    return sorted(int(n) for n in names if n.isdigit())


def verify(workdir: Any, step: int) -> str | None:
    """None when checkpoint `step` matches its sealed checksums (or was never sealed); else what differs."""
    sealed = storage.path(workdir) / CHECKSUMS / f"{step}.json"
    if not sealed.exists():
        return None
    want = storage.read_json(sealed)
    have = storage.file_digests(checkpoints_dir(workdir) / str(step))
    for name, (size, digest) in want.items():
        if name not in have:
            return f"file {name} is missing"
        if have[name][0] != size:
            return f"file {name} has {have[name][0]} bytes, {size} when saved"
        if have[name][1] != digest:
            kind = digest.split(":")[0] if ":" in digest else "sha256"
            return f"file {name} has changed since it was saved ({kind} differs)"
    return None


class Store:
    """A workdir's checkpoints: orbax's manager, checksums sealed after each save, verified restores.
    `writer`: the training run that owns the workdir (it removes saves left unfinished by a killed run);
    readers (evaluation, export, pictures) change nothing."""

    def __init__(self, workdir: Any, config: ml_collections.ConfigDict, writer: bool = True):
        c = config.checkpoint
        self.workdir, self.writer = storage.path(workdir), writer
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=c.save_interval_steps,
            max_to_keep=c.max_to_keep,
            enable_async_checkpointing=c.async_save,
            create=writer,
            cleanup_tmp_directories=writer,
        )
        self.mngr = ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=("state", "data"))
        self._unsealed: list[int] = []

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether a save started. Refuses (OSError
        ENOSPC) before writing when a local disk cannot hold the checkpoint, rather than failing half-way."""
        if not (force or self.mngr.should_save(step)):
            return False
        self.seal()
        if not storage.is_remote(self.workdir):
            needed = sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count() + (1 << 20)
            free = shutil.disk_usage(checkpoints_dir(self.workdir)).free
            if free < needed:
                raise OSError(
                    errno.ENOSPC,
                    f"checkpoint {step} needs ~{needed / 2**20:.1f} MiB, the disk has {free / 2**20:.1f} MiB free",
                    os.fspath(checkpoints_dir(self.workdir)),
                )
        started = self.mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )
        if started:
            self._unsealed.append(step)
        return started

    def seal(self) -> None:
        """Waits for the running save, then writes the checksums of the checkpoints this process saved."""
        try:
            self.mngr.wait_until_finished()
        except ValueError as error:  # tensorstore reports a full disk from the background save this way
            if "os_error_code='28'" in str(error) or "No space left" in str(error):
                raise OSError(
                    errno.ENOSPC, "the background save ran out of space", os.fspath(checkpoints_dir(self.workdir))
                ) from error
            raise
        if jax.process_index() == 0:
            folder = self.workdir / CHECKSUMS
            finished = set(finished_steps(self.workdir))
            for step in self._unsealed:
                if step in finished:
                    storage.write_json(
                        folder / f"{step}.json", storage.file_digests(checkpoints_dir(self.workdir) / str(step))
                    )
            for stale in sealed_steps(self.workdir):  # checkpoints orbax has since deleted
                if stale not in finished:
                    (folder / f"{stale}.json").unlink(missing_ok=True)
        self._unsealed = []

    def set_aside(self, steps: list[int], folder: str) -> list[str]:
        """Moves checkpoints out of the run (to WORKDIR/folder/STEP), so no restore picks them; returns where."""
        self.mngr.wait_until_finished()
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                source = checkpoints_dir(self.workdir) / str(step)
                if source.is_dir():
                    target = self.workdir / folder / str(step)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if target.exists():
                        target.rmtree()
                    source.rename(target)
                    moved.append(os.fspath(target))
                (self.workdir / CHECKSUMS / f"{step}.json").unlink(missing_ok=True)
        self._unsealed = [s for s in self._unsealed if s not in steps]
        self.mngr.reload()
        return moved

    def remove_partial_saves(self) -> list[str]:
        """Deletes unfinished (never finalised) saves, e.g. after the disk filled up mid-save (orbax's own test
        of what is unfinished: a tmp-suffixed folder, or a gs:// step without its commit marker)."""
        partial = asyncio.run(temporary_paths.all_temporary_paths(checkpoints_dir(self.workdir)))
        for tmp in partial:
            tmp.get().rmtree()
        return [os.fspath(tmp.get()) for tmp in partial]

    def restore(
        self,
        state: Any,
        state_shardings: Any,
        step: int | None = None,
        fall_back: bool = False,
        step_flag: str = "--config.step",
        partial: bool = False,
    ) -> tuple[Any, dict] | None:
        """(state, data state) of checkpoint `step` (default: the newest) laid out with `state_shardings`; None
        when there is none. A checkpoint that fails its checksums (or cannot be read) raises ValueError naming
        the newest one that verifies (and `step_flag`, the caller's flag that picks it); with `fall_back`
        (resuming training) it is set aside under WORKDIR/corrupt_checkpoints/ with a loud warning and the next
        newest is restored instead. `partial`: `state` is a dict of some of the train state's fields (an
        encoder's parameters without the optimizer state), and only those are read. A reader of a workdir a run is
        writing (its lease is live) takes sealed checkpoints only, and passes over one the run deletes while it
        reads."""
        steps = sorted(self.mngr.all_steps())
        writing = not self.writer and lease.holder(self.workdir) is not None
        if writing:
            sealed = set(sealed_steps(self.workdir))
            steps = [s for s in steps if s in sealed]
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"no {'sealed ' if writing else ''}checkpoint {step} in "
                f"{checkpoints_dir(self.workdir)}; there are {steps}"
            )
        candidates = [step] if step is not None else steps[::-1]
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
        for candidate in candidates:
            where = checkpoints_dir(self.workdir) / str(candidate)
            problem = verify(self.workdir, candidate)
            if problem is None:
                try:
                    restored = self.mngr.restore(
                        candidate,
                        args=ocp.args.Composite(state=_restore_args(abstract, partial), data=ocp.args.JsonRestore()),
                    )
                    return restored["state"], dict(restored["data"])
                except (ValueError, KeyError) as error:
                    if "shape" in str(error).lower() or isinstance(error, KeyError):
                        raise ValueError(
                            f"checkpoint {where} does not fit the model of the config: {str(error)[:300]}"
                        ) from error
                    problem = f"it cannot be read ({type(error).__name__}: {str(error)[:200]})"
                except Exception as error:  # noqa: BLE001 - tensorstore reports a cut-short file as anything
                    problem = f"it cannot be read ({type(error).__name__}: {str(error)[:200]})"
            if writing and step is None and not where.exists():
                print(
                    f"checkpoint {where} was removed by the run while it was read (max_to_keep); taking the "
                    f"previous one",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            good = next((s for s in steps[::-1] if s < candidate and verify(self.workdir, s) is None), None)
            if not fall_back:
                offer = (
                    f"checkpoint {good} verifies: pass {step_flag}={good} to use it"
                    if good is not None
                    else "no earlier checkpoint verifies"
                )
                raise ValueError(f"checkpoint {where} is damaged: {problem}; {offer}")
            moved = self.set_aside([candidate], "corrupt_checkpoints")
            print(
                f"WARNING: checkpoint {where} is damaged ({problem}); moved it to {moved[0] if moved else '?'} "
                f"and resuming from the previous one instead",
                file=sys.stderr,
                flush=True,
            )
        return None

    def close(self) -> None:
        self.mngr.close()


def _restore_args(abstract: Any, partial: bool) -> ocp.args.CheckpointArgs:
    """How to read the saved train state into `abstract`: all of it, or (`partial`) only the fields it names,
    the rest left on disk unread."""
    if not partial:
        return ocp.args.StandardRestore(abstract)
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract
    )
    return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)


def describe_latest(workdir: Any) -> str:
    """Human pointer to the newest finalised checkpoint (for error messages)."""
    steps = finished_steps(workdir)
    return f"{checkpoints_dir(workdir)}/{steps[-1]}" if steps else f"none yet in {checkpoints_dir(workdir)}"
