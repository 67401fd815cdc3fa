"""Per-request cost of ``ControlSocketMiddleware`` next to the alternatives (issue #3).

Run ``python bench/bench_middleware.py`` (about 21 minutes; 10 more with
``--instructions``) or add ``--quick`` (about two). Six variants of one app are compared in the same run:

* ``bare``: the app alone;
* ``noop``: a pure ASGI middleware that only awaits the app (the floor for any middleware);
* ``timing``: a pure ASGI middleware that learns each response's status and reads the
  clock before and after, and keeps only the last status and duration (the floor for any middleware that times
  requests by status, before it counts anything);
* ``instrumentator``: prometheus-fastapi-instrumentator, ``Instrumentator(registry=CollectorRegistry()).instrument(app)``;
* ``exporter``: starlette-exporter's ``PrometheusMiddleware`` (``group_paths=True``);
* ``ours``: ``ControlSocketMiddleware`` with statistics on.

Part 1 calls the app in-process with ASGI scope dicts (no server, no sockets)
and reports ns/request; with ``--instructions`` (valgrind installed), part 1b
counts the instructions per request of the same calls, which unlike times do
not move with a shared machine's speed; part 2 runs each variant as a real
single-worker uvicorn process on 127.0.0.1 under a load generator (wrk when
installed, else a Python keep-alive load generator in its own process) and
reports requests/s, one variant after another and then each beside the bare
app; with ``--uvicorn-instructions`` (valgrind), part 2b counts instructions
and simulated cache misses per request of a real uvicorn process.
Variants are interleaved within each round and medians are reported, because
the machines this runs on are noisy. Issue #3's targets: at most 3 us added per
request in-process, and at least 97% of the bare app's requests/s under uvicorn.

This file is also the app module of the uvicorn runs (``uvicorn_app`` reads the
variant from the environment) and, with ``--loadgen-worker``, the Python load
generator's process.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import gc
import http.client
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import pstats
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette_exporter import PrometheusMiddleware

from unixsock_asgi import Client, ControlSocketMiddleware, Stats

VARIANTS = ("bare", "noop", "timing", "instrumentator", "exporter", "ours")
VARIANT_LABELS = {
    "bare": "bare app",
    "noop": "no-op ASGI middleware",
    "timing": "timing-only ASGI middleware",
    "instrumentator": "prometheus-fastapi-instrumentator",
    "exporter": "starlette-exporter",
    "ours": "ControlSocketMiddleware (stats on)",
}
ADDED_NS_TARGET = 3000
"""In-process target: ns added per request by ``ours`` over the bare app."""
RPS_RATIO_TARGET = 0.97
"""Under-uvicorn target: ``ours`` requests/s over the bare app's."""
TARGET_SPREAD = 5
"""How many routes the requests are spread over (always the first and the last declared)."""
SLICES = 10
"""In-process batches are timed in this many slices, the variants taking turns."""
SERVER_CPU = 0
LOADGEN_CPU = 1
_ENV_PREFIX = "UNIXSOCK_BENCH_"


# -- the app under test ---------------------------------------------------------


