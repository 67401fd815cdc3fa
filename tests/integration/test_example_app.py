"""The example app under a real uvicorn process, driven over HTTP and its control socket."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from unixsock_asgi import Client

from .harness import ServerProcess, StartServer, reset_stats, wait_for

pytestmark = pytest.mark.timeout(90)


def _example(start_server: StartServer, socket_dir: Path) -> tuple[ServerProcess, Client]:
    server = start_server("-m", "example_app", "--port", "{port}", "--socket-dir", str(socket_dir))
    sockets = list(socket_dir.glob("example_app-*.sock"))
    assert len(sockets) == 1, sockets
    assert sockets[0].name == f"example_app-{server.proc.pid}.sock"
    control = Client(sockets[0], timeout=5.0)
    reset_stats(sockets[0])  # forget the harness's readiness probes
    return server, control


def _payload(client: Client, cmd: str, **args: Any) -> Any:
    response = client.send(cmd, args)
    assert response is not None
    assert response.ok, response.error
    return response.payload


def test_stats_count_exactly_what_was_sent_per_route_template(
    start_server: StartServer, short_dir: Path
) -> None:
    server, control = _example(start_server, short_dir / "s")
    paths = (
        ["/items/1"] * 7
        + ["/items/2"] * 3
        + ["/items/99", "/items/" + "9" * 5000]
        + ["/"] * 5
        + ["/fail"] * 2
    )
    paths += [f"/no/such/page/{i}" for i in range(4)]

    def get(path: str) -> int:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            return http.get(path).status_code

    with ThreadPoolExecutor(8) as pool:  # concurrent requests must all be counted
        statuses = list(pool.map(get, paths))
    assert statuses.count(200) == 15 and statuses.count(404) == 6 and statuses.count(500) == 2

    stats = _payload(control, "stats")
    routes = stats["routes"]
    assert set(routes) == {"/items/{item_id}", "/", "/fail", "<unmatched>"}  # never raw paths
    assert routes["/items/{item_id}"]["requests"] == 12
    assert routes["/items/{item_id}"]["by_status"] == {"2xx": 10, "4xx": 2}
    assert routes["/items/{item_id}"]["by_method"] == {"GET": 12}
    assert routes["/"]["requests"] == 5
    assert routes["/fail"]["requests"] == 2 and routes["/fail"]["exceptions"] == 2
    assert routes["/fail"]["by_status"] == {"5xx": 2}
    assert routes["<unmatched>"]["requests"] == 4
    assert stats["requests_total"] == len(paths)
    assert stats["latency"]["count"] == len(paths)
    assert stats["by_status"] == {"2xx": 15, "4xx": 6, "5xx": 2}
    assert stats["in_flight"] == 0 and stats["exceptions_total"] == 2
    assert stats["pid"] == server.proc.pid
    assert stats["ppid"] == os.getpid()  # started by this test: its parent
    assert 0 < stats["latency"]["p50_s"] <= stats["latency"]["p99_s"] <= stats["latency"]["max_s"] * 1.05
    assert stats["process"]["rss_bytes"] > 0 and stats["process"]["open_fds"] > 0

    assert _payload(control, "stats_reset")["requests_before"] == len(paths)
    assert _payload(control, "stats")["requests_total"] == 0


def test_set_log_level_changes_what_the_server_logs_and_ttl_reverts(
    start_server: StartServer, short_dir: Path
) -> None:
    server, control = _example(start_server, short_dir / "s")
    httpx.get(server.url + "/items/1")
    assert "served item 1" not in server.log()  # example_app logs at INFO by default

    reply = _payload(control, "set_log_level", level="DEBUG", logger="example_app", ttl=1.5)
    assert reply["old"] == "INFO" and reply["new"] == "DEBUG" and reply["reverts_to"] == "INFO"
    httpx.get(server.url + "/items/3")
    wait_for(lambda: "served item 3" in server.log(), 5, "the debug line")

    wait_for(
        lambda: _payload(control, "get_log_level", logger="example_app")["level"] == "INFO", 10, "ttl revert"
    )
    httpx.get(server.url + "/items/2")
    httpx.get(server.url + "/")  # a request after it, to be sure logs were flushed
    assert "served item 2" not in server.log()

    # uvicorn's own loggers too: silence the access log, then bring it back.
    _payload(control, "set_log_level", level="WARNING", logger="uvicorn.access")
    httpx.get(server.url + "/items?quiet=1")
    _payload(control, "set_log_level", level="INFO", logger="uvicorn.access")
    httpx.get(server.url + "/items?loud=1")
    wait_for(lambda: "/items?loud=1" in server.log(), 5, "the access log line")
    assert "/items?quiet=1" not in server.log()

    failure = control.send("set_log_level", {"level": "LOUD"})
    assert failure is not None and not failure.ok and "unknown log level 'LOUD'" in failure.error


def test_set_changes_the_apps_behaviour_on_the_next_request(
    start_server: StartServer, short_dir: Path
) -> None:
    server, control = _example(start_server, short_dir / "s")
    assert httpx.get(server.url + "/").json()["message"] == "hello"
    assert _payload(control, "set", name="greeting", value="good morning") == {
        "name": "greeting",
        "old": "hello",
        "new": "good morning",
    }
    assert httpx.get(server.url + "/").json()["message"] == "good morning"

    assert httpx.get(server.url + "/items/1").json()["price"] == 25.0  # now cached
    _payload(control, "set", name="discount_percent", value=50)
    assert httpx.get(server.url + "/items/1").json()["price"] == 12.5  # cached per settings too
    _payload(control, "set", name="show_stock", value=False)
    assert httpx.get(server.url + "/items/1").json() == {"id": 1, "name": "teapot", "price": 12.5}
    _payload(control, "set", name="show_stock", value=True)
    assert httpx.get(server.url + "/items/1").json()["stock"] == 3
    assert _payload(control, "flush_cache")["dropped"] == 3

    assert httpx.get(server.url + "/items/2").json()["stock"] == 0
    assert _payload(control, "restock", item_id=2, quantity=4) == {"item_id": 2, "stock": 4}
    assert httpx.get(server.url + "/items/2").json()["stock"] == 4

    bad = control.send("set", {"name": "discount_percent", "value": 200})
    assert bad is not None and not bad.ok and "at most 90" in bad.error
    bad = control.send("restock", {"item_id": "two", "quantity": 1})
    assert bad is not None and "argument 'item_id'" in bad.error and "expected an integer" in bad.error
    assert _payload(control, "get", name="discount_percent")["value"] == 50


def test_odd_item_ids_and_block_arguments_are_client_errors(
    start_server: StartServer, short_dir: Path
) -> None:
    server, _ = _example(start_server, short_dir / "s")
    with httpx.Client(base_url=server.url) as http:
        for item in ("abc", "-1", "\u00fc", "1.5", "9" * 5000):  # 5,000 digits: int() alone would raise
            response = http.get(f"/items/{item}")
            assert response.status_code == 404 and response.json()["error"].startswith("no item "), item
        for seconds in ("abc", "-1", "nan", "11"):
            response = http.get("/block", params={"seconds": seconds})
            assert response.status_code == 400, seconds
            assert response.json() == {"error": "seconds must be a number from 0 to 10"}
    assert "Traceback" not in server.log()


def test_health_fail_and_maintenance_change_responses(start_server: StartServer, short_dir: Path) -> None:
    server, control = _example(start_server, short_dir / "s")
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        _payload(control, "health_fail")
        assert http.get("/health").status_code == 503
        assert http.get("/items/1").status_code == 200  # other requests still succeed
        _payload(control, "health_ok")
        assert http.get("/health").status_code == 200

        _payload(control, "maintenance_on", retry_after=7)
        response = http.get("/items/1")
        assert response.status_code == 503 and response.headers["retry-after"] == "7"
        assert http.get("/health").status_code == 200  # exempt
        _payload(control, "maintenance_off")
        assert http.get("/items/1").status_code == 200
    drained = _payload(control, "drain", timeout=2)
    assert drained["drained"] is True and drained["in_flight"] == 0
    # Nothing keeps the next request away while the health check passes: said, not hidden.
    assert "still takes requests (0 arrived while it drained)" in drained["note"]


def test_drain_waits_while_requests_still_arrive_and_answers_once_they_stop(
    start_server: StartServer, short_dir: Path
) -> None:
    server, control = _example(start_server, short_dir / "s")
    stop = threading.Event()
    sent = 0

    def keep_sending() -> None:  # a load balancer that has not noticed health_fail yet
        nonlocal sent
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set() and sent < 100_000:
                http.get("/items/1")
                sent += 1

    _payload(control, "health_fail")
    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        wait_for(lambda: sent > 5, 10, "the first requests")
        # Between two requests nothing is in flight; the drain must not call that drained.
        still = control.send("drain", {"timeout": 1.5, "quiet": 0.5})
        assert still is not None and not still.ok
        assert "requests still arrive" in still.error or "in flight" in still.error, still.error
        assert still.payload["drained"] is False and still.payload["arrived"] > 0
        assert still.payload["websockets_active"] == 0  # said on failure too
    finally:
        stop.set()
        sender.join(15)
    assert not sender.is_alive()
    drained = _payload(control, "drain", timeout=5, quiet=0.3)
    assert drained["drained"] is True and drained["in_flight"] == 0
    assert drained["waited_s"] >= 0.3 and drained["arrived"] == 0 and "note" not in drained  # health_fail
    gated = _payload(control, "stats")["routes"]["/items/{item_id}"]["requests"]
    assert gated == sent  # what the drain waited for was counted, request by request


def test_ping_and_stacks_answer_while_a_route_blocks_the_loop(
    start_server: StartServer, short_dir: Path
) -> None:
    server, control = _example(start_server, short_dir / "s")
    blocker = threading.Thread(target=lambda: httpx.get(server.url + "/block?seconds=4", timeout=20))
    blocker.start()
    try:

        def loop_is_in_block() -> bool:
            threads = _payload(control, "stacks")["threads"]
            app_loop = [t for t in threads if t["app_loop"]]
            return bool(app_loop) and any(" in block: " in line for line in app_loop[0]["stack"])

        wait_for(loop_is_in_block, 5, "the app loop to be inside block()")
        start = time.perf_counter()
        assert _payload(control, "ping") == "pong"
        ping_s = time.perf_counter() - start
        start = time.perf_counter()
        threads = _payload(control, "stacks")["threads"]
        stacks_s = time.perf_counter() - start
        assert ping_s < 0.1, ping_s
        assert stacks_s < 0.1, stacks_s
        loop_stack = next(t for t in threads if t["app_loop"])["stack"]
        assert any("example_app/app.py" in line and "time.sleep(seconds)" in line for line in loop_stack)
        assert _payload(control, "stats", routes=False)["in_flight"] == 1
        # tasks names the request that blocks the loop, first, and where in it: a running
        # coroutine's chain of awaits ends at its outermost frame (uvicorn's run_asgi).
        listed = _payload(control, "tasks", limit=1)
        (running,) = listed["tasks"]
        assert running["running"] is True and listed["running"] == running["name"]
        assert " in run_asgi: " in running["stack"][0]
        assert "example_app/app.py" in running["stack"][-1] and "time.sleep(seconds)" in running["stack"][-1]
    finally:
        blocker.join(20)
    idle = _payload(control, "tasks")
    assert idle["running"] is None and not any(t["running"] for t in idle["tasks"])


def test_tasks_shows_the_await_a_request_is_suspended_in(start_server: StartServer, short_dir: Path) -> None:
    server, control = _example(start_server, short_dir / "s")
    _payload(control, "set", name="slow_delay_s", value=3)
    waiter = threading.Thread(target=lambda: httpx.get(server.url + "/slow", timeout=20))
    waiter.start()
    try:

        def request_stack() -> list[str]:
            for task in _payload(control, "tasks")["tasks"]:
                if any(" in slow: " in line for line in task["stack"]):
                    return list(task["stack"])
            return []

        # uvicorn's run_asgi on the outside, down through the middleware and
        # Starlette to the handler's await and the sleep it waits in.
        wait_for(lambda: bool(request_stack()), 5, "the request's task to wait in slow()")
        stack = request_stack()
        assert " in run_asgi: " in stack[0]
        assert " in __call__: " in "".join(stack)
        handler = next(i for i, line in enumerate(stack) if " in slow: " in line)
        assert "example_app/app.py" in stack[handler] and "await asyncio.sleep(delay)" in stack[handler]
        assert " in sleep: " in stack[-1] and "asyncio" in stack[-1]
    finally:
        waiter.join(20)


def test_socket_is_removed_after_shutdown(start_server: StartServer, short_dir: Path) -> None:
    server, control = _example(start_server, short_dir / "s")
    sock = Path(control.path)
    assert sock.stat().st_mode & 0o777 == 0o600
    # uvicorn shuts down gracefully, then re-raises SIGTERM: exit code 0 or -15.
    assert server.stop() in (0, -15)
    assert "Application shutdown complete" in server.log()
    assert not sock.exists()
    assert "example app stopping" in server.log()  # the app's own lifespan shutdown ran


def test_a_drain_cut_short_by_the_shutdown_is_told_so(start_server: StartServer, short_dir: Path) -> None:
    # A deploy tool's SIGTERM arrives while an operator's drain waits: the drain's
    # client reads why it ended, not a connection closed as if the worker had crashed.
    server, control = _example(start_server, short_dir / "s")
    replies: list[Any] = []
    waiting = Client(control.path, timeout=60)
    drain = threading.Thread(
        target=lambda: replies.append(waiting.send("drain", {"timeout": 60, "quiet": 60}))
    )
    drain.start()
    try:
        time.sleep(1.0)  # the control thread reads the command at once: the drain is waiting
        assert server.stop() in (0, -15)
    finally:
        drain.join(20)
    assert not drain.is_alive()
    [reply] = replies
    assert not reply.ok
    assert (
        reply.error
        == "'drain' was cut short: the server is stopping (it may have run in part, or finish unanswered)"
    )


def test_unusable_socket_dir_leaves_the_app_serving(start_server: StartServer, short_dir: Path) -> None:
    blocker = short_dir / "a-file"
    blocker.write_text("not a directory")
    # The app under plain uvicorn: ``python -m example_app`` checks --socket-dir before it starts.
    server = start_server(
        "-m",
        "uvicorn",
        "example_app.app:app",
        "--port",
        "{port}",
        env={"EXAMPLE_APP_SOCKET_DIR": str(blocker / "sub")},
    )
    assert httpx.get(server.url + "/items/1").json()["name"] == "teapot"
    assert "could not start" in server.log() and "serves on without it" in server.log()
    assert blocker.read_text() == "not a directory"
