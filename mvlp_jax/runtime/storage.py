"""One path type for every location a user names (workdir, data, embeddings, outputs): a local folder or a
`gs://` URL alike, as an `etils.epath.Path`. Nothing here or elsewhere runs `os.path` on a URL.

Which client moves which bytes:
- files and folders: epath on fsspec's gcsfs (chosen below, before any gs:// path is touched: epath would
  otherwise go through tf.io.gfile, whose GCS client cannot be pointed at another server);
- checkpoint arrays: orbax's TensorStore; ArrayRecord shards (datasets, LLM targets): ArrayRecord's own GCS reader.
`MVLP_GCS_ENDPOINT=http://HOST:PORT` points all three at a GCS-protocol server instead of Google's (the tests'
server on 127.0.0.1, or `gcp-storage-emulator` to try a pod recipe on a laptop).

Object stores have no append and no folder rename. A file is written whole (`write_bytes`: an object appears
complete or not at all; a local file is renamed into place); files that grow (metrics.jsonl, TensorBoard
events) live in a local `Spool` uploaded whole at each flush; outputs that other tools write only to local
folders (Hugging Face `save_pretrained`, profiler traces, TFDS builds) are made in a local folder and copied
when complete (`copy_tree`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any

ENDPOINT_ENV = "MVLP_GCS_ENDPOINT"
REMOTE_SCHEMES = ("gs://",)

os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through fsspec (gcsfs) in epath, orbax, grain and TFDS
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC bucket-layout lookups per bucket

import fsspec  # noqa: E402 - after the environment above: gcsfs reads it when a filesystem is made
from etils import epath  # noqa: E402

from mvlp_jax.runtime import cli  # noqa: E402

# A listing cached by gcsfs goes stale when TensorStore writes a checkpoint beside it: always ask the store.
fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False


def use_endpoint(endpoint: str) -> None:
    """Sends every client's gs:// requests to the GCS-protocol server at `endpoint` (http://HOST:PORT), with no
    credential lookups; call it before the first gs:// access of the process (child processes inherit it)."""
    os.environ[ENDPOINT_ENV] = endpoint
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint  # gcsfs
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint  # orbax's TensorStore
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = endpoint  # ArrayRecord's GCS reader (google-cloud-cpp)
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "none"  # TensorStore: no credential lookup
    fsspec.config.conf["gs"]["token"] = "anon"  # gcsfs: likewise
    fsspec.get_filesystem_class("gs").clear_instance_cache()  # made anew with these settings


if os.environ.get(ENDPOINT_ENV):
    use_endpoint(os.environ[ENDPOINT_ENV])

Path = epath.Path


def is_remote(location: Any) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def path(location: Any) -> epath.Path:
    """The path of a location a user named: a URL as it is, a local path made absolute (`~` expanded)."""
    text = os.fspath(location) if not isinstance(location, str) else location
    if "://" in text and not is_remote(text):
        raise ValueError(f"{text}: only local paths and {', '.join(REMOTE_SCHEMES)} URLs are supported")
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(location: Any, *parts: str) -> str:
    """`location/part/...` as a string, for a URL or a local path."""
    return os.fspath(path(location).joinpath(*parts))


def _gcs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("gs")


def _bucket(location: Any) -> str:
    return str(location)[len("gs://") :].split("/", 1)[0]


def describe_failure(location: Any, error: BaseException) -> str:
    """Why `location` could not be reached, in words."""
    if is_remote(location):
        server = os.environ.get(ENDPOINT_ENV) or "storage.googleapis.com"
        reason = (str(error).splitlines() or [""])[0][:160]
        return (
            f"{location} cannot be reached ({type(error).__name__}: {reason}): check the bucket name "
            f"({_bucket(location)}), your credentials (gcloud auth application-default login) and the network "
            f"to {server}"
        )
    return f"{location}: {error}"


def check_writable_dir(location: Any, flag: str) -> epath.Path:
    """`location` is a folder (or can be made one) this process can write; returns its path. A remote one:
    its bucket answers and takes a small probe object (removed at once). Raises UserError naming the flag."""
    where = path(location)
    if not is_remote(where):
        cli.check_writable_dir(os.fspath(where), flag)
        return where
    probe = where / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        if not _gcs().exists(_bucket(where)):
            raise cli.UserError(
                f"{flag}={location}: bucket gs://{_bucket(where)} does not exist (or is not "
                f"visible to these credentials): create it or choose another {flag}"
            )
        probe.write_bytes(b"")
        probe.unlink()
    except cli.UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a store reports an unreachable server as many kinds
        raise cli.UserError(f"{flag}={location}: {describe_failure(where, error)}") from error
    return where


def check_exists(location: Any, what: str, missing: str = "") -> epath.Path:
    """`location` exists; else FileNotFoundError (`missing`, or "{what} {location} does not exist"), or a
    UserError when its store cannot be reached."""
    where = path(location)
    try:
        found = where.exists()
    except Exception as error:  # noqa: BLE001 - a store reports an unreachable server as many kinds
        raise cli.UserError(f"{what} {describe_failure(where, error)}") from error
    if not found:
        raise FileNotFoundError(missing or f"{what} {location} does not exist")
    return where


