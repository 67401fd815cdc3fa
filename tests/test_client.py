"""Client and AsyncClient against real servers, broken peers and a Go-shaped server."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import pickle
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unixsock_asgi import (
    AsyncClient,
    Client,
    CommandFailed,
    ConnectError,
    ControlSocketMiddleware,
    ProtocolError,
    RequestContext,
    Response,
    TimeoutException,
    TransportError,
    UnixSockError,
    UnixSockServer,
)

pytestmark = pytest.mark.timeout(30)

# The shape of the conftest fixture ``start_server``.
ServerFactory = Callable[..., UnixSockServer]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class ConnectionTracker:
    """A handler that numbers connections and can tell when the server has closed one.

    Async handlers run in the connection's own task, so that task stands for
    the connection; it is done once the server has closed the connection.
    """

    def __init__(self) -> None:
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.received: list[tuple[str, dict[str, Any]]] = []

    def serial(self) -> int:
        task = asyncio.current_task()
        assert task is not None
        for serial, known in self.tasks.items():
            if known is task:
                return serial
        serial = len(self.tasks) + 1
        self.tasks[serial] = task
        return serial

    def closed(self, serial: int) -> bool:
        return self.tasks[serial].done()

    async def __call__(self, cmd: str, args: dict[str, Any], ctx: RequestContext) -> Any:
        self.received.append((cmd, args))
        if cmd == "conn":
            return self.serial()
        if cmd == "sleep":
            await asyncio.sleep(float(args["seconds"]))
            return "slept"
        if cmd == "big":
            return "x" * int(args["size"])
        if cmd == "fail":
            return Response.failure("it failed", payload={"code": 7})
        return {"cmd": cmd, "args": args, "pid": ctx.peer.pid}


@pytest.fixture
def tracker() -> ConnectionTracker:
    return ConnectionTracker()


# -- Client ----------------------------------------------------------------


def test_send_returns_the_response(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker)
    response = Client(server.path).send("show", {"a": [1, 2], "b": None})
    assert response is not None
    assert response.ok
    assert response.payload == {"cmd": "show", "args": {"a": [1, 2], "b": None}, "pid": os.getpid()}
    assert response.raise_for_status() is response


def test_failure_and_raise_for_status(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker)
    response = Client(server.path).send("fail")
    assert response is not None
    assert not response.ok
    assert (response.status, response.error, response.payload) == ("failure", "it failed", {"code": 7})
    with pytest.raises(CommandFailed) as info:
        response.raise_for_status()
    # Which socket and which command: a loop over many workers logs what failed where.
    assert str(info.value) == f"{server.path}: 'fail' failed: it failed"
    assert info.value.response is response
    assert info.value.request is not None and info.value.request.cmd == "fail"
    assert response.request is info.value.request and response.path == server.path
    copied = pickle.loads(pickle.dumps(info.value))  # from a process pool's worker, say
    assert (str(copied), copied.response, copied.request) == (str(info.value), response, response.request)
    own = _Refused("refused", response=response)
    own.code = 7
    if sys.version_info >= (3, 11):
        own.add_note("while deploying")
    copied = pickle.loads(pickle.dumps(own))
    assert type(copied) is _Refused and copied.code == 7
    if sys.version_info >= (3, 11):
        assert copied.__notes__ == ["while deploying"]
    assert isinstance(info.value, UnixSockError)


class _Refused(CommandFailed):
    """An app's own failure class, with an attribute of its own."""

    code = 0