class NoopMiddleware:
    """A pure ASGI middleware that does nothing: the cost of one extra layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class TimingMiddleware:
    """Learns each response's status and times the request, and keeps only the last of each.

    What any middleware that counts requests by status and latency pays before
    it counts anything: a ``send`` wrapper made per request, two calls of it,
    and two clock reads.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last: tuple[int, float] = (0, 0.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        def send_with_status(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.last = (status, time.perf_counter() - start)


def route_template(index: int) -> str:
    """The path template of the ``index``-th declared route."""
    return f"/res{index}/{{item_id}}"


def target_indices(n_routes: int) -> list[int]:
    """Indices of the routes requests go to: spread evenly, first and last included."""
    last = n_routes - 1
    return sorted({round(k * last / (TARGET_SPREAD - 1)) for k in range(TARGET_SPREAD)})


def request_paths(n_routes: int) -> list[str]:
    """Concrete request paths, one per target route."""
    return [f"/res{i}/{1000 + i}" for i in target_indices(n_routes)]


async def starlette_endpoint(request: Request) -> PlainTextResponse:
    """The handler of every route in the Starlette app."""
    return PlainTextResponse("ok")


async def fastapi_endpoint(item_id: str) -> PlainTextResponse:
    """The handler of every route in the FastAPI app."""
    return PlainTextResponse("ok")


def build_app(
    variant: str,
    n_routes: int,
    framework: str,
    *,
    socket_dir: str,
    stats: Stats | None = None,
) -> ASGIApp:
    """The app with ``n_routes`` templated routes, wrapped as ``variant`` says.

    Every middleware goes into the framework's own middleware stack, inside
    its ``ServerErrorMiddleware``, as ``add_middleware`` would put it.
    """
    middleware: list[Middleware] = []
    if variant == "noop":
        middleware.append(Middleware(NoopMiddleware))
    elif variant == "timing":
        middleware.append(Middleware(TimingMiddleware))
    elif variant == "exporter":
        middleware.append(Middleware(PrometheusMiddleware, app_name=f"bench{n_routes}", group_paths=True))
    elif variant == "ours":
        middleware.append(
            Middleware(ControlSocketMiddleware, socket_dir=socket_dir, name=f"bench{n_routes}", stats=stats)
        )
    elif variant not in ("bare", "instrumentator"):
        raise ValueError(f"unknown variant {variant!r}")
    app: Starlette
    if framework == "starlette":
        routes = [Route(route_template(i), starlette_endpoint) for i in range(n_routes)]
        app = Starlette(routes=routes, middleware=middleware)
    elif framework == "fastapi":
        api = FastAPI(middleware=middleware, docs_url=None, redoc_url=None, openapi_url=None)
        for i in range(n_routes):
            api.add_api_route(route_template(i), fastapi_endpoint, methods=["GET"])
        app = api
    else:
        raise ValueError(f"unknown framework {framework!r}")
    if variant == "instrumentator":
        # Its own registry: several instrumented apps live in this one process.
        Instrumentator(registry=CollectorRegistry()).instrument(app)
    return app


def uvicorn_app() -> ASGIApp:
    """The uvicorn factory (``--factory bench_middleware:uvicorn_app``): the variant comes from env."""
    env = os.environ
    return build_app(
        env[_ENV_PREFIX + "VARIANT"],
        int(env[_ENV_PREFIX + "ROUTES"]),
        env[_ENV_PREFIX + "FRAMEWORK"],
        socket_dir=env[_ENV_PREFIX + "SOCKET_DIR"],
    )


# -- part 1: in-process ---------------------------------------------------------

_REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"", "more_body": False}


async def receive_request() -> Message:
    """An ASGI ``receive`` with one empty request body."""
    return _REQUEST_MESSAGE


async def discard(message: Message) -> None:
    """An ASGI ``send`` that drops every message."""


def http_scope(path: str) -> dict[str, Any]:
    """A plain GET scope as uvicorn would build it (without lifespan state)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    }


@dataclass
class InProcessCase:
    """One variant at one route count, with its per-round ns/request."""

    variant: str
    n_routes: int
    app: ASGIApp
    scopes: list[dict[str, Any]]
    stats: Stats | None = None
    ns_per_request: list[float] = field(default_factory=list)


async def check_responses(case: InProcessCase) -> None:
    """Call each request path once and fail unless every answer is a 200."""
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for scope in case.scopes[:TARGET_SPREAD]:
        await case.app(dict(scope), receive_request, record)
    if any(status != 200 for status in statuses) or not statuses:
        raise RuntimeError(f"{case.variant} at {case.n_routes} routes answered {statuses}")


async def time_slice(app: ASGIApp, scopes: list[dict[str, Any]]) -> int:
    """Serve ``scopes`` one after the other; return the ns of CPU time it took.

    The work is all on this thread, so its CPU clock measures it and leaves
    out the time other processes held the CPU, the largest noise on a shared
    machine; a wall clock (perf_counter) gives the same medians, more spread.
    """
    start = _thread_time_ns()
    for scope in scopes:
        await app(scope, receive_request, discard)
    return _thread_time_ns() - start


_thread_time_ns = time.thread_time_ns


async def time_round(cases: list[InProcessCase], slices: int) -> list[float]:
    """Time one batch per case, interleaved in ``slices`` slices; return each case's ns/request.

    A batch is cut into slices and the cases take turns slice by slice, so a
    burst of noise on the machine (a stolen vCPU, say) lands on every case
    alike instead of on whichever case's batch it happened to hit. The
    collector is paused while timing and run between rounds.
    """
    fresh = [[dict(scope) for scope in case.scopes] for case in cases]  # the app writes into scopes
    size = -(-len(cases[0].scopes) // slices)
    elapsed = [0] * len(cases)
    gc.collect()
    gc.disable()
    try:
        for k in range(0, len(cases[0].scopes), size):
            for i, case in enumerate(cases):
                elapsed[i] += await time_slice(case.app, fresh[i][k : k + size])
    finally:
        gc.enable()
    return [ns / len(case.scopes) for ns, case in zip(elapsed, cases, strict=True)]


async def run_in_process(
    route_counts: Sequence[int], framework: str, rounds: int, batch: int, socket_dir: str
) -> list[InProcessCase]:
    """Time every variant at every route count, interleaved, ``rounds`` times."""
    # In-process there is no lifespan, on purpose: ours' warning that it started no socket is no news.
    logging.getLogger("unixsock_asgi").addFilter(
        lambda record: not record.getMessage().startswith("no control socket")
    )
    groups: list[list[InProcessCase]] = []
    for n_routes in route_counts:
        paths = request_paths(n_routes)
        scopes = [http_scope(paths[i % len(paths)]) for i in range(batch)]
        group = []
        for variant in VARIANTS:
            stats = Stats() if variant == "ours" else None
            app = build_app(variant, n_routes, framework, socket_dir=socket_dir, stats=stats)
            group.append(InProcessCase(variant, n_routes, app, scopes, stats))
        groups.append(group)
    cases = [case for group in groups for case in group]
    for case in cases:  # builds the middleware stacks and warms every code path
        await check_responses(case)
        await time_slice(case.app, [dict(scope) for scope in case.scopes])
    shuffler = random.Random(3)
    for _ in range(rounds):
        for group in groups:
            order = list(group)
            shuffler.shuffle(order)
            for case, ns in zip(order, await time_round(order, SLICES), strict=True):
                case.ns_per_request.append(ns)
    for case in cases:  # the middleware must have recorded every request under its template
        if case.stats is not None:
            expected = {route_template(i) for i in target_indices(case.n_routes)}
            if set(case.stats.routes) != expected:
                raise RuntimeError(
                    f"ours recorded routes {sorted(case.stats.routes)}, not {sorted(expected)}"
                )
    return cases


def profile_ours(n_routes: int, framework: str, batch: int, socket_dir: str, top: int = 25) -> None:
    """Print a cProfile of ``ours`` serving ``batch`` requests in-process (tottime order)."""
    paths = request_paths(n_routes)
    app = build_app("ours", n_routes, framework, socket_dir=socket_dir, stats=Stats())
    case = InProcessCase("ours", n_routes, app, [http_scope(paths[i % len(paths)]) for i in range(batch)])

    async def serve() -> None:
        for _ in range(5):
            await time_slice(case.app, [dict(scope) for scope in case.scopes])

    asyncio.run(check_responses(case))
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(serve())
    profiler.disable()
    print(f"\ncProfile of ours, {n_routes} routes, {5 * batch} requests (profiler overhead inflates calls):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


# -- part 1b: instructions per request (valgrind) ----------------------------------

INSTRUCTION_SIZES = (1024, 3072)
"""Requests served in the two runs of each variant; the difference is what is counted."""


def instructions_worker(spec: str) -> None:
    """Serve ``n`` requests in-process (``spec`` = ``variant,routes,framework,n``) with the collector off.

    Run under callgrind by :func:`count_instructions`: two runs that differ
    only in ``n`` leave start-up, imports and warm-up out of the difference.
    """
    variant, n_routes, framework, n = spec.split(",")
    with tempfile.TemporaryDirectory() as socket_dir:
        app = build_app(variant, int(n_routes), framework, socket_dir=socket_dir, stats=Stats())
        paths = request_paths(int(n_routes))
        warm_up = [http_scope(paths[i % len(paths)]) for i in range(1024)]
        scopes = [http_scope(paths[i % len(paths)]) for i in range(int(n))]
        gc.disable()
        asyncio.run(time_slice(app, warm_up))
        asyncio.run(time_slice(app, scopes))


def count_instructions(variant: str, n_routes: int, framework: str) -> float:
    """Instructions per request the CPU executes serving ``variant``, from two callgrind runs."""
    counts = []
    for n in INSTRUCTION_SIZES:
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--instructions-worker",
                f"{variant},{n_routes},{framework},{n}",
            ],
            capture_output=True,
            text=True,
            # A fixed hash seed: dict layouts, hence instruction counts, repeat (within the
            # few hundred that dict keys made of object ids, whose addresses vary, move them).
            env={**os.environ, "PYTHONHASHSEED": "0"},
            timeout=1800,
            check=False,
        )
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind of {variant} failed:\n{proc.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (INSTRUCTION_SIZES[1] - INSTRUCTION_SIZES[0])


def run_instructions(route_counts: Sequence[int], framework: str) -> dict[tuple[str, int], float]:
    """Instructions per request of every variant at every route count, two callgrind runs at a time."""
    jobs = [(variant, n_routes) for n_routes in route_counts for variant in VARIANTS]
    results: dict[tuple[str, int], float] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        futures = {pool.submit(count_instructions, v, n, framework): (v, n) for v, n in jobs}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
    return results


def instructions_table(results: dict[tuple[str, int], float], framework: str) -> Table:
    """Instructions per request: the same question as part 1, answered without the machine's noise."""
    table = Table(
        f"In-process ASGI calls ({framework}): instructions per request (valgrind callgrind)",
        ["variant", "routes", "instructions/req", "added vs bare", "added vs no-op", "bare/variant"],
    )
    for (variant, n_routes), count in sorted(
        results.items(), key=lambda item: (item[0][1], VARIANTS.index(item[0][0]))
    ):
        bare, noop = results["bare", n_routes], results["noop", n_routes]
        table.rows.append(
            [
                VARIANT_LABELS[variant],
                str(n_routes),
                f"{count:,.0f}",
                "-" if variant == "bare" else f"{count - bare:+,.0f} ({(count - bare) / bare:+.1%})",
                "-" if variant in ("bare", "noop") else f"{count - noop:+,.0f}",
                f"{bare / count:.3f}",
            ]
        )
    table.notes += [
        "instructions the CPU executes per request, counted by valgrind's callgrind: the difference of "
        f"two runs serving {INSTRUCTION_SIZES[0]:,} and {INSTRUCTION_SIZES[1]:,} requests after the same "
        "1,024-request warm-up (start-up and imports cancel out), collector off, PYTHONHASHSEED=0; the "
        "counts repeat from run to run within a few hundred (ours groups requests by route object ids, "
        "whose addresses vary), where part 1's times move with the machine (a bare request took 14 to "
        "26 us on this machine on the same day)",
        "instructions are not time: cache misses and branch mispredictions are not in them",
    ]
    return table


# -- part 2: under uvicorn ------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(pid: int, cpu: int) -> bool:
    """Pin ``pid`` to one CPU when this machine has it; return whether it was pinned."""
    if not hasattr(os, "sched_setaffinity") or cpu not in os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(pid, {cpu})
    return True


def can_pin() -> bool:
    """Whether the server and the load generator can each have a CPU of their own."""
    return hasattr(os, "sched_getaffinity") and {SERVER_CPU, LOADGEN_CPU} <= os.sched_getaffinity(0)


@dataclass
class UvicornServer:
    """A uvicorn subprocess serving one variant on 127.0.0.1."""

    variant: str
    n_routes: int
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    socket_dir: str
    requests_sent: int = 0
    rps: list[float] = field(default_factory=list)
    per_cpu_s: list[float] = field(default_factory=list)
    """Requests served per second of the server's CPU time (all its threads), per round."""
    side_by_side: list[float] = field(default_factory=list)
    """Its requests per CPU-second over the bare app's, both loaded at the same time on one CPU."""

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def answers(self, path: str) -> bool:
        """Whether the server answers ``path`` with a 200 now."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"uvicorn ({self.variant}) exited with {self.proc.returncode}:\n{self.log()}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Terminate the server, and kill it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def start_server(
    variant: str,
    n_routes: int,
    framework: str,
    workdir: Path,
    *,
    wrapper: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    factory: str = f"{Path(__file__).stem}:uvicorn_app",
) -> UvicornServer:
    """Start uvicorn with one worker, no access log, on a free port (under ``wrapper``, e.g.
    valgrind, when given); do not wait for it. ``factory`` is the app factory of a module
    in this directory that reads the variant from the environment, as :func:`uvicorn_app` does."""
    port = free_port()
    socket_dir = tempfile.mkdtemp(prefix="usab-")  # short: socket paths must fit in 107 bytes
    env = {
        **os.environ,
        **(extra_env or {}),
        _ENV_PREFIX + "VARIANT": variant,
        _ENV_PREFIX + "ROUTES": str(n_routes),
        _ENV_PREFIX + "FRAMEWORK": framework,
        _ENV_PREFIX + "SOCKET_DIR": socket_dir,
    }
    argv = [
        *wrapper, sys.executable, "-m", "uvicorn", "--factory", factory,
        "--app-dir", str(Path(__file__).parent), "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning", "--lifespan", "on",
    ]  # fmt: skip
    log_path = workdir / f"uvicorn-{variant}-{n_routes}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pin(proc.pid, SERVER_CPU)
    return UvicornServer(variant, n_routes, port, proc, log_path, socket_dir)


def wait_until_ready(server: UvicornServer, path: str, timeout: float = 60.0) -> None:
    """Poll until the server answers ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.answers(path):
            server.requests_sent += 1
            return
        time.sleep(0.05)
    raise RuntimeError(f"uvicorn ({server.variant}) not ready after {timeout}s:\n{server.log()}")


@dataclass
class LoadResult:
    """What one load-generator run measured."""

    requests: int
    seconds: float
    errors: int
    loadgen_cpu_share: float | None = None  # of one core, Python load generator only

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds


_WRK_SCRIPT = """\
local paths = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


def run_wrk(port: int, paths: Sequence[str], duration: float, connections: int, workdir: Path) -> LoadResult:
    """Load the server with wrk (one thread), requests rotating over ``paths``."""
    script = workdir / f"paths-{port}.lua"  # one per server: two may run at once
    script.write_text(_WRK_SCRIPT % ", ".join(f'"{p}"' for p in paths))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", str(script)]
    proc = subprocess.Popen(
        [*argv, f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pin(proc.pid, LOADGEN_CPU)
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if proc.returncode != 0 or done is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return LoadResult(int(done.group(1)), seconds, errors)


async def python_load(
    port: int, paths: Sequence[str], duration: float, connections: int, max_requests: int
) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 GETs over ``connections`` connections until time or count runs out."""
    messages = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for p in paths]
    completed = 0
    errors = 0
    deadline = time.monotonic() + duration

    async def one_connection(offset: int) -> None:
        nonlocal completed, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while completed < max_requests and time.monotonic() < deadline:
                writer.write(messages[i % len(messages)])
                i += 1
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is None:
                    raise RuntimeError(f"no content-length in {head!r}")
                await reader.readexactly(int(length.group(1)))
                if head[9:12] != b"200":
                    errors += 1
                completed += 1
        finally:
            writer.close()

    cpu_start = time.process_time()
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(one_connection(k) for k in range(connections)), return_exceptions=True)
    seconds = time.perf_counter() - start
    errors += sum(isinstance(outcome, BaseException) for outcome in outcomes)
    return {
        "requests": completed,
        "seconds": seconds,
        "errors": errors,
        "cpu_share": (time.process_time() - cpu_start) / seconds,
    }


