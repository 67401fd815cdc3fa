"""Cost of a ``stats`` snapshot as an app's routes grow, with and without the per-route figures.

``top`` and ``ls`` ask every worker for ``stats routes=false`` once a second;
the snapshot is made on the worker's control thread, which shares the GIL
with the app, so its cost is taken from the app. Without routes it must not
grow with the number of routes; with routes it is the routes' payload.

Each row fills a ``Stats`` with 200,000 requests over N routes (five methods,
five statuses, log-normal latencies) and times ``snapshot()``, median of
rounds; the baseline is the same snapshot at 10 routes, in the same run.

Run: ``python bench/bench_snapshot.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from unixsock_asgi import Stats

ROUTE_COUNTS = (10, 100, 1000)
REQUESTS = 200_000


def filled(n_routes: int, seed: int = 1) -> Stats:
    """A Stats that has counted ``REQUESTS`` requests spread over ``n_routes`` routes."""
    rnd = random.Random(seed)
    stats = Stats()
    methods = ["GET", "POST", "PUT", "DELETE", "HEAD"]
    statuses = [200, 201, 302, 404, 500]
    for _ in range(REQUESTS):
        stats.started += 1
        route = f"/r{rnd.randrange(n_routes)}"
        stats.add(route, rnd.choice(methods), rnd.choice(statuses), rnd.lognormvariate(-6, 1.5), False)
    stats.snapshot()  # counted and bucketed: what a worker is like between two snapshots
    return stats


def time_snapshot(stats: Stats, *, routes: bool, rounds: int) -> float:
    """Median seconds of one ``snapshot(routes=routes)``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        stats.snapshot(routes=routes)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    filled_stats = {n: filled(n) for n in ROUTE_COUNTS}
    rows = []
    for routes in (False, True):
        results = {n: time_snapshot(filled_stats[n], routes=routes, rounds=args.rounds) for n in ROUTE_COUNTS}
        base = results[ROUTE_COUNTS[0]]
        for n in ROUTE_COUNTS:
            rows.append((f"routes={str(routes).lower()}", n, results[n] * 1e3, results[n] / base))
    print(f"Stats.snapshot(): median of {args.rounds} rounds, {REQUESTS:,} requests counted")
    print(f"{'snapshot':<14}{'routes':>7}{'ms':>10}{'vs 10 routes':>14}")
    print(f"{'-' * 13:<14}{'-' * 6:>7}{'-' * 9:>10}{'-' * 13:>14}")
    for name, n, ms, ratio in rows:
        print(f"{name:<14}{n:>7,}{ms:>10.2f}{ratio:>13.2f}x")


if __name__ == "__main__":
    main()