def test_respond_false_returns_none_and_still_delivers(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    assert Client(server.path).send("note", {"n": 1}, respond=False) is None
    wait_until(lambda: ("note", {"n": 1}) in tracker.received)


def test_options_set_size_timeout_and_default_flags(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    client = Client(server.path)
    client.options(4 << 20, 2.5, False, True)
    assert (client.max_message_size, client.timeout, client.respond, client.close_after) == (
        4 << 20,
        2.5,
        False,
        True,
    )
    assert client.send("note") is None
    wait_until(lambda: any(cmd == "note" for cmd, _ in tracker.received))
    client.options(1 << 30, 5.0, True, True)
    assert client.max_message_size == 16 << 20  # capped at the hard limit
    response = client.send("conn")
    assert response is not None
    assert response.ok
    client.options(timeout=60)  # by name, what is left out stays
    assert (client.max_message_size, client.timeout, client.respond, client.close_after) == (
        16 << 20,
        60,
        True,
        True,
    )
    client.options(respond=False, timeout=None)
    assert (client.timeout, client.respond) == (None, False)


@pytest.mark.parametrize("twin", [Client, AsyncClient])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number of seconds or None"),
        ({"timeout": -1}, "timeout must be .* not -1"),
        ({"timeout": float("nan")}, "timeout must be .* not nan"),
        ({"timeout": "5"}, "timeout must be .* not '5'"),
        ({"max_message_size": 0}, "max_message_size must be a whole number of bytes of at least 1, not 0"),
    ],
)
def test_options_that_cannot_work_are_refused_by_both_twins(
    twin: type[Client | AsyncClient], options: dict[str, Any], message: str, sock_path: str
) -> None:
    # Before: the blocking client failed in the socket layer, the async one said the
    # server's backlog was full; a size below 1 failed every reply.
    with pytest.raises(ValueError, match=message):
        twin(sock_path, **options)
    client = twin(sock_path)
    given = {"max_length": options["max_message_size"]} if "max_message_size" in options else options
    with pytest.raises(ValueError, match=message.replace("max_message_size", "max_length")):
        client.options(**given)
    assert (client.timeout, client.max_message_size) == (10.0, 1 << 20)  # left as they were
    client.options(timeout=math.inf)  # as before these checks: no limit, which None also says
    assert client.timeout is None and twin(sock_path, timeout=math.inf).timeout is None


