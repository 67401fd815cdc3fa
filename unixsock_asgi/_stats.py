"""Request statistics: exact counters and mergeable log-bucketed latency histograms.

Requests are queued by the app's thread and counted in batches under a lock
(see :class:`Stats`), so counts are exact whichever thread reads them.

The histogram is DDSketch-style: a value ``v`` (seconds) goes to bucket
``ceil(log(v) / log(GAMMA))`` and is reported as the bucket's midpoint
``2 * GAMMA**i / (GAMMA + 1)``, so every quantile is within ``RELATIVE_ERROR``
of a true sample. Buckets are fixed, so histograms from many processes merge
exactly by adding counts, and percentiles are computed after the merge.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "GAMMA",
    "RELATIVE_ERROR",
    "UNMATCHED",
    "LatencyHistogram",
    "Stats",
    "merge_histograms",
    "process_figures",
]

RELATIVE_ERROR = 0.04
"""Largest relative error of a reported quantile (the issue asks for at most 5%)."""
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(GAMMA)
_INV_LOG_GAMMA = 1 / _LOG_GAMMA
_log = math.log
_ceil = math.ceil
_MIN_VALUE = 1e-7  # 100 ns; anything faster is counted there
_MAX_VALUE = 1e5  # about a day

logger = logging.getLogger("unixsock_asgi")

UNMATCHED = "<unmatched>"
"""Route key of requests that matched no route: raw paths are never keys."""

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Methods are client-controlled: anything else is counted as OTHER, so that a
# client cannot grow the counters without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_METHOD_KEYS = (*sorted(_METHODS), "OTHER")
_QUANTILES = (("p50_s", 0.5), ("p90_s", 0.9), ("p99_s", 0.99))


def _bucket(value: float) -> int:
    if value < _MIN_VALUE:
        value = _MIN_VALUE
    elif value > _MAX_VALUE:
        value = _MAX_VALUE
    return _ceil(_log(value) * _INV_LOG_GAMMA)


def _bucket_value(index: int) -> float:
    return 2 * GAMMA**index / (GAMMA + 1)


class LatencyHistogram:
    """A sparse histogram over fixed logarithmic buckets (seconds)."""

    __slots__ = ("buckets", "count", "max", "sum")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        """Add one observation."""
        i = _bucket(seconds)
        b = self.buckets
        b[i] = b.get(i, 0) + 1
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's counts to this one."""
        for i, c in list(other.buckets.items()):
            self.buckets[i] = self.buckets.get(i, 0) + c
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1), within RELATIVE_ERROR; None when empty."""
        total = sum(self.buckets.values())
        if total == 0:
            return None
        rank = q * (total - 1)
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen > rank:
                return min(_bucket_value(i), self.max) if self.max else _bucket_value(i)
        return _bucket_value(max(self.buckets))  # pragma: no cover - rank < total

    def to_payload(self) -> dict[str, Any]:
        """JSON form: counts by bucket index plus the figures derived from them."""
        buckets = dict(self.buckets)  # atomic copy; recording may go on meanwhile
        hist = LatencyHistogram()
        hist.buckets = buckets
        hist.count = sum(buckets.values())
        hist.max = self.max
        payload: dict[str, Any] = {
            "count": hist.count,
            "sum_s": self.sum,
            "max_s": self.max,
            "gamma": GAMMA,
            "buckets": sorted([i, c] for i, c in buckets.items()),
        }
        for key, q in _QUANTILES:
            payload[key] = hist.quantile(q)
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild a histogram from :meth:`to_payload` output (of any process)."""
        gamma = payload.get("gamma", GAMMA)
        if not math.isclose(float(gamma), GAMMA, rel_tol=1e-9):
            raise ValueError(f"histogram uses gamma {gamma}, this version uses {GAMMA}")
        hist = cls()
        for i, c in payload.get("buckets", []):
            hist.buckets[int(i)] = hist.buckets.get(int(i), 0) + int(c)
        hist.count = sum(hist.buckets.values())
        hist.sum = float(payload.get("sum_s", 0.0))
        hist.max = float(payload.get("max_s", 0.0))
        return hist


