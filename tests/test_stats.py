"""Statistics: exact counters and mergeable histograms with bounded relative error."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from unittest.mock import ANY

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from unixsock_asgi import ControlSocketMiddleware, LatencyHistogram, Stats
from unixsock_asgi._stats import (
    BUCKET_EVERY,
    GAMMA,
    KEY_LIMIT,
    LIVE_LIMIT,
    OTHER_ROUTES,
    RELATIVE_ERROR,
    ROTATE_PATIENCE,
    ROUTES_LIMIT,
    UNBUCKETED_LIMIT,
    UNMATCHED,
    _bucket,
    merge_histograms,
)


def _true_quantile(samples: list[float], q: float) -> float:
    """The nearest-rank quantile: the ceil(q * n)-th smallest sample."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_are_within_the_relative_error(seed: int) -> None:
    rng = random.Random(seed)
    samples = [rng.lognormvariate(-6, 1.5) for _ in range(20000)]
    hist = LatencyHistogram()
    for s in samples:
        hist.record(s)
    for q in (0.5, 0.9, 0.99):
        estimate = hist.quantile(q)
        assert estimate is not None
        true = _true_quantile(samples, q)
        assert abs(estimate - true) / true <= RELATIVE_ERROR + 1e-9, (q, estimate, true)
    assert RELATIVE_ERROR <= 0.05


