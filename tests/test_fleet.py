"""_fleet: stale sockets, fan-out, aggregation, durable overrides and the Prometheus text."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from unixsock_asgi import _fleet, cli
from unixsock_asgi._fleet import (
    AskedWorkers,
    OverrideError,
    OverridesFileError,
    UntrustedDirectory,
    aggregate_stats,
    ask_worker,
    check_can_persist,
    clear_overrides,
    fan_out,
    load_overrides,
    open_checked_directory,
    override_key,
    overrides_path,
    persist_override,
    read_overrides_document,
    remove_stale_sockets,
    render_prometheus,
    untrusted_peer,
    walk_path,
)
from unixsock_asgi._protocol import Response
from unixsock_asgi._server import UnixSockServer
from unixsock_asgi._stats import Stats

from .fleet_workers import Fleet, fleet, make_stale_socket, socket_dir

__all__ = ["fleet", "socket_dir"]  # fixtures

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- stale sockets

DEEP_OVERRIDES = '{"overrides": [' + "[" * 100_000 + "]" * 100_000 + "]}"
"""Nested deeper than the JSON parser recurses (Python 3.13 parses 1,500 levels): 200 KB of brackets."""


def test_remove_stale_sockets_removes_only_dead_sockets(fleet: Fleet, socket_dir: Path) -> None:
    (live,) = fleet.start(1)
    stale = make_stale_socket(socket_dir / "app-1.sock")
    regular = socket_dir / "app-2.sock"
    regular.write_text("not a socket")
    other_stale = make_stale_socket(socket_dir / "not-a-worker.socket")  # not *.sock: not ours

    removed = remove_stale_sockets(str(socket_dir))

    assert removed == [str(stale)]
    assert not stale.exists()
    assert live.path.exists() and regular.read_text() == "not a socket" and other_stale.exists()
    assert remove_stale_sockets(str(socket_dir)) == []
    assert remove_stale_sockets(str(socket_dir / "missing")) == []


# --------------------------------------------------------------------------- overrides


def test_load_overrides_is_empty_without_a_file(socket_dir: Path) -> None:
    assert load_overrides(str(socket_dir)) == []


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"overrides": "nope"}', "", "\xff\xfe", DEEP_OVERRIDES],
    ids=["syntax", "list", "no-list", "empty", "binary", "too-deep"],
)
def test_load_overrides_warns_and_returns_nothing_for_a_corrupt_file(
    socket_dir: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    Path(overrides_path(str(socket_dir))).write_text(content, encoding="latin-1")
    with caplog.at_level(logging.WARNING, logger="unixsock_asgi.fleet"):
        assert load_overrides(str(socket_dir)) == []
    assert "ignoring overrides file" in caplog.text


def test_load_overrides_skips_malformed_entries(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = {
        "version": 1,
        "overrides": [
            {"cmd": "set", "args": {"name": "greeting", "value": "hi"}},
            {"cmd": 3},
            {"cmd": "health_fail"},
            "junk",
        ],
    }
    Path(overrides_path(str(socket_dir))).write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="unixsock_asgi.fleet"):
        loaded = load_overrides(str(socket_dir))
    assert loaded == [
        {"cmd": "set", "args": {"name": "greeting", "value": "hi"}},
        {"cmd": "health_fail", "args": {}},
    ]
    assert caplog.text.count("malformed entry") == 2


def test_persist_replaces_the_override_of_the_same_state_and_keeps_order(socket_dir: Path) -> None:
    d = str(socket_dir)
    persist_override(d, "set_log_level", {"level": "DEBUG"})
    persist_override(d, "set", {"name": "greeting", "value": "hi"})
    persist_override(d, "set_log_level", {"level": "INFO", "logger": "app"})
    persist_override(d, "health_fail", {})
    persist_override(d, "maintenance_on", {"retry_after": 30})
    # Replacements: root logger (named "root" or ""), the health state, the setting.
    persist_override(d, "set_log_level", {"level": "ERROR", "logger": "root"})
    persist_override(d, "health_ok", {})
    persist_override(d, "set", {"name": "greeting", "value": "bye"})

    assert load_overrides(d) == [
        {"cmd": "set_log_level", "args": {"level": "INFO", "logger": "app"}},
        {"cmd": "maintenance_on", "args": {"retry_after": 30}},
        {"cmd": "set_log_level", "args": {"level": "ERROR", "logger": "root"}},
        {"cmd": "set", "args": {"name": "greeting", "value": "bye"}},
    ]  # health_ok took health_fail's out: a worker starts healthy, nothing is left to apply
    persist_override(d, "maintenance_off", {})
    assert [e["cmd"] for e in load_overrides(d)] == ["set_log_level", "set_log_level", "set"]
    written = os.stat(overrides_path(d)).st_ino  # a rewrite renames a new file into place
    persist_override(d, "health_ok", {})  # nothing to take out: the file is left as it is
    assert os.stat(overrides_path(d)).st_ino == written
    os.unlink(overrides_path(d))
    persist_override(d, "health_ok", {})
    assert not os.path.exists(overrides_path(d))  # and none is made to hold nothing


def test_persisted_file_is_private_and_no_temporary_file_is_left(socket_dir: Path) -> None:
    persist_override(str(socket_dir), "set", {"name": "greeting", "value": "hi"})
    path = Path(overrides_path(str(socket_dir)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in socket_dir.iterdir()) == ["overrides.json"]
    assert read_overrides_document(str(socket_dir))["version"] == 1


def test_persist_replaces_the_file_atomically_so_readers_never_see_a_partial_one(socket_dir: Path) -> None:
    d = str(socket_dir)
    path = Path(overrides_path(d))
    persist_override(d, "set", {"name": "payload", "value": "x" * 200_000})
    old_file = path.open()  # an atomic replace leaves this one whole and untouched
    stop = threading.Event()
    reads: list[int] = []
    torn: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            text = path.read_text()
            try:
                json.loads(text)
            except ValueError:
                torn.append(text[:80])
            reads.append(len(text))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            persist_override(d, "set", {"name": "payload", "value": str(i) * 200_000})
    finally:
        stop.set()
        thread.join(10)
    with old_file:
        assert json.loads(old_file.read())["overrides"][0]["args"]["value"] == "x" * 200_000
    assert torn == []
    assert len(reads) > 0


def test_a_failed_write_leaves_the_previous_file_and_no_debris(socket_dir: Path) -> None:
    d = str(socket_dir)
    persist_override(d, "set", {"name": "greeting", "value": "hi"})
    before = Path(overrides_path(d)).read_text()
    with pytest.raises(TypeError):
        persist_override(d, "set", {"name": "greeting", "value": object()})  # not JSON
    assert Path(overrides_path(d)).read_text() == before
    assert sorted(p.name for p in socket_dir.iterdir()) == ["overrides.json"]


def test_concurrent_persists_lose_no_update(socket_dir: Path) -> None:
    d = str(socket_dir)
    threads = [
        threading.Thread(target=persist_override, args=(d, "set", {"name": f"s{i}", "value": i}))
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(e["args"]["name"] for e in load_overrides(d)) == sorted(f"s{i}" for i in range(12))


@pytest.mark.parametrize(
    ("cmd", "args", "message"),
    [
        ("set_log_level", {"level": "DEBUG", "ttl": 60}, "ttl"),
        ("set_log_level", {"logger": "app"}, "level="),
        ("set", {"name": "greeting"}, "value="),
        ("stats_reset", {}, "cannot be persisted"),
        ("drain", {"timeout": 5}, "cannot be persisted"),
    ],
)
def test_override_key_refuses_what_cannot_be_persisted(cmd: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(OverrideError, match=message):
        override_key(cmd, args)


def test_a_ttl_of_null_is_not_a_ttl() -> None:
    assert override_key("set_log_level", {"level": "DEBUG", "ttl": None}) == ("log_level", "")


@pytest.mark.parametrize("content", ["{corrupt", DEEP_OVERRIDES], ids=["syntax", "too-deep"])
def test_persist_never_overwrites_a_corrupt_file_but_clear_removes_it(socket_dir: Path, content: str) -> None:
    d = str(socket_dir)
    Path(overrides_path(d)).write_text(content)
    with pytest.raises(OverridesFileError, match="fix or clear it"):
        persist_override(d, "health_fail", {})
    assert Path(overrides_path(d)).read_text() == content
    assert clear_overrides(d) is None  # removed, though what it held is unknown
    assert not Path(overrides_path(d)).exists()


def test_clear_reports_how_many_overrides_it_dropped(socket_dir: Path) -> None:
    d = str(socket_dir)
    assert clear_overrides(d) == 0
    persist_override(d, "health_fail", {})
    persist_override(d, "set", {"name": "a", "value": 1})
    assert clear_overrides(d) == 2
    assert load_overrides(d) == []


# --------------------------------------------------------------------------- aggregation

_ROUTES = ["/", "/items/{item_id}", "/slow"]
_STATUSES = [200, 201, 304, 404, 500, 503]
_METHODS = ["GET", "POST"]

_request = st.tuples(
    st.sampled_from(_ROUTES),
    st.sampled_from(_METHODS),
    st.sampled_from(_STATUSES),
    st.floats(min_value=1e-6, max_value=30.0, allow_nan=False),
    st.booleans(),
)


def _record(stats: Stats, requests: list[tuple[str, str, int, float, bool]]) -> None:
    for route, method, status, seconds, exception in requests:
        stats.record(route, method, status, seconds, exception)


def _latency_without_sum(histogram: dict[str, Any]) -> dict[str, Any]:
    # Float sums depend on addition order; everything else must be identical.
    return {k: v for k, v in histogram.items() if k != "sum_s"}


@settings(max_examples=60, deadline=None)
@given(workers=st.lists(st.lists(_request, max_size=40), min_size=1, max_size=5))
def test_merging_workers_equals_counting_the_union_of_their_requests(
    workers: list[list[tuple[str, str, int, float, bool]]],
) -> None:
    snapshots = []
    union = Stats()
    for requests in workers:
        stats = Stats()
        _record(stats, requests)
        _record(union, requests)
        snapshots.append(stats.snapshot())
    expected = union.snapshot()

    total = aggregate_stats(snapshots)

    assert total["workers"] == len(workers)
    assert total["requests_total"] == expected["requests_total"] == sum(len(w) for w in workers)
    assert total["exceptions_total"] == expected["exceptions_total"]
    assert total["by_status"] == expected["by_status"]
    assert total["by_method"] == expected["by_method"]
    assert _latency_without_sum(total["latency"]) == _latency_without_sum(expected["latency"])
    assert total["latency"]["sum_s"] == pytest.approx(expected["latency"]["sum_s"])
    assert set(total["routes"]) == set(expected["routes"])
    for route, figures in expected["routes"].items():
        merged = total["routes"][route]
        assert merged["requests"] == figures["requests"]
        assert merged["exceptions"] == figures["exceptions"]
        assert merged["by_status"] == figures["by_status"]
        assert merged["by_method"] == figures["by_method"]
        assert _latency_without_sum(merged["latency"]) == _latency_without_sum(figures["latency"])


def test_percentiles_come_from_merged_buckets_not_from_averaging() -> None:
    fast, slow = Stats(), Stats()
    for _ in range(99):
        fast.record("/", "GET", 200, 0.001, False)
    slow.record("/", "GET", 200, 2.0, False)
    total = aggregate_stats([fast.snapshot(), slow.snapshot()])
    # One slow request in a hundred: the fleet's p50 stays fast. Averaging the
    # workers' p50s would claim about one second.
    assert total["latency"]["p50_s"] == pytest.approx(0.001, rel=0.05)
    assert total["latency"]["count"] == 100
    assert total["latency"]["max_s"] == 2.0


def test_gauges_are_summed_where_they_add_up_and_lag_is_the_worst() -> None:
    a, b = Stats(), Stats()
    a.started, b.started = 2, 3  # started and not finished: in flight
    a.loop_lag_s, b.loop_lag_s = 0.001, 0.25
    a.websockets_active, b.websockets_active = 1, 4
    sa, sb = a.snapshot(), b.snapshot()
    sa["process"]["rss_bytes"], sb["process"]["rss_bytes"] = 100, 250
    total = aggregate_stats([sa, sb])
    assert total["in_flight"] == 5
    assert total["process"]["rss_bytes"] == 350
    assert total["process"]["loop_lag_s"] == 0.25
    assert total["websockets"]["active"] == 5


def test_aggregate_tolerates_payloads_without_optional_parts() -> None:
    total = aggregate_stats([{"pid": 1, "requests_total": 3}, {"pid": 2}])
    assert total["requests_total"] == 3
    assert total["latency"]["count"] == 0
    assert total["process"]["rss_bytes"] is None


# --------------------------------------------------------------------------- fan-out


def test_a_hung_worker_costs_at_most_the_timeout_and_others_still_answer(fleet: Fleet) -> None:
    quick = fleet.start(3)
    (hung,) = fleet.start(1, reply_delay_s=10.0)
    sockets = [str(w.path) for w in [*quick, hung]]

    started = time.monotonic()
    outcome = asyncio.run(fan_out(sockets, "ping", timeout=0.5))
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    by_pid = {r.pid: r for r in outcome.results}
    assert by_pid[hung.pid].status == "timeout"
    assert "0.5s" in by_pid[hung.pid].error
    assert all(by_pid[w.pid].payload == "pong" and by_pid[w.pid].elapsed_s < 0.5 for w in quick)
    assert not outcome.all_ok


def test_fan_out_reports_stale_sockets_apart_from_results(fleet: Fleet, socket_dir: Path) -> None:
    (live,) = fleet.start(1)
    stale = make_stale_socket(socket_dir / "app-7.sock")
    outcome = asyncio.run(fan_out([str(live.path), str(stale)], "ping", timeout=1.0))
    assert [r.pid for r in outcome.results] == [live.pid]
    assert outcome.stale == [str(stale)]
    assert outcome.all_ok


def test_a_worker_that_exits_while_asked_counts_as_gone_not_as_an_error(
    exiting_server: Callable[[str], str], sock_path: str
) -> None:
    # A worker shutting down (a deploy, --max-requests) ends the connections it
    # holds: that is a worker gone, not an error; but the command may have run.
    exiting_server(sock_path)  # it says so: "'slow' was cut short: the server is stopping"
    outcome = asyncio.run(fan_out([sock_path], "slow", timeout=5.0))
    assert (outcome.results, outcome.stale, outcome.gone) == ([], [], [sock_path])


def test_a_live_workers_failure_that_looks_like_a_stop_is_a_failure(
    start_server: Callable[..., UnixSockServer], sock_path: str
) -> None:
    # A handler relaying another server's "cut short" reply: its own worker is still there.
    def relay(cmd: str, args: dict[str, Any]) -> Response:
        return Response.failure("'apply' was cut short: the server is stopping", {"server_stopping": True})

    start_server(relay, path=sock_path)
    outcome = asyncio.run(fan_out([sock_path], "apply", timeout=5.0))
    assert outcome.gone == [] and [r.status for r in outcome.results] == ["failure"]
    assert outcome.results[0].error == "'apply' was cut short: the server is stopping"


def test_a_worker_that_exits_while_asked_without_a_word_counts_as_gone(tmp_path: Path) -> None:
    # A killed process, or an older version: the connection ends with no reply, and nothing listens.
    path = str(tmp_path / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def exit_once_asked() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(1 << 16)
            os.unlink(path)
            listener.close()

    exiting = threading.Thread(target=exit_once_asked)
    exiting.start()
    try:
        outcome = asyncio.run(fan_out([path], "slow", timeout=5.0))
    finally:
        exiting.join(10)
        listener.close()
    assert (outcome.results, outcome.stale, outcome.gone) == ([], [], [path])


def test_fan_out_runs_concurrently(fleet: Fleet) -> None:
    workers = fleet.start(6, reply_delay_s=0.3)
    started = time.monotonic()
    outcome = asyncio.run(fan_out([str(w.path) for w in workers], "ping", timeout=5.0))
    assert outcome.all_ok and len(outcome.results) == 6
    assert time.monotonic() - started < 1.2  # one after another would take 1.8 s


def test_fan_out_refuses_a_timeout_that_cannot_work_before_asking_anyone(fleet: Fleet) -> None:
    (worker,) = fleet.start(1)
    for timeout in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            asyncio.run(fan_out([str(worker.path)], "ping", timeout=timeout))
    assert worker.commands_seen == []
    assert asyncio.run(fan_out([str(worker.path)], "ping", timeout=float("inf"))).all_ok  # no limit


def test_failure_answers_keep_their_message(fleet: Fleet) -> None:
    workers = fleet.start(2)
    outcome = asyncio.run(fan_out([str(w.path) for w in workers], "set_log_level", {"level": "LOUD"}))
    assert [r.status for r in outcome.results] == ["failure", "failure"]
    assert all("unknown level" in r.error for r in outcome.results)


# --------------------------------------------------------------------------- Prometheus


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}


def test_prometheus_text_parses_and_matches_each_workers_figures(fleet: Fleet) -> None:
    workers = fleet.start(3)
    rng = random.Random(4)
    for w in workers:
        w.record(*[("/items/{item_id}", 200, rng.uniform(0.001, 0.1)) for _ in range(50)])
        w.record(('/we"ird\\route', 500, 0.5), exception=True)
    outcome = asyncio.run(fan_out([str(w.path) for w in workers], "stats"))

    text = render_prometheus(outcome)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = _samples(text)
    assert samples[("asgi_workers", ())] == 3
    for w in workers:
        pid = ("pid", str(w.pid))
        assert samples[("asgi_requests_total", (pid, ("route", "/items/{item_id}"), ("status", "2xx")))] == 50
        assert samples[("asgi_requests_total", (pid, ("route", '/we"ird\\route'), ("status", "5xx")))] == 1
        assert samples[("asgi_exceptions_total", (pid, ("route", '/we"ird\\route')))] == 1
        route = ("route", "/items/{item_id}")
        assert samples[("asgi_request_duration_seconds_count", (pid, route))] == 50
        assert samples[("asgi_request_duration_seconds_bucket", (("le", "+Inf"), pid, route))] == 50
        assert samples[("asgi_request_duration_seconds_bucket", (("le", "0.001"), pid, route))] == 0
        assert samples[("asgi_request_duration_seconds_bucket", (("le", "0.25"), pid, route))] == 50
        slow = ("route", '/we"ird\\route')
        assert samples[("asgi_request_duration_seconds_bucket", (("le", "0.25"), pid, slow))] == 0
        assert samples[("asgi_request_duration_seconds_bucket", (("le", "1.0"), pid, slow))] == 1
    assert families["asgi_request_duration_seconds"].type == "histogram"
    assert families["asgi_requests"].type == "counter"  # the parser names a counter without _total
    per_worker = {labels: v for (name, labels), v in samples.items() if name == "asgi_worker_requests_total"}
    assert per_worker == {(("pid", str(w.pid)),): 51 for w in workers}
    for line in text.splitlines():
        assert not line.startswith("#") or line.split()[1] in ("HELP", "TYPE")
    assert len([ln for ln in text.splitlines() if ln.startswith("# TYPE asgi_requests_total ")]) == 1


def test_prometheus_counters_of_workers_that_answer_do_not_drop_when_another_does_not(fleet: Fleet) -> None:
    # Sums over the workers that answered dropped whenever one was replaced or stopped, and
    # Prometheus' rate() read each drop as a reset: a burst of requests that never happened.
    workers = fleet.start(3)
    for w in workers:
        w.record(*[("/items/{item_id}", 200, 0.01)] * 10)
    paths = [str(w.path) for w in workers]
    before = _samples(render_prometheus(asyncio.run(fan_out(paths, "stats"))))
    after = _samples(render_prometheus(asyncio.run(fan_out(paths[1:], "stats"))))  # one left out
    counters = {  # (the per-worker process figures move by themselves: CPU time)
        key: v
        for key, v in before.items()
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")) and not key[0].startswith("asgi_worker_")
    }
    gone = ("pid", str(workers[0].pid))
    assert any(gone in labels for _, labels in counters)
    for (name, labels), value in counters.items():
        if gone in labels:
            assert (name, labels) not in after  # its series pauses, as if unscraped
        elif "pid" in dict(labels):
            assert after[(name, labels)] == value, (name, labels)


def test_a_stats_reply_over_the_clients_default_limit_still_reaches_the_fleet(fleet: Fleet) -> None:
    (worker,) = fleet.start(1)
    routes = 1000  # as many as a worker counts apart
    for i in range(routes):
        route = f"/customers/{i:05d}/orders/{{order_id}}/items/{{item_id}}"
        statuses = (200, 201, 404, 500)
        worker.record(*[(route, statuses[k % 4], 0.0001 * 1.1**k) for k in range(120)])  # 120 buckets
    outcome = asyncio.run(fan_out([str(worker.path)], "stats", timeout=10.0))
    (result,) = outcome.results
    assert result.ok, result.error
    assert len(json.dumps(result.payload, separators=(",", ":"))) > 1 << 20  # past a Client's default 1 MiB
    assert len(result.payload["routes"]) == routes
    assert 'route="/customers/00999/orders/{order_id}/items/{item_id}"' in render_prometheus(outcome)


def test_prometheus_text_of_an_empty_fleet_still_parses(socket_dir: Path) -> None:
    stale = make_stale_socket(socket_dir / "app-9.sock")
    outcome = asyncio.run(fan_out([str(stale)], "stats"))
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus(outcome))}
    assert families["asgi_stale_sockets"].samples[0].value == 1
    assert families["asgi_workers"].samples[0].value == 0


def test_overrides_directory_stays_clean(socket_dir: Path) -> None:
    persist_override(str(socket_dir), "health_fail", {})
    clear_overrides(str(socket_dir))
    assert os.listdir(socket_dir) == []


_NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating files of another user needs root")


_THIRD = 65533  # a user neither the operator nor the server runs as


@pytest.fixture
def lookup_tree(tmp_path: Path) -> Path:
    """A small filesystem: root's ``run`` holding the workers' (nobody's) ``shop``, nobody's home,
    a sticky ``tmp`` anyone may write, a group-writable ``shared`` and a third user's directory."""
    base = tmp_path / "fs"
    for name, mode, uid in [
        ("", 0o755, 0),
        ("run", 0o755, 0),
        ("run/shop", 0o750, _NOBODY),
        ("home", 0o755, 0),
        ("home/nobody", 0o755, _NOBODY),
        ("home/nobody/d", 0o755, _NOBODY),
        ("home/nobody/d/x", 0o755, _NOBODY),
        ("tmp", 0o1777, 0),
        ("shared", 0o2775, 0),
        ("third", 0o755, _THIRD),
    ]:
        (base / name).mkdir(exist_ok=True)
        os.chmod(base / name, mode)  # mkdir's mode passes the umask
        os.chown(base / name, uid, uid)
    os.chmod(tmp_path, 0o755)  # pytest's own is 0700: fine for root, but this is the tree's way in
    for name in ("run/shop", "home/nobody/d", "third", "tmp"):
        (base / name / "app-1.sock").touch()  # the lookups only lstat: a file stands in for a socket
        os.chown(base / name / "app-1.sock", _NOBODY, _NOBODY)

    def link(name: str, target: str, uid: int) -> None:
        (base / name).symlink_to(target)
        os.lchown(base / name, uid, uid)

    link("run/shoplink", "shop", 0)  # root's own, relative
    link("tmp/ctl", str(base / "home/nobody/d"), _NOBODY)  # nobody's, where anyone may make names
    link("run/shop2", str(base / "shared/shop-ctl"), 0)  # root's, through a group-writable directory
    link("shared/shop-ctl", str(base / "home/nobody/d"), _NOBODY)
    link("run/shop3", str(base / "tmp/sock2/d"), 0)  # root's, through a name nobody took in tmp
    link("tmp/sock2", str(base / "home/nobody"), _NOBODY)
    link("run/loop", "loop", 0)
    return base


@needs_root
@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("run/shop/app-1.sock", ""),
        ("run/shop", ""),  # a socket directory
        ("run/shop/../shop/app-1.sock", ""),
        ("run/shoplink/app-1.sock", ""),
        ("home/nobody/d/app-1.sock", ""),  # nobody's own directory, in root's
        ("tmp/app-1.sock", "{base}/tmp/app-1.sock belongs to uid 65534, in {base}/tmp, where any user"),
        ("tmp/ctl/app-1.sock", "{base}/tmp/ctl belongs to uid 65534, in {base}/tmp, where any user"),
        # '..' after nobody's link: the link is still met (it was once checked only as resolved).
        ("tmp/ctl/x/../app-1.sock", "{base}/tmp/ctl belongs to uid 65534, in {base}/tmp, where any user"),
        # Root's links, leading through a name someone else could have made: met on the way.
        ("run/shop2/app-1.sock", "{base}/shared is writable by others"),
        ("run/shop3/app-1.sock", "{base}/tmp/sock2 belongs to uid 65534, in {base}/tmp, where any user"),
        ("run/shop3", "{base}/tmp/sock2 belongs to uid 65534, in {base}/tmp, where any user"),
        ("third/app-1.sock", "{base}/third belongs to uid 65533"),
        ("run/shop/gone.sock", "{base}/run/shop/gone.sock cannot be inspected (No such file or directory)"),
        ("run/loop/app-1.sock", "cannot be inspected (Too many levels of symbolic links)"),
    ],
)
def test_a_socket_of_another_user_is_trusted_only_where_nobody_else_could_have_put_it(
    lookup_tree: Path, written: str, why: str
) -> None:
    problem = untrusted_peer(str(lookup_tree / written), _NOBODY)
    if not why:
        assert problem == ""
    else:
        assert problem.startswith("not asked: uid 65534 serves this socket, and ")
        assert why.format(base=lookup_tree) in problem