def write_bytes(location: Any, data: bytes) -> None:
    """Writes a whole file: complete or absent for any reader (a local file is renamed into place)."""
    target = path(location)
    if is_remote(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def create_exclusive(location: Any, data: bytes) -> bool:
    """Writes a new file at `location` only if none is there, atomically (a link into place locally, a create-only
    upload on gs://); False when one exists."""
    target = path(location)
    if is_remote(target):
        try:
            _gcs().pipe_file(os.fspath(target), data, mode="create")
            return True
        except Exception:  # noqa: BLE001 - the store's precondition failure, or a real error raised below
            if target.exists():
                return False
            raise
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def write_text(location: Any, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: Any, data: Any, **dump_options: Any) -> None:
    write_text(location, json.dumps(data, **dump_options))


def read_json(location: Any) -> Any:
    return json.loads(path(location).read_text())


def size(location: Any) -> int:
    """Bytes of the file at `location`."""
    return int(path(location).stat().length)


def save_figure(figure: Any, location: Any, **options: Any) -> str:
    """A matplotlib figure as a PNG at `location` (local or remote); returns the location."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **options)
    write_bytes(location, buffer.getvalue())
    return os.fspath(path(location))


def file_digests(folder: Any) -> dict[str, list]:
    """relative name -> [size, digest] of every file under `folder`: the sha256 of a local file; for an object,
    the MD5 (else CRC32C) the store computed when it was written, from one listing (no download)."""
    root = path(folder)
    if is_remote(root):
        return _object_checksums(root, recursive=True)
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = [os.path.getsize(full), file_digest(full)]
    return dict(sorted(out.items()))


def file_digest(location: Any) -> str:
    """What the bytes of one file are: the sha256 of a local file; an object's MD5 (else CRC32C) as the store
    computed it when it was written (no download)."""
    where = path(location)
    if is_remote(where):
        info = _gcs().info(os.fspath(where)[len("gs://") :])
        return f"md5:{info['md5Hash']}" if info.get("md5Hash") else f"crc32c:{info.get('crc32c')}"
    return sha256(where)


def sha256(location: Any) -> str:
    """The sha256 of the file at `location` (an object is read through)."""
    digest = hashlib.sha256()
    with path(location).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_versions(folder: Any) -> dict[str, list]:
    """name -> [size, version] of the files directly in `folder`, cheaply: a local file's mtime (ns), an
    object's checksum from one listing. Equal versions: the same file, for cache keys."""
    root = path(folder)
    if is_remote(root):
        return _object_checksums(root, recursive=False)
    return {
        entry.name: [entry.stat().st_size, entry.stat().st_mtime_ns]
        for entry in sorted(os.scandir(root), key=lambda e: e.name)
        if entry.is_file()
    }


def _object_checksums(root: epath.Path, recursive: bool) -> dict[str, list]:
    prefix = os.fspath(root)[len("gs://") :].rstrip("/") + "/"
    infos = (
        _gcs().find(prefix, detail=True)
        if recursive
        else {info["name"]: info for info in _gcs().ls(prefix, detail=True) if info["type"] == "file"}
    )
    return {
        name[len(prefix) :]: [
            int(info["size"]),
            f"md5:{info['md5Hash']}" if info.get("md5Hash") else f"crc32c:{info.get('crc32c')}",
        ]
        for name, info in sorted(infos.items())
    }


def canonical(location: Any) -> str:
    """One spelling per location, for keys and labels: a URL as it is, a local path resolved (links, `..`)."""
    where = path(location)
    return os.fspath(where).rstrip("/") if is_remote(where) else os.path.realpath(where)


def copy_tree(local: str, target: Any, last: tuple[str, ...] = ()) -> None:
    """Copies the files under local folder `local` into `target` (local or remote), keeping relative names, each
    written whole; the files named in `last` go after all others (a marker that makes the folder complete)."""
    names = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, files in os.walk(local) for f in files)
    root = path(target)
    for name in sorted(names, key=lambda n: n in last):
        with open(os.path.join(local, name), "rb") as f:
            write_bytes(root / name, f.read())


class Spool:
    """Files that grow by appends in a folder that may be remote (object stores have no append): a remote
    folder's files are written in a local spool and uploaded whole by `sync()`; a local folder is its own spool.
    `carried` names files whose earlier remote copy (a resumed run's metrics.jsonl) is fetched first, so appends
    continue it."""

    def __init__(self, target: Any, carried: tuple[str, ...] = ()):
        self.target = path(target)
        self.remote = is_remote(self.target)
        self.local = tempfile.mkdtemp(prefix="mvlp-spool-") if self.remote else os.fspath(self.target)
        os.makedirs(self.local, exist_ok=True)
        self._sent: dict[str, tuple[int, int]] = {}
        for name in carried if self.remote else ():
            source = self.target / name
            if source.exists():
                with open(os.path.join(self.local, name), "wb") as f:
                    f.write(source.read_bytes())
                self._sent[name] = self._stamp(name)

    def _stamp(self, name: str) -> tuple[int, int]:
        stat = os.stat(os.path.join(self.local, name))
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        """Uploads every spooled file changed since the last sync (nothing to do for a local folder)."""
        if not self.remote:
            return
        for dirpath, _, files in os.walk(self.local):
            for name in files:
                relative = os.path.relpath(os.path.join(dirpath, name), self.local)
                stamp = self._stamp(relative)
                if self._sent.get(relative) != stamp:
                    with open(os.path.join(self.local, relative), "rb") as f:
                        (self.target / relative).write_bytes(f.read())
                    self._sent[relative] = stamp

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