@pytest.mark.parametrize("seed", range(5))
def test_the_fleets_quantile_lies_between_the_workers_own(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        workers = [
            [rng.lognormvariate(-6, 1.5) for _ in range(rng.randint(1, 60))] for _ in range(rng.randint(2, 4))
        ]
        merged = LatencyHistogram.from_payload(merge_histograms(_hist(w).to_payload() for w in workers))
        for q in (0.5, 0.9, 0.99):
            # In buckets: a reported value is its bucket's midpoint, or the histogram's max
            # when that is smaller, and the fleet's max may be another worker's.
            own = [_bucket(_hist(w).quantile(q) or 0.0) for w in workers]
            fleet = merged.quantile(q)
            assert fleet is not None and min(own) <= _bucket(fleet) <= max(own), (q, fleet, own)


def test_merging_buckets_equals_the_histogram_of_all_samples() -> None:
    rng = random.Random(7)
    workers = [[rng.expovariate(1 / (0.001 * (i + 1))) for _ in range(3000)] for i in range(4)]
    merged = merge_histograms(_hist(w).to_payload() for w in workers)
    union = _hist([s for w in workers for s in w]).to_payload()
    assert merged["buckets"] == union["buckets"]
    assert merged["count"] == 12000
    for key in ("p50_s", "p90_s", "p99_s"):
        assert merged[key] == union[key]
    # Averaging the workers' p99s would be wrong; the merge is not that.
    mean_p99 = sum(_hist(w).quantile(0.99) or 0 for w in workers) / 4
    assert merged["p99_s"] != pytest.approx(mean_p99, rel=0.05)


def _hist(samples: list[float]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for s in samples:
        hist.record(s)
    return hist


def test_quantiles_stay_within_the_smallest_and_largest_latency() -> None:
    # A route that always sleeps 200 ms: its bucket's value, 193.7 ms, lies below every one.
    slow = [0.2001, 0.2003, 0.2004] * 7
    for hist in (_hist(slow), LatencyHistogram()):
        if not hist.count:
            hist.record_many(list(slow))  # as the app's thread counts them: in batches
        assert [hist.quantile(q) for q in (0.5, 0.99)] == [0.2001, 0.2001]  # one bucket: its floor
        payload = hist.to_payload()
        assert (payload["min_s"], payload["p50_s"], payload["max_s"]) == (0.2001, 0.2001, 0.2004)
    # Over workers: the fleet's smallest; from a worker of a version without min_s, none is known.
    fast = _hist([0.2002] * 5).to_payload()
    merged = merge_histograms([_hist(slow).to_payload(), fast])
    assert (merged["min_s"], merged["p50_s"]) == (0.2001, 0.2001)
    older = {k: v for k, v in fast.items() if k != "min_s"}
    unknown = merge_histograms([_hist(slow).to_payload(), older])
    assert unknown["min_s"] == 0.0 and unknown["p50_s"] < 0.2  # the bucket's value, as before
    assert LatencyHistogram().to_payload()["min_s"] == 0.0  # empty: nothing below it
    empty_first = merge_histograms([LatencyHistogram().to_payload(), fast])
    assert empty_first["min_s"] == 0.2002  # an empty worker knows no smaller latency
    for bad in (dict(fast, min_s="soon"), dict(fast, min_s=5.0), dict(fast, min_s=-1.0)):
        with pytest.raises(ValueError, match="min_s"):  # one worker's would move the fleet's
            LatencyHistogram.from_payload(bad)
    odd = _hist(slow)
    odd.min = 5.0  # however it came about, the largest observation wins
    assert odd.quantile(0.5) == 0.2004


def test_from_payload_refuses_another_bucket_scheme() -> None:
    payload = _hist([0.1]).to_payload()
    payload["gamma"] = 1.5
    with pytest.raises(ValueError, match="gamma"):
        LatencyHistogram.from_payload(payload)


def test_stats_snapshot_totals_derive_from_routes() -> None:
    stats = Stats()
    stats.record("/items/{id}", "GET", 200, 0.001, False)
    stats.record("/items/{id}", "POST", 201, 0.002, False)
    stats.record("/fail", "GET", 500, 0.003, True)
    stats.record(UNMATCHED, "GET", 404, 0.0, False)  # zero duration is fine
    stats.record("/weird", "GET", 999, 0.001, False)  # out-of-range statuses count as 5xx
    for i in range(100):  # client-chosen methods cannot grow the counters
        stats.record("/weird", f"X-{i}", 200, 0.001, False)
    snap = stats.snapshot()
    assert snap["requests_total"] == 105
    assert snap["by_status"] == {"2xx": 102, "4xx": 1, "5xx": 2}
    assert snap["by_method"] == {"GET": 4, "POST": 1, "OTHER": 100}
    assert snap["exceptions_total"] == 1
    assert snap["latency"]["count"] == 105
    assert snap["routes"]["/items/{id}"]["by_method"] == {"GET": 1, "POST": 1}
    assert set(snap) >= {"pid", "uptime_s", "requests_total", "in_flight", "by_status", "routes", "latency"}
    assert "routes" not in stats.snapshot(routes=False)
    stats.reset()
    assert stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_totals_kept_as_routes_are_counted_equal_the_routes_added_up(seed: int) -> None:
    # Totals are kept apart so that a snapshot without routes costs the same for any
    # number of routes: they must stay what adding up the routes gives.
    rnd = random.Random(seed)
    stats = Stats()
    methods = ["GET", "POST", "HEAD", "BREW", "DELETE"]
    for round_ in range(3):
        for _ in range(rnd.randrange(500, 3000)):
            route, method = f"/r{rnd.randrange(ROUTES_LIMIT + 40)}", rnd.choice(methods)
            status, seconds = rnd.choice([200, 201, 302, 404, 500, 999]), rnd.lognormvariate(-6, 2)
            if rnd.random() < 0.05:  # what the gate answers itself
                stats.record(route, method, status, seconds, False)
            else:
                stats.started += 1
                stats.add(route, method, status, seconds, rnd.random() < 0.02)
            if rnd.random() < 0.001:
                stats.snapshot(routes=False)  # counting and bucketing half-way
        snap = stats.snapshot()
        routes = snap["routes"].values()
        assert snap["requests_total"] == sum(r["requests"] for r in routes)
        assert snap["exceptions_total"] == sum(r["exceptions"] for r in routes)
        for field in ("by_status", "by_method"):
            added: dict[str, int] = {}
            for r in routes:
                for key, n in r[field].items():
                    added[key] = added.get(key, 0) + n
            assert snap[field] == added
        merged = merge_histograms(r["latency"] for r in routes)
        assert snap["latency"] == {**merged, "sum_s": pytest.approx(merged["sum_s"])}
        assert stats.snapshot(routes=False) == {
            **{k: v for k, v in snap.items() if k != "routes"},
            **dict.fromkeys(("uptime_s", "since_reset_s", "process"), ANY),
        }
        if round_ == 1:
            assert stats.reset() == snap["requests_total"]
            assert stats.snapshot()["latency"]["count"] == 0


def _serve(app: Any, path: str, n: int) -> None:
    """Push ``n`` GET requests for ``path`` through ``app`` (ASGI, in this thread)."""

    async def send(message: dict[str, Any]) -> None:
        pass

    async def run() -> None:
        for _ in range(n):
            read = False

            async def receive() -> dict[str, Any]:
                nonlocal read
                if read:  # what follows the body, as a server does: nothing until the client goes
                    await asyncio.Event().wait()
                read = True
                return {"type": "http.request", "body": b"", "more_body": False}

            scope = {
                "type": "http",
                "method": "GET",
                "path": path,
                "root_path": "",
                "headers": [],
                "query_string": b"",
            }
            await app(scope, receive, send)

    asyncio.run(run())


def _middleware_app() -> tuple[Any, Stats]:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Route("/items/{id}", page)]), path="/nonexistent/unused.sock", stats=stats
    )
    return app, stats