def run_python_loadgen(port: int, paths: Sequence[str], duration: float, connections: int) -> LoadResult:
    """Run :func:`python_load` in a process of its own (on the load generator's CPU)."""
    config = {"port": port, "paths": list(paths), "duration": duration, "connections": connections}
    argv = [sys.executable, __file__, "--loadgen-worker", json.dumps(config)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(proc.pid, LOADGEN_CPU)
    try:
        out, err = proc.communicate(timeout=duration + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{err}")
    result = json.loads(out)
    return LoadResult(result["requests"], result["seconds"], result["errors"], result["cpu_share"])


LoadGenerator = Callable[[int, Sequence[str], float], LoadResult]


def choose_loadgen(name: str, connections: int, workdir: Path) -> tuple[LoadGenerator, str]:
    """The load generator to use and its description for the footer."""
    if name == "wrk" or (name == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            raise SystemExit("--loadgen wrk: wrk is not installed")
        version = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True).stdout.split(
            "\n"
        )[0]
        description = f"{version.split(' [')[0].strip() or 'wrk'} (-t1 -c{connections})"
        return lambda port, paths, seconds: run_wrk(port, paths, seconds, connections, workdir), description
    description = f"Python asyncio keep-alive load generator ({connections} connections, own process)"
    return lambda port, paths, seconds: run_python_loadgen(port, paths, seconds, connections), description


def check_control_socket(server: UvicornServer) -> str:
    """Query ``ours``'s control socket: it must exist and have counted the traffic."""
    sockets = sorted(Path(server.socket_dir).glob("*.sock"))
    if not sockets:
        raise RuntimeError(f"no control socket in {server.socket_dir}:\n{server.log()}")
    response = Client(sockets[0]).send("stats", {"routes": True})
    if response is None or not response.ok:
        raise RuntimeError(f"stats over {sockets[0]} failed: {response}")
    counted = response.payload["requests_total"]
    routes = sorted(response.payload["routes"])
    return (
        f"{server.n_routes} routes: control socket started; its stats counted {counted} requests "
        f"(load generators completed {server.requests_sent}) under {len(routes)} route templates"
    )


def load_side_by_side(
    loadgen: LoadGenerator, bare: UvicornServer, other: UvicornServer, paths: Sequence[str], duration: float
) -> float:
    """Load ``bare`` and ``other`` at the same time; ``other``'s requests per CPU-second over bare's.

    Both servers are pinned to the same CPU and saturated, so whatever slows
    that CPU down (a stolen vCPU, a neighbour, frequency) slows both alike in
    the same seconds; dividing by each one's CPU time corrects for an uneven
    share of it.
    """
    results: dict[str, tuple[LoadResult, float]] = {}

    def load(server: UvicornServer) -> None:
        before = server.cpu_seconds()
        result = loadgen(server.port, paths, duration)
        results[server.variant] = (result, server.cpu_seconds() - before)

    threads = [threading.Thread(target=load, args=(server,)) for server in (bare, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server in (bare, other):
        if server.variant not in results:
            raise RuntimeError(f"{server.variant}: the side-by-side load failed:\n{server.log()}")
        result, _ = results[server.variant]
        server.requests_sent += result.requests
        if result.errors:
            raise RuntimeError(f"{server.variant}: {result.errors} errors under load:\n{server.log()}")
    (bare_result, bare_cpu), (other_result, other_cpu) = results[bare.variant], results[other.variant]
    return (other_result.requests / other_cpu) / (bare_result.requests / bare_cpu)


def fresh_pair_ratio(
    variant: str,
    n_routes: int,
    framework: str,
    paths: Sequence[str],
    duration: float,
    loadgen: LoadGenerator,
    workdir: Path,
) -> float:
    """Start a new bare app and a new ``variant`` server, warm both up, load them side by side, stop both.

    New processes every round: each uvicorn process has a hash seed and a
    memory layout of its own, which move its speed by about as much as the
    margin under test. Rounds that shared one pair of processes would all
    carry that pair's offset, and their interval would not show it.
    """
    pair = [
        start_server("bare", n_routes, framework, workdir),
        start_server(variant, n_routes, framework, workdir),
    ]
    try:
        for server in pair:
            wait_until_ready(server, paths[-1])
        load_side_by_side(loadgen, pair[0], pair[1], paths, 1.0)  # warm-up, both at once
        if variant == "ours" and not any(Path(pair[1].socket_dir).glob("*.sock")):
            raise RuntimeError(f"ours: no control socket in {pair[1].socket_dir}:\n{pair[1].log()}")
        return load_side_by_side(loadgen, pair[0], pair[1], paths, duration)
    finally:
        for server in pair:
            server.stop()
            shutil.rmtree(server.socket_dir, ignore_errors=True)


def run_under_uvicorn(
    n_routes: int,
    framework: str,
    rounds: int,
    pair_rounds: int,
    duration: float,
    loadgen: LoadGenerator,
    workdir: Path,
) -> tuple[list[UvicornServer], str]:
    """Start every variant, load each in turn for ``rounds`` interleaved rounds and stop them all;
    then load each beside the bare app for ``pair_rounds`` rounds, a new pair of processes each time."""
    paths = request_paths(n_routes)
    servers: list[UvicornServer] = []
    shuffler = random.Random(7)
    try:
        for variant in VARIANTS:
            servers.append(start_server(variant, n_routes, framework, workdir))
        for server in servers:
            wait_until_ready(server, paths[-1])
            warmup = loadgen(server.port, paths, 1.0)
            server.requests_sent += warmup.requests
            if warmup.errors:
                raise RuntimeError(
                    f"{server.variant}: {warmup.errors} errors during warm-up:\n{server.log()}"
                )
        for _ in range(rounds):
            order = list(servers)
            shuffler.shuffle(order)
            for server in order:
                cpu_before = server.cpu_seconds()
                result = loadgen(server.port, paths, duration)
                cpu = server.cpu_seconds() - cpu_before
                server.per_cpu_s.append(result.requests / cpu if cpu > 0 else float("nan"))
                server.requests_sent += result.requests
                if result.errors:
                    raise RuntimeError(
                        f"{server.variant}: {result.errors} errors under load:\n{server.log()}"
                    )
                if result.loadgen_cpu_share is not None and result.loadgen_cpu_share > 0.9:
                    print(
                        f"  warning: the load generator used {result.loadgen_cpu_share:.0%} of its core: "
                        "it may be the bottleneck, so the ratios are understated",
                        file=sys.stderr,
                    )
                server.rps.append(result.rps)
        ours = next(s for s in servers if s.variant == "ours")
        note = check_control_socket(ours)
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.socket_dir, ignore_errors=True)
    for _ in range(pair_rounds):
        order = [s for s in servers if s.variant != "bare"]
        shuffler.shuffle(order)
        for server in order:
            server.side_by_side.append(
                fresh_pair_ratio(server.variant, n_routes, framework, paths, duration, loadgen, workdir)
            )
    return servers, note


# -- part 2b: under uvicorn, in instructions ------------------------------------------

UVICORN_CG_VARIANTS = ("bare", "noop", "timing", "ours")
UVICORN_CG_REQUESTS = (1_500, 3_000)
"""Requests served under callgrind before its counters are zeroed, and after."""
_CG_EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")


def serve_requests(port: int, paths: Sequence[str], n: int) -> None:
    """``n`` GETs one after another over one keep-alive connection, each answered 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(n):
            conn.request("GET", paths[i % len(paths)])
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {paths[i % len(paths)]}: {response.status}")
    finally:
        conn.close()


def callgrind_events(path: Path) -> dict[str, int]:
    """The totals of a callgrind dump, by event name."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("summary:", "totals:")) and names:
            return dict(zip(names, (int(v) for v in line.split()[1:]), strict=True))
    raise RuntimeError(f"no totals in {path}")


def callgrind_control(command: str, pid: int) -> None:
    """Have the callgrind running ``pid`` carry out ``command`` (``--zero``, ``--dump``)."""
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True, timeout=300)


def count_under_uvicorn(variant: str, n_routes: int, framework: str, workdir: Path) -> dict[str, float]:
    """Callgrind's events per request of a real uvicorn process serving ``variant``.

    The whole process is counted (uvicorn, h11, asyncio, the app and the
    collector), from after a warm-up until ``callgrind_control`` dumps it.
    """
    out = workdir / f"callgrind-{variant}-{n_routes}"
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--cache-sim=yes",
        "--branch-sim=yes",
        f"--callgrind-out-file={out}",
    ]
    server = start_server(
        variant, n_routes, framework, workdir, wrapper=wrapper, extra_env={"PYTHONHASHSEED": "0"}
    )
    paths = request_paths(n_routes)
    warm_up, counted = UVICORN_CG_REQUESTS
    dump = Path(f"{out}.1")
    try:
        wait_until_ready(server, paths[-1], timeout=600)
        serve_requests(server.port, paths, warm_up)
        callgrind_control("--zero", server.proc.pid)
        serve_requests(server.port, paths, counted)
        callgrind_control("--dump", server.proc.pid)
        deadline = time.monotonic() + 60
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not dump.exists():
            raise RuntimeError(f"callgrind wrote no dump for {variant}:\n{server.log()[-2000:]}")
        time.sleep(1.0)  # let it finish writing
        events = callgrind_events(dump)
    finally:
        server.stop()
        shutil.rmtree(server.socket_dir, ignore_errors=True)
    return {name: events.get(name, 0) / counted for name in _CG_EVENTS}


def estimated_cycles(events: dict[str, float]) -> float:
    """Callgrind's cycle estimate: Ir + 10 (L1 misses + mispredicted branches) + 100 LL misses."""
    l1 = events["I1mr"] + events["D1mr"] + events["D1mw"]
    ll = events["ILmr"] + events["DLmr"] + events["DLmw"]
    return events["Ir"] + 10 * (l1 + events["Bcm"] + events["Bim"]) + 100 * ll


def uvicorn_instructions_table(results: dict[tuple[str, int], dict[str, float]], framework: str) -> Table:
    """Per request under a real uvicorn: instructions, simulated misses, and their cycle estimate."""
    table = Table(
        f"Under uvicorn ({framework}, 1 worker): per request, valgrind callgrind with cache and branch simulation",
        ["variant", "routes", "instructions/req", "added vs bare", "L1 misses added", "mispredicts added",
         "est. cycles added", "bare/variant (est. cycles)"],
    )  # fmt: skip
    for (variant, n_routes), events in sorted(
        results.items(), key=lambda item: (item[0][1], VARIANTS.index(item[0][0]))
    ):
        bare = results["bare", n_routes]
        diff = {name: events[name] - bare[name] for name in _CG_EVENTS}
        cycles, bare_cycles = estimated_cycles(events), estimated_cycles(bare)
        added = (
            ["-"] * 4
            if variant == "bare"
            else [
                f"{diff['Ir']:+,.0f} ({diff['Ir'] / bare['Ir']:+.1%})",
                f"{diff['I1mr'] + diff['D1mr'] + diff['D1mw']:+,.0f}",
                f"{diff['Bcm'] + diff['Bim']:+,.0f}",
                f"{cycles - bare_cycles:+,.0f} ({(cycles - bare_cycles) / bare_cycles:+.1%})",
            ]
        )
        table.rows.append(
            [
                VARIANT_LABELS[variant],
                str(n_routes),
                f"{events['Ir']:,.0f}",
                *added,
                f"{bare_cycles / cycles:.3f}",
            ]
        )
    warm_up, counted = UVICORN_CG_REQUESTS
    table.notes += [
        f"the whole uvicorn process under callgrind, counted over {counted:,} GETs sent one at a time over one "
        f"keep-alive connection after {warm_up:,} uncounted ones, PYTHONHASHSEED=0; not under load: a saturated "
        "server handles several requests per loop turn",
        "est. cycles: callgrind's estimate Ir + 10 x (L1 misses + mispredicted branches) + 100 x last-level "
        "misses, over caches it simulates (the VM has no hardware counters); real misses cost what the machine "
        "makes them cost, so it is a guide, not the target's measure",
        "the counts move from run to run, ours' the most: the event loop's turns per request and the work "
        "on its timer heap move with timing, which valgrind slows down fifty-fold",
    ]
    return table


def run_uvicorn_instructions(
    route_counts: Sequence[int], framework: str, workdir: Path
) -> dict[tuple[str, int], dict[str, float]]:
    """Part 2b for every variant of :data:`UVICORN_CG_VARIANTS` at every route count, one at a time."""
    return {
        (variant, n_routes): count_under_uvicorn(variant, n_routes, framework, workdir)
        for n_routes in route_counts
        for variant in UVICORN_CG_VARIANTS
    }


# -- tables -----------------------------------------------------------------------


@dataclass
class Table:
    """A result table: printed aligned for the terminal and as Markdown for README."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """Aligned plain text."""
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

        out = [self.title, line(self.columns), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in self.rows]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        """A GitHub Markdown table with the notes below it."""
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        out.append("| --- | " + " | ".join("---:" for _ in self.columns[1:]) + " |")
        out += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def verdict(met: bool) -> str:
    """A target's outcome as a word."""
    return "MET" if met else "MISSED"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values``, and its coverage.

    The order statistics ``x(k)`` and ``x(n+1-k)`` with the largest ``k``
    for which the binomial(n, 1/2) probability of fewer than ``k`` is at most
    half of ``1 - level``: nothing is assumed of the noise but that rounds
    are independent. The coverage returned is the interval's exact one; with
    fewer than six values even the whole range covers less than 95 %.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    k, below = 1, 0.0
    while k < n // 2 + 1:
        below += math.comb(n, k - 1) / 2**n  # P(fewer than k of n below the median)
        if below + math.comb(n, k) / 2**n > (1 - level) / 2:
            break
        k += 1
    outside = sum(math.comb(n, j) for j in range(k)) / 2**n  # P(fewer than k below), one side
    return ordered[k - 1], ordered[n - k], 1 - 2 * outside


def bounded_verdict(low: float, high: float, *, at_most: float, coverage: float = 1.0) -> str:
    """MET when the whole interval is within the target, MISSED when none of it is, else undecided."""
    if coverage < 0.95:
        return f"NOT DECIDED (too few rounds: the range covers the median {coverage:.0%} of the time)"
    if high <= at_most:
        return "MET"
    if low > at_most:
        return "MISSED"
    return "NOT DECIDED (the target is inside the 95% interval)"


def in_process_table(cases: list[InProcessCase], framework: str, rounds: int, batch: int) -> Table:
    """ns/request per variant, and what it adds over the bare app and the no-op middleware."""
    table = Table(
        f"In-process ASGI calls ({framework}): ns/request, median of {rounds} interleaved rounds",
        ["variant", "routes", "ns/req", "added ns vs bare", "added ns vs no-op", "bare/variant"],
    )
    by_key = {(c.variant, c.n_routes): c for c in cases}
    for case in cases:
        bare = by_key["bare", case.n_routes].ns_per_request
        noop = by_key["noop", case.n_routes].ns_per_request
        mine = case.ns_per_request
        # Paired per round: a variant and its reference were timed in the same round.
        paired = [m - b for m, b in zip(mine, bare, strict=True)]
        added_bare = statistics.median(paired)
        low, high, coverage = median_interval(paired)
        added_noop = statistics.median(m - n for m, n in zip(mine, noop, strict=True))
        ratio = statistics.median(b / m for m, b in zip(mine, bare, strict=True))
        table.rows.append(
            [
                VARIANT_LABELS[case.variant],
                str(case.n_routes),
                f"{statistics.median(mine):,.0f}",
                "-" if case.variant == "bare" else f"{added_bare:+,.0f}",
                "-" if case.variant in ("bare", "noop") else f"{added_noop:+,.0f}",
                f"{ratio:.3f}",
            ]
        )
        if case.variant == "ours":
            table.notes.append(
                f"target <= {ADDED_NS_TARGET:,} ns added per request at {case.n_routes} routes: "
                f"{added_bare:+,.0f} ns (95% interval {low:+,.0f} to {high:+,.0f}), "
                f"{bounded_verdict(low, high, at_most=ADDED_NS_TARGET, coverage=coverage)}"
            )
    table.notes += [
        f"each round times a batch of {batch:,} requests per variant, in {SLICES} slices the variants "
        "take turns at (order shuffled per round), timed on the thread's CPU clock with the garbage "
        "collector paused; "
        "'added' and 'bare/variant' are medians of per-round paired differences/ratios",
        f"requests rotate over {TARGET_SPREAD} routes spread over the table, first and last declared included; "
        "each handler returns PlainTextResponse('ok')",
        "ours: the lifespan is not run in-process, so no control socket is started; "
        "statistics are recorded for every request (checked after the run)",
    ]
    return table


def uvicorn_table(
    results: list[tuple[list[UvicornServer], str]], framework: str, rounds: int, duration: float
) -> Table:
    """requests/s per variant and its ratio to the bare app's."""
    table = Table(
        f"Under uvicorn ({framework}, 1 worker): requests/s, median of {rounds} interleaved rounds",
        [
            "variant",
            "routes",
            "req/s",
            "min-max req/s",
            "added ns vs bare",
            "ratio vs bare",
            "req per CPU-s",
            "CPU ratio vs bare",
        ],
    )
    for servers, note in results:
        bare_server = next(s for s in servers if s.variant == "bare")
        bare, bare_cpu = bare_server.rps, bare_server.per_cpu_s
        for server in servers:
            rps = server.rps
            ratio = statistics.median(r / b for r, b in zip(rps, bare, strict=True))
            cpu_ratio = statistics.median(r / b for r, b in zip(server.per_cpu_s, bare_cpu, strict=True))
            # The server is CPU-bound on one core, so 1/throughput is its time per request.
            added = statistics.median(1e9 / r - 1e9 / b for r, b in zip(rps, bare, strict=True))
            table.rows.append(
                [
                    VARIANT_LABELS[server.variant],
                    str(server.n_routes),
                    f"{statistics.median(rps):,.0f}",
                    f"{min(rps):,.0f}-{max(rps):,.0f}",
                    "-" if server.variant == "bare" else f"{added:+,.0f}",
                    f"{ratio:.3f}",
                    f"{statistics.median(server.per_cpu_s):,.0f}",
                    f"{cpu_ratio:.3f}",
                ]
            )
            if server.variant == "ours":
                table.notes.append(
                    f"target >= {RPS_RATIO_TARGET:.0%} of the bare app's req/s at {server.n_routes} routes: "
                    f"wall clock {ratio:.1%}, {verdict(ratio >= RPS_RATIO_TARGET)}; "
                    f"per CPU-second {cpu_ratio:.1%}, {verdict(cpu_ratio >= RPS_RATIO_TARGET)}"
                )
        table.notes.append(note)
    table.notes += [
        f"each round loads every variant for {duration:g} s (variants shuffled per round, after a 1 s warm-up "
        "each); 'ratio' and 'added ns' are medians of per-round pairs with the bare app; "
        "added ns = 1e9/req/s - 1e9/bare req/s (server time per request, one busy core); "
        "'req per CPU-s' = requests completed / CPU time the server process used meanwhile (user + system, "
        "all threads, from /proc): its capacity, which time taken by other processes on its CPU does not blur",
        "uvicorn: --no-access-log --log-level warning; ours runs its lifespan, so its control socket is up "
        "(in a temp dir) during the load",
    ]
    return table


def side_by_side_table(
    results: list[tuple[list[UvicornServer], str]], framework: str, rounds: int, duration: float
) -> Table:
    """Each variant's capacity over the bare app's, both loaded at the same time on one CPU."""
    table = Table(
        f"Under uvicorn, side by side with the bare app ({framework}): requests per CPU-second over "
        f"bare's, {rounds} rounds",
        ["variant", "routes", "median ratio", "min-max ratio", "added CPU us per request"],
    )
    for servers, _ in results:
        bare = next(s for s in servers if s.variant == "bare")
        bare_us = 1e6 / statistics.median(bare.per_cpu_s)
        for server in servers:
            if server is bare:
                continue
            ratios = server.side_by_side
            ratio = statistics.median(ratios)
            table.rows.append(
                [
                    VARIANT_LABELS[server.variant],
                    str(server.n_routes),
                    f"{ratio:.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    f"{bare_us / ratio - bare_us:+,.1f}",
                ]
            )
            if server.variant == "ours":
                low, high, coverage = median_interval(ratios)
                table.notes.append(
                    f"target >= {RPS_RATIO_TARGET:.0%} of the bare app's req/s at {server.n_routes} routes: "
                    f"{ratio:.1%} (95% interval {low:.1%} to {high:.1%}), "
                    f"{bounded_verdict(-high, -low, at_most=-RPS_RATIO_TARGET, coverage=coverage)}"
                )
    table.notes += [
        "each round starts a new bare app and a new variant process (each process's hash seed and memory layout "
        f"move its speed), warms both up for 1 s, then loads both at the same time for {duration:g} s, both "
        "servers pinned to one CPU and each with its own load generator on the other: noise on that CPU hits "
        "both in the same seconds; the ratio is of requests completed per CPU-second each server used "
        "(user + system, from /proc)",
        "added CPU us per request: from the ratio and the bare app's CPU time per request in the rounds above",
    ]
    return table


def footer(framework: str, loadgen: str | None, args: argparse.Namespace) -> list[str]:
    """Versions and settings the numbers depend on."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    impl = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    lines = [
        f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.machine()}, "
        f"{os.cpu_count()} CPUs; uvicorn {version('uvicorn')} (loop {impl}, http {http_impl}), "
        f"starlette {version('starlette')}"
        + (f", fastapi {version('fastapi')}" if framework == "fastapi" else ""),
        f"prometheus-fastapi-instrumentator {version('prometheus-fastapi-instrumentator')}, "
        f"starlette-exporter {version('starlette-exporter')}, unixsock-asgi {version('unixsock-asgi')}",
    ]
    if not args.skip_in_process:
        lines.append(f"in-process: {args.rounds} rounds x {args.batch:,} requests per variant")
    if loadgen is not None:
        pinning = (
            f"server pinned to CPU {SERVER_CPU}, load generator to CPU {LOADGEN_CPU}"
            if can_pin()
            else "not pinned (fewer than 2 CPUs available)"
        )
        lines.append(
            f"under uvicorn: {args.uvicorn_rounds} rounds x {args.duration:g} s per variant; "
            f"load generator: {loadgen}; {pinning}"
        )
    return lines


# -- main -------------------------------------------------------------------------


@contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory for logs, the wrk script and in-process socket paths."""
    path = Path(tempfile.mkdtemp(prefix="usab-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the defaults it is given with."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about two minutes)")
    parser.add_argument("--framework", choices=("starlette", "fastapi"), default="starlette")
    parser.add_argument("--routes", type=int, nargs="+", default=[5, 100], help="route counts in-process")
    parser.add_argument("--rounds", type=int, help="in-process rounds (default 21, quick 5)")
    parser.add_argument("--batch", type=int, help="requests per in-process batch (default 2000, quick 1000)")
    parser.add_argument("--uvicorn-routes", type=int, nargs="*", default=[5, 100], help="route counts")
    parser.add_argument("--uvicorn-rounds", type=int, help="rounds under uvicorn (default 3, quick 2)")
    parser.add_argument(
        "--side-by-side-rounds",
        type=int,
        help="rounds of each variant loaded beside bare, a new pair of processes each (default 12, quick 2)",
    )
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 5, quick 2)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections of the load")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--skip-uvicorn", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of ours in-process")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per request in-process with valgrind (about 10 minutes)",
    )
    parser.add_argument(
        "--uvicorn-instructions",
        action="store_true",
        help="also count instructions and simulated cache misses per request of a real uvicorn process "
        "with valgrind (bare, no-op, timing-only, ours; about 3.5 minutes each)",
    )
    parser.add_argument("--instructions-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--loadgen-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (5 if quick else 21)
    args.batch = args.batch or (1000 if quick else 2000)
    args.uvicorn_rounds = args.uvicorn_rounds or (2 if quick else 3)
    args.side_by_side_rounds = args.side_by_side_rounds or (2 if quick else 12)
    args.duration = args.duration or (2.0 if quick else 5.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts and print their tables, then the same tables as Markdown."""
    args = parse_args(argv)
    if args.loadgen_worker is not None:  # the Python load generator's own process
        config = json.loads(args.loadgen_worker)
        result = asyncio.run(
            python_load(
                config["port"], config["paths"], config["duration"], config["connections"], 10_000_000
            )
        )
        print(json.dumps(result))
        return 0
    if args.instructions_worker is not None:  # a callgrind run of part 1b
        instructions_worker(args.instructions_worker)
        return 0
    started = time.monotonic()
    tables: list[Table] = []
    loadgen_description: str | None = None
    with workspace() as workdir:
        socket_dir = str(workdir)
        if not args.skip_in_process:
            print(f"part 1: in-process, {args.rounds} rounds ...", file=sys.stderr)
            cases = asyncio.run(
                run_in_process(args.routes, args.framework, args.rounds, args.batch, socket_dir)
            )
            tables.append(in_process_table(cases, args.framework, args.rounds, args.batch))
            print("\n" + tables[-1].text(), flush=True)
            if args.profile:
                profile_ours(max(args.routes), args.framework, args.batch, socket_dir)
        if args.instructions:
            if shutil.which("valgrind") is None:
                print("--instructions: valgrind is not installed; part 1b skipped", file=sys.stderr)
            else:
                print("part 1b: instructions per request under valgrind ...", file=sys.stderr)
                tables.append(
                    instructions_table(run_instructions(args.routes, args.framework), args.framework)
                )
                print("\n" + tables[-1].text(), flush=True)
        if args.uvicorn_instructions and args.uvicorn_routes:
            if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
                print("--uvicorn-instructions: valgrind is not installed; part 2b skipped", file=sys.stderr)
            else:
                print("part 2b: uvicorn under valgrind ...", file=sys.stderr)
                tables.append(
                    uvicorn_instructions_table(
                        run_uvicorn_instructions(args.uvicorn_routes, args.framework, workdir), args.framework
                    )
                )
                print("\n" + tables[-1].text(), flush=True)
        if not args.skip_uvicorn and args.uvicorn_routes:
            loadgen, loadgen_description = choose_loadgen(args.loadgen, args.connections, workdir)
            results = []
            for n_routes in args.uvicorn_routes:
                print(f"part 2: uvicorn, {n_routes} routes, {loadgen_description} ...", file=sys.stderr)
                results.append(
                    run_under_uvicorn(
                        n_routes,
                        args.framework,
                        args.uvicorn_rounds,
                        args.side_by_side_rounds,
                        args.duration,
                        loadgen,
                        workdir,
                    )
                )
            tables.append(uvicorn_table(results, args.framework, args.uvicorn_rounds, args.duration))
            print("\n" + tables[-1].text(), flush=True)
            tables.append(
                side_by_side_table(results, args.framework, args.side_by_side_rounds, args.duration)
            )
            print("\n" + tables[-1].text(), flush=True)
    lines = footer(args.framework, loadgen_description, args)
    lines.append(f"total bench time {time.monotonic() - started:.0f} s")
    print("\n" + "\n".join(lines))
    print("\n--- Markdown ---\n")
    print("\n\n".join(table.markdown() for table in tables))
    print("\n" + "\n".join(f"<sub>{line}</sub><br>" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
