"""Where ``ControlSocketMiddleware``'s cost under load lies: variants paired side by side.

Run ``python bench/bench_parts.py`` (about 20 minutes: 7 pairs, 20 rounds) or
``--pairs`` with fewer. Each round starts a new uvicorn process for each side
of each pair (a process's hash seed and memory layout move its speed), warms
both up, then loads both at the same time, pinned to one CPU, with a load
generator each on the other (``bench_middleware.load_side_by_side``). A pair
``A/B`` reads B's requests per CPU-second over A's: above 1, B costs less.
The variants, each a 5-route Starlette app like ``bench_middleware``'s:

* ``bare``, ``timing``, ``ours``: as in ``bench_middleware``;
* ``ours-idle``: ours whose lifespan goes straight to the app, so that no control
  plane starts: ours' request path alone;
* ``ours-stopped``: ours that stops its control server (and its thread) and its
  loop-lag task once they have started: what starting leaves behind, with
  nothing running;
* ``counter``: the least a per-route counter does, in a plain middleware: timing's
  ``send`` wrapper and clock reads, then a count and a latency sum per (route,
  method, status) in a dict, inline; no histogram, no gate for health and
  maintenance, no in-flight count, no ``receive`` wrapper;
* ``counter-in-ours``: the same counter as the request path of a
  ``ControlSocketMiddleware``, whose control plane starts as ours' does.

This file is also the app module of its uvicorn processes (``uvicorn_app``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import bench_middleware as bm  # this directory: the script's, and uvicorn's --app-dir
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unixsock_asgi import ControlSocketMiddleware

N_ROUTES = 5
DEFAULT_PAIRS = (
    "bare/ours",
    "bare/timing",
    "bare/counter",
    "ours/ours-idle",
    "ours/ours-stopped",
    "ours/counter-in-ours",
    "counter-in-ours/counter",
)
_perf_counter = time.perf_counter


class Counter:
    """A count and a latency sum per (route, method, status), kept inline: no histogram."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app
        self.counts: dict[tuple[int, str, int], list[Any]] = {}

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        status = 500

        def send_with_status(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        start = _perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            seconds = _perf_counter() - start
            route = scope.get("route")
            key = (id(route), scope["method"], status)
            try:
                counted = self.counts[key]
            except KeyError:
                self.counts[key] = [route, 1, seconds]
            else:
                counted[1] += 1
                counted[2] += seconds


class CounterInOurs(ControlSocketMiddleware):
    """:class:`Counter`'s request path in ours' class: ours' control plane starts as usual."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        super().__init__(app, **options)
        self.counts: dict[tuple[int, str, int], list[Any]] = {}

    __call__ = Counter.__call__  # the same function, run on this class


class OursIdle(ControlSocketMiddleware):
    """Ours, whose lifespan goes straight to the app: no control plane starts."""

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.control.lifespan_began()  # no "no lifespan" warning at the first request
        await self.app(scope, receive, send)


class OursStopped(ControlSocketMiddleware):
    """Ours, which stops its control server and its loop-lag task once they have started."""

    async def _start_control(self, scope: Scope) -> str | None:
        error = await super()._start_control(scope)
        if self.control.monitor.task is not None:
            self.control.monitor.task.cancel()
        if self.control.server is not None:
            self.control.server.stop()
        return error


MIDDLEWARE: dict[str, Callable[..., ASGIApp]] = {
    "counter": Counter,
    "counter-in-ours": CounterInOurs,
    "ours-idle": OursIdle,
    "ours-stopped": OursStopped,
}
VARIANTS = ("bare", "timing", "ours", *MIDDLEWARE)
WITH_SOCKET = frozenset({"ours", "counter-in-ours"})
"""The variants whose control socket is up while they are loaded (checked every round)."""


def build_app(variant: str, socket_dir: str) -> ASGIApp:
    """A variant of the 5-route app; those ``bench_middleware`` knows are built there."""
    if variant not in MIDDLEWARE:
        return bm.build_app(variant, N_ROUTES, "starlette", socket_dir=socket_dir)
    middleware = [Middleware(MIDDLEWARE[variant], socket_dir=socket_dir, name=f"parts-{variant}")]
    routes = [Route(bm.route_template(i), bm.starlette_endpoint) for i in range(N_ROUTES)]
    return Starlette(routes=routes, middleware=middleware)


def uvicorn_app() -> ASGIApp:
    """The uvicorn factory (``--factory bench_parts:uvicorn_app``): the variant comes from env."""
    env = os.environ
    return build_app(env[bm._ENV_PREFIX + "VARIANT"], env[bm._ENV_PREFIX + "SOCKET_DIR"])


def pair_ratio(
    a: str, b: str, paths: Sequence[str], duration: float, loadgen: bm.LoadGenerator, workdir: Path
) -> float:
    """B's requests per CPU-second over A's, both new processes loaded at the same time."""
    factory = f"{Path(__file__).stem}:uvicorn_app"
    # Which one starts first alternates from round to round.
    first, second = (a, b) if random.random() < 0.5 else (b, a)
    pair = [bm.start_server(v, N_ROUTES, "starlette", workdir, factory=factory) for v in (first, second)]
    try:
        for server in pair:
            bm.wait_until_ready(server, paths[-1])
        bm.load_side_by_side(loadgen, pair[0], pair[1], paths, 1.0)  # warm-up, both at once
        for server in pair:
            has_socket = any(Path(server.socket_dir).glob("*.sock"))
            if has_socket != (server.variant in WITH_SOCKET):
                raise RuntimeError(f"{server.variant}: control socket {has_socket}:\n{server.log()}")
        ratio = bm.load_side_by_side(loadgen, pair[0], pair[1], paths, duration)
        return ratio if first == a else 1 / ratio
    finally:
        for server in pair:
            server.stop()
            shutil.rmtree(server.socket_dir, ignore_errors=True)


def reading(low: float, high: float) -> str:
    """What a pair's interval says about B against A."""
    if low > 1:
        return "B costs less"
    if high < 1:
        return "B costs more"
    return "no difference shown"


def parse_pairs(given: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for text in given:
        a, _, b = text.partition("/")
        for variant in (a, b):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r} in {text!r}: one of {', '.join(VARIANTS)}")
        if a == b:
            raise SystemExit(f"{text!r}: a pair needs two different variants")
        pairs.append((a, b))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), metavar="A/B")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per pair and round")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every round's ratio there")
    args = parser.parse_args(argv)
    pairs = parse_pairs(args.pairs)
    if not bm.can_pin():
        raise SystemExit(f"needs CPUs {bm.SERVER_CPU} and {bm.LOADGEN_CPU} to pin the servers and the load")
    workdir = Path(tempfile.mkdtemp(prefix="usab-parts-"))
    results: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    began = time.monotonic()
    try:
        loadgen, described = bm.choose_loadgen(args.loadgen, 32, workdir)
        paths = bm.request_paths(N_ROUTES)
        for n in range(args.rounds):
            order = list(pairs)
            random.shuffle(order)
            for a, b in order:
                results[a, b].append(pair_ratio(a, b, paths, args.duration, loadgen, workdir))
            done = "  ".join(f"{a}/{b} {values[-1]:.3f}" for (a, b), values in results.items())
            print(f"round {n + 1}/{args.rounds} ({time.monotonic() - began:.0f} s): {done}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = bm.Table(
        f"Side by side, new processes every round ({N_ROUTES}-route Starlette app): B's requests per CPU-second over A's",
        ["A/B", "median", "95% interval", "min-max", "reading"],
    )
    for (a, b), values in results.items():
        low, high, coverage = bm.median_interval(values)
        table.rows.append(
            [
                f"{a}/{b}",
                f"{statistics.median(values):.4f}",
                f"{low:.4f}-{high:.4f}" + ("" if coverage >= 0.95 else f" (covers {coverage:.0%})"),
                f"{min(values):.3f}-{max(values):.3f}",
                reading(low, high) if coverage >= 0.95 else "too few rounds",
            ]
        )
    table.notes.append(
        f"{args.rounds} rounds x {args.duration:g} s per pair, pairs shuffled each round; load generator: {described}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({f"{a}/{b}": values for (a, b), values in results.items()}, indent=1))
    print()
    print(table.text())
    print()
    print(table.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