def _uncounted(stats: Stats) -> int:
    """Finished requests in the live groups that no one has counted yet."""
    return sum(len(values) - stats._taken.get(key, 1) for key, values in list(stats.live.items()))


@pytest.mark.parametrize("n", [1, LIVE_LIMIT - 1, LIVE_LIMIT, LIVE_LIMIT + 1, 3 * LIVE_LIMIT + 7])
def test_live_requests_are_all_counted_whatever_the_group_boundary(n: int) -> None:
    app, stats = _middleware_app()
    _serve(app, "/items/1", n)
    _serve(app, "/missing", 2)
    assert _uncounted(stats) <= LIVE_LIMIT + 2  # the app's thread counts a group when it is full
    assert stats.in_flight == 0
    snap = stats.snapshot()
    assert snap["requests_total"] == n + 2
    assert snap["routes"]["/items/{id}"]["requests"] == n
    assert snap["routes"]["/items/{id}"]["by_status"] == {"2xx": n}
    assert snap["routes"][UNMATCHED]["by_status"] == {"4xx": 2}
    assert _uncounted(stats) == 0
    _serve(app, "/items/2", 5)
    stats.reset()  # live requests belong to before the reset
    assert stats.snapshot()["requests_total"] == 0
    _serve(app, "/items/2", LIVE_LIMIT)  # the groups counted by the reset are not counted again
    assert stats.snapshot()["requests_total"] == LIVE_LIMIT
    assert stats.in_flight == 0


def test_live_groups_stay_bounded_while_other_threads_keep_taking_the_lock() -> None:
    app, stats = _middleware_app()
    stop = threading.Event()

    def poll() -> None:  # a client polling in_flight as fast as it can: the lock is nearly always taken
        while not stop.is_set():
            _ = stats.in_flight

    largest = 0
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(40):
            _serve(app, "/items/1", 250)
            largest = max(largest, max(map(len, list(stats.live.values())), default=0) - 1)
    finally:
        stop.set()
        poller.join(10)
    assert largest <= LIVE_LIMIT + ROTATE_PATIENCE + 1
    assert stats.snapshot()["requests_total"] == 10000
    assert stats.in_flight == 0


def test_a_status_whose_hash_fails_fails_neither_its_request_nor_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unhashable(int):
        def __hash__(self) -> int:
            raise ValueError("no hash")

    async def odd(scope: Any, receive: Any, send: Any) -> None:
        status = Unhashable(200) if scope["path"] == "/odd" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    stats = Stats()
    app = ControlSocketMiddleware(odd, path="/nonexistent/unused.sock", stats=stats)
    _serve(app, "/odd", 3)  # raises out of _serve if the middleware let the error through
    _serve(app, "/fine", 2)
    assert stats.snapshot()["requests_total"] == 2
    assert stats.in_flight == 0
    assert caplog.text.count("could not be counted") == 3


def test_many_distinct_groups_are_counted_before_they_grow_without_bound() -> None:
    stats = Stats()
    n = 3 * KEY_LIMIT + 5
    for i in range(n):  # a client inventing methods: one group each
        stats.started += 1
        stats.add("/x", f"M{i}", 200, 0.001, False)
        assert len(stats.live) <= KEY_LIMIT
    snap = stats.snapshot()
    assert snap["requests_total"] == n
    assert snap["by_method"] == {"OTHER": n}
    assert stats.in_flight == 0


