"""The example app under gunicorn with uvicorn workers and ``--max-requests``: recycled workers."""

from __future__ import annotations

import importlib
from importlib.metadata import version
from pathlib import Path

import pytest

from .fleet_helpers import cli, cli_json, control, get_many, live_pids, wait_for_workers
from .harness import StartServer, reset_stats

pytestmark = pytest.mark.timeout(120)

MAX_REQUESTS = 40


def _own_control_socket(directory: Path) -> list[str]:
    """gunicorn 27's own control socket (the arbiter's, for gunicornc) in the test's directory:
    by default it goes to ~/.gunicorn, which tests leave alone."""
    config = importlib.import_module("gunicorn.config")
    return ["--control-socket", str(directory / "gunicorn.ctl")] if hasattr(config, "ControlSocket") else []


def test_recycled_gunicorn_workers_come_up_with_the_persisted_overrides(
    start_server: StartServer, short_dir: Path
) -> None:
    socket_dir = short_dir / "run"
    server = start_server(
        "-m", "gunicorn", "example_app.app:app", "-k", "uvicorn.workers.UvicornWorker", "-w", "3",
        "--max-requests", str(MAX_REQUESTS), "-b", "127.0.0.1:{port}", "--log-level", "warning",
        *_own_control_socket(short_dir),
        env={"EXAMPLE_APP_SOCKET_DIR": str(socket_dir)},
    )  # fmt: skip
    originals = wait_for_workers(socket_dir, 3)
    reset_stats(*originals.values())

    # Fewer requests than any worker may serve before recycling: the counts must add up exactly.
    paths = ["/items/3"] * 12 + ["/"] * 12
    assert get_many(server.url, paths) == [200] * len(paths)
    document = cli_json("send", str(socket_dir), "stats")
    assert sorted(r["pid"] for r in document["results"]) == sorted(originals)
    assert sum(r["payload"]["requests_total"] for r in document["results"]) == len(paths)
    assert document["total"]["requests_total"] == len(paths)
    servers = {r["payload"]["server"] for r in cli_json("send", str(socket_dir), "info")["results"]}
    assert servers == {f"gunicorn {version('gunicorn')} + uvicorn {version('uvicorn')}"}

    for argv in (
        ["set_log_level", "level=DEBUG", "logger=example_app"],
        ["set", "name=discount_percent", "value=15"],
    ):
        result = cli("send", str(socket_dir), *argv, "--persist")
        assert result.returncode == 0, result.stderr

    # Traffic until every original worker has been recycled by --max-requests (bounded).
    for _ in range(30):
        get_many(server.url, ["/health"] * 30, recycling=True)
        if not set(live_pids(socket_dir)) & set(originals):
            break
    recycled = wait_for_workers(socket_dir, 3, gone=set(originals))

    for socket in recycled.values():
        assert control(socket, "get_log_level", logger="example_app")["level"] == "DEBUG"
        assert control(socket, "get", name="discount_percent")["value"] == 15
    listing = cli_json("ls", str(socket_dir))
    assert listing["stale"] == []
    assert sorted(w["pid"] for w in listing["workers"]) == sorted(recycled)
