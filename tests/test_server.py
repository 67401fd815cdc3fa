"""UnixSockServer over real UNIX sockets: concurrency, framing, bad input, limits, binding, handlers."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unixsock_asgi import (
    BindError,
    Client,
    ControlSocketMiddleware,
    PeerCredentials,
    RequestContext,
    Response,
    ServerConfig,
    TransportError,
    UnixSockServer,
    _compat,
)
from unixsock_asgi import _server as server_module
from unixsock_asgi._protocol import encode_frame

pytestmark = pytest.mark.timeout(30)

# The shapes of the conftest fixtures ``start_server`` and ``connect_raw``.
ServerFactory = Callable[..., UnixSockServer]
RawConnector = Callable[..., socket.socket]

NOBODY = 65534


# -- raw wire helpers ------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    header = recv_exact(sock, 5)
    assert header[4:5] == b":", header
    (length,) = struct.unpack(">I", header[:4])
    obj = json.loads(recv_exact(sock, length))
    assert isinstance(obj, dict)
    return obj


def recv_response(sock: socket.socket) -> dict[str, Any]:
    """The ``response`` object of the next frame reply."""
    response = recv_frame(sock)["response"]
    assert isinstance(response, dict)
    return response


def recv_line(sock: socket.socket) -> dict[str, Any]:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"EOF inside a line: {bytes(data)!r}")
        data += chunk
    obj = json.loads(data)
    assert isinstance(obj, dict)
    return obj


def assert_eof(sock: socket.socket) -> None:
    """The server closed the connection without sending anything more (times out otherwise)."""
    assert sock.recv(1) == b""


def send_frame(sock: socket.socket, obj: Any) -> None:
    sock.sendall(encode_frame(obj))


def header(length: int) -> bytes:
    return struct.pack(">I", length) + b":"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def ping_ok(path: str) -> bool:
    response = Client(path, timeout=5).send("ping")
    return response is not None and response.ok and response.payload == "pong"


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Records at ERROR or above from the server logger (there should be none)."""
    caplog.set_level(logging.DEBUG, logger="unixsock_asgi.server")
    records: list[logging.LogRecord] = []
    yield records
    records.extend(
        r for r in caplog.records if r.name == "unixsock_asgi.server" and r.levelno >= logging.ERROR
    )
    assert not records, [r.getMessage() for r in records]


# -- concurrency and persistent connections --------------------------------


def test_hundred_concurrent_clients_each_get_their_own_answer(start_server: ServerFactory) -> None:
    n = 100
    arrived = 0
    gate: asyncio.Event | None = None

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        # Hold every reply until all 100 requests are in, so they truly overlap.
        nonlocal arrived, gate
        if gate is None:
            gate = asyncio.Event()
        arrived += 1
        if arrived == n:
            gate.set()
        await asyncio.wait_for(gate.wait(), 20)
        return {"value": args["value"], "cmd": cmd}

    server = start_server(handler, max_connections=n)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            response = Client(server.path, timeout=25).send("echo", {"value": f"v{i}"})
            assert response is not None
            results[i] = response.payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(28)
    assert not errors, errors[:3]
    assert results == {i: {"value": f"v{i}", "cmd": "echo"} for i in range(n)}


def test_hundred_concurrent_async_clients(start_server: ServerFactory) -> None:
    from unixsock_asgi import AsyncClient

    server = start_server(max_connections=128)

    async def one(i: int) -> list[Any]:
        async with AsyncClient(server.path, close=False) as client:
            out = []
            for j in range(3):
                response = await client.send("echo", {"i": i, "j": j})
                assert response is not None
                out.append(response.payload)
            return out

    async def main() -> list[list[Any]]:
        return await asyncio.gather(*(one(i) for i in range(100)))

    results = asyncio.run(main())
    assert results == [[{"i": i, "j": j} for j in range(3)] for i in range(100)]


def test_many_requests_on_one_persistent_connection(start_server: ServerFactory) -> None:
    server = start_server()
    with Client(server.path, close=False) as client:
        serials = set()
        for i in range(200):
            response = client.send("echo", {"i": i})
            assert response is not None
            assert response.payload == {"i": i}
            conn = client.send("conn")
            assert conn is not None
            serials.add(conn.payload)
    assert len(serials) == 1