def test_snapshots_from_another_thread_while_the_app_records_stay_exact() -> None:
    app, stats = _middleware_app()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(stats.snapshot(routes=False)["requests_total"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(10):  # in chunks, each after the watcher took a snapshot, so that they interleave
            taken = len(seen)
            for _ in range(1000):
                if len(seen) > taken:
                    break
                time.sleep(0.001)
            _serve(app, "/items/1", 500)
    finally:
        stop.set()
        watcher.join(10)
    assert len(seen) >= 10
    assert seen == sorted(seen)  # counts only grow
    assert stats.snapshot()["requests_total"] == 5000
    assert stats.routes["/items/{id}"].requests == 5000


def test_route_keys_of_root_mounts_and_str_subclasses() -> None:
    class Path(str, enum.Enum):
        HEALTH = "/health"

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("item")

    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Mount("/", app=raw)]), path="/nonexistent/unused.sock", stats=stats
    )
    _serve(app, "/anything", 3)
    stats.record(Path.HEALTH, "GET", 503, 0.001, False)
    routes = stats.snapshot()["routes"]
    # An app without routes at "/" (StaticFiles serving a single-page app, say) serves what
    # it is given, like one at "/static": counted under its mount's template, not unmatched.
    assert routes["/{path}"]["requests"] == 3 and UNMATCHED not in routes
    assert routes["/health"]["by_status"] == {"5xx": 1}
    # An app with routes at "/", behind middleware too: what none of them matches is
    # unmatched, as at the top.
    from starlette.middleware.gzip import GZipMiddleware

    sub = Starlette(routes=[Route("/items/{id}", item)])
    for mounted in (sub, GZipMiddleware(sub)):
        stats = Stats()
        app = ControlSocketMiddleware(
            Starlette(routes=[Mount("/", app=mounted)]), path="/nonexistent/unused.sock", stats=stats
        )
        _serve(app, "/items/1", 2)
        _serve(app, "/nothing/here", 1)
        routes = stats.snapshot()["routes"]
        assert routes["/items/{id}"]["requests"] == 2 and routes[UNMATCHED]["by_status"] == {"4xx": 1}


def test_a_request_that_cannot_be_counted_fails_no_other_request(caplog: pytest.LogCaptureFixture) -> None:
    async def odd(scope: Any, receive: Any, send: Any) -> None:
        # Not an int (cannot be classed), and not even hashable (cannot be grouped).
        status = {"/odd": "200", "/odder": [200]}.get(scope["path"], 200)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    stats = Stats()
    app = ControlSocketMiddleware(odd, path="/nonexistent/unused.sock", stats=stats)
    _serve(app, "/odd", 1)
    _serve(app, "/odder", 1)
    _serve(app, "/fine", 2 * LIVE_LIMIT)  # the group of the odd one is counted in here
    assert stats.snapshot()["requests_total"] == 2 * LIVE_LIMIT
    assert caplog.text.count("could not be counted") == 2
    assert stats.in_flight == 0  # finished, if not counted
    assert stats.reset() == 2 * LIVE_LIMIT
    assert stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_bucketing_many_at_once_equals_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    samples = [rng.lognormvariate(-7, 2.0) for _ in range(5000)] + [0.0, 1e-9, 1e6, 2e5]
    one_by_one = _hist(samples)
    at_once = LatencyHistogram()
    at_once.record_many(samples[:1234])
    at_once.record_many(samples[1234:])
    assert at_once.buckets == one_by_one.buckets
    assert at_once.count == one_by_one.count == len(samples)
    assert at_once.max == one_by_one.max
    assert at_once.sum == pytest.approx(one_by_one.sum)


