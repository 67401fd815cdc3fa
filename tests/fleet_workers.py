"""Stand-ins for app workers: real UnixSockServers on real sockets, serving real Stats snapshots.

Used by the fleet and CLI tests before (and besides) the real example app.
Each :class:`ScriptedWorker` binds ``<dir>/app-<pid>.sock`` under a made-up
pid and answers the worker commands the CLI relies on (``ping``, ``help``,
``stats``, log levels, settings, health, maintenance) the way the middleware
does, so that the CLI is exercised over the wire, without mocks.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unixsock_asgi import Response, UnixSockServer
from unixsock_asgi._stats import Stats

__all__ = ["Fleet", "ScriptedWorker", "make_stale_socket"]

_fake_pids = itertools.count(41000)

HELP = {
    "commands": [
        {"name": "ping", "doc": "Answer pong.", "readonly": True, "diagnostic": True, "args": []},
        {"name": "help", "doc": "List commands.", "readonly": True, "diagnostic": True, "args": []},
        {
            "name": "stats",
            "doc": "Request counts.",
            "readonly": True,
            "diagnostic": True,
            "args": [{"name": "routes", "type": "boolean", "required": False, "default": True}],
        },
        {
            "name": "set_log_level",
            "doc": "Set a logger's level.",
            "readonly": False,
            "diagnostic": True,
            "args": [
                {"name": "level", "type": "string", "required": True},
                {"name": "logger", "type": "string", "required": False, "default": ""},
                {"name": "ttl", "type": "number | null", "required": False, "default": None},
            ],
        },
        {
            "name": "get_log_level",
            "doc": "A logger's level.",
            "readonly": True,
            "diagnostic": True,
            "args": [{"name": "logger", "type": "string", "required": False, "default": ""}],
        },
        {
            "name": "set",
            "doc": "Set a setting.",
            "readonly": False,
            "diagnostic": True,
            "args": [
                {"name": "name", "type": "string", "required": True},
                {"name": "value", "type": "any", "required": True},
            ],
        },
    ]
}

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


class ScriptedWorker:
    """One worker's control socket, answering like the middleware does, with real Stats."""

    def __init__(
        self,
        directory: Path,
        *,
        pid: int | None = None,
        reply_delay_s: float = 0.0,
        requests_per_stats_call: int = 0,
    ) -> None:
        self.pid = next(_fake_pids) if pid is None else pid
        self.path = directory / f"app-{self.pid}.sock"
        self.stats = Stats()
        self.levels: dict[str, str] = {"": "WARNING"}
        self.settings: dict[str, Any] = {"greeting": "hello"}
        self.health_failing = False
        self.maintenance = False
        self.reply_delay_s = reply_delay_s
        # Simulated traffic: this many requests are counted before each stats answer,
        # so that successive snapshots (top's refreshes) differ.
        self.requests_per_stats_call = requests_per_stats_call
        self.commands_seen: list[tuple[str, dict[str, Any]]] = []
        # Figures a broken or hostile worker reports: put over its snapshot's, one level deep.
        self.stats_overrides: dict[str, Any] = {}
        self.server = UnixSockServer(str(self.path), self.handle)

    def record(self, *samples: tuple[str, int, float], method: str = "GET", exception: bool = False) -> None:
        """Count finished requests: ``(route, status, seconds)`` each."""
        for route, status, seconds in samples:
            self.stats.record(route, method, status, seconds, exception)

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        self.commands_seen.append((cmd, dict(args)))
        if self.reply_delay_s:
            await asyncio.sleep(self.reply_delay_s)
        if cmd == "ping":
            return "pong"
        if cmd == "help":
            return HELP
        if cmd == "stats":
            for _ in range(self.requests_per_stats_call):
                self.stats.record("/items/{item_id}", "GET", 200, 0.002, False)
            snapshot = self.stats.snapshot(routes=bool(args.get("routes", True)))
            snapshot["pid"] = self.pid  # every stand-in lives in the test process
            snapshot["control"] = {"health_failing": self.health_failing, "maintenance": self.maintenance}
            for key, value in self.stats_overrides.items():
                if isinstance(value, dict) and isinstance(snapshot.get(key), dict):
                    snapshot[key] = {**snapshot[key], **value}
                else:
                    snapshot[key] = value
            return snapshot
        if cmd == "set_log_level":
            level = str(args.get("level", "")).upper()
            if level not in _LEVELS:
                return Response.failure(f"unknown level {args.get('level')!r}")
            logger = args.get("logger") or ""
            old = self.levels.get(logger, "NOTSET")
            self.levels[logger] = level
            return {"logger": logger, "old": old, "new": level}
        if cmd == "get_log_level":
            logger = args.get("logger") or ""
            return {"logger": logger, "level": self.levels.get(logger, "NOTSET")}
        if cmd == "set":
            self.settings[args["name"]] = args["value"]
            return {"name": args["name"], "new": args["value"]}
        if cmd == "drain":  # takes its own timeout to answer, like a drain that waits for long requests
            await asyncio.sleep(float(args.get("timeout", 0)))
            return {"drained": True}
        if cmd in ("health_fail", "health_ok"):
            self.health_failing = cmd == "health_fail"
            return {"failing": self.health_failing}
        return Response.failure(f"unknown command {cmd!r}")

    def start(self) -> ScriptedWorker:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(timeout=2.0)


def make_stale_socket(path: Path) -> Path:
    """A socket file that nothing listens on, as a crashed worker leaves behind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


class Fleet:
    """Starts scripted workers in one socket directory; :meth:`stop_all` stops every one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.workers: list[ScriptedWorker] = []

    def start(self, count: int = 1, **options: Any) -> list[ScriptedWorker]:
        started = []
        for _ in range(count):
            worker = ScriptedWorker(self.directory, **options)
            self.workers.append(worker)
            started.append(worker.start())
        return started

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


FleetFactory = Callable[[], Fleet]


@pytest.fixture
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short, private socket directory (UNIX socket paths must fit in 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="usa-fleet-"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fleet(socket_dir: Path) -> Iterator[Fleet]:
    """Scripted workers in ``socket_dir``, all stopped when the test ends."""
    f = Fleet(socket_dir)
    try:
        yield f
    finally:
        f.stop_all()
