"""The one place that writes and reads checkpoints: orbax, holding the train state and data position.

A checkpoint is complete or absent (orbax finalises by rename), so a run killed mid-save resumes from
the previous one. Once a save has finished, the sha256 of each of its files is sealed in
`WORKDIR/checksums/STEP.json`; a restore verifies them first, so a checkpoint changed or cut short on
disk is never read as good. Restoring takes the shardings of the *current* mesh, so a run can resume
on a different mesh shape or device count.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKSUMS = "checksums"


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def finished_steps(workdir: str) -> list[int]:
    """Steps of the finalised checkpoints on disk (orbax renames a finished save to its step number)."""
    directory = checkpoints_dir(workdir)
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _file_digests(step_dir: str) -> dict[str, list]:
    out = {}
    for path in sorted(glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), digest.hexdigest()]
    return out


def verify(workdir: str, step: int) -> str | None:
    """None when checkpoint `step` matches its sealed checksums (or was never sealed); else what differs."""
    sealed = os.path.join(os.path.abspath(workdir), CHECKSUMS, f"{step}.json")
    if not os.path.exists(sealed):
        return None
    with open(sealed) as f:
        want = json.load(f)
    have = _file_digests(os.path.join(checkpoints_dir(workdir), str(step)))
    for name, (size, digest) in want.items():
        if name not in have:
            return f"file {name} is missing"
        if have[name][0] != size:
            return f"file {name} has {have[name][0]} bytes, {size} when saved"
        if have[name][1] != digest:
            return f"file {name} has changed since it was saved (sha256 differs)"
    return None


class Store:
    """A workdir's checkpoints: orbax's manager, checksums sealed after each save, verified restores."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        c = config.checkpoint
        self.workdir = os.path.abspath(workdir)
        options = ocp.CheckpointManagerOptions(save_interval_steps=c.save_interval_steps, max_to_keep=c.max_to_keep,
                                               enable_async_checkpointing=c.async_save, create=True)
        self.mngr = ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=("state", "data"))
        self._unsealed: list[int] = []

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether a save started. Refuses (OSError
        ENOSPC) before writing when the disk cannot hold the checkpoint, rather than failing half-way."""
        if not (force or self.mngr.should_save(step)):
            return False
        self.seal()
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count() + (1 << 20)
        free = shutil.disk_usage(checkpoints_dir(self.workdir)).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"checkpoint {step} needs ~{needed / 2**20:.1f} MiB, the disk has "
                          f"{free / 2**20:.1f} MiB free", checkpoints_dir(self.workdir))
        started = self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data_state)), force=force)
        if started:
            self._unsealed.append(step)
        return started

    def seal(self) -> None:
        """Waits for the running save, then writes the checksums of the checkpoints this process saved."""
        try:
            self.mngr.wait_until_finished()
        except ValueError as error:  # tensorstore reports a full disk from the background save this way
            if "os_error_code='28'" in str(error) or "No space left" in str(error):
                raise OSError(errno.ENOSPC, "the background save ran out of space",
                              checkpoints_dir(self.workdir)) from error
            raise
        if jax.process_index() == 0:
            directory = os.path.join(self.workdir, CHECKSUMS)
            os.makedirs(directory, exist_ok=True)
            on_disk = set(finished_steps(self.workdir))
            for step in self._unsealed:
                if step in on_disk:
                    _write_json(os.path.join(directory, f"{step}.json"),
                                _file_digests(os.path.join(checkpoints_dir(self.workdir), str(step))))
            for stale in glob.glob(os.path.join(directory, "*.json")):  # checkpoints orbax has since deleted
                name = os.path.basename(stale)[:-5]
                if name.isdigit() and int(name) not in on_disk:
                    os.remove(stale)
        self._unsealed = []

    def set_aside(self, steps: list[int], folder: str) -> list[str]:
        """Moves checkpoints out of the run (to WORKDIR/folder/STEP), so no restore picks them; returns where."""
        self.mngr.wait_until_finished()
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(checkpoints_dir(self.workdir), str(step))
                if os.path.isdir(source):
                    target = os.path.join(self.workdir, folder, str(step))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(source, target)
                    moved.append(target)
                sealed = os.path.join(self.workdir, CHECKSUMS, f"{step}.json")
                if os.path.exists(sealed):
                    os.remove(sealed)
        self._unsealed = [s for s in self._unsealed if s not in steps]
        self.mngr.reload()
        return moved

    def remove_partial_saves(self) -> list[str]:
        """Deletes unfinished (never finalised) save folders, e.g. after the disk filled up mid-save."""
        partial = [p for p in glob.glob(os.path.join(checkpoints_dir(self.workdir), "*"))
                   if os.path.isdir(p) and not os.path.basename(p).isdigit()]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return partial

    def restore(self, state: Any, state_shardings: Any, step: int | None = None,
                fall_back: bool = False) -> tuple[Any, dict] | None:
        """(state, data state) of checkpoint `step` (default: the newest) laid out with `state_shardings`; None
        when there is none. A checkpoint that fails its checksums (or cannot be read) raises ValueError naming
        the newest one that verifies; with `fall_back` (resuming training) it is set aside under
        WORKDIR/corrupt_checkpoints/ with a loud warning and the next newest is restored instead."""
        steps = sorted(self.mngr.all_steps())
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {self.mngr.directory}; there are {steps}")
        candidates = [step] if step is not None else steps[::-1]
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                state_shardings)
        for candidate in candidates:
            problem = verify(self.workdir, candidate)
            if problem is None:
                try:
                    restored = self.mngr.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
                    return restored["state"], dict(restored["data"])
                except (ValueError, KeyError) as error:
                    if "shape" in str(error).lower() or isinstance(error, KeyError):
                        raise ValueError(f"checkpoint {candidate} in {self.mngr.directory} does not fit the model "
                                         f"of the config: {str(error)[:300]}") from error
                    problem = f"it cannot be read ({type(error).__name__}: {str(error)[:200]})"
                except Exception as error:  # noqa: BLE001 - tensorstore reports a cut-short file as anything
                    problem = f"it cannot be read ({type(error).__name__}: {str(error)[:200]})"
            where = os.path.join(self.mngr.directory, str(candidate))
            good = next((s for s in steps[::-1] if s < candidate and verify(self.workdir, s) is None), None)
            if not fall_back:
                offer = (f"checkpoint {good} verifies: pass its step (e.g. --config.step={good}) to use it"
                         if good is not None else "no earlier checkpoint verifies")
                raise ValueError(f"checkpoint {where} is damaged: {problem}; {offer}")
            moved = self.set_aside([candidate], "corrupt_checkpoints")
            print(f"WARNING: checkpoint {where} is damaged ({problem}); moved it to {moved[0] if moved else '?'} "
                  f"and resuming from the previous one instead", file=sys.stderr, flush=True)
        return None

    def close(self) -> None:
        self.mngr.close()


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def describe_latest(workdir: str) -> str:
    """Human pointer to the newest finalised checkpoint (for error messages)."""
    steps = finished_steps(workdir)
    return f"{checkpoints_dir(workdir)}/{steps[-1]}" if steps else f"none yet in {checkpoints_dir(workdir)}"
