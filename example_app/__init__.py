"""A small but realistic Starlette shop API with a unixsock-asgi control socket.

Run it with ``python -m example_app`` (see ``--help``); the ASGI app is
``example_app.app:app`` and reads its socket directory from
``$EXAMPLE_APP_SOCKET_DIR``.
"""

from __future__ import annotations

import os

__all__ = ["SOCKET_NAME", "default_socket_dir"]

SOCKET_NAME = "example_app"


def default_socket_dir() -> str:
    """``$XDG_RUNTIME_DIR/example_app`` where there is one, else a per-user /tmp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, SOCKET_NAME)
    return f"/tmp/{SOCKET_NAME}-{os.getuid()}"
