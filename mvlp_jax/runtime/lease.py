"""One writer per workdir: a training run's process 0 holds `WORKDIR/lease.json` (host, pid, start time,
heartbeat) from start to exit, so a second start on the same workdir refuses, naming the holder, instead of
interleaving two runs' checkpoints and curves.

A lease whose holder is gone is taken over with a log line: on this host, when its process no longer exists; from
another host (a shared or gs:// workdir), when its heartbeat is older than `STALE_AFTER_S`. Taking is atomic where
the store allows it (an exclusive create: O_EXCL locally, a create-only upload on gs://), so of two starts at once
one wins. Readers (evaluation, export, pictures) ask `holder()` and then read only sealed checkpoints.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from mvlp_jax.runtime import cli, storage

FILE = "lease.json"
HEARTBEAT_S = 60
STALE_AFTER_S = 600  # a holder on another host that has not beaten for this long is gone


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    heartbeat: float  # time.time() of the last beat
    token: str

    def describe(self) -> str:
        return (
            f"process {self.pid} on {self.host} (started {self.started}, last heartbeat "
            f"{max(time.time() - self.heartbeat, 0):.0f} s ago)"
        )


def _read(location: Any) -> Holder | None:
    try:
        return Holder(**json.loads(storage.path(location).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def alive(holder: Holder) -> bool:
    """Whether the holder still runs: its process exists (same host), or it beat recently (another host)."""
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - holder.heartbeat < STALE_AFTER_S


def holder(workdir: Any) -> Holder | None:
    """The live holder of `workdir`'s lease, or None."""
    found = _read(storage.join(workdir, FILE))
    return found if found is not None and alive(found) else None


class Lease:
    """Held from `take()` until `release()`; a background thread beats every HEARTBEAT_S seconds."""

    def __init__(self, workdir: Any):
        self.path = storage.join(workdir, FILE)
        self.workdir = workdir
        now = time.time()
        self.mine = Holder(
            socket.gethostname(),
            os.getpid(),
            datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds"),
            now,
            uuid.uuid4().hex,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Lease:
        """Takes the lease, or raises UserError naming the live holder. Returns self."""
        for _ in range(3):
            if storage.create_exclusive(self.path, self._bytes(self.mine)):
                break
            current = _read(self.path)
            if current is not None and alive(current):
                raise cli.UserError(
                    f"{self.workdir} is being trained by {current.describe()}: two runs in one workdir would mix "
                    f"their checkpoints and curves. Wait for it to finish or stop it (SIGTERM saves and exits), or "
                    f"choose another --workdir"
                )
            if current is not None:
                print(f"taking over the lease of {self.workdir} from {current.describe()}, which is gone", flush=True)
            storage.path(self.path).unlink(missing_ok=True)
        else:
            raise cli.UserError(
                f"{self.path}: another start keeps taking this workdir's lease; choose another --workdir"
            )
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _bytes(self, holder: Holder) -> bytes:
        return json.dumps(asdict(holder), indent=2).encode()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = _read(self.path)
            if current is None or current.token != self.mine.token:
                print(
                    f"WARNING: {self.path} is no longer this run's lease (now: "
                    f"{current.describe() if current else 'none'})",
                    flush=True,
                )
                return
            try:
                storage.write_bytes(self.path, self._bytes(Holder(**{**asdict(self.mine), "heartbeat": time.time()})))
            except Exception as error:  # noqa: BLE001 - a missed beat is retried; training goes on
                print(f"WARNING: lease heartbeat failed ({type(error).__name__}: {error})", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = _read(self.path)
        if current is not None and current.token == self.mine.token:
            storage.path(self.path).unlink(missing_ok=True)
