"""Fleets of workers: socket directories, fan-out, aggregation and durable overrides.

Under ``uvicorn --workers N`` or gunicorn every worker is its own process with
its own control socket. In socket-directory mode each worker binds
``<dir>/<name>-<pid>.sock``; this module discovers them from the directory
alone (no master process), cleans up sockets that nothing answers any more,
and keeps the overrides file that later workers apply during startup.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any

from ._sockets import probe

__all__ = [
    "OVERRIDES_FILENAME",
    "load_overrides",
    "remove_stale_sockets",
]

logger = logging.getLogger("unixsock_asgi.fleet")

OVERRIDES_FILENAME = "overrides.json"


def _socket_files(directory: str) -> list[str]:
    """Every ``*.sock`` entry of ``directory`` that is a socket, sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    paths = []
    for name in names:
        if not name.endswith(".sock"):
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                paths.append(path)
        except OSError:
            continue  # vanished between listdir and lstat
    return paths


def remove_stale_sockets(directory: str) -> list[str]:
    """Remove the socket files in ``directory`` that nothing answers; return their paths.

    Only sockets whose connection is refused (or that vanish while probed) are
    removed; regular files and anything that is not a socket are never touched,
    and a socket that cannot be probed (permission denied) is left alone.
    """
    removed = []
    for path in _socket_files(directory):
        try:
            if probe(path) is not None:
                continue
        except OSError as exc:
            logger.debug("not removing %s: cannot probe it (%s)", path, exc)
            continue
        try:
            # Re-check right before unlinking: never remove something that is not a socket.
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot remove stale socket %s: %s", path, exc)
            continue
        logger.info("removed stale socket %s", path)
        removed.append(path)
    return removed


def overrides_path(directory: str) -> str:
    """Where the overrides file of a socket directory lives."""
    return os.path.join(directory, OVERRIDES_FILENAME)


def load_overrides(directory: str) -> list[dict[str, Any]]:
    """The persisted overrides of ``directory``, in the order to apply them.

    Each entry is ``{"cmd": str, "args": dict}``. A missing file yields ``[]``;
    an unreadable or corrupt file is logged as a warning and also yields ``[]``,
    because a bad overrides file must never stop a worker from starting.
    """
    path = overrides_path(directory)
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        logger.warning("ignoring overrides file %s: %s", path, exc)
        return []
    entries = document.get("overrides") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        logger.warning("ignoring overrides file %s: no 'overrides' list", path)
        return []
    result: list[dict[str, Any]] = []
    for entry in entries:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("cmd"), str)
            and isinstance(entry.get("args", {}), dict)
        ):
            result.append({"cmd": entry["cmd"], "args": dict(entry.get("args", {}))})
        else:
            logger.warning("ignoring malformed entry in overrides file %s: %r", path, entry)
    return result