def test_reply_above_the_clients_limit_is_a_protocol_error(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    client = Client(server.path, max_message_size=1000)
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000 bytes") as info:
        client.send("big", {"size": 5000})
    assert str(info.value).endswith(
        "(this client's max_message_size: raise it with options() or max_message_size=)"
    )
    response = client.send("big", {"size": 500})
    assert response is not None
    assert response.payload == "x" * 500


def test_a_connection_dropped_unanswered_says_what_that_may_mean(tmp_path: Path) -> None:
    # What a server flooded past max_connections (and its refusal queue) does: RST, no reply.
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()

        def drop(count: int) -> None:
            for _ in range(count):
                conn, _ = listener.accept()
                conn.recv(1)  # the request has arrived; the rest stays unread
                conn.close()  # closed with unread data: the client reads ECONNRESET

        dropper = threading.Thread(target=drop, args=(2,))
        dropper.start()
        try:
            with pytest.raises(
                TransportError, match=r"it may be flooded, with its max_connections open"
            ) as info:
                Client(path).send("ping")
            assert "Connection reset by peer" in str(info.value)

            async def ask() -> None:
                async with AsyncClient(path) as client:
                    await client.send("ping")

            with pytest.raises(TransportError, match=r"it may be flooded, with its max_connections open"):
                asyncio.run(ask())
        finally:
            dropper.join(10)


def test_clients_wait_longer_than_the_middleware_waits_for_the_app_loop() -> None:
    # So that, on defaults, "the app's event loop appears blocked" reaches the caller
    # rather than the client giving up first (the two were both 5 s).
    app_timeout = inspect.signature(ControlSocketMiddleware).parameters["app_timeout"].default
    for twin in (Client, AsyncClient):
        assert twin("/nowhere.sock").timeout == 10.0 > app_timeout


def test_large_reply_arrives_whole(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker)
    response = Client(server.path, max_message_size=4 << 20).send("big", {"size": 3 << 20})
    assert response is not None
    assert response.payload == "x" * (3 << 20)


def test_empty_command_is_refused_before_sending(sock_path: str) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        Client(sock_path).send("")
    # A list of pairs made a dict quietly; anything else failed inside dict().
    for args in ([("a", 1)], [1, 2], "a=1"):
        with pytest.raises(TypeError, match="args must be a dict \\(a JSON object\\) or None, not"):
            Client(sock_path).send("ping", args)  # type: ignore[call-overload]


def test_close_false_keeps_the_connection_and_close_ends_it(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    with Client(server.path, close=False) as client:
        serials = {_payload(client.send("conn")) for _ in range(5)}
        assert len(serials) == 1
        (first,) = serials
        client.close()
        wait_until(lambda: tracker.closed(first))
        second = _payload(client.send("conn"))
        assert second != first
        # A per-call close=True ends the kept connection after its reply.
        assert _payload(client.send("conn", close=True)) == second
        wait_until(lambda: tracker.closed(second))
    assert _payload(Client(server.path).send("conn")) not in (first, second)


def test_context_manager_closes_the_kept_connection(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    with Client(server.path, close=False) as client:
        serial = _payload(client.send("conn"))
    wait_until(lambda: tracker.closed(serial))


def test_kept_connection_reopens_after_the_server_closed_it(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker, idle_timeout=0.3)
    with Client(server.path, close=False) as client:
        first = _payload(client.send("conn"))
        wait_until(lambda: tracker.closed(first))  # the idle timeout elapsed
        second = _payload(client.send("conn"))
        assert second != first
        assert _payload(client.send("conn")) == second


def test_kept_connection_reopens_after_a_server_restart(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    with Client(server.path, close=False) as client:
        first = _payload(client.send("conn"))
        server.stop()
        server.start()
        assert _payload(client.send("conn")) != first


def _payload(response: Response | None) -> Any:
    assert response is not None
    assert response.ok, response.error
    return response.payload


# -- AsyncClient -----------------------------------------------------------


def test_async_client(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker, idle_timeout=0.3)

    async def main() -> None:
        response = await AsyncClient(server.path).send("show", {"x": 1})
        assert response is not None
        assert response.payload["args"] == {"x": 1}

        failed = await AsyncClient(server.path).send("fail", {"why": 1})
        assert failed is not None
        with pytest.raises(
            CommandFailed, match=f"^{re.escape(server.path)}: 'fail' failed: it failed$"
        ) as info:
            failed.raise_for_status()
        assert info.value.request is not None and info.value.request.args == {"why": 1}

        respond = False  # typed bool: the overload for respond=False is typed None, which mypy will not test
        assert await AsyncClient(server.path).send("note", respond=respond) is None

        async with AsyncClient(server.path, close=False) as client:
            first = _payload(await client.send("conn"))
            assert _payload(await client.send("conn")) == first
            await client.close()
            second = _payload(await client.send("conn"))
            assert second != first
            await wait_until_async(lambda: tracker.closed(second))  # idle timeout
            third = _payload(await client.send("conn"))
            assert third not in (first, second)
        await wait_until_async(lambda: tracker.closed(third))

        client = AsyncClient(server.path)
        client.options(1 << 20, 3.0, True, False)
        kept = _payload(await client.send("conn"))
        assert _payload(await client.send("conn")) == kept
        await client.aclose()

    asyncio.run(main())
    assert ("note", {}) in tracker.received


async def wait_until_async(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- transport errors ------------------------------------------------------


def test_missing_path_is_a_connect_error(sock_path: str) -> None:
    with pytest.raises(ConnectError, match="no socket file there; is the server running") as info:
        Client(sock_path).send("ping")
    assert sock_path in str(info.value)
    with pytest.raises(ConnectError, match="no socket file there"):
        asyncio.run(AsyncClient(sock_path).send("ping"))


def test_stale_socket_is_a_connect_error(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(sock_path)
        stale.close()
        with pytest.raises(ConnectError, match="nothing is listening") as info:
            Client(sock_path).send("ping")
        assert "stale socket" in str(info.value)
        assert isinstance(info.value, TransportError)
        with pytest.raises(ConnectError, match="nothing is listening"):
            asyncio.run(AsyncClient(sock_path).send("ping"))
    finally:
        stale.close()


def test_a_path_that_is_no_socket_is_named_for_what_it_is(tmp_path: Path) -> None:
    # Connecting to a plain file is refused like a stale socket: it is not one.
    plain = tmp_path / "app.sock"
    plain.write_text("")
    with pytest.raises(ConnectError, match=r"app.sock: that path is a regular file, not a socket"):
        Client(plain).send("ping")
    with pytest.raises(ConnectError, match="that path is a directory, not a socket"):
        asyncio.run(AsyncClient(tmp_path).send("ping"))


def test_a_full_backlog_is_named_as_such_by_both_clients(
    sock_path: str, full_backlog: Callable[[str], socket.socket]
) -> None:
    listener = full_backlog(sock_path)
    with pytest.raises(ConnectError, match="the server's backlog is full"):
        Client(sock_path, timeout=0.5).send("ping")
    started = time.monotonic()
    # asyncio took EAGAIN for a connect in progress: it "connected", and the first
    # write failed as "the server dropped the connection unanswered: it may be flooded".
    with pytest.raises(ConnectError, match="the server's backlog is full"):
        asyncio.run(AsyncClient(sock_path, timeout=0.5).send("ping"))
    assert 0.4 < time.monotonic() - started < 3  # tried again until its timeout

    async def send_once_there_is_room() -> None:
        client = AsyncClient(sock_path, timeout=5.0)
        sending = asyncio.ensure_future(client.send("ping", respond=False))
        await asyncio.sleep(0.2)
        assert not sending.done()  # still trying to connect
        listener.accept()[0].close()  # the oldest in the queue goes: room for one more
        await sending  # connected on a later try, and the frame went out
        await client.aclose()

    asyncio.run(send_once_there_is_room())


def test_slow_handler_is_a_timeout(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker)
    client = Client(server.path, timeout=0.3, close=False)
    with pytest.raises(TimeoutException, match=r"no reply within 0\.3s") as info:
        client.send("sleep", {"seconds": 10})
    # What to do about it, for a command that takes that long (not a guess at a blocked loop).
    assert str(info.value).endswith("needs a longer timeout: timeout= or options(timeout=...))")
    client.options(1 << 20, 5.0, True, True)
    assert _payload(client.send("show"))["cmd"] == "show"  # a fresh connection after the timeout

    async def main() -> None:
        with pytest.raises(TimeoutException, match=r"no reply within 0\.3s"):
            await AsyncClient(server.path, timeout=0.3).send("sleep", {"seconds": 10})

    asyncio.run(main())


class RawPeer:
    """A raw socket server in a thread that hands every connection to ``serve``."""

    name = "raw-peer"

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.listener.settimeout(0.1)
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=self.name)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                self.serve(conn, self.connections)

    def serve(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        assert not self.thread.is_alive()


class JunkServer(RawPeer):
    """Answers every connection with fixed bytes, then closes."""

    name = "junk-server"

    def __init__(self, path: str, reply: bytes) -> None:
        self.reply = reply
        super().__init__(path)

    def serve(self, conn: socket.socket, number: int) -> None:
        conn.recv(65536)
        conn.sendall(self.reply)


@pytest.fixture
def junk_server(sock_path: str) -> Iterator[Callable[[bytes], JunkServer]]:
    servers: list[JunkServer] = []

    def start(reply: bytes) -> JunkServer:
        server = JunkServer(sock_path, reply)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad reply: malformed frame"),
        (b"\x7f\xff\xff\xff:", "exceeds the limit"),
        (b"\x00\x00\x00\x02;{}", "expected ':'"),
        (b"\x00\x00\x00\x05:hello", "not valid JSON"),
        (b"\x00\x00\x00\x02:[]", "must be a JSON object"),
        (b'\x00\x00\x00\x0d:{"cmd":"x"}  ', "no response object"),
        (b"\x00\x00\x00\x10:{}", "closed mid-reply"),
        (b"\x00\x00", "closed before a reply arrived"),
        (b"", "closed before a reply arrived"),
    ],
)
def test_garbage_from_the_peer_is_a_protocol_error(
    junk_server: Callable[[bytes], JunkServer], sock_path: str, reply: bytes, message: str
) -> None:
    junk_server(reply)
    with pytest.raises(ProtocolError, match=message):
        Client(sock_path).send("ping")

    async def main() -> None:
        with pytest.raises(ProtocolError, match=message):
            await AsyncClient(sock_path).send("ping")

    asyncio.run(main())


# -- a Go server on the wire -----------------------------------------------


class GoShapedServer(RawPeer):
    """Serves like the Go library's server: read a frame, echo the whole request with response filled.

    The Go server decodes into its Request struct, so an absent ``respond`` or
    ``close`` reads as false; it keeps the connection while ``close`` is false.
    """

    name = "go-shaped-server"

    def __init__(self, path: str) -> None:
        self.requests: list[tuple[int, dict[str, Any]]] = []
        super().__init__(path)

    def serve(self, conn: socket.socket, number: int) -> None:
        while True:
            header = _recv_exact(conn, 5)
            if len(header) < 5:
                return
            (length,) = struct.unpack(">I", header[:4])
            request = json.loads(_recv_exact(conn, length))
            self.requests.append((number, request))
            if request["cmd"] == "fail":
                request["response"] = {"status": "failure", "error": "go says no", "payload": ""}
            else:
                payload = json.dumps({"cmd": request["cmd"], "args": request["args"]})
                request["response"] = {"status": "success", "error": "", "payload": payload}
            if request.get("respond", False):
                body = json.dumps(request).encode()
                conn.sendall(struct.pack(">I", len(body)) + b":" + body)
            if request.get("close", False):
                return


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def go_server(sock_path: str) -> Iterator[GoShapedServer]:
    server = GoShapedServer(sock_path)
    try:
        yield server
    finally:
        server.stop()


def test_client_talks_to_a_go_server(go_server: GoShapedServer, sock_path: str) -> None:
    response = Client(sock_path).send("stats", {"verbose": True})
    assert response is not None
    assert response.ok
    assert isinstance(response.payload, str)
    assert json.loads(response.payload) == {"cmd": "stats", "args": {"verbose": True}}
    failed = Client(sock_path).send("fail")
    assert failed is not None
    assert (failed.status, failed.error) == ("failure", "go says no")
    # Both flags are always sent explicitly: a Go server reads an absent one as false.
    for _, request in go_server.requests:
        assert request["respond"] is True
        assert request["close"] is True


def test_kept_connection_to_a_go_server(go_server: GoShapedServer, sock_path: str) -> None:
    with Client(sock_path, close=False) as client:
        for i in range(3):
            assert json.loads(_payload(client.send("echo", {"i": i})))["args"] == {"i": i}
        assert _payload(client.send("last", close=True))
    assert [number for number, _ in go_server.requests] == [1, 1, 1, 1]
    assert [request["close"] for _, request in go_server.requests] == [False, False, False, True]


def test_async_client_talks_to_a_go_server(go_server: GoShapedServer, sock_path: str) -> None:
    async def main() -> Response | None:
        return await AsyncClient(sock_path).send("stats", {"a": 1})

    response = asyncio.run(main())
    assert response is not None
    assert json.loads(_payload(response)) == {"cmd": "stats", "args": {"a": 1}}


# -- interrupted calls, shared async clients, refused requests ----------------


def test_a_cancelled_async_call_never_hands_its_reply_to_the_next(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)

    async def main() -> None:
        client = AsyncClient(server.path, close=False)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.send("sleep", {"seconds": 0.2}), 0.05)
        # At once, before the sleep's reply arrives on the connection it was sent on.
        assert _payload(await client.send("next"))["cmd"] == "next"
        await client.aclose()

    asyncio.run(main())


def test_an_interrupted_blocking_call_never_hands_its_reply_to_the_next(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    import signal

    server = start_server(tracker)
    client = Client(server.path, close=False)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            client.send("sleep", {"seconds": 0.2})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # At once, before the sleep's reply arrives on the connection it was sent on.
    assert _payload(client.send("next"))["cmd"] == "next"
    client.close()


@pytest.mark.parametrize("close", [True, False])
def test_tasks_may_share_one_async_client(
    start_server: ServerFactory, tracker: ConnectionTracker, close: bool
) -> None:
    server = start_server(tracker)

    async def main() -> list[Any]:
        client = AsyncClient(server.path, close=close)
        try:
            await client.send("warm", close=False)  # a kept connection that every task would use
            replies = await asyncio.gather(*(client.send("echo", {"n": n}) for n in range(10)))
        finally:
            await client.aclose()
        return [_payload(reply)["args"]["n"] for reply in replies]

    assert asyncio.run(main()) == list(range(10))


def test_a_request_too_large_for_the_server_gets_its_refusal(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)  # max_message_size 1 MiB
    args = {"blob": "x" * 4_000_000}  # more than the socket's buffer: the write itself fails
    reply = Client(server.path).send("big", args)
    assert reply is not None and not reply.ok
    assert "exceeds the limit of 1048576 bytes" in reply.error
    with pytest.raises(CommandFailed, match=f"^{re.escape(server.path)}: 'big' failed: message of"):
        reply.raise_for_status()
    with pytest.raises(ProtocolError, match="refused the request: message of"):
        Client(server.path).send("big", args, respond=False)

    async def main() -> Response | None:
        return await AsyncClient(server.path).send("big", args)

    for _ in range(5):  # the refusal and the failed write race in the transport: never lost
        reply = asyncio.run(main())
        assert reply is not None and "exceeds the limit of 1048576 bytes" in reply.error
    assert _payload(Client(server.path).send("after"))["cmd"] == "after"
    assert all(cmd != "big" for cmd, _ in tracker.received)


def test_no_timeout_waits_for_the_reply(start_server: ServerFactory, tracker: ConnectionTracker) -> None:
    server = start_server(tracker)
    assert Client(server.path, timeout=None).send("sleep", {"seconds": 0.1}) == Response.success("slept")
    reply = asyncio.run(AsyncClient(server.path, timeout=None).send("sleep", {"seconds": 0.1}))
    assert reply == Response.success("slept")


@pytest.mark.parametrize("close", [True, False])
def test_one_async_client_serves_one_event_loop_after_another(
    start_server: ServerFactory, tracker: ConnectionTracker, close: bool
) -> None:
    server = start_server(tracker)
    client = AsyncClient(server.path, close=close)

    async def three() -> list[Any]:
        try:
            replies = await asyncio.gather(*(client.send("echo", {"n": n}) for n in range(3)))
        finally:
            await client.aclose()  # a kept connection belongs to its loop
        return [_payload(reply)["args"]["n"] for reply in replies]

    for _ in range(3):  # each asyncio.run is a new loop; tasks compete for the client in each
        assert asyncio.run(three()) == [0, 1, 2]


def test_a_connection_kept_from_a_finished_loop_is_closed_not_leaked(
    start_server: ServerFactory, tracker: ConnectionTracker
) -> None:
    server = start_server(tracker)
    client = AsyncClient(server.path, close=False)

    async def ping() -> Any:
        return _payload(await client.send("ping"))

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    asyncio.run(ping())
    before = open_fds()
    for _ in range(5):  # each run leaves a kept connection behind, in a loop that is then closed
        assert asyncio.run(ping())["cmd"] == "ping"
    assert open_fds() <= before + 1
    wait_until(lambda: sum(not tracker.closed(n) for n in tracker.tasks) <= 1)  # the server saw them go
    asyncio.run(client.aclose())  # from yet another loop: no "Event loop is closed"
