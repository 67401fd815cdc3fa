"""Fan-out time of ``send DIR stats`` to 1, 4 and 16 workers, beside asking them one after another.

Each worker is a subprocess running a UnixSockServer that answers ``stats``
with a fresh ``Stats.snapshot()`` of a realistic app (a dozen routes, tens of
thousands of recorded requests). Measured, median of several rounds:

* fan-out: ``_fleet.fan_out`` (what ``send DIR`` does: every worker at once);
* sequential: a blocking ``Client`` per worker, one after another;
* CLI: the whole ``unixsock-asgi send DIR stats --json`` command, interpreter start-up included.

A second block gives every worker a 20 ms reply delay (a worker whose control
thread waits on a busy app), where the concurrency of the fan-out shows best.

Run: ``python bench/bench_fanout.py`` (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from unixsock_asgi import Client, UnixSockServer
from unixsock_asgi._fleet import fan_out
from unixsock_asgi._stats import Stats

WORKER_COUNTS = (1, 4, 16)
ROUNDS = 15
ROUTES = [
    "/",
    "/health",
    "/items",
    "/items/{item_id}",
    "/items/{item_id}/reviews",
    "/cart",
    "/cart/items/{line}",
    "/checkout",
    "/users/{user_id}",
    "/search",
    "/slow",
    "<unmatched>",
]


def realistic_stats(seed: int) -> Stats:
    """A worker's Stats after ~30k requests spread over a dozen routes."""
    rng = random.Random(seed)
    stats = Stats()
    for _ in range(30_000):
        route = rng.choice(ROUTES)
        status = rng.choices([200, 201, 304, 404, 500], weights=[80, 5, 5, 8, 2])[0]
        stats.record(
            route, rng.choice(["GET", "GET", "GET", "POST"]), status, rng.lognormvariate(-5, 1), False
        )
    return stats


def serve(path: str, reply_delay_s: float) -> None:
    """Worker mode: answer ping and stats on ``path`` until SIGTERM."""
    stats = realistic_stats(os.getpid())

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        if reply_delay_s:
            await asyncio.sleep(reply_delay_s)
        if cmd == "stats":
            return stats.snapshot(routes=bool(args.get("routes", True)))
        return "pong"

    server = UnixSockServer(path, handler)
    server.start()
    stop = asyncio.Event()

    async def wait() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    try:
        asyncio.run(wait())
    finally:
        server.stop()


def start_workers(directory: str, count: int, reply_delay_s: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        path = os.path.join(directory, f"bench-{i}.sock")
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve", path, "--reply-delay", str(reply_delay_s)],
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + 60
    for i in range(count):
        path = os.path.join(directory, f"bench-{i}.sock")
        while True:
            try:
                if Client(path, timeout=2).send("ping") is not None:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {path} did not come up") from None
                time.sleep(0.05)
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def median_ms(action: Callable[[], object], rounds: int) -> float:
    action()  # warm-up: imports, first connections
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(count: int, reply_delay_s: float, rounds: int) -> tuple[float, float, float]:
    directory = tempfile.mkdtemp(prefix="usa-bench-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = start_workers(directory, count, reply_delay_s)
        sockets = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".sock"))

        def concurrent() -> None:
            outcome = asyncio.run(fan_out(sockets, "stats", timeout=10))
            assert outcome.all_ok and len(outcome.results) == count

        def sequential() -> None:
            for path in sockets:
                response = Client(path, timeout=10).send("stats")
                assert response is not None and response.ok

        def whole_command() -> None:
            subprocess.run(
                [sys.executable, "-m", "unixsock_asgi", "send", directory, "stats", "--json"],
                check=True,
                stdout=subprocess.DEVNULL,
            )

        return (
            median_ms(concurrent, rounds),
            median_ms(sequential, rounds),
            median_ms(whole_command, max(3, rounds // 3)),
        )
    finally:
        stop_workers(procs)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--reply-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds per cell (median)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.reply_delay)
        return

    payload_kib = len(repr(realistic_stats(1).snapshot())) / 1024
    print(
        f"send DIR stats: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, ~{payload_kib:.0f} KiB per reply"
    )
    print(f"median of {args.rounds} rounds; CLI = whole `unixsock-asgi send DIR stats --json` process\n")
    header = f"{'reply delay':>11} {'workers':>7} {'fan-out ms':>10} {'one-by-one ms':>13} {'speed-up':>8} {'CLI ms':>7}"
    print(header)
    print("-" * len(header))
    for delay in (0.0, 0.020):
        for count in WORKER_COUNTS:
            fanned, one_by_one, cli = measure(count, delay, args.rounds)
            print(
                f"{delay * 1000:>9.0f}ms {count:>7} {fanned:>10.1f} {one_by_one:>13.1f}"
                f" {one_by_one / fanned:>7.2f}x {cli:>7.0f}"
            )


if __name__ == "__main__":
    main()