def _entries(path: str) -> list[str]:
    """The entries :func:`walk_path` looks up on the way to ``path``."""
    walk = walk_path(path)
    os.close(walk.fd)
    return [lookup.entry for lookup in walk.lookups]


@needs_root
def test_walk_path_walks_the_path_as_the_kernel_does(
    lookup_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = str(lookup_tree)
    way_in = _entries(base)  # /tmp, pytest's directories, the tree
    # Every link is replaced by where it leads, walked again from / (its targets are absolute).
    assert _entries(f"{base}/run/shop3/app-1.sock") == [
        *way_in,
        f"{base}/run",
        f"{base}/run/shop3",  # root's link to tmp/sock2/d
        *way_in,
        f"{base}/tmp",
        f"{base}/tmp/sock2",  # nobody's link to home/nobody
        *way_in,
        f"{base}/home",
        f"{base}/home/nobody",
        f"{base}/home/nobody/d",
        f"{base}/home/nobody/d/app-1.sock",
    ]
    # '..' from where the link led, not from the text.
    assert _entries(f"{base}/tmp/ctl/x/../app-1.sock")[-1] == f"{base}/home/nobody/d/app-1.sock"
    # A relative path from the working directory.
    monkeypatch.chdir(lookup_tree / "run")
    monkeypatch.setenv("PWD", f"{base}/run")
    assert _entries("shoplink/app-1.sock")[-3:] == [
        f"{base}/run/shoplink",
        f"{base}/run/shop",
        f"{base}/run/shop/app-1.sock",
    ]
    assert untrusted_peer("shoplink/app-1.sock", _NOBODY) == ""


@needs_root
def test_a_relative_path_is_judged_by_the_kernels_way_and_the_shells(
    lookup_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = str(lookup_tree)
    # `cd tmp/ctl`: the kernel starts from nobody's own directory, in root's...
    monkeypatch.chdir(lookup_tree / "tmp/ctl")
    monkeypatch.setenv("PWD", f"{base}/tmp/ctl")
    walk = walk_path("app-1.sock")
    os.close(walk.fd)
    assert [lookup.entry for lookup in walk.lookups][-4:] == [
        f"{base}/home",
        f"{base}/home/nobody",
        f"{base}/home/nobody/d",
        f"{base}/home/nobody/d/app-1.sock",
    ]
    assert walk.lookups[0].directory == "/" and walk.root_uid == 0
    # ... but the shell came there through nobody's link, in a directory anyone may write.
    assert f"{base}/tmp/ctl" in [lookup.entry for lookup in walk.shells_way]
    problem = untrusted_peer("app-1.sock", _NOBODY)
    assert f"{base}/tmp/ctl belongs to uid 65534, in {base}/tmp, where any user may make names" in problem
    assert "(on the way the shell came to its working directory, $PWD)" in problem
    # Come the kernel's way: nobody's own directory, trusted as if given in full.
    monkeypatch.setenv("PWD", f"{base}/home/nobody/d")
    assert untrusted_peer("app-1.sock", _NOBODY) == ""
    # Without $PWD (or a relative one), the way is unknown: the full path is asked for.
    monkeypatch.delenv("PWD")
    assert "$PWD is not set" in untrusted_peer("app-1.sock", _NOBODY)
    monkeypatch.setenv("PWD", "tmp/ctl")
    assert "$PWD is not set" in untrusted_peer("app-1.sock", _NOBODY)
    # A $PWD that leads elsewhere: how the shell came here is unknown.
    monkeypatch.setenv("PWD", f"{base}/run/shop")
    assert "$PWD (" in untrusted_peer("app-1.sock", _NOBODY)
    # The working directory's own way down from / is checked as a written path's is.
    monkeypatch.chdir(lookup_tree / "tmp")
    monkeypatch.setenv("PWD", f"{base}/tmp")
    assert f"{base}/tmp/app-1.sock belongs to uid 65534, in {base}/tmp" in untrusted_peer(
        "app-1.sock", _NOBODY
    )
    monkeypatch.chdir(lookup_tree / "third")
    monkeypatch.setenv("PWD", f"{base}/third")
    assert f"{base}/third belongs to uid 65533" in untrusted_peer("app-1.sock", _NOBODY)
    assert f"{base}/third belongs to uid 65533" in untrusted_peer("../third/./app-1.sock", _NOBODY)
    # Root's own workers (and the operator's) are talked to whatever the way.
    monkeypatch.setenv("PWD", "/nonexistent")
    assert untrusted_peer("app-1.sock", 0) == ""


def test_the_cli_talks_to_the_socket_it_checked_whatever_is_renamed_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's client connects through the descriptor its walk ended on, not by name again."""
    checked, other = tmp_path / "checked", tmp_path / "other"
    checked.mkdir()
    other.mkdir()
    servers = []

    def answering(name: str) -> Callable[[str, dict[str, Any]], str]:
        return lambda cmd, args: name

    for directory in (checked, other):
        server = UnixSockServer(str(directory / "app-1.sock"), answering(directory.name))
        server.start()
        servers.append(server)
    walk_path = _fleet.walk_path

    def walk_then_swap(path: str) -> _fleet.PathWalk:
        walk = walk_path(path)
        # Between the walk and the connection, the name comes to lead to the other server.
        checked.rename(tmp_path / "moved")
        other.rename(checked)
        return walk

    monkeypatch.setattr(_fleet, "walk_path", walk_then_swap)
    try:
        result = asyncio.run(ask_worker(str(checked / "app-1.sock"), "which", {}, 5.0))
        assert (result.status, result.payload) == ("success", "checked")
    finally:
        for server in servers:
            server.stop()


def test_persist_refuses_a_directory_swapped_after_its_workers_were_asked(
    fleet: Fleet,
    socket_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet.start(1)
    link, elsewhere = tmp_path / "workers", tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link.symlink_to(socket_dir)
    run_fan_out = cli._run_fan_out

    def fan_out_then_swap(*args: Any, **kwargs: Any) -> Any:
        outcome = run_fan_out(*args, **kwargs)
        link.unlink()  # the link now leads to a directory no worker was asked in
        link.symlink_to(elsewhere)
        return outcome

    monkeypatch.setattr(cli, "_run_fan_out", fan_out_then_swap)
    status = cli.main(["send", str(link), "set_log_level", "level=DEBUG", "logger=app", "--persist"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_FAILED
    assert "applied, but not persisted" in err and "no longer the directory whose workers were asked" in err
    assert list(elsewhere.iterdir()) == [] and not Path(overrides_path(str(socket_dir))).exists()


@needs_root
def test_root_hands_the_overrides_file_to_the_workers_user(fleet: Fleet, socket_dir: Path) -> None:
    (worker,) = fleet.start(1)
    os.chown(worker.path, _NOBODY, _NOBODY)  # as if the workers ran as nobody
    check_can_persist(str(socket_dir))
    persist_override(str(socket_dir), "health_fail", {})
    st_file = os.stat(overrides_path(str(socket_dir)))
    assert (st_file.st_uid, st_file.st_gid) == (_NOBODY, _NOBODY)
    assert stat.S_IMODE(st_file.st_mode) == 0o600


@needs_root
def test_another_user_may_not_persist_what_the_workers_could_not_read(fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(1)  # the workers' sockets belong to root
    os.chmod(socket_dir, 0o777)
    os.seteuid(_NOBODY)  # the operator is someone else
    try:
        with pytest.raises(OverrideError) as caught:
            check_can_persist(str(socket_dir))
    finally:
        os.seteuid(0)
    assert "workers run as uid 0" in str(caught.value) and f"written by uid {_NOBODY}" in str(caught.value)


def test_stale_sockets_are_removed_after_one_wait_for_a_lock_held_elsewhere(socket_dir: Path) -> None:
    import fcntl

    stale = [make_stale_socket(socket_dir / f"app-{n}.sock") for n in range(4)]
    holder = os.open(socket_dir, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a hung process holds the directory's lock
        started = time.monotonic()
        assert sorted(remove_stale_sockets(str(socket_dir))) == sorted(map(str, stale))
        assert time.monotonic() - started < 3.5  # one patience (2 s), not one per socket
    finally:
        os.close(holder)


def test_an_overrides_file_others_may_write_is_not_applied(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path(overrides_path(str(socket_dir)))
    path.write_text(json.dumps({"version": 1, "overrides": [{"cmd": "maintenance_on", "args": {}}]}))
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, logger="unixsock_asgi.fleet"):
        assert load_overrides(str(socket_dir)) == []
    assert "only a file of the workers' user or root that no one else may write is applied" in caplog.text
    os.chmod(path, 0o644)
    assert load_overrides(str(socket_dir)) == [{"cmd": "maintenance_on", "args": {}}]


def test_persisting_gives_up_on_a_directory_lock_held_too_long(socket_dir: Path) -> None:
    import fcntl

    from unixsock_asgi._sockets import directory_lock

    holder = os.open(socket_dir, os.O_RDONLY)  # another open file: as another process's lock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with (
            pytest.raises(TimeoutError, match=r"stayed locked by another process for 0\.3s"),
            directory_lock(str(socket_dir), patience=0.3),
        ):
            pass
        assert time.monotonic() - started < 3
    finally:
        os.close(holder)
    persist_override(str(socket_dir), "health_fail", {})  # free again
    assert load_overrides(str(socket_dir)) == [{"cmd": "health_fail", "args": {}}]


def test_an_overrides_file_that_is_a_link_or_a_fifo_is_neither_followed_nor_waited_for(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = socket_dir.parent / f"{socket_dir.name}-elsewhere.json"
    elsewhere.write_text(
        json.dumps({"version": 1, "overrides": [{"cmd": "secret", "args": {"token": "s3"}}]})
    )
    path = Path(overrides_path(str(socket_dir)))
    try:
        path.symlink_to(elsewhere)
        with caplog.at_level(logging.WARNING, logger="unixsock_asgi.fleet"):
            assert load_overrides(str(socket_dir)) == []
        assert "symbolic link" in caplog.text
        with pytest.raises(OverridesFileError, match="symbolic link"):
            read_overrides_document(str(socket_dir))
        with pytest.raises(OverridesFileError):
            persist_override(str(socket_dir), "health_fail", {})
        assert (
            "secret" in elsewhere.read_text() and path.is_symlink()
        )  # neither read into nor written through
        path.unlink()

        os.mkfifo(path)  # its open would wait for a writer
        started = time.monotonic()
        assert load_overrides(str(socket_dir)) == []
        with pytest.raises(OverridesFileError, match="not a regular file"):
            read_overrides_document(str(socket_dir))
        assert time.monotonic() - started < 1
        assert clear_overrides(str(socket_dir)) is None and not path.exists()  # the way out
    finally:
        elsewhere.unlink()


@pytest.fixture
def run_dir(socket_dir: Path) -> Path:
    """A socket directory in one of root's that others may not write, as /run/<app> is in /run."""
    os.chmod(socket_dir, 0o755)
    run = socket_dir / "app"
    run.mkdir(mode=0o700)
    return run


@needs_root
def test_root_persists_with_the_rights_of_the_directorys_owner(run_dir: Path) -> None:
    socket_dir = run_dir
    os.chown(socket_dir, _NOBODY, _NOBODY)  # the workers' user's directory: they may swap what is in it
    path = Path(overrides_path(str(socket_dir)))
    path.write_text(json.dumps({"version": 1, "overrides": [{"cmd": "root_only", "args": {"token": "s3"}}]}))
    os.chmod(path, 0o600)  # root's file: nobody may read it, so neither does root on nobody's behalf
    with pytest.raises(OverridesFileError, match="permission denied"):
        persist_override(str(socket_dir), "health_fail", {})
    assert os.geteuid() == 0 and os.getegid() == 0  # given back
    assert "root_only" in path.read_text() and path.stat().st_uid == 0
    path.unlink()
    persist_override(str(socket_dir), "health_fail", {})
    st_file = path.stat()
    assert (st_file.st_uid, st_file.st_gid, stat.S_IMODE(st_file.st_mode)) == (_NOBODY, _NOBODY, 0o600)
    assert clear_overrides(str(socket_dir)) == 1


def test_persist_writes_only_into_the_directory_the_workers_were_asked_in(
    fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    (worker,) = fleet.start(1)
    result = asyncio.run(ask_worker(str(worker.path), "ping", {}, 5.0))
    st = socket_dir.stat()
    assert (result.peer_uid, result.home) == (os.geteuid(), (st.st_dev, st.st_ino))
    asked = AskedWorkers.of([result])
    # The name now leads to another directory (a link swapped meanwhile): nothing is written there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    with pytest.raises(OverridesFileError, match="no longer the directory whose workers were asked"):
        persist_override(str(elsewhere), "health_fail", {}, asked)
    assert list(elsewhere.iterdir()) == []
    persist_override(str(socket_dir), "health_fail", {}, asked)
    assert [e["cmd"] for e in load_overrides(str(socket_dir))] == ["health_fail"]


@needs_root
def test_persist_writes_nothing_into_a_directory_of_a_user_the_workers_do_not_run_as(
    run_dir: Path,
) -> None:
    socket_dir = run_dir
    st = socket_dir.stat()
    os.chown(socket_dir, _THIRD, _THIRD)
    asked = AskedWorkers(frozenset({(st.st_dev, st.st_ino)}), frozenset({_NOBODY}))
    with pytest.raises(OverridesFileError, match="belongs to uid 65533, neither root nor the workers' user"):
        persist_override(str(socket_dir), "set", {"name": "api_token", "value": "s3cr3t"}, asked)
    assert list(socket_dir.iterdir()) == []
    os.chown(socket_dir, _NOBODY, _NOBODY)  # the workers' own: written, and handed to them
    persist_override(str(socket_dir), "health_fail", {}, asked)
    assert Path(overrides_path(str(socket_dir))).stat().st_uid == _NOBODY


def test_remove_stale_removes_only_in_the_directory_it_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there, link = tmp_path / "here", tmp_path / "there", tmp_path / "workers"
    here.mkdir()
    there.mkdir()
    make_stale_socket(here / "app-1.sock")
    live = UnixSockServer(str(there / "app-1.sock"), lambda cmd, args: "alive")
    live.start()
    link.symlink_to(here)
    probe = _fleet.probe  # type: ignore[attr-defined]  # patched where _fleet looks it up

    def probe_then_swap(path: str, timeout: float = 1.0) -> Any:
        found = probe(path, timeout)
        link.unlink()  # between the probe and the removal, the name comes to lead elsewhere
        link.symlink_to(there)
        return found

    monkeypatch.setattr(_fleet, "probe", probe_then_swap)
    try:
        assert remove_stale_sockets(str(link)) == [str(link / "app-1.sock")]
        assert not (here / "app-1.sock").exists()
        assert asyncio.run(ask_worker(str(there / "app-1.sock"), "ping", {}, 5.0)).payload == "alive"
    finally:
        live.stop()


def test_remove_stale_logs_a_socket_name_as_text(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_stale_socket(socket_dir / "app\x1b]0;PWNED\x07-2.sock")  # its name is the workers' user's
    with caplog.at_level(logging.INFO, logger="unixsock_asgi.fleet"):
        assert len(remove_stale_sockets(str(socket_dir))) == 1
    logged = caplog.messages
    assert any("PWNED" in message for message in logged)
    assert not any("\x1b" in message or "/proc/self/fd" in message for message in logged), logged


@needs_root
def test_root_works_in_no_directory_another_user_could_have_led_it_to(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A third user's link in /tmp to a directory of a user's (their overrides file), or to one of root's."""
    os.chown(run_dir, _NOBODY, _NOBODY)
    secret = Path(overrides_path(str(run_dir)))
    secret.write_text(
        json.dumps({"version": 1, "overrides": [{"cmd": "set", "args": {"name": "k", "value": "s3"}}]})
    )
    make_stale_socket(run_dir / "app-9.sock")
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a /tmp of its own
    link = shared / "ctl"
    link.symlink_to(run_dir)
    os.lchown(link, _THIRD, _THIRD)
    why = f"{link} belongs to uid 65533, in {shared}, where any user may make names"

    for argv in (
        ("overrides", "show", str(link)),
        ("overrides", "clear", str(link)),
        ("ls", str(link), "--remove-stale"),
    ):
        status, _, err = _cli_run(capsys, *argv)
        assert status == 1 and why in " ".join(err.split()), (argv, err)
    assert secret.exists() and (run_dir / "app-9.sock").exists()  # neither read, removed nor cleared

    # root's directory (as /etc would be), through the link: no file written there.
    link.unlink()
    link.symlink_to(tmp_path)
    os.lchown(link, _THIRD, _THIRD)
    status, _, err = _cli_run(capsys, "metrics", str(run_dir), "--output", str(link / "fleet.prom"))
    assert status == 2 and why in " ".join(err.split()), err
    assert not (tmp_path / "fleet.prom").exists()
    # Given by the way only root and the owners could have made, all of them work.
    assert _cli_run(capsys, "overrides", "show", str(run_dir))[0] == 0
    assert (
        _cli_run(capsys, "ls", str(run_dir), "--remove-stale")[0] == 2
    )  # no live worker; the stale one removed
    assert not (run_dir / "app-9.sock").exists()
    _cli_run(capsys, "metrics", str(run_dir), "--output", str(tmp_path / "fleet.prom"))
    assert (tmp_path / "fleet.prom").exists()


def _cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@needs_root
def test_a_way_through_proc_links_is_not_judged_from_their_text(
    lookup_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc/self/cwd reads as a path, but the kernel follows it to the directory itself,
    # whichever way the shell came there: another user's server is not asked that way...
    monkeypatch.chdir(lookup_tree / "run/shop")
    for written in ("/proc/self/cwd/app-1.sock", "/dev/fd/../cwd/app-1.sock"):
        assert "is a /proc link, whose way cannot be judged: give the path itself" in untrusted_peer(
            written, _NOBODY
        )
    # ...nor is such a directory worked in; given as itself, it is.
    with pytest.raises(UntrustedDirectory, match="is a /proc link"):
        open_checked_directory("/proc/self/cwd")
    os.close(open_checked_directory(str(lookup_tree / "run/shop")))
    assert untrusted_peer(str(lookup_tree / "run/shop/app-1.sock"), _NOBODY) == ""
