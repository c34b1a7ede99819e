"""A GCS-protocol server on 127.0.0.1 for the storage tests (tests/gcs_emulator.py, in memory), and a guard
that fails a test whose processes try to reach any other host.

The guard has two halves: in Python processes a socket wrapper refuses (and logs) connections and name
lookups outside the loopback range (installed in this process by the fixture, in child processes by
tests/no_egress/sitecustomize.py); libcurl clients (TensorStore, ArrayRecord's GCS reader) are given an HTTP
proxy on 127.0.0.1 that passes on requests for loopback addresses and logs and refuses every other one.
"""

from __future__ import annotations

import http.client
import http.server
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD_DIR = os.path.join(REPO, "tests", "no_egress")


def _loopback(host: object) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def install_socket_guard(log_path: str):
    """Refuses and logs, in this process, every connection or name lookup outside the loopback range; returns
    the function that lifts the guard."""

    def record(what: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"pid {os.getpid()}: {what}\n")

    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def check(address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if isinstance(address, tuple) and not _loopback(host):
            record(f"connect {address}")
            raise ConnectionRefusedError(f"storage test guard: connection to {address} refused (loopback only)")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            record(f"lookup {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"storage test guard: lookup of {host} refused (loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    def lift() -> None:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
            real_connect,
            real_connect_ex,
            real_getaddrinfo,
        )

    return lift


class _Sink(http.server.BaseHTTPRequestHandler):
    """The proxy the libcurl clients are given: a request for a loopback address (some clients send even those
    through a proxy) is passed on; any other request is logged and refused."""

    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        body = self._body()
        if self.command == "CONNECT" or not _loopback(target.hostname):
            self.server.seen.append(f"{self.command} {self.path}")
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        path = target.path + (f"?{target.query}" if target.query else "")
        connection.request(self.command, path, body=body, headers=headers)
        reply = connection.getresponse()
        data = reply.read()
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_CONNECT = _handle

    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client killed mid-request (the tests kill runs on purpose)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GcsServer:
    """A running emulator: `bucket`, `endpoint`, `env` for child processes, and the guard's findings."""

    endpoint: str
    bucket: str
    process: subprocess.Popen
    egress_log: str
    sink: http.server.HTTPServer
    env: dict = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def contacts_elsewhere(self) -> list[str]:
        logged = open(self.egress_log).read().splitlines() if os.path.exists(self.egress_log) else []
        return logged + [f"proxied: {r}" for r in self.sink.seen]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.sink.shutdown()


def start(tmp_dir: str, bucket: str = "mvlp-test") -> GcsServer:
    """Starts the emulator on a free loopback port and the proxy sink; returns once the server answers."""
    port = _free_port()
    log = open(os.path.join(tmp_dir, "gcs_server.log"), "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator", f"--port={port}", f"--bucket={bucket}"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the GCS emulator did not start: {open(log.name).read()[-2000:]}") from None
            time.sleep(0.1)
    sink = _QuietServer(("127.0.0.1", 0), _Sink)
    sink.seen = []
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{sink.server_address[1]}"
    endpoint = f"http://127.0.0.1:{port}"
    egress_log = os.path.join(tmp_dir, "egress.log")
    env = {
        "MVLP_GCS_ENDPOINT": endpoint,
        "MVLP_EGRESS_LOG": egress_log,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "PYTHONPATH": os.pathsep.join([GUARD_DIR, REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return GcsServer(endpoint, bucket, process, egress_log, sink, env)
