"""Fixtures for the core tests: real servers on real UNIX sockets in temporary directories.

Every server or socket a test opens through these fixtures is closed in a
``finally`` when the test ends, whether it passed or not.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unixsock_asgi import RequestContext, Response, UnixSockServer

ServerFactory = Callable[..., UnixSockServer]
RawConnector = Callable[..., socket.socket]

_serials = itertools.count(1)
_connection_serials: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def connection_serial() -> int:
    """A number unique to the connection whose task is running (async handlers only).

    Async handlers run inside the connection's own task on the server loop, so
    the task identifies the connection; the weak map forgets closed ones.
    """
    task = asyncio.current_task()
    assert task is not None
    serial = _connection_serials.get(task)
    if serial is None:
        serial = _connection_serials[task] = next(_serials)
    return serial


async def default_handler(cmd: str, args: dict[str, Any], ctx: RequestContext) -> Any:
    """The handler most tests use: a handful of commands that exercise the server."""
    if cmd == "echo":
        return args
    if cmd == "ping":
        return "pong"
    if cmd == "sleep":
        await asyncio.sleep(float(args["seconds"]))
        return "slept"
    if cmd == "conn":
        return connection_serial()
    if cmd == "peer":
        return {"pid": ctx.peer.pid, "uid": ctx.peer.uid, "gid": ctx.peer.gid, "mode": ctx.mode}
    if cmd == "fail":
        return Response.failure(str(args.get("message", "asked to fail")))
    if cmd == "raise":
        raise RuntimeError(str(args.get("message", "boom")))
    return Response.failure(f"unknown command {cmd!r}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temporary directory, removed afterwards: UNIX socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="usa-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    """A free socket path inside this test's temporary directory (no socket file is left there)."""
    path = tmp_path / "ctl.sock"
    yield str(path)
    # Servers remove their own socket; the raw peers some tests bind here do not.
    if path.is_socket():
        path.unlink()


@pytest.fixture
def start_server(sock_path: str) -> Iterator[ServerFactory]:
    """Start servers (``start_server(handler, path=..., **options)``); all are stopped afterwards."""
    servers: list[UnixSockServer] = []

    def start(handler: Any = default_handler, *, path: str | None = None, **options: Any) -> UnixSockServer:
        server = UnixSockServer(path or sock_path, handler, **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        for server in servers:
            assert not server.running, "a server thread outlived stop()"


@pytest.fixture
def exiting_server(start_server: Callable[..., UnixSockServer]) -> Iterator[Callable[[str], str]]:
    """Start a server at a path that stops while it answers its first command (but ``help``): a
    worker exiting while it is asked (a deploy, ``--max-requests``). Returns the socket path."""
    release = threading.Event()
    stoppers: list[threading.Thread] = []

    def start(path: str) -> str:
        entered = threading.Event()

        def handler(cmd: str, args: dict[str, Any]) -> Any:
            if cmd == "help":  # what the shell asks first, for completion
                return {"commands": []}
            entered.set()
            release.wait(5)
            return "too late"

        server = start_server(handler, path=path)

        def stop_once_it_runs() -> None:
            entered.wait(5)
            server.stop()

        stoppers.append(threading.Thread(target=stop_once_it_runs))
        stoppers[-1].start()
        return server.path

    try:
        yield start
    finally:
        release.set()
        for stopper in stoppers:
            stopper.join(10)


@pytest.fixture
def connect_raw() -> Iterator[RawConnector]:
    """Open raw AF_UNIX stream sockets (``connect_raw(path, timeout=5.0)``); all are closed afterwards."""
    opened: list[socket.socket] = []

    def connect(path: str, timeout: float = 5.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(sock)
        sock.settimeout(timeout)
        sock.connect(path)
        return sock

    try:
        yield connect
    finally:
        for sock in opened:
            sock.close()


@pytest.fixture(autouse=True)
def _no_leaked_server_threads() -> Iterator[None]:
    """Fail a test that leaves a server loop thread of its own running."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.name == "unixsock-server"]
    assert not leaked, f"server threads still running: {leaked}"


@pytest.fixture
def full_backlog() -> Iterator[Callable[[str], socket.socket]]:
    """Listen on a path and accept nothing until the backlog is full: a stopped or hung
    server. Returns the listener; it and the queued connections are closed afterwards."""
    opened: list[socket.socket] = []

    def listen(path: str) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(listener)
        listener.bind(path)
        listener.listen(0)
        for _ in range(64):  # bounded: the kernel refuses once the backlog is full
            queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            queued.setblocking(False)
            opened.append(queued)
            try:
                queued.connect(path)
            except BlockingIOError:
                return listener
        raise AssertionError("the backlog never filled up")

    try:
        yield listen
    finally:
        for sock in opened:
            sock.close()