def merge_histograms(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge histogram payloads by bucket and recompute percentiles from the merge."""
    merged = LatencyHistogram()
    for payload in payloads:
        merged.merge(LatencyHistogram.from_payload(payload))
    return merged.to_payload()


class RouteStats:
    """Counters of one route template."""

    __slots__ = ("by_method", "by_status", "exceptions", "latency")

    def __init__(self) -> None:
        self.exceptions = 0
        self.by_status = [0, 0, 0, 0, 0, 0]  # index = status // 100
        # Every key present from the start: one lookup and one store per request.
        self.by_method: dict[str, int] = dict.fromkeys(_METHOD_KEYS, 0)
        self.latency = LatencyHistogram()

    @property
    def requests(self) -> int:
        """Requests finished: every one is one latency observation."""
        return self.latency.count

    def to_payload(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "exceptions": self.exceptions,
            "by_status": _status_payload(self.by_status),
            "by_method": {method: n for method, n in list(self.by_method.items()) if n},
            "latency": self.latency.to_payload(),
        }


def _status_payload(counts: list[int]) -> dict[str, int]:
    snapshot = list(counts)
    return {name: snapshot[i + 1] for i, name in enumerate(_STATUS_CLASSES) if snapshot[i + 1]}


FLUSH_EVERY = 256
"""Finished requests the app's thread queues before it counts them, in one go."""


class Stats:
    """Everything one process has counted since start (or the last reset).

    The middleware queues each finished request on :attr:`pending` (one
    append; the queue is a deque, whose appends and pops are atomic) and
    counts the queue every ``FLUSH_EVERY`` requests: counting in a batch
    finds the counters in the CPU's caches, where one request at a time,
    between a server's parsing and I/O, finds them evicted. Snapshots count
    what is queued first, under the same lock, so counts are exact. Only
    per-route counters are kept; process totals are derived in snapshots.
    """

    def __init__(self) -> None:
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.loop_lag_s = 0.0
        self.loop_lag_max_s = 0.0
        self.in_flight = 0
        self.websockets_active = 0
        self.pending: collections.deque[tuple[Any, str, int, float, bool]] = collections.deque()
        """Finished requests: route template (or a Starlette route, for its ``path_format``),
        method, status, seconds, whether the app raised."""
        # Re-entrant: a signal handler on the app's thread may take a snapshot
        # while that thread is counting.
        self._lock = threading.RLock()
        self._routes: dict[str, RouteStats] = {}
        self.reset()

    def reset(self) -> int:
        """Zero every counter; in-flight gauges and the start time are kept.

        Returns how many requests had been counted (queued ones included).
        """
        with self._lock:
            self._count_pending()
            before = sum(rs.requests for rs in self._routes.values())
            self.reset_at = time.time()
            self._routes = {}
            self.websockets_total = 0
            return before

    @property
    def routes(self) -> dict[str, RouteStats]:
        """Counters by route template, every finished request counted."""
        self.flush()
        return self._routes

    def record(self, route: str, method: str, status: int, seconds: float, exception: bool) -> None:
        """Count one finished HTTP request now. O(1), independent of the number of routes."""
        with self._lock:
            self._count(((route, method, status, seconds, exception),))

    def flush(self, *, wait: bool = True) -> None:
        """Count the queued requests.

        ``wait=False`` (the app's thread) returns at once when another thread
        holds the lock: it is counting them or taking a snapshot.
        """
        if not self.pending or not self._lock.acquire(blocking=wait):
            return
        try:
            self._count_pending()
        finally:
            self._lock.release()

    def _count_pending(self) -> None:
        pending = self.pending
        take = pending.popleft
        self._count(take() for _ in range(len(pending)) if pending)  # only lock holders take

    def _count(self, finished: Iterable[tuple[Any, str, int, float, bool]]) -> None:
        routes = self._routes
        for key, method, status, seconds, exception in finished:
            try:
                if isinstance(key, str):
                    route = key
                else:  # a Starlette route that served a request with no mount on the way
                    route = getattr(key, "path_format", None) or UNMATCHED
                    if route.endswith("/{path}") and getattr(key, "path", None) == "":
                        route = UNMATCHED  # under Mount("/"), a request nothing inside matched
                rs = routes.get(route)
                if rs is None:
                    rs = routes[route] = RouteStats()
                cls = status // 100
                rs.by_status[cls if 0 < cls < 6 else 5] += 1
                by_method = rs.by_method
                if method in by_method:
                    by_method[method] += 1
                else:
                    by_method["OTHER"] += 1
                if exception:
                    rs.exceptions += 1
                # LatencyHistogram.record, inlined.
                hist = rs.latency
                i = _ceil(_log(seconds if seconds > _MIN_VALUE else _MIN_VALUE) * _INV_LOG_GAMMA)
                buckets = hist.buckets
                buckets[i] = buckets.get(i, 0) + 1
                hist.count += 1
                hist.sum += seconds
                if seconds > hist.max:
                    hist.max = seconds
            except Exception:  # a request the app answered strangely must not fail another one
                logger.warning(
                    "a request could not be counted: %r", (key, method, status, seconds), exc_info=True
                )

    def snapshot(self, *, routes: bool = True) -> dict[str, Any]:
        """The stable ``stats`` payload (keys documented in README)."""
        now = time.time()
        with self._lock:  # what is queued is counted, and nothing counted while copying
            self._count_pending()
            route_payloads = {name: rs.to_payload() for name, rs in self._routes.items()}
        by_status: dict[str, int] = {}
        by_method: dict[str, int] = {}
        for rp in route_payloads.values():
            for key, n in rp["by_status"].items():
                by_status[key] = by_status.get(key, 0) + n
            for key, n in rp["by_method"].items():
                by_method[key] = by_method.get(key, 0) + n
        payload: dict[str, Any] = {
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - self._started_mono,
            "started_at": self.started_at,
            "since_reset_s": now - self.reset_at,
            "requests_total": sum(rp["requests"] for rp in route_payloads.values()),
            "in_flight": self.in_flight,
            "exceptions_total": sum(rp["exceptions"] for rp in route_payloads.values()),
            "by_status": by_status,
            "by_method": by_method,
            "latency": merge_histograms(rp["latency"] for rp in route_payloads.values()),
            "websockets": {"active": self.websockets_active, "total": self.websockets_total},
            "process": {
                **process_figures(),
                "loop_lag_s": self.loop_lag_s,
                "loop_lag_max_s": self.loop_lag_max_s,
            },
        }
        if routes:
            payload["routes"] = route_payloads
        return payload


def process_figures() -> dict[str, Any]:
    """RSS, open file descriptors, threads and CPU time of this process."""
    figures: dict[str, Any] = {"rss_bytes": None, "open_fds": None, "threads": None}
    try:
        with open("/proc/self/statm") as f:
            figures["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        figures["rss_bytes"] = usage * (1 if sys.platform == "darwin" else 1024)
    try:
        figures["open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    try:
        figures["threads"] = len(os.listdir("/proc/self/task"))
    except OSError:
        pass
    rusage = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_s"] = rusage.ru_utime + rusage.ru_stime
    return figures