@pytest.mark.parametrize("n_keys", [1, 80])
@pytest.mark.parametrize("mixed", [False, True])
def test_batches_count_like_one_request_at_a_time(
    n_keys: int, mixed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="unixsock_asgi")
    rng = random.Random(5)

    # Route-like objects (unhashable, like Starlette's) and plain templates, mixed.
    class FakeRoute:
        __hash__ = None  # type: ignore[assignment]

        def __init__(self, path_format: str) -> None:
            self.path_format = path_format
            self.path = path_format

    objects = [FakeRoute(f"/obj{i}/{{id}}") for i in range(n_keys // 2 or 1)]
    keys: list[Any] = [*objects, *(f"/str{i}" for i in range(n_keys // 2))]
    # Uniform columns take a shorter way through the counting than mixed ones.
    statuses = [200, 201, 304, 404, 500, HTTPStatus.OK, 999] if mixed else [HTTPStatus.OK]
    methods = ["GET", "POST", "BREW"] if mixed else ["GET"]
    finished = [
        (
            rng.choice(keys),
            rng.choice(methods),
            rng.choice(statuses),
            rng.expovariate(1000),
            mixed and rng.random() < 0.1,
        )
        for _ in range(UNBUCKETED_LIMIT + 3 * BUCKET_EVERY + 11)
    ]
    batched = Stats()
    for item in finished:
        batched.started += 1
        batched.add(*item)
    one_by_one = Stats()
    for key, method, status, seconds, raised in finished:
        name = key if isinstance(key, str) else key.path_format
        one_by_one.record(name, method, status, seconds, raised)
    got, want = batched.snapshot(), one_by_one.snapshot()
    assert "could not be counted" not in caplog.text
    assert batched.in_flight == 0
    assert got["requests_total"] == len(finished)
    for key in ("requests_total", "exceptions_total", "by_status", "by_method"):
        assert got[key] == want[key], key
    assert got["latency"]["buckets"] == want["latency"]["buckets"]
    assert set(got["routes"]) == set(want["routes"])
    for name, route in got["routes"].items():
        expected = want["routes"][name]
        assert {k: v for k, v in route.items() if k != "latency"} == {
            k: v for k, v in expected.items() if k != "latency"
        }
        assert route["latency"]["buckets"] == expected["latency"]["buckets"]
        assert route["latency"]["max_s"] == expected["latency"]["max_s"]


def test_record_refuses_impossible_durations() -> None:
    stats = Stats()
    for seconds in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="cannot take"):
            stats.record("/x", "GET", 200, seconds, False)
    assert stats.snapshot()["requests_total"] == 0


def test_mounts_with_path_parameters_count_one_template_not_raw_paths() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    tenant = Starlette(routes=[Route("/items/{id}", page), Mount("/files", app=raw)])
    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Mount("/{tenant}", routes=[Mount("/v1", app=tenant)])]),
        path="/nonexistent/unused.sock",
        stats=stats,
    )
    for name in ("acme", "globex", "initech"):
        _serve(app, f"/{name}/v1/items/1", 2)
        _serve(app, f"/{name}/v1/files/a.txt", 1)
    routes = stats.snapshot()["routes"]
    assert routes["/{tenant}/v1/items/{id}"]["requests"] == 6
    assert routes["/{tenant}/v1/files/{path}"]["requests"] == 3
    assert len(routes) == 2


def test_mounts_inside_an_app_wrapped_in_middleware_by_hand_count_one_template() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    class Passthrough:  # any pure ASGI middleware keeps what it wraps in .app
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    tenants = Starlette(routes=[Mount("/{tenant}", routes=[Route("/items/{id}", page)])])
    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Mount("/api", app=Passthrough(Passthrough(tenants)))]),
        path="/nonexistent/unused.sock",
        stats=stats,
    )
    for name in ("acme", "globex", "initech"):
        _serve(app, f"/api/{name}/items/1", 2)
    routes = stats.snapshot()["routes"]
    assert routes == {"/api/{tenant}/items/{id}": ANY}  # not one key per tenant
    assert routes["/api/{tenant}/items/{id}"]["requests"] == 6


def test_an_app_mounted_inside_itself_is_walked_once() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    class Passthrough:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    class Broken:  # a wrapper whose .app fails: left out of the tree, the other mounts still count
        @property
        def app(self) -> Any:
            raise RuntimeError("no")

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    app = Starlette(routes=[Route("/items/{id}", page), Mount("/broken", app=Broken())])
    # Old prefixes kept working by mounting the app inside itself, twice, wrapped by hand.
    app.routes.append(Mount("/legacy", app=Passthrough(app)))
    app.routes.append(Mount("/old", app=Passthrough(app)))
    stats = Stats()
    middleware = ControlSocketMiddleware(app, path="/nonexistent/unused.sock", stats=stats)
    started = time.monotonic()
    _serve(middleware, "/legacy/items/1", 2)
    _serve(middleware, "/old/items/1", 1)
    _serve(middleware, "/broken/x", 1)
    assert time.monotonic() - started < 5  # the tree is not walked once per way round the loop
    routes = stats.snapshot()["routes"]
    assert routes["/legacy/items/{id}"]["requests"] == 2
    assert routes["/old/items/{id}"]["requests"] == 1
    assert routes["/broken/{path}"]["requests"] == 1
    assert len(middleware._route_trees) == 1  # built once, kept


