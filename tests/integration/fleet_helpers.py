"""Helpers for the fleet integration tests: the real CLI, live workers, HTTP traffic."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from unixsock_asgi import Client
from unixsock_asgi._fleet import Target, fan_out

from .harness import REPO, wait_for

__all__ = ["cli", "cli_json", "control", "get_many", "live_pids", "wait_for_workers"]


def cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m unixsock_asgi ARGV`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "unixsock_asgi", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def cli_json(*argv: str) -> Any:
    """Run the CLI with ``--json``; it must exit 0."""
    result = cli(*argv, "--json")
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def live_pids(socket_dir: Path) -> dict[int, str]:
    """Pid -> socket of every worker in the directory that answers ping now."""
    outcome = asyncio.run(fan_out(Target(str(socket_dir), True).sockets(), "ping", timeout=2.0))
    return {r.pid: r.socket for r in outcome.results if r.ok and r.pid is not None}


def wait_for_workers(
    socket_dir: Path, count: int, *, gone: set[int] | None = None, timeout: float = 30
) -> dict[int, str]:
    """Poll until exactly ``count`` workers answer and none of ``gone`` is among them."""
    found: dict[int, str] = {}

    def ready() -> bool:
        nonlocal found
        found = live_pids(socket_dir)
        return len(found) == count and not (set(found) & (gone or set()))

    wait_for(ready, timeout, f"{count} live workers in {socket_dir} (not {sorted(gone or [])})", interval=0.1)
    return found


def control(socket: str, cmd: str, **args: Any) -> Any:
    """Ask one worker directly (not through the CLI); the command must succeed."""
    response = Client(socket, timeout=5.0).send(cmd, args)
    assert response is not None and response.ok, (cmd, response)
    return response.payload


def get_many(base_url: str, paths: list[str], threads: int = 6, *, recycling: bool = False) -> list[int]:
    """GET every path, each on a new connection so that the workers share them; return the statuses.

    With ``recycling``, a connection that a worker closed unanswered while it
    was being recycled (gunicorn ``--max-requests``) counts as status 0
    instead of failing the test.
    """

    def get(path: str) -> int:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            try:
                return http.get(path).status_code
            except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError):
                if not recycling:
                    raise
                return 0

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(get, paths))


def socket_files(socket_dir: Path) -> list[str]:
    """Names of the socket files in the directory, live or not."""
    return sorted(n for n in os.listdir(socket_dir) if n.endswith(".sock"))
