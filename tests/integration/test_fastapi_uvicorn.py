"""A FastAPI app (include_router prefixes, mounts, lifespan state) under real uvicorn."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from unixsock_asgi import Client

from .harness import StartServer, reset_stats, wait_for

pytestmark = pytest.mark.timeout(90)


def _uvicorn(*extra: str) -> tuple[str, ...]:
    return ("-m", "uvicorn", "--app-dir", "tests/integration", "fastapi_app:app", "--port", "{port}", *extra)


def _payload(client: Client, cmd: str, **args: Any) -> Any:
    response = client.send(cmd, args)
    assert response is not None and response.ok, response
    return response.payload


@pytest.mark.parametrize("lifespan", ["auto", "on"])
def test_route_templates_and_lifespan_state(
    start_server: StartServer, short_dir: Path, lifespan: str
) -> None:
    sock = short_dir / "c-{pid}.sock"
    server = start_server(*_uvicorn("--lifespan", lifespan), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    control = Client(str(sock).replace("{pid}", str(server.proc.pid)))
    reset_stats(control.path)  # forget the harness's readiness probes
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/api/v1/users/7").json() == {"id": 7, "db_users": 2}  # request.state from lifespan
        assert http.get("/api/v1/users/8").status_code == 200
        assert http.get("/api/v1/inner/things/x").status_code == 200
        assert http.get("/legacy/pages/about").status_code == 200
        assert http.get("/static/css/site.css").status_code == 200
        assert http.get("/api/v1/users/not-a-number").status_code == 422
        assert http.get("/missing").status_code == 404
    routes = _payload(control, "stats")["routes"]
    assert {name: r["requests"] for name, r in routes.items()} == {
        "/api/v1/users/{user_id}": 3,
        "/api/v1/inner/things/{name}": 1,
        "/legacy/pages/{slug}": 1,
        "/static/{path}": 1,
        "<unmatched>": 1,
    }
    state = _payload(control, "lifespan_state")
    assert state == {"keys": ["db"], "db": {"users": 2}, "app_state_ready": True}
    info = _payload(control, "info")
    assert info["framework"].startswith("fastapi ") and info["server"].startswith("uvicorn ")


def test_app_loop_commands_report_a_blocked_loop_while_diagnostics_answer(
    start_server: StartServer, short_dir: Path
) -> None:
    sock = short_dir / "c.sock"
    server = start_server(*_uvicorn(), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    control = Client(sock)
    blocker = threading.Thread(target=lambda: httpx.get(server.url + "/block-loop?seconds=3", timeout=20))
    blocker.start()
    try:
        wait_for(
            lambda: _payload(control, "stats", routes=False)["in_flight"] == 1, 5, "the blocking request"
        )
        reply = control.send("lifespan_state")  # runs on the app loop: app_timeout is 0.5 s here
        assert reply is not None and not reply.ok
        assert "event loop appears blocked" in reply.error and "'stacks'" in reply.error
        assert _payload(control, "ping") == "pong"
    finally:
        blocker.join(20)
    assert _payload(control, "lifespan_state")["keys"] == ["db"]  # and it recovers


def test_strict_refuses_to_start_when_the_socket_cannot_be_bound(
    start_server: StartServer, short_dir: Path
) -> None:
    blocker = short_dir / "file"
    blocker.write_text("x")
    env = {"UNIXSOCK_TEST_SOCKET": str(blocker / "c.sock"), "UNIXSOCK_TEST_STRICT": "1"}
    server = start_server(*_uvicorn("--lifespan", "on"), env=env, wait=False)
    assert server.proc.wait(30) != 0
    assert "control socket" in server.log() and "could not start" in server.log()


def test_a_live_socket_is_never_stolen(start_server: StartServer, short_dir: Path) -> None:
    sock = short_dir / "shared.sock"
    first = start_server(*_uvicorn(), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    second = start_server(*_uvicorn(), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    assert f"live server (pid {first.proc.pid})" in second.log()
    assert httpx.get(second.url + "/api/v1/users/1").status_code == 200  # serves on without a socket
    assert _payload(Client(sock), "info")["pid"] == first.proc.pid


def test_lifespan_off_means_no_control_socket(start_server: StartServer, short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    server = start_server(*_uvicorn("--lifespan", "off"), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    assert httpx.get(server.url + "/block").status_code == 200
    assert httpx.get(server.url + "/block").status_code == 200
    assert not sock.exists()
    # Not silent: the first request says why there is no socket, once.
    assert server.log().count("no control socket: ControlSocketMiddleware got an HTTP request") == 1
    assert "(uvicorn --lifespan off, daphne)" in server.log()


def test_a_client_that_goes_away_before_any_response_is_no_server_error(
    start_server: StartServer, short_dir: Path
) -> None:
    sock = short_dir / "c-{pid}.sock"
    server = start_server(*_uvicorn(), env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    control = Client(str(sock).replace("{pid}", str(server.proc.pid)))
    reset_stats(control.path)
    port = int(server.url.rsplit(":", 1)[1])
    for request in (
        b"GET /longpoll/events HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000,
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(request)
            time.sleep(0.3)  # the app is waiting for the client
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/no-answer/x").status_code == 500  # uvicorn's, the client still there

    def counted() -> bool:
        stats = _payload(control, "stats")
        return bool(stats["requests_total"] == 3 and stats["in_flight"] == 0)

    wait_for(counted, 10, "three requests counted")
    routes = _payload(control, "stats")["routes"]
    assert {name: (r["by_status"], r["exceptions"]) for name, r in routes.items()} == {
        "/longpoll/{path}": ({"4xx": 1}, 0),  # 499: nothing was sent
        "/upload": ({"4xx": 1}, 1),  # 499, and the app raised ClientDisconnect
        "/no-answer/{path}": ({"5xx": 1}, 0),
    }
    # The server's own account: one 500, the one a client received; none for the aborted ones.
    sent_500 = [line for line in server.log().splitlines() if '" 500 ' in line]
    assert len(sent_500) == 1 and '"GET /no-answer/x HTTP/1.1" 500' in sent_500[0], sent_500


# ``uvicorn.run(app, log_config=...)`` in the app's own script: the configuration is
# applied after the app's module (and ours) made their loggers, and disables them.
_RUN_WITH_LOG_CONFIG = """
import sys
sys.path.insert(0, "tests/integration")
import gunicorn  # imported, as by a module that may also run under it: uvicorn runs the app here
import uvicorn
from fastapi_app import app
uvicorn.run(app, port={port}, log_config={
    "version": 1,
    "disable_existing_loggers": True,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["err"], "level": "INFO"},
})
"""


def test_a_logging_config_that_disables_existing_loggers_does_not_silence_ours(
    start_server: StartServer, short_dir: Path
) -> None:
    blocker = short_dir / "file"
    blocker.write_text("x")
    failed = start_server("-c", _RUN_WITH_LOG_CONFIG, env={"UNIXSOCK_TEST_SOCKET": str(blocker / "c.sock")})
    assert httpx.get(failed.url + "/api/v1/users/1").status_code == 200  # serves on without a socket
    log = failed.log()
    assert "WARNING unixsock_asgi: control socket" in log and "could not start" in log
    assert "unixsock_asgi, unixsock_asgi.audit" in log and "enabled again" in log

    sock = short_dir / "c.sock"
    server = start_server("-c", _RUN_WITH_LOG_CONFIG, env={"UNIXSOCK_TEST_SOCKET": str(sock)})
    _payload(Client(sock), "set_log_level", level="DEBUG", logger="app")
    wait_for(lambda: "INFO unixsock_asgi.audit:" in server.log(), 5, "the command in the audit log")
    assert "set_log_level" in server.log()
    assert _payload(Client(sock), "info")["server"] == f"uvicorn {uvicorn.__version__}"


def _handshake(port: int, path: str) -> str:
    """The head of the server's answer to a websocket handshake, over plain HTTP on loopback."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:  # bounded by the timeout
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.partition(b"\r\n\r\n")[0].decode().lower()