def test_route_names_beyond_the_limit_are_counted_together(caplog: pytest.LogCaptureFixture) -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{id}", page)])

    async def dispatcher(scope: Any, receive: Any, send: Any) -> None:
        # Not a Starlette mount: a prefix per customer, a route key per customer.
        scope["root_path"] = scope.get("root_path", "") + "/" + scope["path"].split("/")[2]
        await inner(scope, receive, send)

    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Mount("/raw", app=dispatcher)]), path="/nonexistent/unused.sock", stats=stats
    )
    extra = 5
    for i in range(ROUTES_LIMIT + extra):
        _serve(app, f"/raw/customer{i}/items/1", 1)
    routes = stats.snapshot()["routes"]
    assert len(routes) == ROUTES_LIMIT + 1
    assert routes[OTHER_ROUTES]["requests"] == extra
    assert routes["/raw/customer0/items/{id}"]["requests"] == 1
    assert stats.snapshot()["requests_total"] == ROUTES_LIMIT + extra
    assert caplog.text.count(f"more than {ROUTES_LIMIT} distinct routes") == 1
    _serve(app, "/nowhere", 1)  # beyond the limit, unmatched requests and the gate's 503s stay apart
    stats.record("<maintenance>", "GET", 503, 0.001, False)
    routes = stats.snapshot()["routes"]
    assert routes[UNMATCHED]["requests"] == 1
    assert routes["<maintenance>"]["requests"] == 1
    assert routes[OTHER_ROUTES]["requests"] == extra
    stats.reset()  # a fresh start counts routes apart again
    _serve(app, "/raw/late/items/1", 1)
    assert list(stats.snapshot()["routes"]) == ["/raw/late/items/{id}"]


def test_bucketing_many_at_once_agrees_with_one_by_one_at_bucket_boundaries() -> None:
    samples = []
    for i in range(-200, 140, 7):
        edge = GAMMA**i
        samples += [edge, math.nextafter(edge, 0), math.nextafter(edge, math.inf)]
        samples += [math.nextafter(math.nextafter(edge, 0), 0), math.nextafter(math.nextafter(edge, 1), 1)]
    at_once = LatencyHistogram()
    at_once.record_many(list(samples))
    assert at_once.buckets == _hist(samples).buckets


def test_same_routes_under_two_mounts_and_prefixes_made_without_mounts() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    shared = [Route("/items/{id}", page)]
    inner = Starlette(routes=shared)

    async def dispatcher(scope: Any, receive: Any, send: Any) -> None:
        # Not a Starlette mount: extends root_path itself.
        scope["root_path"] = scope.get("root_path", "") + "/" + scope["path"].split("/")[2]
        await inner(scope, receive, send)

    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(
            routes=[Mount("/v1", routes=shared), Mount("/v2", routes=shared), Mount("/raw", app=dispatcher)]
        ),
        path="/nonexistent/unused.sock",
        stats=stats,
    )
    _serve(app, "/v1/items/1", 1)
    _serve(app, "/v2/items/1", 2)
    _serve(app, "/raw/shop/items/1", 3)
    routes = stats.snapshot()["routes"]
    assert routes["/v1/items/{id}"]["requests"] == 1
    assert routes["/v2/items/{id}"]["requests"] == 2
    # No mount of the tree matches /raw/shop: the path the dispatcher matched is the prefix.
    assert routes["/raw/shop/items/{id}"]["requests"] == 3


def _interrupt_counting(
    action: Callable[[Stats], int], *, after_extend: bool
) -> tuple[Any, Stats, list[int]]:
    """An app whose next counting of ``/items/{id}`` runs ``action`` once, halfway through.

    As a signal handler on the app's thread would: while the group's
    latencies are put aside (before or after), before they are bucketed.
    Returns the app, its stats and what ``action`` returned.
    """
    app, stats = _middleware_app()
    _serve(app, "/items/1", 1)
    stats.flush()  # counted; its latency waits to be bucketed
    results: list[int] = []

    class Interrupting(list):  # type: ignore[type-arg]
        def extend(self, values: Any) -> None:
            if after_extend:
                super().extend(values)
            if not results:
                results.append(action(stats))
            if not after_extend:
                super().extend(values)

    route = stats._routes["/items/{id}"]
    route.unbucketed = Interrupting(route.unbucketed)
    return app, stats, results


def test_a_snapshot_taken_while_a_batch_is_counted_loses_nothing() -> None:
    app, stats, taken = _interrupt_counting(lambda s: s.snapshot()["requests_total"], after_extend=False)
    _serve(app, "/items/1", LIVE_LIMIT + 1)  # the app's thread counts the full group
    assert taken  # the snapshot ran inside the counting
    snap = stats.snapshot()
    assert snap["requests_total"] == LIVE_LIMIT + 2
    assert snap["latency"]["count"] == LIVE_LIMIT + 2


