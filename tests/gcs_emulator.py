"""`python -m tests.gcs_emulator --port=P --bucket=B`: gcp-storage-emulator in memory, with the conditional reads
and writes of GCS's JSON API that it skips and that TensorStore's OCDBT checkpoints and the workdir lease rely
on: an object read answers `x-goog-generation` and honours ifGenerationMatch / ifGenerationNotMatch (412 / 304),
an object write honours ifGenerationMatch (412), as GCS does."""

from __future__ import annotations

import argparse
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage


def _generation(storage: Storage, bucket: str, name: str) -> str | None:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _precondition_fails(request, current: str | None) -> HTTPStatus | None:
    match = request.query.get("ifGenerationMatch", [None])[0]
    if match is not None and (current or "0") != match:
        return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if not_match is not None and current is not None and current == not_match:
        return HTTPStatus.NOT_MODIFIED
    return None


_ORIGINAL = {"download": objects.download, "insert": objects.insert}


def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    current = _generation(storage, bucket, name)
    if current is not None:
        failed = _precondition_fails(request, current)
        if failed:
            response.status = failed
            return None
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = current
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return _ORIGINAL["download"](request, response, storage)


def insert(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    if name is None and isinstance(request.data, dict):
        name = request.data.get("meta", {}).get("name") or request.data.get("name")
    if name is not None and "ifGenerationMatch" in request.query:
        current = _generation(storage, request.params["bucket_name"], name)
        if _precondition_fails(request, current) == HTTPStatus.PRECONDITION_FAILED:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            return None
    return _ORIGINAL["insert"](request, response, storage)


def _patch_handlers() -> None:
    """Routes the emulator's object reads and uploads through the wrappers above."""
    replace = {_ORIGINAL["download"]: download, _ORIGINAL["insert"]: insert}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = replace.get(handler, handler)
    objects.download = download  # objects.get serves ?alt=media reads through this name
    objects.insert = insert  # the router's fallback for uploads posted without the /upload prefix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
    _patch_handlers()
    print(f"GCS emulator on 127.0.0.1:{args.port}, bucket {args.bucket}", flush=True)
    server.create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == "__main__":
    main()