@pytest.mark.parametrize("ws", ["websockets", "auto", "auto-wrapped"])
def test_maintenance_refuses_a_websocket_handshake_503_with_retry_after_where_it_can(
    start_server: StartServer, short_dir: Path, ws: str
) -> None:
    sock = short_dir / "c.sock"
    env = {"UNIXSOCK_TEST_SOCKET": str(sock), "UNIXSOCK_TEST_WRAP_SEND": "1" if "wrapped" in ws else ""}
    server = start_server(*_uvicorn("--ws", ws.partition("-")[0]), env=env)
    control = Client(sock)
    assert _handshake(server.port, "/ws").startswith("http/1.1 101")
    _payload(control, "maintenance_on", retry_after=9)
    refused = _handshake(server.port, "/ws")
    if ws == "websockets":
        # As any other request, not the 403 a close before accepting becomes: a client can
        # tell maintenance from a refusal, and when to come back.
        assert refused.startswith("http/1.1 503") and "retry-after: 9" in refused.splitlines()
    else:
        # uvicorn's default with the websockets package (websockets-sansio) logs an ERROR
        # after such a response: there the close (a 403) it takes without one, however
        # wrapped the send it is given.
        assert refused.startswith("http/1.1 403")
    _payload(control, "maintenance_off")
    assert _handshake(server.port, "/ws").startswith("http/1.1 101")
    assert "ERROR" not in server.log() and "Traceback" not in server.log()