def test_a_reset_from_a_signal_handler_while_a_group_is_counted_keeps_the_totals_whole() -> None:
    app, stats, resets = _interrupt_counting(Stats.reset, after_extend=True)
    _serve(app, "/items/1", LIVE_LIMIT + 1)  # the app's thread counts the full group, and buckets it
    assert resets  # the reset ran inside the counting (that group may be lost: documented)
    _serve(app, "/items/1", 10)
    snap = stats.snapshot()
    assert snap["latency"]["count"] == snap["requests_total"]
    assert snap["requests_total"] == sum(r["requests"] for r in snap["routes"].values())
    assert snap["latency"]["count"] == sum(r["latency"]["count"] for r in snap["routes"].values())


def test_bucket_counts_below_one_in_a_payload_add_nothing() -> None:
    # A payload from another process is not trusted to be well formed.
    payload = {"gamma": GAMMA, "buckets": [[-149, 28], [-123, -5], [-100, 0], [84, 5]], "max_s": 0.0}
    hist = LatencyHistogram.from_payload(payload)
    assert hist.buckets == {-149: 28, 84: 5} and hist.count == 33
    assert hist.quantile(0.9) == hist.quantile(1.0)  # the 30th of 33 values is in the top bucket
    # An index no value of this version falls in (another scheme's; 100,000 overflowed a float).
    for index in (-349, 184, 100_000):
        with pytest.raises(ValueError, match=f"bucket index {index} is out of range"):
            LatencyHistogram.from_payload({"gamma": GAMMA, "buckets": [[index, 1]]})
        with pytest.raises(ValueError, match=f"bucket index {index} is out of range"):
            merge_histograms([payload, {"gamma": GAMMA, "buckets": [[index, 1]]}])
    assert merge_histograms([payload, payload])["count"] == 66


def test_a_status_equal_to_an_int_counts_as_it_whatever_came_first(caplog: pytest.LogCaptureFixture) -> None:
    pairs: list[tuple[Any, Any]] = [(200.0, 200), (200, 200.0), (HTTPStatus.OK, 200), (200.5, 200)]
    counted = []
    for first, second in pairs:  # an app may send anything: 200.0 and 200 are one group
        stats = Stats()
        for status in (first, second):
            stats.started += 1
            stats.add("/x", "GET", status, 0.001, False)
        counted.append(stats.snapshot()["by_status"])
        assert stats.in_flight == 0
    assert counted == [{"2xx": 2}, {"2xx": 2}, {"2xx": 2}, {"2xx": 1}]
    assert caplog.text.count("could not be counted") == 1  # 200.5


def test_fastapi_include_prefixes_under_a_mount_with_a_path_parameter() -> None:
    from fastapi import APIRouter, FastAPI

    router = APIRouter()

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    api = FastAPI()
    api.include_router(router, prefix="/api")
    stats = Stats()
    app = ControlSocketMiddleware(
        Starlette(routes=[Mount("/{tenant}", app=api)]), path="/nonexistent/unused.sock", stats=stats
    )
    for tenant in ("acme", "globex"):
        _serve(app, f"/{tenant}/api/items/1", 2)
    assert stats.snapshot()["routes"] == {"/{tenant}/api/items/{item_id}": ANY}
    assert stats.snapshot()["requests_total"] == 4


def test_fastapi_counts_staticfiles_at_the_root_mount_under_its_template(tmp_path: Any) -> None:
    # A single-page app's StaticFiles at "/" beside FastAPI routes: FastAPI's router leaves no
    # route in the scope for a mount, only the mounted app as its endpoint.
    from fastapi import FastAPI
    from starlette.staticfiles import StaticFiles

    (tmp_path / "app.js").write_text("ok")
    api = FastAPI()

    @api.get("/api/items/{item_id}")
    async def api_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    api.mount("/", StaticFiles(directory=tmp_path))
    stats = Stats()
    app = ControlSocketMiddleware(api, path="/nonexistent/unused.sock", stats=stats)
    _serve(app, "/app.js", 2)
    _serve(app, "/missing.js", 1)
    _serve(app, "/api/items/1", 1)
    routes = stats.snapshot()["routes"]
    assert routes["/{path}"]["by_status"] == {"2xx": 2, "4xx": 1}
    assert routes["/api/items/{item_id}"]["requests"] == 1 and UNMATCHED not in routes


