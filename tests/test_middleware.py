"""ControlSocketMiddleware in-process: lifespan, recording, gates, handlers. Real control sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from unixsock_asgi import (
    Client,
    Commands,
    ControlSocketMiddleware,
    Response,
    Setting,
    Settings,
    TimeoutException,
    UnixSockError,
    UnixSockServer,
)
from unixsock_asgi._fleet import persist_override

pytestmark = pytest.mark.timeout(30)


def _payload(client: Client, cmd: str, **args: Any) -> Any:
    response = client.send(cmd, args)
    assert response is not None and response.ok, response
    return response.payload


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hi")


async def _boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


async def _ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def _starlette(sock: Path, **options: Any) -> Starlette:
    inner = Starlette(routes=[Route("/page/{slug}", _hello)])
    return Starlette(
        routes=[
            Route("/hello/{name}", _hello),
            Route("/boom", _boom),
            WebSocketRoute("/ws", _ws),
            Mount("/sub", app=inner),
        ],
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock), **options)],
    )


def test_nothing_starts_before_lifespan_and_everything_stops_after(short_dir: Path) -> None:
    sock = short_dir / "c-{pid}.sock"
    app = _starlette(sock)
    real = Path(str(sock).replace("{pid}", str(os.getpid())))
    assert not real.exists()  # construction binds nothing (gunicorn --preload forks after it)
    with TestClient(app) as http:
        assert real.exists() and real.stat().st_mode & 0o777 == 0o600
        assert http.get("/hello/x").text == "hi"
        assert _payload(Client(real), "ping") == "pong"
    assert not real.exists()


def test_requests_without_a_lifespan_say_once_why_there_is_no_socket(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn --lifespan off, or the middleware on a mounted app: silent, it looked like a bug.
    sock = short_dir / "c.sock"
    caplog.set_level(logging.WARNING, logger="unixsock_asgi")
    http = TestClient(_starlette(sock))  # outside `with`: no lifespan
    assert [http.get("/hello/x").status_code for _ in range(3)] == [200] * 3
    said = [r for r in caplog.records if r.getMessage().startswith("no control socket")]
    assert len(said) == 1 and "uvicorn --lifespan off" in said[0].getMessage() and not sock.exists()
    caplog.clear()
    websockets_only = TestClient(_starlette(sock))  # Channels under daphne: no HTTP request at all
    for _ in range(2):
        with websockets_only.websocket_connect("/ws") as ws:
            assert ws.receive_text() == "hello"
    said = [r for r in caplog.records if r.getMessage().startswith("no control socket")]
    assert len(said) == 1 and "got a websocket connection but no lifespan startup" in said[0].getMessage()
    caplog.clear()
    with TestClient(_starlette(sock)) as http:  # with its lifespan: nothing to say
        assert http.get("/hello/x").status_code == 200
        _payload(Client(sock), "health_fail")
        assert http.get("/health").status_code == 503 and http.get("/hello/x").status_code == 200
        _payload(Client(sock), "health_ok")
        assert http.get("/health").status_code == 404  # the app's own: it has no /health
    assert not [r for r in caplog.records if r.getMessage().startswith("no control socket")]


def test_stats_says_what_an_operator_turned_on(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock)):
        control = Client(sock)
        assert _payload(control, "stats", routes=False)["control"] == {
            "health_failing": False,
            "maintenance": False,
        }
        _payload(control, "health_fail")
        _payload(control, "maintenance_on")
        assert _payload(control, "stats", routes=False)["control"] == {
            "health_failing": True,
            "maintenance": True,
        }
        _payload(control, "health_ok")
        assert _payload(control, "stats")["control"] == {"health_failing": False, "maintenance": True}


def test_recording_templates_statuses_exceptions_and_websockets(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock), raise_server_exceptions=False) as http:
        control = Client(sock)
        for name in ("a", "b", "c"):
            assert http.get(f"/hello/{name}").status_code == 200
        assert http.post("/hello/a").status_code == 405  # partial match: still the template
        assert http.get("/boom").status_code == 500
        assert http.get("/sub/page/intro").status_code == 200
        assert http.get("/nowhere").status_code == 404
        with http.websocket_connect("/ws") as ws:
            assert ws.receive_text() == "hello"
        # Refused at the handshake (no websocket route there): no connection to count.
        for refused in ("/no-such-ws", "/hello/x"):
            with pytest.raises(WebSocketDisconnect), http.websocket_connect(refused):
                pass
        stats = _payload(control, "stats")
    routes = stats["routes"]
    assert routes["/hello/{name}"]["requests"] == 4
    assert routes["/hello/{name}"]["by_status"] == {"2xx": 3, "4xx": 1}
    assert routes["/hello/{name}"]["by_method"] == {"GET": 3, "POST": 1}
    assert routes["/boom"]["exceptions"] == 1 and routes["/boom"]["by_status"] == {"5xx": 1}
    assert routes["/sub/page/{slug}"]["requests"] == 1
    assert routes["<unmatched>"]["requests"] == 1
    assert stats["websockets"] == {"active": 0, "total": 1}
    assert stats["in_flight"] == 0


def test_concurrent_requests_are_counted_exactly_and_in_flight_is_live(short_dir: Path) -> None:
    release = asyncio.Event()
    entered = 0

    async def wait(scope: Any, receive: Any, send: Any) -> None:
        nonlocal entered
        if scope["type"] != "http":
            return
        entered += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = ControlSocketMiddleware(wait, path=str(short_dir / "c.sock"))

    async def one(i: int) -> None:
        scope = {"type": "http", "method": "GET", "path": f"/r/{i}", "root_path": "", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        await middleware(scope, receive, send)

    async def main() -> None:
        tasks = [asyncio.create_task(one(i)) for i in range(250)]
        while entered < 250:
            await asyncio.sleep(0.001)
        assert middleware.stats.in_flight == 250
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    snap = middleware.stats.snapshot()
    assert snap["requests_total"] == 250 and snap["in_flight"] == 0
    assert snap["routes"] == {"<unmatched>": snap["routes"]["<unmatched>"]}  # raw paths never become keys
    assert snap["by_status"] == {"2xx": 250}


def test_an_app_without_lifespan_support_still_gets_a_control_socket(short_dir: Path) -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")
        await PlainTextResponse("bare")(scope, receive, send)

    sock = short_dir / "c.sock"
    with TestClient(ControlSocketMiddleware(bare, path=str(sock))) as http:
        assert http.get("/").text == "bare"
        assert _payload(Client(sock), "ping") == "pong"
    assert not sock.exists()


def test_an_app_whose_startup_fails_still_fails_and_leaves_no_socket(short_dir: Path) -> None:
    @asynccontextmanager
    async def broken_lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("database unreachable")
        yield  # pragma: no cover

    sock = short_dir / "c.sock"
    app = Starlette(
        lifespan=broken_lifespan, middleware=[Middleware(ControlSocketMiddleware, path=str(sock))]
    )
    with pytest.raises(RuntimeError, match="database unreachable"), TestClient(app):
        pass
    assert not sock.exists()


def _run_lifespan_without_asyncio(app: Any) -> list[dict[str, Any]]:
    """Startup then shutdown, with no asyncio loop running: as hypercorn -k trio runs them."""
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    coro = app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    try:
        coro.send(None)
    except StopIteration:  # never suspended: nothing in it waits on a loop
        return sent
    except RuntimeError as exc:  # startup.failed goes out, then the app raises (strict)
        sent.append({"type": "raised", "message": str(exc)})
        return sent
    coro.close()
    raise AssertionError("the lifespan waited on something no loop will ever wake")


def test_a_server_without_asyncio_serves_on_and_is_told_why(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    sock = short_dir / "c.sock"
    with caplog.at_level(logging.WARNING, "unixsock_asgi"):
        sent = _run_lifespan_without_asyncio(ControlSocketMiddleware(app, path=sock))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert "runs the app on no asyncio event loop (trio, say)" in caplog.text
    assert "serves on without it" in caplog.text and not sock.exists()
    sent = _run_lifespan_without_asyncio(ControlSocketMiddleware(app, path=sock, strict=True))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed", "raised"]
    assert "no asyncio event loop" in sent[0]["message"] and not sock.exists()


def test_socket_trouble_never_breaks_the_app_unless_strict(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = short_dir / "file"
    blocker.write_text("keep me")
    with (
        caplog.at_level(logging.WARNING, "unixsock_asgi"),
        TestClient(_starlette(blocker / "c.sock")) as http,
    ):
        assert http.get("/hello/x").text == "hi"
    assert "could not start" in caplog.text and "serves on without it" in caplog.text
    assert blocker.read_text() == "keep me"

    strict = _starlette(blocker / "c.sock", strict=True)
    with pytest.raises(RuntimeError, match=r"control socket .* could not start"), TestClient(strict):
        pass

    # An option that cannot work (a mode written in decimal) is such trouble too, found at startup.
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, "unixsock_asgi"),
        TestClient(_starlette(short_dir / "c.sock", socket_mode=600)) as http,
    ):
        assert http.get("/hello/x").text == "hi"
    assert "did you mean 0o600?" in caplog.text and "serves on without it" in caplog.text
    assert not (short_dir / "c.sock").exists()
    # Found before the directory's overrides are applied: a persisted maintenance_on is not
    # left on in a worker with no socket to turn it off.
    run = short_dir / "run"
    run.mkdir(mode=0o700)
    persist_override(str(run), "maintenance_on", {})
    app = Starlette(
        routes=[Route("/hello/{name}", _hello)],
        middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(run), socket_mode=600)],
    )
    with TestClient(app) as http:
        assert http.get("/hello/x").status_code == 200
    # Nor when the socket itself cannot be bound, after the overrides were applied (here
    # another server answers on its path).
    caplog.clear()
    with UnixSockServer(str(run / f"taken-{os.getpid()}.sock"), lambda cmd, args: "pong"):
        app = Starlette(
            routes=[Route("/hello/{name}", _hello)],
            middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(run), name="taken")],
        )
        with caplog.at_level(logging.WARNING, "unixsock_asgi"), TestClient(app) as http:
            assert http.get("/hello/x").status_code == 200
    assert (
        "persisted maintenance not kept: this worker's control socket could not start (this process"
        in caplog.text
    )


def test_startup_leaves_no_idle_thread_in_the_app(short_dir: Path) -> None:
    # The socket directory's checks and the bind ran in the app loop's default executor,
    # whose threads then stayed, idle: 3, 4 or 5 threads per worker in `top` for no reason.
    def executor_threads() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith(("asyncio_", "unixsock-start"))}

    before = executor_threads()
    app = Starlette(
        routes=[Route("/hello/{name}", _hello)],
        middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(short_dir / "run"), name="t")],
    )
    with TestClient(app) as http:
        assert http.get("/hello/x").text == "hi"
        deadline = time.monotonic() + 5
        while executor_threads() - before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor_threads() - before == set()
        assert any(t.name == "unixsock-server" for t in threading.enumerate())


def test_a_startup_cancelled_while_the_socket_is_bound_leaves_no_server_running(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bind runs in a thread, which goes on when the lifespan is cancelled meanwhile; the
    # server it starts was held by nothing, answering on its socket until the process exited.
    real_start = UnixSockServer.start
    binding = threading.Event()

    def slow_start(server: UnixSockServer) -> UnixSockServer:
        binding.set()
        time.sleep(0.5)
        return real_start(server)

    monkeypatch.setattr(UnixSockServer, "start", slow_start)
    middleware = ControlSocketMiddleware(Starlette(), path=str(short_dir / "c.sock"))

    async def cancel_startup() -> None:
        task = asyncio.create_task(middleware._start_control({"type": "lifespan", "state": {}}))
        while not binding.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_startup())
    deadline = time.monotonic() + 10

    def busy() -> bool:  # the bind's thread still at it, or a server it started still there
        names = [t.name for t in threading.enumerate()]
        return any(name.startswith(("unixsock-start", "unixsock-server")) for name in names)

    while busy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (short_dir / "c.sock").exists()
    assert not any(t.name == "unixsock-server" for t in threading.enumerate())


def test_paths_may_be_path_objects(short_dir: Path) -> None:
    # pytest's tmp_path and pathlib are what an app's tests and settings hand over.
    for options in ({"path": short_dir / "p-{pid}.sock"}, {"socket_dir": short_dir / "run", "name": "shop"}):
        app = Starlette(
            routes=[Route("/hello/{name}", _hello)],
            middleware=[Middleware(ControlSocketMiddleware, **options)],
        )
        with TestClient(app) as http:
            assert http.get("/hello/x").text == "hi"
            (sock,) = list(short_dir.rglob("*.sock"))
            assert sock.name in (f"p-{os.getpid()}.sock", f"shop-{os.getpid()}.sock")
            assert _payload(Client(sock), "ping") == "pong"
        assert not list(short_dir.rglob("*.sock"))
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        ControlSocketMiddleware(_hello, path=b"/tmp/x.sock")  # type: ignore[arg-type]


def test_options_read_from_a_configuration_still_start_the_socket(short_dir: Path) -> None:
    # As before options were checked: whole floats, no app_timeout limit, a size above the protocol's.
    options: dict[str, Any] = {"retry_after": 30.0, "app_timeout": float("inf"), "max_message_size": 64 << 20}
    with TestClient(_starlette(short_dir / "c.sock", **options)) as http:
        control = Client(short_dir / "c.sock")
        assert _payload(control, "ping") == "pong"
        assert _payload(control, "maintenance_on")["maintenance"] is True
        response = http.get("/hello/x")
        assert response.status_code == 503 and response.headers["retry-after"] == "30"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"app_timeout": -1}, r"app_timeout must be a positive number of seconds \(inf: no limit\), not -1"),
        ({"app_timeout": float("nan")}, "app_timeout must be a positive number"),
        ({"retry_after": "soon"}, "retry_after must be a whole number of seconds of at least 0, not 'soon'"),
        (
            {"health_path": "health"},
            "health_path holds paths as the app sees them, starting with '/', not 'health'",
        ),
        ({"maintenance_exempt": ["/ok", "metrics"]}, "maintenance_exempt holds paths .* not 'metrics'"),
        ({"name": "a/b"}, r"name must be a file name \(no '/'\), not 'a/b'"),
        ({"max_message_size": 0}, "max_message_size must be a whole number of bytes of at least 1, not 0"),
        ({"allowed_gids": [-3]}, "allowed_gids must hold whole numbers of at least 0"),
    ],
)
def test_options_that_cannot_work_are_startup_trouble(
    short_dir: Path, caplog: pytest.LogCaptureFixture, options: dict[str, Any], message: str
) -> None:
    def app(**strict: bool) -> Starlette:
        where = (
            {"path": str(short_dir / "c.sock")} if "name" not in options else {"socket_dir": str(short_dir)}
        )
        given: dict[str, Any] = {**where, **options, **strict}
        return Starlette(
            routes=[Route("/hello/{name}", _hello)],
            middleware=[Middleware(ControlSocketMiddleware, **given)],
        )

    with caplog.at_level(logging.WARNING, "unixsock_asgi"), TestClient(app()) as http:
        assert http.get("/hello/x").text == "hi"
    assert re.search(message, caplog.text) and "serves on without it" in caplog.text
    assert not list(short_dir.rglob("*.sock")) and not list(short_dir.glob("a"))
    with pytest.raises(RuntimeError, match=message), TestClient(app(strict=True)):
        pass


def test_go_style_handler_gets_what_no_command_claims_on_the_app_loop(short_dir: Path) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def handler(cmd: str, args: dict[str, Any], ctx: Any) -> Response:
        loops.append(asyncio.get_running_loop())
        if cmd == "echo":
            return Response.success({"echo": args, "peer_pid": ctx.peer.pid})
        return Response.failure(f"handler: unknown command {cmd!r}")

    app_loop: list[asyncio.AbstractEventLoop] = []

    async def capture(request: Request) -> PlainTextResponse:
        app_loop.append(asyncio.get_running_loop())
        return PlainTextResponse("ok")

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/", capture)],
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock), handler=handler)],
    )
    with TestClient(app) as http:
        http.get("/")
        control = Client(sock)
        assert _payload(control, "echo", a=1) == {"echo": {"a": 1}, "peer_pid": os.getpid()}
        reply = control.send("other")
        assert reply is not None and reply.error == "handler: unknown command 'other'"
        assert _payload(control, "ping") == "pong"  # built-ins still win over the handler
    assert loops and all(loop is app_loop[0] for loop in loops)


def test_set_log_level_ttl_over_ttl_reverts_to_the_first_level(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    logger = logging.getLogger("usa.test.ttl")
    logger.setLevel(logging.WARNING)
    with TestClient(_starlette(sock)):
        control = Client(sock)
        _payload(control, "set_log_level", level="INFO", logger="usa.test.ttl", ttl=0.3)
        reply = _payload(control, "set_log_level", level="DEBUG", logger="usa.test.ttl", ttl=0.3)
        assert reply["old"] == "INFO" and reply["reverts_to"] == "WARNING"
        deadline = time.monotonic() + 5
        while logger.level != logging.WARNING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert logger.level == logging.WARNING
        _payload(control, "set_log_level", level=15, logger="usa.test.ttl")
        assert logger.level == 15
        bad = control.send("set_log_level", {"level": "INFO", "ttl": -1})
        assert bad is not None and "ttl must be a positive number" in bad.error
        loggers = _payload(control, "loggers")["loggers"]
        assert loggers["usa.test.ttl"]["level"] == "Level 15" and "root" in loggers


def _wait_until(check: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_ttl_leaves_a_level_the_app_set_meanwhile_alone(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = short_dir / "c.sock"
    logger = logging.getLogger("usa.test.ttl.app")
    logger.setLevel(logging.WARNING)
    with TestClient(_starlette(sock)), caplog.at_level(logging.INFO, logger="unixsock_asgi"):
        control = Client(sock)
        _payload(control, "set_log_level", level="DEBUG", logger=logger.name, ttl=0.3)
        logger.setLevel(logging.ERROR)  # the app's own change, during the ttl
        _wait_until(
            lambda: "not reverted after 0.3s: it was set to ERROR meanwhile" in caplog.text, "the ttl"
        )
        assert logger.level == logging.ERROR  # not put back to WARNING over the app's change
        # Untouched meanwhile: reverted as before.
        _payload(control, "set_log_level", level="DEBUG", logger=logger.name, ttl=0.2)
        _wait_until(lambda: logger.level == logging.ERROR, "the revert")
        # A ttl'd change over a ttl'd one goes back to what the app set between the two.
        _payload(control, "set_log_level", level="DEBUG", logger=logger.name, ttl=30)
        logger.setLevel(logging.CRITICAL)
        reply = _payload(control, "set_log_level", level="INFO", logger=logger.name, ttl=0.2)
        assert (reply["old"], reply["reverts_to"]) == ("CRITICAL", "CRITICAL")
        _wait_until(lambda: logger.level == logging.CRITICAL, "the revert")
        # The app enabling a disabled logger during a ttl that did not: it stays enabled.
        logger.disabled = True
        _payload(control, "set_log_level", level="DEBUG", logger=logger.name, ttl=0.2)
        logger.disabled = False
        _wait_until(lambda: logger.level == logging.CRITICAL, "the revert")
        assert not logger.disabled


def test_quietening_the_audit_log_from_the_socket_leaves_a_trace(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Else one command muted the record of itself and of every command after it.
    sock = short_dir / "c.sock"
    audit = logging.getLogger("unixsock_asgi.audit")
    with TestClient(_starlette(sock)), caplog.at_level(logging.INFO, logger="unixsock_asgi"):
        control = Client(sock)
        refused = control.send("set_log_level", {"level": "ERROR", "logger": "unixsock_asgi.audit"})
        assert refused is not None and refused.error.startswith(
            "the audit logger 'unixsock_asgi.audit' is not quietened from the socket"
        )
        assert audit.level == logging.NOTSET
        parent = logging.getLogger("unixsock_asgi")
        audit.setLevel(logging.INFO)  # set so by the app, under a parent at WARNING
        parent.setLevel(logging.WARNING)
        for level in ("NOTSET", 0):  # inheriting WARNING: as quiet
            refused = control.send("set_log_level", {"level": level, "logger": "unixsock_asgi.audit"})
            assert refused is not None and "is not quietened from the socket" in refused.error
        assert audit.level == logging.INFO
        audit.setLevel(logging.NOTSET)
        parent.setLevel(logging.INFO)
        caplog.clear()
        _payload(control, "set_log_level", level="ERROR", logger="unixsock_asgi", ttl=0.3)
        (warning,) = [r for r in caplog.records if r.name == "unixsock_asgi.audit"]
        assert warning.levelno == logging.WARNING and warning.getMessage() == (
            f"peer pid={os.getpid()} uid={os.getuid()} sets the level of 'unixsock_asgi' to ERROR for 0.3s:"
            " the audit lines of later commands are not logged while it stands"
        )
        _wait_until(lambda: logging.getLogger("unixsock_asgi").level == logging.INFO, "the revert")
        caplog.clear()
        # Louder, or a logger the audit lines do not pass through: nothing to say.
        _payload(control, "set_log_level", level="DEBUG", logger="unixsock_asgi.audit")
        _payload(control, "set_log_level", level="CRITICAL", logger="usa.test.elsewhere")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    audit.setLevel(logging.NOTSET)
    logging.getLogger("usa.test.elsewhere").setLevel(logging.NOTSET)


def test_set_log_level_says_when_no_handler_takes_the_loggers_records(short_dir: Path) -> None:
    # Under plain uvicorn the root logger has no handler: a DEBUG level there shows nothing.
    sock = short_dir / "c.sock"
    logger = logging.getLogger("usa.test.unhandled")
    logger.propagate = False  # no handler of its own, none above it that it reaches
    try:
        with TestClient(_starlette(sock)):
            control = Client(sock)
            reply = _payload(control, "set_log_level", level="DEBUG", logger=logger.name)
            assert "no handler takes this logger's records" in reply["note"]
            assert "note" not in _payload(control, "set_log_level", level="ERROR", logger=logger.name)
            handler = logging.NullHandler()
            logger.addHandler(handler)
            assert "note" not in _payload(control, "set_log_level", level="DEBUG", logger=logger.name)
            logger.removeHandler(handler)
            logger.propagate = True  # pytest's handlers on the root logger take them
            assert "note" not in _payload(control, "set_log_level", level="DEBUG", logger=logger.name)
    finally:
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_set_log_level_says_when_a_logger_is_disabled_and_can_enable_it_until_the_ttl(
    short_dir: Path,
) -> None:
    sock = short_dir / "c.sock"
    logger = logging.getLogger("usa.test.disabled")
    logger.setLevel(logging.WARNING)
    logger.disabled = True  # what logging.config.dictConfig does to loggers made before it
    try:
        with TestClient(_starlette(sock)):
            control = Client(sock)
            reply = _payload(control, "set_log_level", level="DEBUG", logger=logger.name)
            assert reply["disabled"] is True and "enable=true enables it" in reply["note"]
            assert _payload(control, "get_log_level", logger=logger.name)["disabled"] is True
            assert _payload(control, "loggers")["loggers"][logger.name]["disabled"] is True
            reply = _payload(control, "set_log_level", level="INFO", logger=logger.name, enable=True, ttl=0.3)
            assert reply["disabled"] is False and "note" not in reply and not logger.disabled
            _wait_until(lambda: logger.disabled, "the ttl to disable it again")
            assert logger.level == logging.DEBUG  # and the level before the ttl'd change is back
            # The app reconfigured meanwhile (a new level): its configuration stands, enabled.
            _payload(control, "set_log_level", level="INFO", logger=logger.name, enable=True, ttl=0.2)
            logger.setLevel(logging.ERROR)
            time.sleep(0.5)
            assert (logger.level, logger.disabled) == (logging.ERROR, False)
            # ... and so it does when another ttl'd change came after the app's.
            logger.disabled = True
            _payload(control, "set_log_level", level="DEBUG", logger=logger.name, enable=True, ttl=30)
            logger.setLevel(logging.ERROR)
            _payload(control, "set_log_level", level="INFO", logger=logger.name, ttl=0.2)
            _wait_until(lambda: logger.level == logging.ERROR, "the revert")
            assert not logger.disabled
            # Without a ttl, or a plain set over a ttl'd one: the change, enable included, stands.
            logger.disabled = True
            _payload(control, "set_log_level", level="INFO", logger=logger.name, enable=True, ttl=30)
            reply = _payload(control, "set_log_level", level="DEBUG", logger=logger.name)
            assert reply["disabled"] is False and reply["reverts_to"] is None
            assert _payload(control, "get_log_level")["disabled"] is False  # the root logger
    finally:
        logger.disabled = False


async def _block(request: Request) -> PlainTextResponse:
    time.sleep(float(request.query_params["s"]))  # blocks the app's loop on purpose
    return PlainTextResponse("unblocked")


def _blocking_app(sock: Path, commands: Commands, *, app_timeout: float) -> Starlette:
    """An app whose ``GET /block?s=N`` blocks its loop for N seconds."""
    middleware = Middleware(
        ControlSocketMiddleware, path=str(sock), commands=commands, app_timeout=app_timeout
    )
    return Starlette(routes=[Route("/block", _block)], middleware=[middleware])


def test_a_command_reported_as_not_started_never_runs_later(short_dir: Path) -> None:
    commands = Commands()
    calls: list[int] = []

    @commands.command
    def increment() -> int:
        """Not idempotent: running it twice counts twice."""
        calls.append(1)
        return len(calls)

    sock = short_dir / "c.sock"
    with TestClient(_blocking_app(sock, commands, app_timeout=0.3)) as http:
        control = Client(sock)
        blocker = threading.Thread(target=http.get, args=("/block?s=1.5",))
        blocker.start()
        try:
            deadline = time.monotonic() + 5
            while _payload(control, "stats", routes=False)["in_flight"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            reply = control.send("increment")
            assert reply is not None and not reply.ok
            assert "appears blocked" in reply.error and "'increment' did not start" in reply.error
        finally:
            blocker.join(10)
        assert _payload(control, "stats", routes=False)["in_flight"] == 0  # the loop ran on since
        assert _payload(control, "increment") == 1  # the call given up on never ran
    assert calls == [1]


def test_a_command_past_app_timeout_says_whether_it_may_still_finish(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = Commands()
    done: list[str] = []

    @commands.command
    def plain_slow() -> str:
        time.sleep(0.6)  # cannot be stopped
        done.append("plain")
        return "plain"

    @commands.command
    async def async_slow() -> str:
        await asyncio.sleep(0.6)  # cancelled at app_timeout
        done.append("async")
        return "async"

    @commands.command
    def broken() -> None:
        stock: dict[str, int] = {}
        stock["missing"] += 1  # a bug in a command

    sock = short_dir / "c.sock"
    app = Starlette(
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock), commands=commands, app_timeout=0.3)]
    )
    with (
        TestClient(app),
        caplog.at_level(logging.WARNING, logger="unixsock_asgi"),
        caplog.at_level(logging.INFO, logger="unixsock_asgi.audit"),
    ):
        control = Client(sock)
        reply = control.send("plain_slow")
        assert reply is not None and not reply.ok
        assert "'plain_slow' did not finish within 0.3s" in reply.error and "may yet finish" in reply.error
        reply = control.send("async_slow")
        assert reply is not None and not reply.ok
        assert reply.error.startswith(
            "'async_slow' did not finish within 0.3s on the app's loop and is cancelled"
        )
        time.sleep(0.8)
        assert done == ["plain"]  # as each reply said
        # The audit log, where an operator checks, says how each ended after its reply.
        audited = [r.getMessage() for r in caplog.records if r.name == "unixsock_asgi.audit"]
        overdue = " (ended on the app's loop after its reply at app_timeout)"
        for cmd, status in (("plain_slow", "success"), ("async_slow", "cancelled")):
            lines = [m for m in audited if f"cmd={cmd} " in m]
            assert [m.split(" status=")[1].split()[0] for m in lines] == ["failure", status], lines
            assert lines[1].endswith(overdue)
        reply = control.send("broken")
        assert reply is not None and reply.error == "KeyError: 'missing'"
    raised = [
        r
        for r in caplog.records
        if r.getMessage().startswith("command 'broken' raised KeyError: 'missing'\n")
    ]
    assert len(raised) == 1 and raised[0].levelno == logging.WARNING
    assert '    stock["missing"] += 1  # a bug in a command' in raised[0].getMessage().split("\n")


def test_tasks_and_stacks_show_at_most_limit_and_count_the_rest(short_dir: Path) -> None:
    async def idle(gate: asyncio.Event) -> None:
        await gate.wait()

    async def deeper(gate: asyncio.Event) -> None:
        await gate.wait()

    async def odd_one_out(gate: asyncio.Event) -> None:
        await deeper(gate)

    async def chunks(gate: asyncio.Event) -> AsyncIterator[bytes]:
        await gate.wait()
        yield b""

    async def streaming(gate: asyncio.Event) -> None:
        async for _ in chunks(gate):  # a StreamingResponse body
            pass

    @asynccontextmanager
    async def resource(gate: asyncio.Event) -> AsyncIterator[None]:
        await gate.wait()
        yield

    async def dependency(gate: asyncio.Event) -> None:
        async with resource(gate):  # a FastAPI yield dependency
            pass

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gate = asyncio.Event()
        spawned = [asyncio.create_task(idle(gate)) for _ in range(3000)]
        spawned += [asyncio.create_task(f(gate)) for f in (odd_one_out, streaming, dependency)]
        yield
        gate.set()
        await asyncio.gather(*spawned)

    sock = short_dir / "c.sock"
    app = Starlette(lifespan=lifespan, middleware=[Middleware(ControlSocketMiddleware, path=str(sock))])
    with TestClient(app):
        control = Client(sock)
        listed = _payload(control, "tasks", limit=10)
        assert len(listed["tasks"]) == 10 and listed["count"] >= 3003
        assert listed["omitted"] == listed["count"] - 10
        by_coro = listed["by_coro"]
        assert by_coro[idle.__qualname__] == 3000 and by_coro[odd_one_out.__qualname__] == 1
        assert odd_one_out.__qualname__ in {t["coro"] for t in listed["tasks"]}  # not hidden by the 3,000
        assert any("in idle" in frame for t in listed["tasks"] for frame in t["stack"])
        shown = {t["coro"]: t["stack"] for t in listed["tasks"]}

        def names(coro: Any) -> list[str]:
            # "file:line in function: source line"
            return [re.search(r":\d+ in (\w+)", line).group(1) for line in shown[coro.__qualname__]]  # type: ignore[union-attr]

        # Down the awaits, not just the task's own frame, and on through async generators.
        assert names(odd_one_out) == ["odd_one_out", "deeper", "wait"]
        assert "await deeper(gate)" in shown[odd_one_out.__qualname__][0]
        assert names(streaming) == ["streaming", "chunks", "wait"]
        assert names(dependency) == ["dependency", "__aenter__", "resource", "wait"]
        assert len(_payload(control, "tasks")["tasks"]) == 100  # the default
        threads = _payload(control, "stacks", limit=1)
        assert [t["app_loop"] for t in threads["threads"]] == [True] and threads["count"] >= 2
        assert threads["omitted"] == threads["count"] - 1
        assert listed["coroutines"] >= 2
        everything = _payload(control, "tasks", limit=10_000)
        assert len(everything["tasks"]) == everything["count"] and everything["omitted"] == 0
        for cmd in ("tasks", "stacks"):
            reply = control.send(cmd, {"limit": -1})
            assert reply is not None and reply.error == "limit must be between 0 and 10000, got -1"


def test_set_logs_a_big_value_shortened(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, settings=Settings(Setting("motd", str, "hi")))):
        with caplog.at_level(logging.INFO, logger="unixsock_asgi"):
            reply = _payload(Client(sock), "set", name="motd", value="x" * 100_000)
        assert reply["new"] == "x" * 100_000  # the reply has it whole
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("setting motd")]
    assert line.startswith("setting motd changed from 'hi' to 'xxx") and line.endswith(
        "... (100002 characters)"
    )
    assert len(line) < 250


def test_an_app_that_ignores_the_lifespan_scope_still_gets_a_control_socket(short_dir: Path) -> None:
    async def returns(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # the usual raw ASGI way of not supporting lifespan
        await PlainTextResponse("bare")(scope, receive, send)

    async def takes_startup_and_returns(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            return
        await PlainTextResponse("bare")(scope, receive, send)

    for n, app in enumerate((returns, takes_startup_and_returns)):
        sock = short_dir / f"c{n}.sock"
        with TestClient(ControlSocketMiddleware(app, path=str(sock))) as http:
            assert http.get("/").text == "bare"
            assert _payload(Client(sock), "ping") == "pong"
        assert not sock.exists()


def test_out_of_range_values_are_refused_by_name(short_dir: Path) -> None:
    from unixsock_asgi import Setting, Settings

    settings = Settings(Setting("delay_s", float, 0.2, minimum=0, maximum=30))
    sock = short_dir / "c.sock"
    app = _starlette(sock, settings=settings, maintenance_exempt="/hello/ok")  # one path, as a str
    with TestClient(app) as http:
        control = Client(sock)
        refused: list[tuple[str, dict[str, Any], str]] = [
            ("set", {"name": "delay_s", "value": "NaN"}, "expected a number"),
            ("set_log_level", {"level": "DEBUG", "ttl": 10**9}, "at most 604800"),
            ("set_log_level", {"level": "DEBUG", "ttl": 604800.4}, "(a week), got 604800.4"),
            ("drain", {"timeout": 300.0001}, "between 0 and 300 seconds, got 300.0001"),
            ("drain", {"quiet": 1e9}, "between 0 and 300 seconds, got 1e+09"),
            ("set_log_level", {"level": 10**20}, "between 0 and 100"),
            ("maintenance_on", {"retry_after": -5}, "retry_after must be between 0 and"),
        ]
        for cmd, args, message in refused:
            reply = control.send(cmd, args)
            assert reply is not None and not reply.ok and message in reply.error, (cmd, reply)
        # Beyond a double: no client sends it and no server reads it; set in-process, refused too.
        with pytest.raises(ValueError, match="number out of range"):
            control.send("set", {"name": "delay_s", "value": 10**400})
        with pytest.raises(ValueError, match="expected a finite number"):
            settings.set("delay_s", 10**400)
        assert settings["delay_s"] == 0.2
        assert _payload(control, "maintenance_on", retry_after=60)["maintenance"] is True
        assert http.get("/hello/ok").status_code == 200  # exempt
        gated = http.get("/hello/other")
        assert gated.status_code == 503 and gated.headers["retry-after"] == "60"
        # The next maintenance without retry_after tells clients the configured 30 s, not the last 60.
        _payload(control, "maintenance_off")
        assert _payload(control, "health")["retry_after"] == 30  # what the next one sends, not the last
        assert _payload(control, "maintenance_on")["retry_after"] == 30
        assert http.get("/hello/other").headers["retry-after"] == "30"


def test_maintenance_leaves_the_configured_health_path_alone_by_default(short_dir: Path) -> None:
    # health_path="/healthz" with the default exemptions: the load balancer's probe must not
    # fail with the rest in maintenance (it followed "/health", whatever the health path was).
    sock = short_dir / "c.sock"
    app = _starlette(sock, health_path="/hello/healthz")
    with TestClient(app) as http:
        control = Client(sock)
        health = _payload(control, "maintenance_on")
        assert health["maintenance_exempt"] == ["/hello/healthz"]
        assert http.get("/hello/healthz").status_code == 200
        assert http.get("/hello/other").status_code == 503
        assert http.get("/health").status_code == 503  # not the health path here: gated like the rest
        _payload(control, "health_fail")
        assert http.get("/hello/healthz").status_code == 503  # its own health state, as configured


def test_cors_outside_ours_adds_its_headers_to_the_maintenance_503s(short_dir: Path) -> None:
    # What README advises for an API browsers call across origins: ours added first, CORS after.
    from starlette.middleware.cors import CORSMiddleware

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/hello/{name}", _hello)],
        middleware=[  # the first listed is outermost
            Middleware(CORSMiddleware, allow_origins=["*"]),
            Middleware(ControlSocketMiddleware, path=str(sock)),
        ],
    )
    with TestClient(app) as http:
        _payload(Client(sock), "maintenance_on")  # the lifespan reached ours through CORS
        gated = http.get("/hello/x", headers={"Origin": "https://shop.example"})
        assert gated.status_code == 503 and gated.headers["retry-after"] == "30"
        assert gated.headers["access-control-allow-origin"] == "*"  # a browser can read the 503


def no_denial(http: TestClient) -> TestClient:
    """A client of the same app served as by a server without the websocket.http.response extension."""
    app = http.app

    async def without_extension(scope: Any, receive: Any, send: Any) -> None:
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "websocket.http.response"}
        await app({**scope, "extensions": extensions}, receive, send)

    return TestClient(without_extension)


def test_maintenance_refuses_new_websocket_sessions_and_drain_counts_open_ones(short_dir: Path) -> None:

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())  # open until the client speaks
        await websocket.close()

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)], middleware=[Middleware(ControlSocketMiddleware, path=str(sock))]
    )
    with TestClient(app) as http:
        control = Client(sock)
        with http.websocket_connect("/ws") as open_session:
            _payload(control, "maintenance_on", retry_after=7)
            # TestClient, like uvicorn and hypercorn, lets the app answer the handshake itself.
            with pytest.raises(WebSocketDenialResponse) as denied, http.websocket_connect("/ws"):
                pass
            assert denied.value.status_code == 503 and denied.value.headers["retry-after"] == "7"
            assert denied.value.json()["error"] == "maintenance"
            with pytest.raises(WebSocketDisconnect) as refused, no_denial(http).websocket_connect("/ws"):
                pass
            assert refused.value.code == 1013  # where the server would not let it
            drained = _payload(control, "drain", timeout=1)
            assert drained["drained"] is True and drained["websockets_active"] == 1
            assert "note" not in drained  # maintenance keeps new requests away
            open_session.send_text("still here")  # the open session goes on
            assert open_session.receive_text() == "still here"
        _payload(control, "maintenance_off")
        with http.websocket_connect("/ws") as session:  # after maintenance, sessions are taken again
            session.send_text("back")
            assert session.receive_text() == "back"


def test_a_command_that_raises_system_exit_fails_and_the_app_serves_on(short_dir: Path) -> None:
    commands = Commands()

    @commands.command
    async def parse(argv: list[str]) -> str:
        """Parses like argparse does: SystemExit on bad input."""
        raise SystemExit(2)

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        raise KeyboardInterrupt

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/hello/{name}", _hello)],
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock), commands=commands, handler=handler)],
    )
    with TestClient(app) as http:
        control = Client(sock)
        reply = control.send("parse", {"argv": ["--bogus"]})
        assert reply is not None and reply.error == "SystemExit: 2"
        reply = control.send("anything")
        assert reply is not None and reply.error == "KeyboardInterrupt"
        assert http.get("/hello/x").text == "hi"  # the app's loop runs on
        assert _payload(control, "ping") == "pong"


def test_an_app_command_raising_key_error_names_it(short_dir: Path) -> None:
    commands = Commands()

    @commands.command
    async def price(item: str) -> float:
        return {"tea": 2.5}[item]

    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, commands=commands)):
        reply = Client(sock).send("price", {"item": "coffee"})
        assert reply is not None and reply.error == "KeyError: 'coffee'"


def test_ctx_app_state_is_the_apps_state_even_when_empty_at_startup(short_dir: Path) -> None:
    commands = Commands()

    @commands.command(readonly=True)
    async def hits(ctx: Any) -> Any:
        return getattr(ctx.app_state, "hits", None)

    async def count(request: Request) -> PlainTextResponse:
        request.app.state.hits = getattr(request.app.state, "hits", 0) + 1
        return PlainTextResponse("ok")

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/", count)],
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock), commands=commands)],
    )
    with TestClient(app) as http:
        http.get("/")
        http.get("/")
        assert _payload(Client(sock), "hits") == 2


def test_ctx_app_is_the_app_the_server_runs_however_the_middleware_is_added(short_dir: Path) -> None:
    # In a middleware list Starlette wraps it around its ExceptionMiddleware: ctx.app is the
    # Starlette instance all the same, as when it wraps the app by hand.
    commands = Commands()

    @commands.command(readonly=True)
    async def app_title(ctx: Any) -> Any:
        return [type(ctx.app).__name__, getattr(ctx.app.state, "title", None)]

    sock = short_dir / "c.sock"

    def made(how: str) -> Any:
        options: dict[str, Any] = {"path": str(sock), "commands": commands}
        if how == "list":
            app = Starlette(middleware=[Middleware(ControlSocketMiddleware, **options)])
        else:
            app = Starlette()
        app.state.title = how
        if how == "add_middleware":
            app.add_middleware(ControlSocketMiddleware, **options)
        return ControlSocketMiddleware(app, **options) if how == "by hand" else app

    for how in ("list", "add_middleware", "by hand"):
        with TestClient(made(how)):
            assert _payload(Client(sock), "app_title") == ["Starlette", how]


def test_a_blocking_plain_diagnostic_command_does_not_stall_other_connections(short_dir: Path) -> None:
    commands = Commands()
    release = threading.Event()

    @commands.command(diagnostic=True)
    def wait_a_while() -> str:
        release.wait(10)
        return "done"

    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, commands=commands)):
        results: list[Any] = []
        slow = threading.Thread(target=lambda: results.append(Client(sock).send("wait_a_while")))
        slow.start()
        try:
            time.sleep(0.2)  # let it start
            start = time.monotonic()
            assert _payload(Client(sock), "ping") == "pong"
            took = time.monotonic() - start
        finally:
            release.set()
            slow.join(10)
        assert took < 2, took
        assert results and results[0].payload == "done"


def test_logger_names_from_the_socket_make_no_loggers_unless_set_and_bounded(short_dir: Path) -> None:
    def made() -> set[str]:  # besides the ones of registered commands
        return {n for n in set(logging.root.manager.loggerDict) - known if not n.startswith("unixsock_asgi")}

    known = set(logging.root.manager.loggerDict)
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock)):
        control = Client(sock)
        reply = _payload(control, "get_log_level", logger="usa.never.made.x")
        assert reply == {
            "logger": "usa.never.made.x",
            "level": "NOTSET",
            "effective": reply["effective"],
            "exists": False,
            "did_you_mean": [],
        }
        reply = control.send("x" * 5000 + "." * 100)  # an unknown command: no logger per name either
        assert reply is not None and "unknown command" in reply.error
        assert made() == set()
        dotted = ".".join(["a"] * 2000)
        reply = control.send("set_log_level", {"level": "DEBUG", "logger": dotted})
        assert reply is not None and "not a name to make one under" in reply.error
        reply = control.send("set_log_level", {"level": "DEBUG", "logger": "usa\nforged line"})
        assert reply is not None and not reply.ok
        assert made() == set()
        # A sane name is made.
        reply = _payload(control, "set_log_level", level="DEBUG", logger="usa.made.later")
        assert reply["made"] is True
        assert logging.getLogger("usa.made.later").level == logging.DEBUG


def test_set_log_level_on_a_name_close_to_an_existing_logger_asks_for_create(short_dir: Path) -> None:
    # An operator's typo (uvicorn.acess) must not quietly make a logger nobody logs to.
    logging.getLogger("usa.typo.access")
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock)):
        control = Client(sock)
        reply = control.send("set_log_level", {"level": "DEBUG", "logger": "usa.typo.acess"})
        assert reply is not None and not reply.ok
        assert "did you mean 'usa.typo.access'?" in reply.error and "create=true" in reply.error
        assert "usa.typo.acess" not in logging.root.manager.loggerDict
        looked = _payload(control, "get_log_level", logger="usa.typo.acess")
        assert looked["exists"] is False and looked["did_you_mean"] == ["usa.typo.access"]
        reply = _payload(control, "set_log_level", level="DEBUG", logger="usa.typo.acess", create=True)
        assert reply["made"] is True and logging.getLogger("usa.typo.acess").level == logging.DEBUG
        reply = _payload(control, "set_log_level", level="INFO", logger="usa.typo.access")
        assert reply["made"] is False and reply["old"] == "NOTSET" and reply["new"] == "INFO"
        # A parent or a child of an existing logger is no typo, however close its name.
        logging.getLogger("usa.kin.pool")
        for kin in ("usa.kin", "usa.kin.pool.Pool"):
            assert _payload(control, "set_log_level", level="DEBUG", logger=kin)["made"] is True


def test_app_commands_replacing_built_ins_are_warned_about(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = Commands()

    @commands.command(name="set")
    def my_set(key: str, value: str) -> str:
        return key

    app = ControlSocketMiddleware(Starlette(), path=str(short_dir / "d.sock"), commands=commands)

    @commands.command(name="ping")  # after wrapping: still warned of, at startup
    def my_ping() -> str:
        return "mine"

    with caplog.at_level(logging.WARNING, logger="unixsock_asgi"), TestClient(app):
        assert Client(short_dir / "d.sock").send("ping").payload == "mine"  # type: ignore[union-attr]
    assert "the app's command(s) 'ping', 'set' replace the built-in one(s)" in caplog.text


def test_commands_registered_after_wrapping_or_startup_are_found(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = Commands()
    app = ControlSocketMiddleware(Starlette(), path=str(short_dir / "c.sock"), commands=commands)

    @commands.command
    def early() -> str:
        """Registered after wrapping, before startup."""
        return "early"

    with TestClient(app):

        @commands.command(readonly=True)
        def late() -> str:
            """Registered while the server runs."""
            return "late"

        control = Client(short_dir / "c.sock")
        with caplog.at_level(logging.DEBUG, logger="unixsock_asgi.audit"):
            assert _payload(control, "early") == "early" and _payload(control, "late") == "late"
        listed = {c["name"] for c in _payload(control, "help")["commands"]}
        assert {"early", "late", "ping", "stats"} <= listed
    audited = {
        r.getMessage().split("cmd=")[1].split()[0]: r.levelno
        for r in caplog.records
        if "cmd=" in r.getMessage()
    }
    assert audited == {
        "early": logging.INFO,
        "late": logging.DEBUG,
    }  # read-only: audited as such, though late


def test_help_tells_of_the_go_style_handler(short_dir: Path) -> None:
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        """Answers echo and friends."""
        return args

    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, handler=handler)):
        control = Client(sock)
        listing = _payload(control, "help")
        assert listing["handler"]["doc"] == "Answers echo and friends."
        assert "handler" in listing["handler"]["name"]
        reply = control.send("help", {"command": "echo"})
        assert reply is not None and "is not a registered command; the app's Go-style handler" in reply.error


def test_only_persistable_commands_are_applied_from_the_overrides_file(short_dir: Path) -> None:
    commands = Commands()
    ran: list[int] = []

    @commands.command
    async def restock(quantity: int) -> int:
        ran.append(quantity)
        return quantity

    document = {
        "version": 1,
        "overrides": [{"cmd": "restock", "args": {"quantity": 99}}, {"cmd": "health_fail", "args": {}}],
    }
    (short_dir / "overrides.json").write_text(json.dumps(document))
    app = Starlette(
        routes=[Route("/health", _hello)],
        middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(short_dir), commands=commands)],
    )
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503  # health_fail was applied
    assert ran == []


def test_the_socket_takes_commands_only_once_the_persisted_overrides_are_applied(short_dir: Path) -> None:
    # A set sent the moment a recycled worker's socket appeared answered success, and the
    # override applied a moment later undid it on every worker.
    def slow_to_apply(value: Any) -> None:
        if value == "persisted":
            time.sleep(0.5)  # the override is being applied: the socket must not answer yet

    settings = Settings(Setting("greeting", str, "hello", validate=slow_to_apply))
    document = {
        "version": 1,
        "overrides": [{"cmd": "set", "args": {"name": "greeting", "value": "persisted"}}],
    }
    (short_dir / "overrides.json").write_text(json.dumps(document))
    first_answer: list[Any] = []

    def ask_as_soon_as_it_appears() -> None:
        deadline = time.monotonic() + 10
        while not first_answer and time.monotonic() < deadline:
            for path in short_dir.glob("*.sock"):
                with contextlib.suppress(OSError, UnixSockError):  # not listening yet, say
                    first_answer.append(_payload(Client(path), "get", name="greeting")["value"])
                    return
            time.sleep(0.001)

    asker = threading.Thread(target=ask_as_soon_as_it_appears)
    asker.start()
    app = Starlette(
        middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(short_dir), settings=settings)]
    )
    try:
        with TestClient(app):
            asker.join(10)
    finally:
        first_answer.append(None)  # stops the asker, should it still ask
        asker.join(10)
    assert first_answer[0] == "persisted"


def _hang_up_on(
    short_dir: Path, caplog: pytest.LogCaptureFixture, command: Callable[[], Any], *, app_timeout: float = 5.0
) -> list[str]:
    """Send ``command`` (registered alone) from a socat-like client that gives up after 0.3 s;
    the audit lines about it once there are two (or after 6 s)."""
    commands = Commands()
    commands.command(command)
    name = command.__name__
    sock = short_dir / "c.sock"
    app = Starlette(
        middleware=[
            Middleware(ControlSocketMiddleware, path=str(sock), commands=commands, app_timeout=app_timeout)
        ]
    )
    with caplog.at_level(logging.INFO, logger="unixsock_asgi.audit"), TestClient(app):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(sock))
            raw.sendall(f"{name}\n".encode())
            time.sleep(0.3)
        deadline = time.monotonic() + 6
        while len(_audit_lines(caplog, name)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    return _audit_lines(caplog, name)


def _audit_lines(caplog: pytest.LogCaptureFixture, cmd: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "unixsock_asgi.audit" and f"cmd={cmd} " in r.getMessage()
    ]


def test_a_command_on_the_app_loop_runs_on_when_its_client_hangs_up_and_is_audited(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    done: list[str] = []

    async def reindex() -> str:
        await asyncio.sleep(1.6)  # past the server's hang-up check
        done.append("reindexed")
        return "ok"

    hung_up, ended = _hang_up_on(short_dir, caplog, reindex)
    assert done == ["reindexed"]
    # No reply said how it ended: the audit log does, at the hang-up and when it ended.
    assert "status=cancelled" in hung_up
    assert "status=success" in ended and ended.endswith(
        "after its connection ended or its server stopped: its client was not told how)"
    )


def test_a_command_on_the_app_loop_whose_client_hung_up_is_still_bounded_by_app_timeout(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    done: list[str] = []

    async def reindex() -> str:
        await asyncio.sleep(4)
        done.append("reindexed")
        return "ok"

    *_, ended = _hang_up_on(short_dir, caplog, reindex, app_timeout=1.5)
    assert "status=cancelled" in ended and "its client was not told how" in ended
    assert done == []


def test_a_command_whose_client_hung_up_while_the_loop_was_blocked_never_starts_after_app_timeout(
    short_dir: Path,
) -> None:
    # As for a client that waited ("did not start within ...: it will not run"): cancelling
    # the call's future let it run once, when the loop unblocked, past its deadline.
    ran: list[float] = []
    commands = Commands()

    @commands.command
    def mark() -> str:
        ran.append(time.monotonic())
        return "marked"

    sock = short_dir / "c.sock"
    with TestClient(_blocking_app(sock, commands, app_timeout=2.0)) as http:
        # The hang-up is seen within a second (the server's check), well before app_timeout.
        blocker = threading.Thread(target=http.get, args=("/block?s=4",))
        blocker.start()
        try:
            time.sleep(0.3)
            with pytest.raises(TimeoutException):
                Client(sock, timeout=0.3).send("mark")  # hangs up, the loop still blocked
        finally:
            blocker.join(10)
        assert _payload(Client(sock), "ping") == "pong"
        time.sleep(0.3)  # what the loop had queued has run by now
        assert ran == []
        assert _payload(Client(sock), "mark") == "marked"  # the next one runs


def test_a_command_that_raises_timeout_or_cancelled_error_itself_gets_its_failure(short_dir: Path) -> None:
    # Not "did not finish within 5s ... may yet finish" (a TimeoutError of its own), nor
    # no reply at all (a CancelledError of its own was taken for its client hanging up).
    commands = Commands()

    @commands.command
    def plain_timeout() -> None:
        raise TimeoutError("upstream took too long")

    @commands.command
    async def async_timeout() -> None:
        await asyncio.sleep(0)
        raise TimeoutError("upstream took too long")

    async def cancelled_job() -> None:
        job = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        job.cancel()
        await job

    @commands.command
    async def awaits_a_cancelled_job() -> None:
        await cancelled_job()

    @commands.command(diagnostic=True)
    async def diagnostic_awaits_a_cancelled_job() -> None:
        await cancelled_job()

    @commands.command
    async def cancelled_on_the_app_loop() -> None:  # as the app's loop does to its tasks at shutdown
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    sock = short_dir / "c.sock"
    app = Starlette(middleware=[Middleware(ControlSocketMiddleware, path=str(sock), commands=commands)])
    expected = {
        "plain_timeout": "TimeoutError: upstream took too long",
        "async_timeout": "TimeoutError: upstream took too long",
        "awaits_a_cancelled_job": "CancelledError",
        "diagnostic_awaits_a_cancelled_job": "CancelledError",
        # Answered, and not audited as a hang-up ("ended ... after its connection did; no reply").
        "cancelled_on_the_app_loop": "'cancelled_on_the_app_loop' was cancelled on the app's loop"
        " (is the app shutting down?)",
    }
    if sys.version_info < (3, 11):  # pragma: no cover - 3.10 cannot tell a task's own CancelledError
        del expected["awaits_a_cancelled_job"], expected["diagnostic_awaits_a_cancelled_job"]
        del expected["cancelled_on_the_app_loop"]
    with TestClient(app):
        control = Client(sock, close=False)
        for cmd, error in expected.items():
            started = time.monotonic()
            reply = control.send(cmd)
            assert reply is not None and (reply.status, reply.error) == ("failure", error), cmd
            assert time.monotonic() - started < 2.0
        assert _payload(control, "ping") == "pong"  # on the same connection


def test_a_persisted_log_level_applies_to_a_logger_not_made_yet_beside_a_close_name(short_dir: Path) -> None:
    logging.getLogger("usa.replay.jobz")  # close to the persisted name, which is not made yet
    document = {
        "version": 1,
        "overrides": [{"cmd": "set_log_level", "args": {"level": "DEBUG", "logger": "usa.replay.jobs"}}],
    }
    (short_dir / "overrides.json").write_text(json.dumps(document))
    app = Starlette(middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(short_dir))])
    with TestClient(app):
        assert logging.getLogger("usa.replay.jobs").level == logging.DEBUG


def test_tasks_shows_where_a_deep_running_task_blocks_the_loop(short_dir: Path) -> None:
    # Deeper than the 40 frames shown (a FastAPI app under a few middlewares is 26 deep
    # already): the innermost 40, down to the blocking line, not run_asgi alone.
    def layer(depth: int) -> None:
        if depth == 0:
            time.sleep(2)  # blocks the app's loop
        else:
            layer(depth - 1)

    async def deep(request: Request) -> PlainTextResponse:
        layer(60)
        return PlainTextResponse("done")

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/deep", deep)], middleware=[Middleware(ControlSocketMiddleware, path=str(sock))]
    )
    with TestClient(app) as http:
        blocker = threading.Thread(target=http.get, args=("/deep",))
        blocker.start()
        try:
            control = Client(sock)
            deadline = time.monotonic() + 5
            listed = _payload(control, "tasks", limit=1)
            while time.monotonic() < deadline and not any(
                "time.sleep(2)" in line for t in listed["tasks"] for line in t["stack"]
            ):
                time.sleep(0.05)
                listed = _payload(control, "tasks", limit=1)
        finally:
            blocker.join(10)
    (running,) = listed["tasks"]
    assert running["running"] is True and len(running["stack"]) == 40
    assert "time.sleep(2)" in running["stack"][-1] and " in layer: " in running["stack"][0]


def test_stacks_are_read_by_faulthandler_for_every_thread_at_once() -> None:
    from unixsock_asgi._builtins import _thread_stacks

    entered, release = threading.Event(), threading.Event()

    def waits_here() -> None:
        entered.set()
        release.wait(10)

    helper = threading.Thread(target=waits_here, name="helper")
    helper.start()
    try:
        assert entered.wait(5)
        stacks = _thread_stacks()
    finally:
        release.set()
        helper.join(5)
    assert helper.ident is not None
    mine = stacks[threading.get_ident()]
    assert (
        mine[0][2] == "_thread_stacks"
        and mine[1][2] == "test_stacks_are_read_by_faulthandler_for_every_thread_at_once"
    )
    assert mine[1][0] == __file__
    theirs = [name for _, _, name in stacks[helper.ident]]
    assert theirs[0] == "wait" and "waits_here" in theirs and theirs[-1] == "_bootstrap"  # innermost first


def test_stacks_shows_the_app_loops_thread_among_more_threads_than_faulthandler_shows() -> None:
    # faulthandler shows the 100 newest threads: the app loop's, the oldest, is read alone.
    from unixsock_asgi._builtins import _thread_stacks, stacks

    release = threading.Event()
    crowd = [threading.Thread(target=release.wait, args=(10,)) for _ in range(120)]
    for thread in crowd:
        thread.start()
    try:
        dumped = _thread_stacks()
        ctx: Any = types.SimpleNamespace(control=types.SimpleNamespace(app_thread_id=threading.get_ident()))
        shown = stacks(ctx, limit=1)
    finally:
        release.set()
        for thread in crowd:
            thread.join(5)
    assert threading.get_ident() not in dumped and len(dumped) == 100
    (mine,) = shown["threads"]
    assert mine["app_loop"] is True and shown["count"] >= 121
    assert (
        " in test_stacks_shows_the_app_loops_thread_among_more_threads_than_faulthandler_shows: "
        in mine["stack"][-3]  # under stacks() and the walk itself
    )


def test_stacks_of_code_under_a_non_ascii_path_read_as_written(tmp_path: Path) -> None:
    from unixsock_asgi._builtins import _located, _thread_stacks

    source = tmp_path / "caf\u00e9.py"
    source.write_text("def attend\u00e9(event):\n    event.wait(10)  # ici\n", encoding="utf-8")
    namespace: dict[str, Any] = {}
    exec(compile(source.read_text(encoding="utf-8"), str(source), "exec"), namespace)
    release = threading.Event()
    helper = threading.Thread(target=namespace["attend\u00e9"], args=(release,))
    helper.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            theirs = _thread_stacks().get(helper.ident or 0, [])
            if any(name == "attend\u00e9" for _, _, name in theirs):
                break
            time.sleep(0.01)
    finally:
        release.set()
        helper.join(5)
    (frame,) = [f for f in theirs if f[2] == "attend\u00e9"]
    assert frame[:2] == (str(source), 2)
    assert _located([frame]) == [f"{source}:2 in attend\u00e9: event.wait(10)  # ici"]


def test_tasks_never_shows_a_finished_task_running_in_another_of_its_coroutine() -> None:
    from unixsock_asgi._builtins import _running_frames

    async def handler(seconds: float) -> None:
        time.sleep(seconds)  # blocks the loop

    made: dict[str, Any] = {}
    blocking = threading.Event()

    async def main() -> None:
        made["loop"] = asyncio.get_running_loop()
        made["done"] = asyncio.create_task(handler(0))
        await made["done"]
        made["running"] = asyncio.create_task(handler(1.5))
        blocking.set()
        await made["running"]

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        assert blocking.wait(5)
        time.sleep(0.2)  # inside the second handler's sleep
        stale = _running_frames(made["done"], thread.ident, made["loop"])
        running = _running_frames(made["running"], thread.ident, made["loop"])
    finally:
        thread.join(10)
    assert stale is None  # same coroutine, other task: its frames are not the finished one's
    assert running is not None and running[-1].endswith("time.sleep(seconds)  # blocks the loop")


def test_loop_lag_shows_a_block_while_it_lasts(short_dir: Path) -> None:
    async def block(request: Request) -> PlainTextResponse:
        time.sleep(1.5)  # blocks the app's loop
        return PlainTextResponse("done")

    sock = short_dir / "c.sock"
    app = Starlette(
        routes=[Route("/block", block)],
        middleware=[Middleware(ControlSocketMiddleware, path=str(sock))],
    )
    with TestClient(app) as http:
        blocked = threading.Thread(target=http.get, args=("/block",))
        blocked.start()
        try:
            time.sleep(1.0)
            process = _payload(Client(sock), "stats", routes=False)["process"]
        finally:
            blocked.join(10)
        # Once over, the stall stays in the figures a scrape reads: the longest, and the sum.
        deadline = time.monotonic() + 5
        after = process
        while time.monotonic() < deadline and after["loop_lag_total_s"] < 1.0:
            time.sleep(0.1)
            after = _payload(Client(sock), "stats", routes=False)["process"]
    assert process["loop_lag_s"] >= 0.4, process  # it read 0 until the loop ran again
    assert process["loop_lag_max_s"] >= process["loop_lag_s"]
    assert after["loop_lag_max_s"] >= 1.0 and after["loop_lag_total_s"] >= 1.0


def test_the_lag_monitor_can_say_how_long_the_loop_is_blocked_before_it_first_ran(short_dir: Path) -> None:
    # The stats command asks it from the control thread: under uvicorn an app that blocks its
    # loop right after startup does so before the monitor task ever ran.
    monitor = ControlSocketMiddleware(Starlette(), path=str(short_dir / "c.sock")).control.monitor
    assert monitor.task is None
    assert monitor.blocked_for() == 0.0  # was: TypeError, float - dataclasses.Field


def test_the_lag_monitor_counts_from_startup_not_from_when_the_middleware_was_made(short_dir: Path) -> None:
    control = ControlSocketMiddleware(Starlette(), path=str(short_dir / "c.sock")).control
    control.monitor.last_tick -= 3600  # made an hour before startup (gunicorn --preload)

    async def start_and_look() -> float:
        await control.start(str(short_dir / "c.sock"), None, {})
        try:
            return control.monitor.blocked_for()  # before its task first ran: nothing awaited since
        finally:
            control.stop()

    assert asyncio.run(start_and_look()) < 1  # not the hour before startup


def test_uptime_counts_from_the_fork_when_the_middleware_was_made_before_it(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    app = ControlSocketMiddleware(Starlette(routes=[Route("/", _hello)]), path=str(sock))
    app.control.started_at -= 3600  # made an hour ago, in the parent (gunicorn --preload)...
    app.stats._started_mono -= 3600
    app.stats.reset_at -= 3600
    app.control._pid = -1  # ...which is not this process
    with TestClient(app):
        control = Client(sock)
        stats = _payload(control, "stats", routes=False)
        assert stats["uptime_s"] < 60 and stats["since_reset_s"] < 60  # no reset before the start
        assert _payload(control, "info")["uptime_s"] < 60


def test_a_socket_directory_others_may_write_is_refused_even_sticky_and_one_inside_is_made(
    short_dir: Path,
) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp, or an emptyDir made sticky: others may add sockets here
    app = Starlette(middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(shared), strict=True)])
    with pytest.raises(RuntimeError, match="could add sockets of their own"), TestClient(app):
        pass
    inside = shared / "ctl"
    app = Starlette(middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(inside), strict=True)])
    with TestClient(app):
        (sock,) = inside.glob("*.sock")
        assert _payload(Client(sock), "ping") == "pong"
    assert oct(inside.stat().st_mode & 0o777) == "0o700"
    # Not sticky: the advice is only what would be accepted, and the shared
    # directory is named for what it is, above the one to be made.
    os.chmod(shared, 0o777)
    app = Starlette(middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(shared), strict=True)])
    with pytest.raises(RuntimeError, match=r"\(chmod go-w\), or put the sockets") as refused, TestClient(app):
        pass
    assert "sticky (chmod +t)" not in str(refused.value)
    app = Starlette(
        middleware=[Middleware(ControlSocketMiddleware, socket_dir=str(shared / "new"), strict=True)]
    )
    with (
        pytest.raises(RuntimeError, match=r"directory above the socket directory .*shared'"),
        TestClient(app),
    ):
        pass


def test_read_only_commands_are_audited_at_debug_and_changes_at_info(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from unixsock_asgi import Setting, Settings

    caplog.set_level(logging.DEBUG, logger="unixsock_asgi.audit")
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, settings=Settings(Setting("delay_s", float, 0.2)))):
        control = Client(sock)
        _payload(control, "stats", routes=False)  # what top polls
        _payload(control, "set", name="delay_s", value=0.5)
    audited = [r for r in caplog.records if r.name == "unixsock_asgi.audit"]
    levels = [(r.getMessage().split("cmd=")[1].split()[0], r.levelname) for r in audited]
    assert [entry for entry in levels if entry[0] in ("stats", "set")] == [
        ("stats", "DEBUG"),
        ("set", "INFO"),
    ]


def test_a_plain_command_that_runs_past_app_timeout_after_its_client_hung_up_is_audited_as_it_ended(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing stops a plain function: the audit line must say it succeeded when it did,
    # not that it was cancelled when app_timeout came.
    done: list[str] = []

    def restock() -> str:
        time.sleep(2.5)  # blocks the app's loop past app_timeout
        done.append("restocked")
        return "ok"

    hung_up, ended = _hang_up_on(short_dir, caplog, restock, app_timeout=1.5)
    assert done == ["restocked"]
    assert "status=cancelled" in hung_up
    assert "status=success" in ended and "its client was not told how" in ended


def test_a_typod_command_gets_the_names_it_is_close_to(short_dir: Path) -> None:
    commands = Commands()

    @commands.command
    def db_count() -> int:
        return 3

    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock, commands=commands)):
        control = Client(sock)
        expectations = {
            "db_cuont": "unknown command 'db_cuont' (did you mean 'db_count'?); 'help' lists the commands",
            "stat": "unknown command 'stat' (did you mean 'stats'?); 'help' lists the commands",
            "frobnicate": "unknown command 'frobnicate'; 'help' lists the commands",
        }
        for typo, error in expectations.items():
            reply = control.send(typo)
            assert reply is not None and reply.error == error
        helped = control.send("help", {"command": "db_cuont"})
        assert helped is not None and "(did you mean 'db_count'?)" in helped.error


def test_names_from_the_socket_are_quoted_back_cut_short(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A megabyte of command name made a megabyte audit line and a reply twice its size.
    caplog.set_level(logging.INFO, logger="unixsock_asgi.audit")
    sock = short_dir / "c.sock"
    long_name = "x" * 500_000 + "\n"
    with TestClient(_starlette(sock)):
        control = Client(sock)
        unknown = control.send(long_name)
        assert isinstance(unknown, Response) and not unknown.ok
        bad_arg = control.send("ping", {"y" * 500_000: 1})
        assert isinstance(bad_arg, Response) and not bad_arg.ok
    assert (
        unknown.error
        == f"unknown command {long_name[:200]!r}... (500001 characters); 'help' lists the commands"
    )
    assert bad_arg.error.startswith(f"unknown argument {'y' * 200!r}... (500000 characters) for 'ping'")
    (line,) = [
        r.getMessage() for r in caplog.records if r.name == "unixsock_asgi.audit" and "xxx" in r.getMessage()
    ]
    assert len(line) < 400 and "(500001 characters)" in line


def test_get_log_level_of_a_long_unknown_name_is_refused_at_once(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    with TestClient(_starlette(sock)):
        control = Client(sock, max_message_size=4 << 20)
        started = time.monotonic()
        reply = control.send("get_log_level", {"logger": "a." * 200_000})
        assert reply is not None and reply.error.startswith("no logger 'a.a.a.")
        assert "(400000 characters) in this process" in reply.error
        assert time.monotonic() - started < 5


def test_a_request_told_the_client_has_gone_before_responding_counts_499(short_dir: Path) -> None:
    async def upload(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))  # ClientDisconnect when aborted

    async def poll(request: Request) -> PlainTextResponse:
        while not await request.is_disconnected():  # what a long poll does, answered when it can
            await asyncio.sleep(0)
        return PlainTextResponse("too late")

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        """Returns without a response and without reading: the server answers 500."""

    # Wrapped by hand: Starlette's ServerErrorMiddleware is inside and sends a 500 for
    # ClientDisconnect, which the gone client never gets.
    app = ControlSocketMiddleware(
        Starlette(
            routes=[
                Route("/upload", upload, methods=["POST"]),
                Route("/poll", poll),
                Mount("/silent", silent),
            ]
        ),
        path=str(short_dir / "c.sock"),
    )

    async def call(path: str, method: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "root_path": "",
            "headers": [],
            "query_string": b"",
        }
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        return sent

    async def main() -> None:
        chunk = {"type": "http.request", "body": b"x" * 10, "more_body": True}
        await call("/upload", "POST", [chunk])  # the client goes after one chunk
        await call("/poll", "GET", [{"type": "http.request", "body": b"", "more_body": False}] * 3)
        await call("/silent/x", "GET", [])
        done = {"type": "http.request", "body": b"abc", "more_body": False}
        assert (await call("/upload", "POST", [done]))[0]["status"] == 200

    asyncio.run(main())
    routes = app.stats.snapshot()["routes"]
    assert {name: (r["by_status"], r["exceptions"]) for name, r in routes.items()} == {
        "/upload": ({"2xx": 1, "4xx": 1}, 1),  # 499 and the app's ClientDisconnect; then one that finished
        "/poll": ({"4xx": 1}, 0),  # 499: its "too late" 200 reached nobody
        "/silent/{path}": ({"5xx": 1}, 0),
    }
    statuses = app.stats.snapshot(routes=False)["by_status"]
    assert statuses == {"2xx": 1, "4xx": 2, "5xx": 1}
