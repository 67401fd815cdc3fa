"""Real server processes for integration tests: start, wait until ready, always stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from unixsock_asgi import Client

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def reset_stats(*sockets: str | Path, timeout: float = 10) -> None:
    """``stats_reset`` on each worker once nothing is in flight there.

    A readiness probe's response reaches the harness before the server has
    counted the request (the middleware counts it after the response went
    out), so a reset sent at once could come first and the probe be counted after it.
    """
    for sock in sockets:
        client = Client(sock, timeout=5.0)

        def idle(client: Client = client) -> bool:
            reply = client.send("stats", {"routes": False})
            return reply is not None and reply.ok and reply.payload["in_flight"] == 0

        wait_for(idle, timeout, f"no request in flight on {sock}")
        reply = client.send("stats_reset")
        assert reply is not None and reply.ok, reply


@dataclass
class ServerProcess:
    """A running server subprocess and where to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            httpx.get(self.url + "/__ready__", timeout=0.5)
        except httpx.TransportError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process group, then SIGKILL if it lingers; return the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``python -m ARGS...`` with env overrides; every process is stopped afterwards."""
    started: list[ServerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, wait: bool = True, port: int | None = None
    ) -> ServerProcess:
        port = port or free_port()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log_path = tmp_path / f"server-{len(started)}.log"
        argv = [sys.executable, *[a.replace("{port}", str(port)) for a in args]]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = ServerProcess(proc, port, log_path, env or {})
        started.append(server)
        if wait:
            wait_for(server.http_ready, 30, f"HTTP on port {port}")
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