def test_a_catch_all_exception_handler_answers_outside_what_add_middleware_adds() -> None:
    """Starlette runs ``exception_handler(Exception)`` in its ServerErrorMiddleware, outside
    ``add_middleware``'s: README says how each form counts what such a handler answers."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    def app_with_handler() -> FastAPI:
        api = FastAPI()

        @api.exception_handler(Exception)
        async def catch_all(request: Any, exc: Exception) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=400)

        @api.get("/crash")
        async def crash() -> None:
            raise RuntimeError("crash")

        return api

    inside, outside = Stats(), Stats()
    added = app_with_handler()
    added.add_middleware(ControlSocketMiddleware, path="/nonexistent/unused.sock", stats=inside)
    wrapped = ControlSocketMiddleware(app_with_handler(), path="/nonexistent/unused.sock", stats=outside)
    for app in (added, wrapped):
        with pytest.raises(RuntimeError, match="crash"):  # re-raised after the 400, for the server's log
            _serve(app, "/crash", 1)
    assert inside.snapshot()["routes"]["/crash"]["by_status"] == {"5xx": 1}  # the 400 went out around it
    assert outside.snapshot()["routes"]["/crash"]["by_status"] == {"4xx": 1}
    assert inside.snapshot()["exceptions_total"] == outside.snapshot()["exceptions_total"] == 1


def test_fastapi_plain_routes_count_under_their_templates_not_unmatched() -> None:
    """FastAPI's router sets ``scope["route"]`` for its own routes only: /docs and add_route() set none."""
    from fastapi import APIRouter, FastAPI

    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse("report")

    router = APIRouter()
    router.add_route("/plain/{x}", report)
    sub = FastAPI()
    sub.add_route("/inner/{z}", report)
    api = FastAPI()
    api.add_route("/reports/{rid}", report)
    api.add_route("/alias/{rid}", report)  # the same endpoint behind two routes
    api.include_router(router, prefix="/v1")
    api.mount("/sub", sub)
    stats = Stats()
    app = ControlSocketMiddleware(api, path="/nonexistent/unused.sock", stats=stats)
    for path in (
        "/reports/1",
        "/reports/2",
        "/alias/3",
        "/docs",
        "/openapi.json",
        "/v1/plain/a",
        "/sub/inner/q",
    ):
        _serve(app, path, 1)
    _serve(app, "/nope", 2)
    routes = stats.snapshot()["routes"]
    assert {name: figures["requests"] for name, figures in routes.items()} == {
        "/reports/{rid}": 2,
        "/alias/{rid}": 1,
        "/docs": 1,
        "/openapi.json": 1,
        "/v1/plain/{x}": 1,
        "/sub/inner/{z}": 1,
        "<unmatched>": 2,
    }
    assert routes["<unmatched>"]["by_status"] == {"4xx": 2}


def test_a_route_added_after_the_first_requests_is_found_on_a_later_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi import FastAPI

    import unixsock_asgi._middleware as middleware_module

    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse("report")

    api = FastAPI()
    api.add_route("/reports/{rid}", report)
    stats = Stats()
    app = ControlSocketMiddleware(api, path="/nonexistent/unused.sock", stats=stats)
    _serve(app, "/reports/1", 1)  # the tree is built now
    api.add_route("/late/{x}", report)
    monkeypatch.setattr(middleware_module, "_REFRESH_AFTER_S", 0.0)  # as if ten seconds had passed
    _serve(app, "/late/1", 2)
    assert {name: r["requests"] for name, r in stats.snapshot()["routes"].items()} == {
        "/reports/{rid}": 1,
        "/late/{x}": 2,
    }


@pytest.mark.parametrize("mount_first", [False, True])
def test_an_endpoint_shared_across_mount_levels_counts_under_the_route_that_served(mount_first: bool) -> None:
    from fastapi import FastAPI

    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse("report")

    api, sub = FastAPI(), FastAPI()
    sub.add_route("/{kind}/{rid}", report)
    if mount_first:
        api.mount("/sub", sub)
    api.add_route("/reports/{rid}", report)
    if not mount_first:
        api.mount("/sub", sub)
    stats = Stats()
    app = ControlSocketMiddleware(api, path="/nonexistent/unused.sock", stats=stats)
    _serve(app, "/sub/reports/1", 2)  # the mounted route, though the top-level one matches "/reports/1"
    _serve(app, "/reports/1", 1)  # the top-level route, though the mounted one matches "/reports/1"
    assert {name: r["requests"] for name, r in stats.snapshot()["routes"].items()} == {
        "/sub/{kind}/{rid}": 2,
        "/reports/{rid}": 1,
    }
