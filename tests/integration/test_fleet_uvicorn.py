"""The example app with ``--workers 3`` under real uvicorn, operated through the CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .fleet_helpers import cli, cli_json, control, get_many, socket_files, wait_for_workers
from .harness import ServerProcess, StartServer, reset_stats, wait_for

pytestmark = pytest.mark.timeout(90)


def _three_workers(start_server: StartServer, socket_dir: Path) -> tuple[ServerProcess, dict[int, str]]:
    server = start_server(
        "-m", "example_app", "--port", "{port}", "--workers", "3", "--socket-dir", str(socket_dir),
        "--log-level", "warning",
    )  # fmt: skip
    return server, wait_for_workers(socket_dir, 3)


def test_stats_of_three_workers_add_up_and_a_log_level_reaches_every_one(
    start_server: StartServer, short_dir: Path
) -> None:
    socket_dir = short_dir / "run"
    server, workers = _three_workers(start_server, socket_dir)
    reset_stats(*workers.values())  # forget readiness probes

    paths = ["/items/1"] * 25 + ["/"] * 20 + ["/health"] * 15
    statuses = get_many(server.url, paths)
    assert statuses == [200] * len(paths)

    document = cli_json("send", str(socket_dir), "stats")
    results = document["results"]
    assert sorted(r["pid"] for r in results) == sorted(workers)
    assert all(r["status"] == "success" for r in results)
    assert sum(r["payload"]["requests_total"] for r in results) == len(paths)
    assert document["total"]["requests_total"] == len(paths)
    assert document["total"]["routes"]["/items/{item_id}"]["requests"] == 25
    assert document["total"]["latency"]["count"] == len(paths)

    result = cli("send", str(socket_dir), "set_log_level", "level=DEBUG", "logger=example_app")
    assert result.returncode == 0, result.stderr
    for socket in workers.values():
        assert control(socket, "get_log_level", logger="example_app")["level"] == "DEBUG"

    server.stop()
    result = cli("send", str(socket_dir), "stats")
    assert result.returncode == 2
    assert result.stderr.startswith("unixsock-asgi: error: nothing to talk to")


def test_a_killed_worker_is_replaced_without_stale_socket_and_with_the_persisted_overrides(
    start_server: StartServer, short_dir: Path
) -> None:
    socket_dir = short_dir / "run"
    _, workers = _three_workers(start_server, socket_dir)
    for argv in (
        ["set_log_level", "level=DEBUG", "logger=example_app"],
        ["set", "name=greeting", "value=persisted hello"],
        ["set_log_level", "level=WARNING", "logger=uvicorn.access"],
    ):
        result = cli("send", str(socket_dir), *argv, "--persist")
        assert result.returncode == 0, result.stderr
    assert len(cli_json("overrides", "show", str(socket_dir))["overrides"]) == 3

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    survivors_and_newcomer = wait_for_workers(socket_dir, 3, gone={victim})
    (newcomer,) = set(survivors_and_newcomer) - set(workers)

    # The newcomer's startup removed the socket its predecessor left behind.
    wait_for(lambda: f"example_app-{victim}.sock" not in socket_files(socket_dir), 10, "stale socket removal")
    listing = cli_json("ls", str(socket_dir))
    assert listing["stale"] == []
    assert sorted(w["pid"] for w in listing["workers"]) == sorted(survivors_and_newcomer)
    assert all(w["state"] == "live" for w in listing["workers"])

    socket = survivors_and_newcomer[newcomer]
    assert control(socket, "get_log_level", logger="example_app")["level"] == "DEBUG"
    assert control(socket, "get_log_level", logger="uvicorn.access")["level"] == "WARNING"
    assert control(socket, "get", name="greeting")["value"] == "persisted hello"

    # Clearing only affects workers started later: the running ones keep their state.
    assert cli("overrides", "clear", str(socket_dir)).returncode == 0
    assert control(socket, "get", name="greeting")["value"] == "persisted hello"
    assert cli_json("overrides", "show", str(socket_dir))["overrides"] == []