def test_pipelined_requests_are_answered_in_order(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(b"".join(encode_frame({"cmd": "echo", "args": {"i": i}, "close": False}) for i in range(20)))
    assert [recv_response(sock)["payload"] for _ in range(20)] == [{"i": i} for i in range(20)]
    send_frame(sock, {"cmd": "ping"})
    assert recv_response(sock)["payload"] == "pong"
    assert_eof(sock)


def test_pipelined_requests_mixing_suspending_and_immediate_handlers_keep_their_order(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # Most requests are answered in the read callback; one whose handler
    # suspends is handed to the connection's task with everything behind it.
    server = start_server()
    sock = connect_raw(server.path)
    requests: list[dict[str, Any]] = []
    for i in range(12):
        if i % 4 == 1:
            requests.append({"cmd": "sleep", "args": {"seconds": 0.02}, "close": False})
        elif i % 4 == 3:
            requests.append({"cmd": "conn", "close": False})
        else:
            requests.append({"cmd": "echo", "args": {"i": i}, "close": False})
    sock.sendall(b"".join(encode_frame(r) for r in requests))
    payloads = [recv_response(sock)["payload"] for _ in requests]
    assert payloads[0::4] == [{"i": i} for i in range(0, 12, 4)]
    assert payloads[2::4] == [{"i": i} for i in range(2, 12, 4)]
    assert payloads[1::4] == ["slept"] * 3
    # Before and after a suspension, a handler runs in the same connection task.
    assert len(set(payloads[3::4])) == 1
    send_frame(sock, {"cmd": "ping"})
    assert recv_response(sock)["payload"] == "pong"
    assert_eof(sock)


def test_handlers_run_in_a_task_from_their_first_step(start_server: ServerFactory) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        task = asyncio.current_task()
        if cmd == "timeout":  # asyncio.timeout needs the current task at once
            try:
                async with _compat.timeout(float(args["seconds"])):
                    await asyncio.sleep(5)
            except TimeoutError:
                return "timed out inside"
        if cmd == "cancel-self":
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        return task is not None and not task.done()

    server = start_server(handler, handler_timeout=2)
    with Client(server.path, close=False) as client:
        assert client.send("task").payload is True  # type: ignore[union-attr]
        assert client.send("timeout", {"seconds": 0.05}).payload == "timed out inside"  # type: ignore[union-attr]
        assert client.send("task").payload is True  # type: ignore[union-attr]
    # A handler that cancels its own task ends its connection, not the server.
    with Client(server.path, close=False) as client, pytest.raises(TransportError):
        client.send("cancel-self")
    with Client(server.path) as client:
        assert client.send("task").payload is True  # type: ignore[union-attr]


CONTEXT_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_server_var", default="unset")


def test_context_variables_set_in_a_first_step_outlive_the_suspension(start_server: ServerFactory) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        token = CONTEXT_VAR.set(str(args["value"]))
        await asyncio.sleep(0.01)
        seen = CONTEXT_VAR.get()
        CONTEXT_VAR.reset(token)  # a token made before the await is valid after it
        return [seen, CONTEXT_VAR.get()]

    server = start_server(handler)
    with Client(server.path, close=False) as client:
        assert client.send("ctx", {"value": "A"}).payload == ["A", "unset"]  # type: ignore[union-attr]
        assert client.send("ctx", {"value": "B"}).payload == ["B", "unset"]  # type: ignore[union-attr]


def test_a_cancellation_requested_in_the_first_step_reaches_the_handler(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The cancel is scheduled before the handler first suspends; it must be
    # delivered where the handler waits, not to the connection.
    async def handler(cmd: str, args: dict[str, Any]) -> str:
        if cmd == "past-deadline":
            try:
                async with _compat.timeout(0):
                    await asyncio.sleep(5)
            except TimeoutError:
                return "timed out inside"
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            _compat.uncancel(task)
            return "caught its own cancel"
        return "not cancelled"

    caplog.set_level(logging.ERROR, logger="asyncio")
    server = start_server(handler)
    with Client(server.path, close=False) as client:
        assert client.send("past-deadline").payload == "timed out inside"  # type: ignore[union-attr]
        assert client.send("self-cancel").payload == "caught its own cancel"  # type: ignore[union-attr]
        assert client.send("past-deadline").payload == "timed out inside"  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_a_closing_reply_too_big_for_one_write_goes_out_whole(
    start_server: ServerFactory, connect_raw: RawConnector, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> str:
        return "x" * 1_000_000

    caplog.set_level(logging.ERROR, logger="asyncio")
    server = start_server(handler)
    for _ in range(3):
        sock = connect_raw(server.path)
        send_frame(sock, {"cmd": "big", "close": True})
        assert len(recv_response(sock)["payload"]) == 1_000_000
        assert_eof(sock)
    with Client(server.path) as client:
        assert len(client.send("again").payload) == 1_000_000  # type: ignore[union-attr]
    server.stop()
    gc.collect()  # a task whose exception nobody retrieved is reported when it is collected
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_requests_pipelined_behind_a_closing_one_end_in_eof_not_a_reset(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server()
    for first in ({"cmd": "sleep", "args": {"seconds": 0.02}, "close": True}, {"cmd": "ping", "close": True}):
        sock = connect_raw(server.path)
        sock.sendall(
            encode_frame(first) + b"".join(encode_frame({"cmd": "ping", "close": False}) for _ in range(5))
        )
        recv_response(sock)
        assert sock.recv(1) == b""  # EOF; unread input would have made the kernel reset the connection


def test_requests_are_served_through_the_connection_task_when_eager_steps_are_unavailable(
    start_server: ServerFactory, connect_raw: RawConnector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The eager first step relies on asyncio.tasks._enter_task; without it
    # every request is handed to the connection's task, with the same results.
    monkeypatch.setattr(server_module, "_enter_task", None)
    server = start_server()
    sock = connect_raw(server.path)
    requests = [{"cmd": "echo", "args": {"i": i}, "close": False} for i in range(5)]
    requests.insert(2, {"cmd": "sleep", "args": {"seconds": 0.01}, "close": False})
    requests += [{"cmd": "conn", "close": False}, {"cmd": "conn", "close": False}]
    sock.sendall(b"".join(encode_frame(r) for r in requests))
    payloads = [recv_response(sock)["payload"] for _ in requests]
    assert payloads[:7] == [{"i": 0}, {"i": 1}, "slept", {"i": 2}, {"i": 3}, {"i": 4}, payloads[6]]
    assert payloads[6] == payloads[7]
    send_frame(sock, {"cmd": "nope"})
    assert recv_response(sock)["status"] == "failure"
    assert_eof(sock)


def test_peer_that_stops_reading_is_dropped_after_the_write_timeout(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> str:
        return "x" * int(args["size"])  # a small request, a big reply

    server = start_server(handler, timeout=0.5)
    sock = connect_raw(server.path)
    count, size = 200, 100_000  # 20 MB of replies: far more than the socket buffers hold
    sock.sendall(
        b"".join(encode_frame({"cmd": "big", "args": {"size": size}, "close": False}) for _ in range(count))
    )
    time.sleep(1.5)  # never read: the server must give up, not buffer every reply
    with Client(server.path) as client:
        assert client.send("big", {"size": 3}).payload == "xxx"  # type: ignore[union-attr]
    received = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += len(chunk)
    assert time.monotonic() < deadline
    assert 0 < received < count * size // 4


@pytest.mark.parametrize("mode", ["line", "frame"])
def test_requests_pipelined_by_a_peer_that_does_not_read_stay_bytes(
    start_server: ServerFactory, connect_raw: RawConnector, mode: str
) -> None:
    """A peer that pipelines tiny requests and never reads its replies costs the
    server what it sent, not an object per request: requests are parsed as they
    are answered, and reading stops once the replies back up."""
    server = start_server(timeout=5)
    one = b"nope\n" if mode == "line" else encode_frame({"cmd": "nope", "close": False})
    flood = one * ((1 << 20) // len(one))  # 1 MiB: about 200,000 requests in line mode
    sock = connect_raw(server.path)
    sock.setblocking(False)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        sent = 0
        deadline = time.monotonic() + 1.5
        while sent < len(flood) and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(flood[sent : sent + (1 << 16)])
                continue
            time.sleep(0.01)  # the server stopped reading: its replies are not taken
        time.sleep(0.3)  # what it had read is answered or left unparsed by now
        assert ping_ok(server.path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > 256 << 10, f"only {sent} bytes went out"  # more than one read's worth arrived
    # Parsed at once, the first 256 KiB read alone would be tens of thousands of
    # request objects (14 MB in line mode, 1.3 MB in frame mode here).
    assert peak < 1 << 20, f"{peak} bytes allocated for {sent} bytes of unread requests"
    sock.close()
    assert ping_ok(server.path)


# -- respond / close -------------------------------------------------------


@pytest.mark.parametrize("respond", [True, False])
@pytest.mark.parametrize("close", [True, False])
def test_respond_and_close_flags(
    start_server: ServerFactory, connect_raw: RawConnector, respond: bool, close: bool
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "echo", "args": {"first": 1}, "respond": respond, "close": close})
    if respond:
        reply = recv_frame(sock)
        assert reply["cmd"] == "echo"
        assert reply["response"] == {"status": "success", "error": "", "payload": {"first": 1}}
    if close:
        assert_eof(sock)
        return
    # Still open: the next reply is the second request's, so the first sent nothing more.
    send_frame(sock, {"cmd": "echo", "args": {"second": 2}, "respond": True, "close": True})
    assert recv_response(sock)["payload"] == {"second": 2}
    assert_eof(sock)


# -- line mode -------------------------------------------------------------


def test_line_mode_through_a_raw_socket(start_server: ServerFactory, connect_raw: RawConnector) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(b"ping\n")
    assert recv_line(sock) == {"status": "success", "error": "", "payload": "pong"}
    sock.sendall(b'echo n=5 flag=true name="two words" xs=[1, 2] level=debug\n')
    assert recv_line(sock)["payload"] == {
        "n": 5,
        "flag": True,
        "name": "two words",
        "xs": [1, 2],
        "level": "debug",
    }
    sock.sendall(b'{"cmd": "echo", "args": {"a": 1}, "id": "req-1"}\n')
    assert recv_line(sock) == {"status": "success", "error": "", "payload": {"a": 1}, "id": "req-1"}
    sock.sendall(b"peer\n")
    peer = recv_line(sock)["payload"]
    assert (peer["pid"], peer["uid"], peer["mode"]) == (os.getpid(), os.getuid(), "line")
    sock.sendall(b"echo oops\n")
    bad = recv_line(sock)
    assert bad["status"] == "failure"
    assert bad["error"] == "argument 'oops' is not key=value"
    sock.sendall(b"fail message=nope\n")
    assert recv_line(sock) == {"status": "failure", "error": "nope", "payload": None}
    sock.sendall(b"quit\n")
    assert_eof(sock)


def test_line_mode_json_line_with_close_true(start_server: ServerFactory, connect_raw: RawConnector) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(b'{"cmd": "ping", "close": true}\n')
    assert recv_line(sock)["payload"] == "pong"
    assert_eof(sock)


# -- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"cmd": "\xff"}', "invalid JSON"),
        (b'{"args": {}}', "request has no 'cmd'"),
        (b'{"cmd": 12}', "'cmd' must be a string, got number"),
        (b'{"cmd": "echo", "args": [1, 2]}', "'args' must be a JSON object, got array"),
        (b'{"cmd": "echo", "close": "no"}', "'close' must be true or false, got string"),
        (b"[" * 50_000, "nested too deeply"),
    ],
)
def test_bad_frames_get_a_failure_and_the_server_keeps_serving(
    start_server: ServerFactory,
    connect_raw: RawConnector,
    server_errors: list[logging.LogRecord],
    body: bytes,
    message: str,
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(header(len(body)) + body)
    response = recv_response(sock)
    assert response["status"] == "failure"
    assert message in response["error"]
    # Not fatal: the same connection still works, and so does a fresh client.
    send_frame(sock, {"cmd": "ping"})
    assert recv_response(sock)["payload"] == "pong"
    assert ping_ok(server.path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"cmd": \n', "invalid JSON"),
        (b'{"cmd": 12}\n', "'cmd' must be a string, got number"),
        (b'{"cmd": "echo", "args": "x"}\n', "'args' must be a JSON object, got string"),
        (b"echo a=\xff\n", "not valid UTF-8"),
        (b'echo a="open\n', "unterminated string"),
    ],
)
def test_bad_lines_get_a_failure_and_the_server_keeps_serving(
    start_server: ServerFactory, connect_raw: RawConnector, line: bytes, message: str
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(line)
    reply = recv_line(sock)
    assert reply["status"] == "failure"
    assert message in reply["error"]
    sock.sendall(b"ping\n")
    assert recv_line(sock)["payload"] == "pong"
    assert ping_ok(server.path)


@pytest.mark.parametrize("announced", [0xFFFFFF00, 0x00FFFFFF, 1025])
def test_oversized_length_is_refused_at_once_without_allocating(
    start_server: ServerFactory, connect_raw: RawConnector, announced: int
) -> None:
    server = start_server(max_message_size=1024, timeout=10)
    sock = connect_raw(server.path, timeout=3)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        sock.sendall(header(announced))  # the header alone, no body follows
        response = recv_response(sock)  # long before the 10 s message timeout
        assert_eof(sock)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response["status"] == "failure"
    assert f"message of {announced} bytes exceeds the limit of 1024 bytes" in response["error"]
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing"
    assert ping_ok(server.path)


def test_bad_colon_byte_gets_a_failure_then_close(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(b"\x00\x00\x00\x02;{}")
    assert "expected ':'" in recv_response(sock)["error"]
    assert_eof(sock)


def test_half_frame_then_eof(start_server: ServerFactory, connect_raw: RawConnector) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    data = encode_frame({"cmd": "ping"})
    sock.sendall(data[:9])
    sock.shutdown(socket.SHUT_WR)
    response = recv_response(sock)
    assert response["status"] == "failure"
    assert response["error"] == f"connection closed mid-frame: got 4 of {len(data) - 5} bytes"
    assert_eof(sock)
    assert ping_ok(server.path)


def test_silent_client_is_closed_after_the_idle_timeout(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(idle_timeout=0.3)
    sock = connect_raw(server.path)
    start = time.monotonic()
    assert_eof(sock)
    assert time.monotonic() - start >= 0.25


def test_idle_timeout_applies_between_requests(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(idle_timeout=0.3)
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "ping", "close": False})
    assert recv_response(sock)["payload"] == "pong"
    assert_eof(sock)


def test_requests_keep_a_connection_alive_past_the_idle_timeout(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # Each request pushes the idle deadline on: 10 requests 0.1s apart outlive a 0.6s idle
    # timeout (the margin between requests is wide so that a loaded machine does not matter).
    server = start_server(idle_timeout=0.6)
    sock = connect_raw(server.path)
    start = time.monotonic()
    for _ in range(10):
        send_frame(sock, {"cmd": "ping", "close": False})
        assert recv_response(sock)["payload"] == "pong"
        time.sleep(0.1)
    assert time.monotonic() - start > 1.0
    assert_eof(sock)


def test_stalled_half_frame_gets_the_timeout_failure(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(timeout=0.3, idle_timeout=30)
    sock = connect_raw(server.path)
    sock.sendall(encode_frame({"cmd": "ping"})[:8])
    response = recv_response(sock)
    assert response["status"] == "failure"
    assert response["error"] == "timed out after 0.3s waiting for the rest of the message"
    assert_eof(sock)


def test_stalled_half_line_gets_the_timeout_failure(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(timeout=0.3, idle_timeout=30)
    sock = connect_raw(server.path)
    sock.sendall(b"echo a=1")
    reply = recv_line(sock)
    assert reply["status"] == "failure"
    assert "timed out" in reply["error"]
    assert_eof(sock)


def test_client_gone_before_the_reply_does_not_hurt_the_server(
    start_server: ServerFactory, connect_raw: RawConnector, server_errors: list[logging.LogRecord]
) -> None:
    server = start_server()
    for _ in range(5):
        sock = connect_raw(server.path)
        send_frame(sock, {"cmd": "sleep", "args": {"seconds": 0.05}})
        sock.close()
    assert ping_ok(server.path)


# -- connection limit ------------------------------------------------------


def _hold_busy(path: str, n: int, connect_raw: RawConnector) -> list[socket.socket]:
    """``n`` connections, each with a handler running (sleeping 3 s): none of them is idle."""
    holders = [connect_raw(path, timeout=10) for _ in range(n)]
    for sock in holders:
        send_frame(sock, {"cmd": "sleep", "args": {"seconds": 3}, "close": False})
    return holders


def test_excess_connections_are_told_busy_and_closed_when_none_is_idle(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(max_connections=2)
    holders = _hold_busy(server.path, 2, connect_raw)
    wait_until(lambda: server._active == 2 and all(c._busy for c in server._connections))
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "ping"})
    busy = recv_response(sock)
    assert busy["status"] == "failure"
    assert busy["error"] == (
        "busy: 2 connections already open, each running a command or reading a message begun under a second ago"
    )
    assert_eof(sock)
    line_sock = connect_raw(server.path)
    line_sock.sendall(b"ping\n")
    assert "busy" in recv_line(line_sock)["error"]
    assert_eof(line_sock)
    # A peer that sends nothing and half-closes is told at once, in frames.
    silent = connect_raw(server.path)
    silent.shutdown(socket.SHUT_WR)
    assert "busy" in recv_response(silent)["error"]
    assert_eof(silent)
    # The busy connections carry on, and once their handlers are done a new client gets in.
    for holder in holders:
        assert recv_response(holder)["payload"] == "slept"
    assert ping_ok(server.path)


def test_a_new_connection_at_the_limit_closes_the_one_idle_the_longest(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A tool that leaks idle connections used to lock every operator out until the idle timeout.
    caplog.set_level(logging.WARNING, logger="unixsock_asgi.server")
    server = start_server(max_connections=2)
    oldest, newer = Client(server.path, close=False), Client(server.path, close=False)
    try:
        for client in (oldest, newer):
            assert client.send("ping").ok  # type: ignore[union-attr]
            time.sleep(0.05)
        assert Client(server.path).send("ping").ok  # type: ignore[union-attr]
        assert "closed the connection idle the longest" in caplog.text
        wait_until(lambda: server._active <= 2)
        assert newer.send("ping").ok  # type: ignore[union-attr]  # on its own connection still
        assert oldest.send("ping").ok  # type: ignore[union-attr]  # reconnected (closing newer, idle now)
    finally:
        oldest.close()
        newer.close()


def test_a_new_connection_at_the_limit_closes_one_trickling_its_message(
    start_server: ServerFactory, connect_raw: RawConnector, caplog: pytest.LogCaptureFixture
) -> None:
    # Each finishing a message just before the timeout and beginning the next was never idle
    # nor timed out: a peer holding every slot so locked out everyone, root included.
    caplog.set_level(logging.WARNING, logger="unixsock_asgi.server")
    server = start_server(max_connections=2, timeout=30)
    frame = encode_frame({"cmd": "ping", "close": False})
    trickling = connect_raw(server.path)
    trickling.sendall(frame[:3])
    fresh = connect_raw(server.path)
    fresh.sendall(frame[:3])  # begun just now: not taken for a trickler
    wait_until(lambda: server._active == 2)
    time.sleep(1.2)  # SLOW_MESSAGE_S and a little
    fresh.sendall(frame[3:])
    assert recv_response(fresh)["payload"] == "pong"
    fresh.sendall(frame[:3])  # its next message, begun now
    assert Client(server.path).send("ping", respond=True).ok
    assert "closed the connection slowest to send its message" in caplog.text
    assert_eof(trickling)
    fresh.sendall(frame[3:])
    assert recv_response(fresh)["payload"] == "pong"  # untouched


@pytest.mark.parametrize("cmd", ["ping", "sleep"])  # answered inline, and by the connection's task
def test_a_peer_that_ends_each_message_and_begins_the_next_in_one_write_is_a_trickler_too(
    start_server: ServerFactory, connect_raw: RawConnector, cmd: str
) -> None:
    # Every message finished within a second, the next begun in the same write: no message was
    # ever a second old, so two such peers held both slots (review of the eviction above). A
    # command that suspends (every one on 3.10) restarted the clock when it was done.
    server = start_server(max_connections=2, timeout=30)
    frame = encode_frame({"cmd": cmd, "args": {"seconds": 0.01}, "respond": False, "close": False})
    peers = [connect_raw(server.path) for _ in range(2)]
    for peer in peers:
        peer.sendall(frame[:3])
    wait_until(lambda: server._active == 2)
    for _ in range(4):  # 1.6 s: each write ends a message and begins another
        time.sleep(0.4)
        for peer in peers:
            peer.sendall(frame[3:] + frame[:3])
    time.sleep(0.1)  # their last commands done: a connection running one is never closed for another
    reply = Client(server.path).send("ping", respond=True)
    assert reply.ok, reply.error
    closed = 0
    for peer in peers:
        peer.settimeout(1.0)
        with contextlib.suppress(OSError):  # the one left open times out here
            closed += peer.recv(1) == b""
    assert closed == 1  # the one half-sending the longest; the other carries on


def test_a_peer_that_hangs_up_during_a_long_handler_frees_its_slot(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # drain timeout=300 from a script that is then killed must not hold a slot for 300 s.
    cancelled: list[str] = []

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "wait":
            try:
                await asyncio.sleep(args["s"])
            except asyncio.CancelledError:
                cancelled.append(args["tag"])
                raise
            return "waited"
        return "pong"

    server = start_server(handler, max_connections=2, handler_timeout=60)
    gone, half = connect_raw(server.path), connect_raw(server.path)
    send_frame(gone, {"cmd": "wait", "args": {"s": 60, "tag": "gone"}})
    send_frame(half, {"cmd": "wait", "args": {"s": 1.5, "tag": "half"}})
    half.shutdown(socket.SHUT_WR)  # a half-close still reads its reply
    time.sleep(0.2)
    assert "busy" in Client(server.path).send("ping").error  # type: ignore[union-attr]
    gone.close()
    started = time.monotonic()
    wait_until(lambda: cancelled == ["gone"], timeout=5)
    assert time.monotonic() - started < 2.5  # checked every second while the handler runs
    assert recv_response(half) == {"status": "success", "error": "", "payload": "waited"}
    assert cancelled == ["gone"]
    assert ping_ok(server.path)


def test_a_handler_that_raises_is_logged_with_its_traceback(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "exit":
            raise SystemExit(3)  # argparse in a handler, say
        stock: dict[str, int] = {}
        return stock["missing"]

    server = start_server(handler)
    with caplog.at_level(logging.WARNING, logger="unixsock_asgi"):
        assert Client(server.path).send("boom").error == "KeyError: 'missing'"  # type: ignore[union-attr]
        assert Client(server.path).send("exit").error == "SystemExit: 3"  # type: ignore[union-attr]
    logged = {
        r.getMessage().split("\n")[0]: r for r in caplog.records if r.getMessage().startswith("command ")
    }
    assert set(logged) == {"command 'boom' raised KeyError: 'missing'", "command 'exit' raised SystemExit: 3"}
    assert all(r.levelno == logging.WARNING for r in logged.values())
    boom = logged["command 'boom' raised KeyError: 'missing'"].getMessage().split("\n")
    assert boom[1] == "Traceback (most recent call last):" and boom[-1] == "KeyError: 'missing'"
    assert '    return stock["missing"]' in boom  # the line that raised


def test_an_exception_whose_text_cannot_be_read_still_gets_its_failure_reply(
    start_server: ServerFactory,
) -> None:
    class Unspeakable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "ping":
            return "pong"
        raise Unspeakable

    server = start_server(handler)
    reply = Client(server.path).send("x", respond=True)
    assert reply.error == "Unspeakable: (its text could not be read)"
    assert ping_ok(server.path)


def test_what_a_raising_handler_logs_is_one_line_of_bounded_length_per_part(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Text from the socket in an exception (a KeyError of the command's name, a ValueError of a
    # value) forged log lines of its own with a line break, and was logged whole, twice.
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        raise ValueError(args.get("text", cmd))

    server = start_server(handler)
    forged = "x\n2026-11-27 09:00:00,000 unixsock_asgi.audit INFO peer pid=1 uid=0 cmd=set status=success"
    with caplog.at_level(logging.WARNING, logger="unixsock_asgi"):
        reply = Client(server.path).send("echo", {"text": forged})
        assert reply is not None and reply.error == f"ValueError: {forged}"  # the peer's own text, whole
        Client(server.path, max_message_size=4 << 20).send("y" * 900_000)
    first, second = (
        r.getMessage().split("\n") for r in caplog.records if r.getMessage().startswith("command ")
    )
    escaped = forged.replace("\n", "\\n")
    assert first[0] == f"command 'echo' raised ValueError: {escaped}"
    assert first[-1] == first[0].partition(" raised ")[2]  # the traceback ends with it, escaped too
    assert not any(line.startswith("2026-11-27") for line in first + second)
    assert max(map(len, second)) < 1300 and "(900012 characters)" in second[0]


def test_a_fire_and_forget_request_runs_to_its_end_after_its_client_leaves(
    start_server: ServerFactory,
) -> None:
    done: list[str] = []

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        await asyncio.sleep(1.6)  # past the hang-up check
        done.append(cmd)
        return "done"

    server = start_server(handler, handler_timeout=60)
    assert Client(server.path, respond=False).send("reindex") is None  # and the client closes
    wait_until(lambda: done == ["reindex"], timeout=5)


# -- binding ---------------------------------------------------------------


@pytest.mark.parametrize("listening_closed", [True, False])
def test_stale_socket_is_replaced(
    start_server: ServerFactory, sock_path: str, listening_closed: bool
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(sock_path)  # bound but never listening: connect() is refused
        if listening_closed:
            stale.close()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        server = start_server()
        assert ping_ok(server.path)
    finally:
        stale.close()


def test_of_two_servers_replacing_one_stale_socket_only_one_starts(sock_path: str) -> None:
    from unixsock_asgi._sockets import bind_unix_socket

    for _ in range(30):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(sock_path)
        stale.close()
        outcomes: list[Any] = []
        barrier = threading.Barrier(2)

        def bind(barrier: threading.Barrier, outcomes: list[Any]) -> None:
            barrier.wait()
            try:
                outcomes.append(bind_unix_socket(sock_path))
            except BindError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=bind, args=(barrier, outcomes)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        bound = [o for o in outcomes if not isinstance(o, BindError)]
        refused = [o for o in outcomes if isinstance(o, BindError)]
        assert len(bound) == 1 and len(refused) == 1, outcomes
        assert "this process already serves" in str(refused[0])
        assert bound[0].still_ours()  # the one that started is the one on the path
        bound[0].sock.close()
        bound[0].unlink_if_ours()


def test_live_server_on_the_path_is_refused(start_server: ServerFactory, sock_path: str) -> None:
    start_server()
    inode = os.lstat(sock_path).st_ino
    with pytest.raises(BindError) as info:
        start_server()
    message = str(info.value)
    # Its own: the middleware added twice, say (it named its own pid as "a live server").
    assert message == (
        f"this process already serves {sock_path!r} (is ControlSocketMiddleware on the app twice,"
        " or do two apps share a path or a socket_dir and name?)"
    )
    assert os.lstat(sock_path).st_ino == inode
    assert ping_ok(sock_path)


def test_another_processs_live_server_on_the_path_is_refused_by_its_pid(sock_path: str) -> None:
    listener = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen();"
        " print('ready', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(  # its pipes are closed on leaving
        [sys.executable, "-c", listener, sock_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as other:
        try:
            assert other.stdout is not None and other.stdout.readline() == "ready\n"
            with pytest.raises(BindError) as info:
                UnixSockServer(sock_path, lambda cmd, args: None).start()
            assert str(info.value) == f"a live server (pid {other.pid}) already answers on {sock_path!r}"
        finally:
            other.kill()
            other.wait(5)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_something_else_at_the_path_is_never_clobbered(
    start_server: ServerFactory, tmp_path: Path, sock_path: str, kind: str
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not delete")
    if kind == "file":
        Path(sock_path).write_text("precious")
    elif kind == "directory":
        os.mkdir(sock_path)
    else:
        os.symlink(target, sock_path)
    with pytest.raises(BindError, match="not a socket") as info:
        start_server()
    assert sock_path in str(info.value)
    if kind == "file":
        assert Path(sock_path).read_text() == "precious"
    elif kind == "directory":
        assert os.path.isdir(sock_path)
    else:
        assert os.readlink(sock_path) == str(target)
    assert target.read_text() == "do not delete"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET], ids=["dgram", "seqpacket"])
def test_a_socket_of_another_type_at_the_path_is_left_alone(
    start_server: ServerFactory, sock_path: str, kind: int
) -> None:
    with socket.socket(socket.AF_UNIX, kind) as other:
        other.bind(sock_path)
        with pytest.raises(BindError, match="is a socket of another type") as info:
            start_server()
        assert sock_path in str(info.value)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)  # still there


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "socket_mode",
            600,
            r"socket_mode 600 is not a permission mode .* \(did you mean 0o600\? 600 is decimal\)",
        ),
        ("socket_mode", 0o4777, "socket_mode 2559 is not a permission mode from 0o000 to 0o777$"),
        ("max_connections", 0, "max_connections must be a whole number of at least 1, not 0"),
        ("idle_timeout", float("nan"), "idle_timeout must be a positive number of seconds, not nan"),
        ("max_message_size", 0, "max_message_size must be a whole number of bytes of at least 1, not 0"),
        ("max_message_size", 1.5, "max_message_size must be .* not 1.5"),
        ("allowed_uids", 1000, "allowed_uids must be a collection of ids, not 1000"),
        ("allowed_gids", ["staff"], r"allowed_gids must hold whole numbers of at least 0, not \['staff'\]"),
    ],
)
def test_options_that_cannot_work_are_refused_before_anything_is_bound(
    sock_path: str, option: str, value: Any, message: str
) -> None:
    error = TypeError if option == "allowed_uids" else ValueError
    with pytest.raises(error, match=message):
        UnixSockServer(sock_path, lambda cmd, args: None, **{option: value})
    with pytest.raises(error, match=message):  # made directly: the same checks
        ServerConfig(path=sock_path, **{option: value})
    assert not os.path.exists(sock_path)


def test_a_config_made_directly_is_normalised_as_the_server_would(sock_path: str) -> None:
    config = ServerConfig(path=Path(sock_path), allowed_uids=[os.getuid()], allowed_gids=range(3))  # type: ignore[arg-type]
    assert config.path == sock_path and config.allowed_uids == frozenset({os.getuid()})
    assert config.allowed_gids == frozenset({0, 1, 2})
    # As before these checks: more than the protocol allows is its limit; a whole float is a number.
    assert ServerConfig(path=sock_path, max_message_size=64 << 20).max_message_size == 16 << 20
    assert ServerConfig(path=sock_path, max_message_size=1048576.0).max_message_size == 1 << 20  # type: ignore[arg-type]
    server = UnixSockServer(handler=lambda cmd, args: "pong", config=config)
    # A peer neither the owner nor root, so its supplementary groups (this process's: it is
    # the far end of the pair) are asked: a list kept as given failed there (no isdisjoint).
    near, far = socket.socketpair(socket.AF_UNIX)
    with near, far:
        stranger = PeerCredentials(pid=os.getpid(), uid=os.getuid() + 12345, gid=54321)
        assert server._allowed(stranger, near) is bool({0, 1, 2} & set(os.getgroups()))
    with pytest.raises(ValueError, match="path must be a non-empty str"):
        ServerConfig(path="")


def test_options_read_from_a_configuration_keep_working(sock_path: str) -> None:
    server = UnixSockServer(sock_path, lambda cmd, args: None, max_connections=8.0, handler_timeout=None)
    assert server.config.max_connections == 8 and isinstance(server.config.max_connections, int)
    assert server.config.handler_timeout is None  # no limit, as before options were checked


def test_too_long_path_is_refused(start_server: ServerFactory, tmp_path: Path) -> None:
    with pytest.raises(BindError, match="longer than"):
        start_server(path=str(tmp_path / ("x" * 120)))


def test_socket_mode_is_0600_and_created_parents_0700(start_server: ServerFactory, tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl" / "app.sock"
    server = start_server(path=str(path))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700  # every directory it made
    assert server.path == str(path)
    assert ping_ok(server.path)


def test_socket_mode_option(start_server: ServerFactory, sock_path: str) -> None:
    start_server(socket_mode=0o660)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660


def test_stop_removes_the_socket_and_is_idempotent(start_server: ServerFactory, sock_path: str) -> None:
    server = start_server()
    assert server.running
    server.stop()
    assert not server.running
    assert not os.path.exists(sock_path)
    server.stop()


def test_stop_leaves_a_socket_that_replaced_ours_alone(start_server: ServerFactory, sock_path: str) -> None:
    first = start_server()
    os.unlink(sock_path)  # someone removed ours and ...
    second = start_server()  # ... another server bound the path
    first.stop()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert ping_ok(sock_path)
    second.stop()
    assert not os.path.exists(sock_path)


def test_stop_closes_open_connections_and_busy_handlers(
    start_server: ServerFactory, connect_raw: RawConnector, sock_path: str
) -> None:
    server = start_server()
    busy = connect_raw(sock_path)
    send_frame(busy, {"cmd": "sleep", "args": {"seconds": 60}, "id": 7})
    busy_line = connect_raw(sock_path)
    busy_line.sendall(b"sleep seconds=60\n")
    unanswered = connect_raw(sock_path)  # respond=false: nobody waits for a reply
    send_frame(unanswered, {"cmd": "sleep", "args": {"seconds": 60}, "respond": False, "close": False})
    idle = connect_raw(sock_path)
    send_frame(idle, {"cmd": "ping", "close": False})
    assert recv_response(idle)["payload"] == "pong"
    time.sleep(0.2)  # the sleeps have begun
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 4
    # A command cut short is told so, not left to read a connection closed as if the server crashed.
    reply = recv_frame(busy)
    assert reply["id"] == 7
    assert reply["response"] == {
        "status": "failure",
        "error": "'sleep' was cut short: the server is stopping (it may have run in part, or finish unanswered)",
        "payload": {"server_stopping": True},  # how the fleet tells a worker gone from one that failed
    }
    assert_eof(busy)
    assert (
        recv_line(busy_line)["error"]
        == "'sleep' was cut short: the server is stopping (it may have run in part, or finish unanswered)"
    )
    assert_eof(busy_line)
    assert_eof(unanswered)
    assert_eof(idle)
    assert not os.path.exists(sock_path)


def test_a_connection_whose_command_was_answered_is_closed_at_stop_without_a_word(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # Its slow command finished and was answered: nothing runs, nothing is "cut short".
    server = start_server()
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "sleep", "args": {"seconds": 0.05}, "close": False})
    assert recv_response(sock)["payload"] == "slept"
    time.sleep(0.1)
    server.stop()
    assert_eof(sock)


def stop_while_it_runs(
    server: UnixSockServer, connect_raw: RawConnector, cmd: str, entered: threading.Event
) -> tuple[socket.socket, float]:
    """Send ``cmd``, stop the server once its handler has begun; the connection and how long stop took."""
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": cmd})
    assert entered.wait(5)
    started = time.monotonic()
    server.stop()
    return sock, time.monotonic() - started


@pytest.mark.parametrize("clean_up_s", [0.3, 30.0])
def test_a_handler_cut_short_by_stop_may_clean_up_for_a_second(
    start_server: ServerFactory, connect_raw: RawConnector, clean_up_s: float
) -> None:
    # Cancelled once, at its await: what it awaits while it cleans up is not cancelled again
    # when its connection closes after the reply; a clean-up that would outlast the server is,
    # a second later.
    entered, ended = threading.Event(), threading.Event()
    finished: list[bool] = []

    async def handler(cmd: str, args: dict[str, Any]) -> str:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            try:
                await asyncio.sleep(clean_up_s)  # releasing a lock, closing a file...
                finished.append(True)
            finally:
                ended.set()
            raise
        return "slept"

    sock, took = stop_while_it_runs(start_server(handler), connect_raw, "job", entered)
    assert ended.is_set() and took < 3
    assert finished == ([True] if clean_up_s < 1 else [])
    assert recv_response(sock)["error"].startswith("'job' was cut short: the server is stopping")
    assert_eof(sock)


def test_a_handler_that_will_not_end_delays_stop_a_second_and_is_named(
    start_server: ServerFactory, connect_raw: RawConnector, caplog: pytest.LogCaptureFixture
) -> None:
    entered = threading.Event()

    async def handler(cmd: str, args: dict[str, Any]) -> str:
        entered.set()
        for _ in range(100):  # swallows every cancellation (bounded: 100 of them)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.5)
        return "never"

    with caplog.at_level(logging.WARNING, logger="unixsock_asgi.server"):
        sock, took = stop_while_it_runs(start_server(handler), connect_raw, "stubborn", entered)
    assert took < 3
    assert "command stubborn did not end when cancelled: the server stops without it" in caplog.text
    assert recv_response(sock)["error"].startswith("'stubborn' was cut short")


def test_stop_during_a_burst_of_connections_leaves_no_socket_open(start_server: ServerFactory) -> None:
    server = start_server(max_connections=10_000)
    socks: list[socket.socket] = []
    done = threading.Event()

    def connect() -> None:
        while not done.is_set() and len(socks) < 300:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(server.path)
            except OSError:
                sock.close()
                return
            socks.append(sock)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.01)
        server.stop()
        done.set()
        for thread in threads:
            thread.join(5)
        # Every connection the server accepted (or had queued) is closed: each
        # client sees EOF or a reset, none waits on a socket left open.
        deadline = time.monotonic() + 5
        waiting = list(socks)
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], 0.1)
            waiting = [s for s in waiting if s not in ready]
        assert socks
        assert not waiting, f"{len(waiting)} of {len(socks)} connections left open"
    finally:
        done.set()
        for sock in socks:
            sock.close()


def test_context_manager_and_config_object(sock_path: str) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> str:
        return cmd

    config = ServerConfig(path=sock_path, idle_timeout=5)
    with UnixSockServer(handler=handler, config=config) as server:
        assert server.running
        assert server.config is config
        response = Client(sock_path).send("hello")
        assert response is not None
        assert response.payload == "hello"
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    assert not server.running
    assert not os.path.exists(sock_path)


def test_constructor_errors(sock_path: str) -> None:
    with pytest.raises(TypeError, match="needs a handler"):
        UnixSockServer(sock_path)
    with pytest.raises(TypeError, match="needs a path"):
        UnixSockServer(handler=lambda c, a: None)
    with pytest.raises(TypeError, match="not both"):
        UnixSockServer(sock_path, lambda c, a: None, config=ServerConfig(path=sock_path))


def test_server_can_be_started_again_after_stop(start_server: ServerFactory, sock_path: str) -> None:
    server = start_server()
    server.stop()
    server.start()
    assert ping_ok(sock_path)


# -- handlers --------------------------------------------------------------


def sync_two(cmd: str, args: dict[str, Any]) -> Any:
    return {"cmd": cmd, "args": args, "thread": threading.current_thread().name}


def sync_three(cmd: str, args: dict[str, Any], ctx: RequestContext) -> Any:
    return {"cmd": cmd, "args": args, "pid": ctx.peer.pid, "uid": ctx.peer.uid, "mode": ctx.mode}


async def async_two(cmd: str, args: dict[str, Any]) -> Any:
    return {"cmd": cmd, "args": args, "thread": threading.current_thread().name}


async def async_three(cmd: str, args: dict[str, Any], ctx: RequestContext) -> Any:
    return {"cmd": cmd, "args": args, "pid": ctx.peer.pid, "uid": ctx.peer.uid, "mode": ctx.mode}


class AsyncCallable:
    async def __call__(self, cmd: str, args: dict[str, Any], ctx: RequestContext) -> Any:
        return {"cmd": cmd, "args": args, "pid": ctx.peer.pid, "uid": ctx.peer.uid, "mode": ctx.mode}


@pytest.mark.parametrize(
    ("handler", "with_ctx", "thread_prefix"),
    [
        (sync_two, False, "unixsock-handler"),
        (sync_three, True, None),
        (async_two, False, "unixsock-server"),
        (async_three, True, None),
        (AsyncCallable(), True, None),
    ],
)
def test_handler_forms(
    start_server: ServerFactory, handler: Any, with_ctx: bool, thread_prefix: str | None
) -> None:
    server = start_server(handler)
    response = Client(server.path).send("show", {"x": [1]})
    assert response is not None
    payload = response.payload
    assert (payload["cmd"], payload["args"]) == ("show", {"x": [1]})
    if with_ctx:
        assert payload["pid"] == os.getpid()
        assert payload["uid"] == os.getuid()
        assert payload["mode"] == "frame"
    else:
        assert payload["thread"].startswith(thread_prefix)


def test_a_handler_that_cannot_take_cmd_and_args_is_refused_when_given(tmp_path: Path) -> None:
    # Not at every command, as "takes 1 positional argument but 2 were given".
    from starlette.applications import Starlette

    def one_arg(cmd: str) -> None: ...

    def four_args(cmd: str, args: dict[str, Any], ctx: Any, extra: int) -> None: ...

    for handler in (one_arg, four_args):
        with pytest.raises(TypeError, match=r"cannot be called as \(cmd, args\) nor as \(cmd, args, ctx\)"):
            UnixSockServer(str(tmp_path / "s.sock"), handler)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"the handler .*(one_arg|four_args)\(cmd"):
            ControlSocketMiddleware(Starlette(), path=str(tmp_path / "m.sock"), handler=handler)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a function of"):
        UnixSockServer(str(tmp_path / "s.sock"), "ping")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing was bound


def test_handler_may_return_a_response(start_server: ServerFactory) -> None:
    server = start_server()
    response = Client(server.path).send("fail", {"message": "no such thing"})
    assert response is not None
    assert (response.status, response.error) == ("failure", "no such thing")


@pytest.mark.parametrize("is_async", [True, False])
@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (RuntimeError("boom"), "RuntimeError: boom"),
        (KeyError("missing"), "KeyError: 'missing'"),
        (SystemExit(3), "SystemExit: 3"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (TimeoutError("upstream slow"), "TimeoutError: upstream slow"),
    ],
)
def test_handler_exceptions_become_failure_replies(
    start_server: ServerFactory,
    server_errors: list[logging.LogRecord],
    is_async: bool,
    exc: BaseException,
    message: str,
) -> None:
    def raise_sync(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "ping":
            return "pong"
        raise exc

    async def raise_async(cmd: str, args: dict[str, Any]) -> Any:
        return raise_sync(cmd, args)

    server = start_server(raise_async if is_async else raise_sync)
    response = Client(server.path).send("explode")
    assert response is not None
    assert response.status == "failure"
    assert response.error == message
    assert server.running
    assert ping_ok(server.path)


@pytest.mark.parametrize("outcome", ["value", "raises", "catches_own_timeout"])
def test_async_handlers_that_suspend(start_server: ServerFactory, outcome: str) -> None:
    # Handlers are stepped eagerly; one that suspends must be resumed with what
    # it awaited, and what it raises after suspending must still become a failure.
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        total = 0
        for step in range(3):
            await asyncio.sleep(0.01)
            total += await asyncio.get_running_loop().run_in_executor(None, abs, step + 1)
        if outcome == "raises":
            raise LookupError(f"after {total}")
        if outcome == "catches_own_timeout":
            try:
                await asyncio.wait_for(asyncio.sleep(10), 0.01)
            except (TimeoutError, asyncio.TimeoutError):  # not one class before Python 3.11
                return "caught"
        return total

    server = start_server(handler, handler_timeout=5)
    response = Client(server.path).send("work")
    assert response is not None
    expected = {
        "value": Response.success(6),
        "raises": Response.failure("LookupError: after 6"),
        "catches_own_timeout": Response.success("caught"),
    }[outcome]
    assert response == expected


@pytest.mark.skipif(
    not hasattr(inspect, "markcoroutinefunction"), reason="only Python 3.12+ can mark a plain function async"
)
def test_async_marked_handler_may_return_a_task(start_server: ServerFactory) -> None:
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        return asyncio.ensure_future(asyncio.sleep(0.01, "from a task"))

    server = start_server(inspect.markcoroutinefunction(handler))  # type: ignore[attr-defined,unused-ignore]
    assert Client(server.path).send("x") == Response.success("from a task")


def test_a_response_with_a_non_string_error_is_sent_as_its_str(start_server: ServerFactory) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        return Response("failure", ValueError("disk full"), {"detail": 1})  # type: ignore[arg-type]

    server = start_server(handler)
    assert Client(server.path).send("x") == Response.failure("disk full", {"detail": 1})


def test_cancelled_error_a_handler_raises_itself_is_its_failure(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # Its own (awaiting a task that was cancelled, say), not its task being cancelled (the
    # timeout, a hang-up, the server stopping): it ended the connection without a reply,
    # as if the client had gone. Before its first suspension or after it: the same either way.
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "ping":
            return "pong"
        if cmd == "later":
            await asyncio.sleep(0)
        raise asyncio.CancelledError

    server = start_server(handler)
    for cmd in ("now", "later"):
        sock = connect_raw(server.path)
        send_frame(sock, {"cmd": cmd, "close": False})
        if sys.version_info < (3, 11):  # pragma: no cover - 3.10 cannot tell the two apart
            assert_eof(sock)
            continue
        assert recv_frame(sock)["response"] == {
            "status": "failure",
            "error": "CancelledError",
            "payload": None,
        }
        send_frame(sock, {"cmd": "ping", "close": False})
        assert recv_frame(sock)["response"]["payload"] == "pong"  # the connection goes on
    assert ping_ok(server.path)


def test_timed_out_async_handler_is_cancelled_and_cleans_up(start_server: ServerFactory) -> None:
    cleaned = threading.Event()

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "ping":
            return "pong"
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()

    server = start_server(handler, handler_timeout=0.2)
    response = Client(server.path).send("hang")
    assert response is not None
    assert response.error == "handler for 'hang' timed out after 0.2s"
    assert cleaned.wait(5)
    assert ping_ok(server.path)


def test_async_handler_timeout(start_server: ServerFactory) -> None:
    server = start_server(handler_timeout=0.2)
    response = Client(server.path).send("sleep", {"seconds": 30})
    assert response is not None
    assert response.status == "failure"
    assert response.error == "handler for 'sleep' timed out after 0.2s"
    assert ping_ok(server.path)


def test_sync_handler_timeout(start_server: ServerFactory) -> None:
    release = threading.Event()

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "block":
            release.wait(30)
        return "pong"

    server = start_server(handler, handler_timeout=0.2)
    try:
        response = Client(server.path).send("block")
        assert response is not None
        assert response.error == "handler for 'block' timed out after 0.2s"
        assert ping_ok(server.path)
    finally:
        release.set()


def test_unserialisable_replies_become_failures(
    start_server: ServerFactory, server_errors: list[logging.LogRecord], caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "tuple-keys":
            return {(1, 2): "x"}
        if cmd == "deep":
            deep: list[Any] = []
            for _ in range(100_000):
                deep = [deep]
            return deep
        if cmd == "object":
            return {"when": Path("/x")}
        return "pong"

    server = start_server(handler)
    client = Client(server.path)
    for cmd in ("tuple-keys", "deep"):
        response = client.send(cmd)
        assert response is not None
        assert response.status == "failure"
        assert response.error.startswith("reply could not be encoded")
    # The handler's bug is said where its developer looks too, not to the peer alone (at most
    # once a second: a poller of a broken command would flood the log).
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name == "unixsock_asgi.server" and r.levelno == logging.WARNING
    ]
    assert said[0] == (
        "the reply to tuple-keys could not be encoded (TypeError: keys must be str, int, float, bool"
        " or None, not tuple): its peer got a failure instead"
    )
    assert len(said) <= 2  # the second within the second is held back, unless the machine stalled
    response = client.send("object")
    assert response is not None
    assert response.payload == {"when": "/x"}  # anything else is sent as its str()
    assert ping_ok(server.path)


def test_audit_log_records_peer_and_outcome(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unixsock_asgi.audit")
    server = start_server()
    Client(server.path).send("ping")
    Client(server.path).send("fail")
    messages = [r.getMessage() for r in caplog.records if r.name == "unixsock_asgi.audit"]
    ping = [m for m in messages if "cmd=ping" in m]
    fail = [m for m in messages if "cmd=fail" in m]
    assert len(ping) == 1
    assert len(fail) == 1
    assert f"pid={os.getpid()} uid={os.getuid()} cmd=ping status=success" in ping[0]
    assert "cmd=fail status=failure" in fail[0]


def test_quiet_commands_are_audited_at_debug_unless_they_fail(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # What tools poll (top: stats every refresh from every worker) must not bury the app's log.
    caplog.set_level(logging.DEBUG, logger="unixsock_asgi.audit")
    server = start_server(quiet_commands=frozenset({"ping", "fail"}))
    for cmd in ("ping", "fail", "echo"):
        Client(server.path).send(cmd)
    levels = {
        r.getMessage().split("cmd=")[1].split()[0]: r.levelname
        for r in caplog.records
        if r.name == "unixsock_asgi.audit"
    }
    assert levels == {"ping": "DEBUG", "fail": "INFO", "echo": "INFO"}


# -- peers of another uid --------------------------------------------------


def _traversable_tmp_root() -> str:
    """A temporary directory root that any user can traverse (tmp_path's parents may be 0700)."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/dev/shm"):
        real = os.path.realpath(candidate)
        parts = [real, *(str(p) for p in Path(real).parents)]
        if os.path.isdir(real) and all(os.stat(p).st_mode & stat.S_IXOTH for p in parts):
            return real
    pytest.fail("no world-traversable temporary directory to put the socket in")


def exchange_as(
    uid: int, gid: int, path: str, data: bytes, timeout: float = 10.0, groups: tuple[int, ...] = ()
) -> bytes:
    """Fork a child that drops to ``uid``/``gid`` (and supplementary ``groups``), sends ``data`` to
    ``path`` and returns all it reads."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 2
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            os.write(write_end, received)
            status = 0
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    output = b""
    try:
        deadline = time.monotonic() + timeout + 5
        while chunk := _read_before(read_end, deadline):
            output += chunk
    except BaseException:
        os.kill(child, signal.SIGKILL)
        raise
    finally:
        os.close(read_end)
        os.waitpid(child, 0)  # it exits right after closing its end of the pipe
    assert not output.startswith(b"child failed"), output.decode(errors="replace")
    return output


def _read_before(fd: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    ready, _, _ = select.select([fd], [], [], max(remaining, 0))
    if not ready:
        raise AssertionError("the child did not finish in time")
    return os.read(fd, 65536)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A fresh 0755 directory that another uid can reach, removed afterwards."""
    path = tempfile.mkdtemp(prefix="usa-", dir=_traversable_tmp_root())
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_peer_with_another_uid_is_refused_unless_allowed(
    start_server: ServerFactory, shared_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unixsock_asgi.audit")
    path = os.path.join(shared_dir, "ctl.sock")
    request = encode_frame({"cmd": "peer"})

    server = start_server(path=path, socket_mode=0o666)
    refused = exchange_as(NOBODY, NOBODY, path, request)
    reply = json.loads(refused[5:])
    assert reply["response"]["status"] == "failure"
    assert "permission denied" in reply["response"]["error"]
    assert any("refused peer" in r.getMessage() and f"uid={NOBODY}" in r.getMessage() for r in caplog.records)
    server.stop()

    start_server(path=path, socket_mode=0o666, allowed_uids={NOBODY})
    allowed = json.loads(exchange_as(NOBODY, NOBODY, path, request)[5:])
    assert allowed["response"]["status"] == "success"
    assert allowed["response"]["payload"]["uid"] == NOBODY
    assert allowed["response"]["payload"]["pid"] != os.getpid()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_peer_allowed_by_gid(start_server: ServerFactory, shared_dir: str) -> None:
    path = os.path.join(shared_dir, "ctl.sock")
    start_server(path=path, socket_mode=0o666, allowed_gids={NOBODY})
    allowed = exchange_as(NOBODY, NOBODY, path, b"peer\nquit\n")
    assert json.loads(allowed)["payload"]["gid"] == NOBODY


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_peer_allowed_by_a_supplementary_group(start_server: ServerFactory, shared_dir: str) -> None:
    # An operator is in "ops" as one of their groups, rarely as their primary one: the socket
    # file's group permission lets them in, and so must the server's check.
    ops, other = 4242, 4343
    path = os.path.join(shared_dir, "ctl.sock")
    start_server(path=path, socket_mode=0o666, allowed_gids={ops})
    allowed = exchange_as(NOBODY, NOBODY, path, b"peer\nquit\n", groups=(other, ops))
    assert json.loads(allowed)["payload"]["uid"] == NOBODY
    refused = exchange_as(NOBODY, NOBODY, path, b"peer\nquit\n", groups=(other,))
    assert json.loads(refused) == {"status": "failure", "error": "permission denied", "payload": None}
    # More groups than Python's getsockopt reads (256) are found too.
    many = exchange_as(NOBODY, NOBODY, path, b"peer\nquit\n", groups=(*range(5000, 5300), ops))
    assert json.loads(many)["payload"]["uid"] == NOBODY


# -- a Go client on the wire -----------------------------------------------


def go_client_frame(cmd: str, args: dict[str, Any], respond: bool, close: bool) -> bytes:
    """Exactly what the Go client's Send writes: json.Marshal of its Request struct, framed."""
    body = json.dumps(
        {
            "cmd": cmd,
            "args": args,
            "response": {"status": "", "error": "", "payload": ""},
            "respond": respond,
            "close": close,
        },
        separators=(",", ":"),
    ).encode()
    return struct.pack(">I", len(body)) + b":" + body


def go_unmarshal_reply(sock: socket.socket) -> dict[str, Any]:
    """Read one reply and check each field has the Go type the Go client decodes it into."""
    reply = recv_frame(sock)
    assert isinstance(reply["cmd"], str)
    response = reply["response"]
    assert isinstance(response["status"], str)
    assert isinstance(response["error"], str)
    assert isinstance(response["payload"], str), "a Go client's Payload is a string"
    return reply


def test_go_client_over_the_wire(start_server: ServerFactory, connect_raw: RawConnector) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    sock.sendall(go_client_frame("echo", {"verbose": True, "n": 3}, respond=True, close=False))
    reply = go_unmarshal_reply(sock)
    assert reply["cmd"] == "echo"
    assert reply["response"]["status"] == "success"
    assert json.loads(reply["response"]["payload"]) == {"verbose": True, "n": 3}
    sock.sendall(go_client_frame("ping", {}, respond=True, close=False))
    assert go_unmarshal_reply(sock)["response"]["payload"] == "pong"
    sock.sendall(go_client_frame("fail", {"message": "nope"}, respond=True, close=True))
    failed = go_unmarshal_reply(sock)
    assert failed["response"] == {"status": "failure", "error": "nope", "payload": ""}
    assert_eof(sock)


# -- replies that cannot be sent, refused requests' flags, the audit log --------


def test_replies_json_cannot_carry_become_failures(
    start_server: ServerFactory, connect_raw: RawConnector, server_errors: list[logging.LogRecord]
) -> None:
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        replies = {"nan": float("nan"), "huge": "x" * (17 << 20), "10**400": 10**400, "digits": "7" * 400}
        return replies.get(cmd, "pong")

    server = start_server(handler)
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "nan", "close": False})
    assert "reply could not be encoded" in recv_response(sock)["error"]
    # Go's float64 and JavaScript cannot read it; digits in a string are only text.
    send_frame(sock, {"cmd": "10**400", "close": False})
    reply = recv_response(sock)
    assert reply["status"] == "failure" and "number out of range" in reply["error"]
    send_frame(sock, {"cmd": "digits", "close": False})
    assert recv_response(sock) == {"status": "success", "error": "", "payload": "7" * 400}
    send_frame(sock, {"cmd": "huge", "close": False})
    reply = recv_response(sock)
    assert reply["status"] == "failure" and "exceeds the protocol's" in reply["error"]
    assert ping_ok(server.path)


def test_an_id_too_deep_to_send_back_still_gets_a_reply(start_server: ServerFactory) -> None:
    from unixsock_asgi._protocol import ConnectionProtocol, Request

    deep: list[Any] = []
    for _ in range(100_000):  # built here, not parsed: deeper than any encoder recurses
        deep = [deep]
    server = start_server()
    reply = server._encode(ConnectionProtocol(), Request("ping", id=deep), Response.success("pong"))
    (length,) = struct.unpack(">I", reply[:4])
    answer = json.loads(reply[5 : 5 + length])
    assert answer["response"]["status"] == "failure" and "id" not in answer  # sent without the id
    assert "reply could not be encoded: RecursionError" in answer["response"]["error"]


def test_deeply_nested_ids_never_break_the_connection(
    start_server: ServerFactory, connect_raw: RawConnector, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    for depth in range(960, 1000, 4):  # parses, but re-encoding the id recurses too deep
        body = b'{"cmd": "ping", "close": false, "id": ' + b"[" * depth + b"]" * depth + b"}"
        sock.sendall(header(len(body)) + body)
        (length,) = struct.unpack(">I", recv_exact(sock, 5)[:4])
        reply = recv_exact(sock, length)  # an id echoed this deep is more than json.loads reads back
        assert b'"response":{"status":"success"' in reply or b'"status":"failure"' in reply
    send_frame(sock, {"cmd": "ping"})
    assert recv_response(sock)["payload"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_refused_request_honours_its_respond_and_close(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server()
    sock = connect_raw(server.path)
    send_frame(sock, {"cmd": "echo", "args": [1], "respond": False})  # refused, and no reply wanted
    send_frame(sock, {"cmd": "ping", "close": False})
    assert recv_response(sock)["payload"] == "pong"  # the next reply is the ping's
    send_frame(sock, {"cmd": "", "close": True})
    assert "'cmd' must not be empty" in recv_response(sock)["error"]
    assert_eof(sock)


def test_a_command_name_cannot_forge_audit_lines(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unixsock_asgi.audit")
    server = start_server()
    Client(server.path).send("x\nunixsock_asgi.audit INFO peer pid=1 uid=0 cmd=drain status=success")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "unixsock_asgi.audit"]
    assert "\n" not in line and "cmd='x\\nunixsock_asgi.audit" in line


# -- the read and write timeouts measure stalls, not slowness -----------------


def test_a_message_trickled_byte_by_byte_is_cut_off_timeout_after_it_began(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    server = start_server(timeout=0.5)
    sock = connect_raw(server.path)
    body = b'{"cmd": "ping", "args": {"pad": "' + b"x" * 100 + b'"}}'
    message = header(len(body)) + body
    started = time.monotonic()
    sent = 0
    with contextlib.suppress(OSError):  # the server may close while we still send
        for byte in message[:40]:  # a byte every 0.1 s: 4 s for these alone
            sock.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.1)
            if select.select([sock], [], [], 0)[0]:
                break
    reply = recv_response(sock)
    assert "timed out after 0.5s waiting for the rest of the message" in reply["error"]
    assert time.monotonic() - started < 1.5 and sent < 15
    assert ping_ok(server.path)


def _serve_big_replies(start_server: ServerFactory, size: int, timeout: float) -> UnixSockServer:
    """A server that answers every command with ``size`` bytes of text."""

    async def handler(cmd: str, args: dict[str, Any]) -> str:
        return "x" * size

    return start_server(handler, timeout=timeout)


def _read_slowly(sock: socket.socket, size: int, chunk: int, pause: float) -> tuple[int, float]:
    """Read until more than ``size`` bytes came (or EOF, or 20 s), ``chunk`` at a time with
    ``pause`` after each; the bytes read and the seconds it took."""
    received = 0
    started = time.monotonic()
    while received <= size and time.monotonic() - started < 20:
        got = len(sock.recv(chunk))
        if not got:
            break
        received += got
        time.sleep(pause)
    return received, time.monotonic() - started


def test_a_slow_but_steady_reader_gets_a_reply_that_takes_longer_than_timeout(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    size = 4_000_000
    server = _serve_big_replies(start_server, size, timeout=0.5)
    for close in (True, False):
        sock = connect_raw(server.path, timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        send_frame(sock, {"cmd": "big", "close": close})
        # 256 KiB per 0.1 s: about 1.6 s in all, three times the timeout
        received, took = _read_slowly(sock, size, 1 << 18, 0.1)
        assert received > size, f"cut off after {received} bytes, {took:.1f}s"
        assert took > 1.0


def test_a_reader_slower_than_the_socket_buffer_per_timeout_still_gets_the_whole_reply(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    # A UNIX socket wakes its writer only once the peer has emptied three quarters of its buffer
    # (about 160 KiB): a peer reading 100 KB/s seemed to take nothing for over a second, and was
    # cut off after 219,264 bytes. The socket's own queue shows each 32 KiB it reads.
    size = 300_000
    server = _serve_big_replies(start_server, size, timeout=1.0)
    sock = connect_raw(server.path, timeout=10)
    send_frame(sock, {"cmd": "big"})
    received, took = _read_slowly(sock, size, 4096, 0.04)  # about 100 KB/s: 3 s, three times the timeout
    assert received > size, f"cut off after {received} bytes, {took:.1f}s"


def test_plain_handlers_that_hang_neither_mislead_nor_keep_the_process_alive(tmp_path: Path) -> None:
    code = f"""
import sys, threading, time
from unixsock_asgi import Client, UnixSockServer
release = threading.Event()
ran = []
def handler(cmd, args):
    ran.append(cmd)
    if cmd == "hang":
        release.wait(600)  # hangs far longer than the test
    return "pong"
server = UnixSockServer({str(tmp_path / "c.sock")!r}, handler, handler_timeout=0.5, handler_threads=2).start()
for _ in range(2):
    Client(server.path).send("hang", respond=False)
time.sleep(0.2)
print(Client(server.path).send("ping").error, flush=True)
server.stop()
print("ran:", ran, flush=True)
"""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10  # not held at exit by the two hung threads
    busy, ran = done.stdout.splitlines()
    assert busy == (
        "handler for 'ping' did not start within 0.5s: all 2 handler threads are busy"
        " (plain handlers that hang hold them); it will not run"
    )
    assert ran == "ran: ['hang', 'hang']"  # the ping that timed out in the queue never ran


def test_a_request_begun_while_a_slow_reader_drains_a_big_reply_is_answered(
    start_server: ServerFactory, connect_raw: RawConnector
) -> None:
    size = 4_000_000

    async def handler(cmd: str, args: dict[str, Any]) -> str:
        return "x" * size if cmd == "big" else "pong"

    server = start_server(handler, timeout=0.5)
    sock = connect_raw(server.path, timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    ping = encode_frame({"cmd": "ping", "close": False})
    sock.sendall(encode_frame({"cmd": "big", "close": False}) + ping[:6])  # the ping cut after 6 bytes
    time.sleep(0.05)
    sock.sendall(ping[6:])
    received = bytearray()
    started = time.monotonic()
    while time.monotonic() - started < 20:
        chunk = sock.recv(1 << 18)
        if not chunk:
            break
        received += chunk
        if received.endswith(b'"payload":"pong"}}'):
            break
        time.sleep(0.1)  # slower than the 0.5 s timeout allows for the whole reply
    (length,) = struct.unpack(">I", received[:4])
    rest = bytes(received[5 + length :])
    assert rest.endswith(b'"payload":"pong"}}'), rest[:200]


def test_a_directory_lock_held_by_a_hung_process_delays_binding_but_never_stops_it(
    start_server: ServerFactory, sock_path: str
) -> None:
    import fcntl

    holder = os.open(os.path.dirname(sock_path), os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process's lock: this is another open file
        started = time.monotonic()
        server = start_server()
        assert time.monotonic() - started < 5  # waited at most its patience (2 s), then went on
        assert ping_ok(server.path)
    finally:
        os.close(holder)


def test_replies_give_the_few_obvious_non_json_types_their_json_form_and_refuse_the_rest(
    start_server: ServerFactory,
) -> None:
    import dataclasses
    import datetime
    import decimal
    import enum
    import uuid
    from pathlib import PurePosixPath

    class Mode(enum.Enum):
        FAST = "fast"

    @dataclasses.dataclass
    class Item:
        id: int
        tags: set[str]

    moment = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    values: dict[str, Any] = {
        "set": {"b", "a"},
        "datetime": moment,
        "date": moment.date(),
        "enum": Mode.FAST,
        "decimal": decimal.Decimal("19.99"),
        "uuid": uuid.UUID(int=1),
        "path": PurePosixPath("/srv/app"),
        "dataclass": Item(1, {"x"}),
    }

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        return values.get(cmd, b"\x00\x01")

    server = start_server(handler)
    client = Client(server.path)
    answers = {name: client.send(name).payload for name in values}  # type: ignore[union-attr]
    assert answers == {
        "set": ["a", "b"],
        "datetime": "2024-05-06T07:08:09+00:00",
        "date": "2024-05-06",
        "enum": "fast",
        "decimal": "19.99",
        "uuid": "00000000-0000-0000-0000-000000000001",
        "path": "/srv/app",
        "dataclass": {"id": 1, "tags": ["x"]},
    }
    reply = client.send("bytes")
    assert (
        reply is not None
        and reply.error == "reply could not be encoded: TypeError: a value of type bytes is not JSON"
    )
    assert client.send("enum") == Response.success("fast")  # the connection goes on


def test_a_directory_other_users_could_change_is_refused(start_server: ServerFactory, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could swap the socket
    with pytest.raises(BindError, match=r"writable by other users \(mode 0777\) and not sticky"):
        start_server(path=str(shared / "app.sock"))
    os.chmod(shared, 0o1777)  # sticky, as /tmp: others cannot touch this user's files
    assert ping_ok(start_server(path=str(shared / "app.sock")).path)
    assert [p.name for p in shared.iterdir()] == ["app.sock"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user takes root")
def test_a_directory_of_another_user_or_a_symlink_of_one_is_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(BindError, match="is owned by uid 65534, not this user"):
        start_server(path=str(theirs / "app.sock"))
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(ours)
    os.lchown(link, 65534, 65534)
    with pytest.raises(BindError, match="is a symlink owned by uid 65534"):
        start_server(path=str(link / "app.sock"))


def test_a_flood_of_refused_connections_holds_few_descriptors_and_logs_few_lines(
    start_server: ServerFactory, connect_raw: RawConnector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="unixsock_asgi.server")
    server = start_server(max_connections=2)
    flood: list[socket.socket] = []
    holders = _hold_busy(server.path, 2, connect_raw)
    try:
        wait_until(lambda: server._active == 2 and all(c._busy for c in server._connections))
        began = time.monotonic()
        for _ in range(200):  # refused ("busy"), and they never send a byte
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(s)
            s.connect(server.path)
        wait_until(lambda: server._opening == 0)
        assert server._refusing <= 16
        # The others were dropped at once (each refused one waits up to a second to be told why).
        wait_until(lambda: len(server._connections) <= 2 + 16, timeout=0.9)
        took = time.monotonic() - began  # a second or more on a loaded machine
        lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        # Once a second, with how many were held back.
        assert 1 <= len(lines) <= 2 + int(took), (len(lines), took)
    finally:
        for s in holders + flood:
            s.close()
    wait_until(lambda: server._active == 0 and server._refusing == 0)
    assert ping_ok(server.path)


def test_a_directory_above_that_others_could_write_is_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    (shared / "ctl").mkdir(parents=True, mode=0o700)
    os.chmod(shared, 0o777)  # others could rename ctl away and put their own in its place
    with pytest.raises(
        BindError, match=r"directory above the socket directory .* is writable by other users"
    ):
        start_server(path=str(shared / "ctl" / "app.sock"))
    os.chmod(shared, 0o1777)  # sticky: they cannot rename what is not theirs
    assert ping_ok(start_server(path=str(shared / "ctl" / "app.sock")).path)


def test_the_directories_a_symlink_leads_through_are_checked_too(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    from unixsock_asgi._sockets import ensure_private_directory

    shared = tmp_path / "shared"
    (shared / "ctl").mkdir(parents=True, mode=0o700)
    os.chmod(shared, 0o777)  # others could rename ctl away...
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "link").symlink_to(shared / "ctl")  # ...however it is reached
    with pytest.raises(BindError, match=r"directory above the socket directory .*shared' is writable"):
        ensure_private_directory(str(mine / "link"))
    with pytest.raises(BindError, match=r"shared' is writable by other users"):
        start_server(path=str(mine / "link" / "app.sock"))
    (mine / "up").symlink_to(shared / "ctl")
    with pytest.raises(BindError, match=r"shared' is writable by other users"):
        ensure_private_directory(str(mine / "up" / ".." / "new"))  # .. after a symlink: where it leads
    with pytest.raises(BindError, match=r"shared' is writable by other users"):
        ensure_private_directory(str(shared / "made"))
    assert sorted(p.name for p in shared.iterdir()) == ["ctl"]  # nothing made in a directory refused
    os.chmod(shared, 0o1777)
    assert ensure_private_directory(str(mine / "up" / ".." / "new")) == str(shared / "new")


def test_a_process_that_exits_without_stopping_its_server_leaves_no_socket_file(tmp_path: Path) -> None:
    # As under uvicorn after a second Ctrl-C, which skips the lifespan's shutdown.
    # A child forked meanwhile exits first, and must leave its parent's socket alone.
    code = f"""
import os, sys
from unixsock_asgi import Client, UnixSockServer
server = UnixSockServer({str(tmp_path / "c.sock")!r}, lambda cmd, args: "pong").start()
for child_stops in (False, True):
    child = os.fork()
    if child == 0:
        if child_stops:
            server.stop()  # as a with-block left in the child would
            assert server._bound.sock.fileno() == -1  # its copy of the listener is closed
        sys.exit(0)  # runs the exit handlers, as the parent will
    _, status = os.waitpid(child, 0)
    print(Client(server.path).send("ping").payload, os.path.exists(server.path), status, flush=True)
sys.exit(0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pong", "True", "0"] * 2  # still there after each child's exit
    assert list(tmp_path.iterdir()) == []


def test_a_stopping_server_removes_its_socket_file_before_it_ends_connections(
    start_server: ServerFactory, connect_raw: RawConnector, sock_path: str
) -> None:
    # A client that comes meanwhile is told nothing is there, rather than connecting
    # to be reset; and once the listener is closed, the inode number may be a new
    # server's at this path, which must be left alone.
    entered = threading.Event()

    async def handler(cmd: str, args: dict[str, Any]) -> str:
        entered.set()
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:  # its connection ended: it lingers, and the server waits 1 s
            await asyncio.sleep(1.5)
        return "late"

    server = start_server(handler)
    send_frame(connect_raw(server.path), {"cmd": "slow", "close": False})
    assert entered.wait(5)
    stopping = threading.Thread(target=server.stop)
    started = time.monotonic()
    stopping.start()
    for _ in range(1000):
        if not os.path.exists(sock_path):
            break
        time.sleep(0.005)
    gone_after = time.monotonic() - started
    assert gone_after < 0.6  # not after the second spent waiting for the handler
    successor = start_server(path=sock_path)  # a new server at that path while the old one stops
    stopping.join(10)
    assert os.path.exists(sock_path) and ping_ok(successor.path)  # left alone, whatever its inode
