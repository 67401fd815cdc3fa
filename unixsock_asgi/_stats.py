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
import itertools
import logging
import math
import os
import resource
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
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
_ROUTE_NAMES_LIMIT = 10000  # distinct route objects remembered (an app has a fixed set)
_QUANTILES = (("p50_s", 0.5), ("p90_s", 0.9), ("p99_s", 0.99))


def _bucket(value: float) -> int:
    if value < _MIN_VALUE:
        value = _MIN_VALUE
    elif value > _MAX_VALUE:
        value = _MAX_VALUE
    return _ceil(_log(value) * _INV_LOG_GAMMA)


_MIN_BUCKET = _bucket(_MIN_VALUE)
_MAX_BUCKET = _bucket(_MAX_VALUE)
_UPPER = [GAMMA**i for i in range(_MIN_BUCKET, _MAX_BUCKET + 1)]
"""``_UPPER[i - _MIN_BUCKET]``: the largest value of bucket ``i``."""


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

    def record_many(self, values: list[float]) -> None:
        """Add many observations; sorts ``values`` in place.

        Sorted, the values of one bucket are a run found by bisection: the
        work is one step per bucket the values fall in, not one per value.
        """
        if not values:
            return
        values.sort()
        n = len(values)
        buckets = self.buckets
        pos = 0
        while pos < n:
            i = _bucket(values[pos])
            end = n if i >= _MAX_BUCKET else bisect_right(values, _UPPER[i - _MIN_BUCKET], pos + 1)
            if _bucket(values[end - 1]) != i or (end < n and _bucket(values[end]) == i):
                # Within an ulp of a boundary, GAMMA**i and the logarithm can
                # disagree: the logarithm (what record() uses) decides.
                end = bisect_right(values, i, pos + 1, n, key=_bucket)
            buckets[i] = buckets.get(i, 0) + end - pos
            pos = end
        self.count += n
        self.sum += sum(values)
        if values[-1] > self.max:
            self.max = values[-1]

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

    __slots__ = ("by_method", "by_status", "exceptions", "latency", "unbucketed")

    def __init__(self) -> None:
        self.exceptions = 0
        self.by_status = [0, 0, 0, 0, 0, 0]  # index = status // 100
        # Every key present from the start: one lookup and one store per request.
        self.by_method: dict[str, int] = dict.fromkeys(_METHOD_KEYS, 0)
        self.latency = LatencyHistogram()
        self.unbucketed: list[float] = []
        """Latencies counted but not yet put in the histogram's buckets (see Stats)."""

    @property
    def requests(self) -> int:
        """Requests finished: every one is one latency observation."""
        return self.latency.count + len(self.unbucketed)

    def bucket_latencies(self) -> None:
        """Put the waiting latencies into the histogram."""
        if self.unbucketed:
            values, self.unbucketed = self.unbucketed, []
            self.latency.record_many(values)

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


FLUSH_EVERY = 1024
"""Finished requests the app's thread queues before it counts them, in one go (about 1 ms)."""
BUCKET_EVERY = 512
"""Latencies a route keeps unsorted before they are put in its histogram's buckets."""
UNBUCKETED_LIMIT = 16384
"""Latencies all routes together keep unsorted at most (about 0.5 MiB)."""

Finished = tuple[Any, str, int, float, bool]
"""A finished request: route template (or a Starlette route, for its ``path_format``),
method, status, seconds, whether the app raised."""
_Groups = tuple[
    Mapping[tuple[str, int], int],  # requests by (route, status)
    Mapping[tuple[str, str], int],  # by (route, method)
    Mapping[str, int],  # exceptions by route
    dict[str, Sequence[float]],  # latencies by route
]


class Stats:
    """Everything one process has counted since start (or the last reset).

    The middleware queues each finished request on :attr:`pending` (one
    append; the queue is a deque, whose appends and pops are atomic) and
    counts the queue every ``FLUSH_EVERY`` requests, under a lock. A batch
    is counted in a few passes that run in C (transposed, grouped with a
    ``Counter``), then one Python step per group, so the per-request cost is
    a small fraction of counting requests one by one. Latencies wait in a
    list per route and are put in buckets ``BUCKET_EVERY`` at a time,
    sorted, one step per bucket (and all of them when ``UNBUCKETED_LIMIT``
    wait). Snapshots count what is queued and bucket
    what waits first, under the same lock, so counts are exact. Only
    per-route counters are kept; process totals are derived in snapshots.
    """

    def __init__(self) -> None:
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.loop_lag_s = 0.0
        self.loop_lag_max_s = 0.0
        self.started = 0
        """HTTP requests the middleware has started (never reset)."""
        self._dequeued = 0
        self.websockets_active = 0
        self.pending: collections.deque[Finished] = collections.deque()
        """Finished requests waiting to be counted (the middleware appends here)."""
        # Re-entrant: a signal handler on the app's thread may take a snapshot
        # while that thread is counting.
        self._lock = threading.RLock()
        self._routes: dict[str, RouteStats] = {}
        self._unbucketed = 0
        self._counting = False  # a batch is being counted (re-entry would split it)
        self._route_names: dict[int, str] = {}
        self._route_objects: list[Any] = []  # keeps the ids in _route_names from being reused
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
            self._unbucketed = 0
            self.websockets_total = 0
            return before

    @property
    def in_flight(self) -> int:
        """HTTP requests started and not finished yet."""
        with self._lock:
            # Finished first: a request that finishes meanwhile then counts as
            # in flight, never the other way round (``drain`` relies on it).
            finished = self._dequeued + len(self.pending)
            return self.started - finished

    @property
    def routes(self) -> dict[str, RouteStats]:
        """Counters by route template, every finished request counted and bucketed."""
        with self._lock:
            self._settle()
            return self._routes

    def record(self, route: str, method: str, status: int, seconds: float, exception: bool) -> None:
        """Count one finished HTTP request now. O(1), independent of the number of routes."""
        seconds = float(seconds)
        if not 0.0 <= seconds < math.inf:
            raise ValueError(f"a request cannot take {seconds!r} seconds")
        with self._lock:
            self._count([(route, method, status, seconds, exception)])

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

    def _settle(self) -> None:
        """Count what is queued and bucket every latency (lock held)."""
        if self._counting:  # re-entered (a signal handler's snapshot): leave it to the counting frame
            return
        self._count_pending()
        self._bucket_all()

    def _bucket_all(self) -> None:
        for rs in self._routes.values():
            rs.bucket_latencies()
        self._unbucketed = 0

    def _count_pending(self) -> None:
        if self._counting:  # re-entered on this thread (the lock is re-entrant): see _settle
            return
        pending = self.pending
        # Only lock holders take, so the queue holds at least this many.
        batch = list(itertools.starmap(pending.popleft, itertools.repeat((), len(pending))))
        self._dequeued += len(batch)
        if batch:
            self._counting = True
            try:
                self._count(batch)
            finally:
                self._counting = False

    def _count(self, batch: Sequence[Finished]) -> None:
        try:
            groups = self._group(batch)
        except Exception:
            # Something in the batch cannot be counted: count the rest one by one.
            logger.debug("counting a batch of %d one by one", len(batch), exc_info=True)
            for finished in batch:
                try:
                    groups = self._group((finished,))
                except Exception:  # a request the app answered strangely must not fail another one
                    logger.warning("a request could not be counted: %r", finished, exc_info=True)
                else:
                    self._add(groups)
            return
        self._add(groups)

    def _group(self, batch: Sequence[Finished]) -> _Groups:
        """Group finished requests; change no counter, so a failure leaves no half-counted batch.

        The passes over the whole batch run in C, and their number follows
        the variety in the batch: a column whose values are all the same (one
        route, one method, one status) is not grouped by at all.
        """
        keys, methods, statuses, seconds, raised = zip(*batch, strict=True)
        # Route objects are not hashable: they are told apart by id (the batch keeps them alive).
        ids = list(map(id, keys))
        n = len(ids)
        names: list[str]
        latencies: dict[str, Sequence[float]]
        if ids.count(ids[0]) == n:  # all one route
            route = self._route_name(keys[0])
            requests: Mapping[str, int] = {route: n}
            names = [route] * n
            latencies = {route: seconds}
        else:
            name_of = {
                ident: self._route_name(key) for ident, key in dict(zip(ids, keys, strict=True)).items()
            }
            names = list(map(name_of.__getitem__, ids))
            requests = collections.Counter(names)
            lists: dict[str, list[float]] = {name: [] for name in requests}
            append = {name: values.append for name, values in lists.items()}
            for name, value in zip(names, seconds, strict=True):
                append[name](value)
            latencies = dict(lists)
        for kind in set(map(type, statuses)):  # 200.0 would be grouped with 200
            if not issubclass(kind, int):
                raise TypeError(f"a status is a {kind.__name__}, not an int")
        by_status = _joint(requests, names, statuses)
        by_method = _joint(requests, names, methods)
        exceptions = collections.Counter(itertools.compress(names, raised)) if True in raised else {}
        return by_status, by_method, exceptions, latencies

    def _route_name(self, key: Any) -> str:
        """The route template a queued request is counted under (cached by route object)."""
        if isinstance(key, str):
            return key
        known = self._route_names
        name = known.get(id(key))
        if name is None:
            if len(known) >= _ROUTE_NAMES_LIMIT:  # an app has a fixed set: something makes routes per request
                known.clear()
                self._route_objects.clear()
            name = known[id(key)] = _template_of(key)
            self._route_objects.append(key)  # keeps the id from being reused
        return name

    def _add(self, groups: _Groups) -> None:
        by_status, by_method, exceptions, latencies = groups
        routes = self._routes
        for route in latencies:  # every route of the batch
            if route not in routes:
                routes[route] = RouteStats()
        for (route, status), n in by_status.items():
            status_class = status // 100
            routes[route].by_status[status_class if 0 < status_class < 6 else 5] += n
        for (route, method), n in by_method.items():
            counts = routes[route].by_method
            counts[method if method in counts else "OTHER"] += n
        for route, n in exceptions.items():
            routes[route].exceptions += n
        unbucketed = self._unbucketed
        for route, seconds in latencies.items():
            rs = routes[route]
            waiting = rs.unbucketed
            waiting.extend(seconds)
            unbucketed += len(seconds)
            if len(waiting) >= BUCKET_EVERY:
                unbucketed -= len(waiting)
                rs.bucket_latencies()
        self._unbucketed = unbucketed
        if unbucketed >= UNBUCKETED_LIMIT:
            self._bucket_all()

    def snapshot(self, *, routes: bool = True) -> dict[str, Any]:
        """The stable ``stats`` payload (keys documented in README)."""
        now = time.time()
        with self._lock:  # what is queued is counted, and nothing counted while copying
            self._settle()
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


def _joint(
    requests: Mapping[str, int], names: list[str], values: Sequence[Any]
) -> Mapping[tuple[str, Any], int]:
    """How many requests each (route, value) has: ``requests`` alone when every value is the same."""
    if values.count(values[0]) == len(values):
        first = values[0]
        return {(route, first): n for route, n in requests.items()}
    return collections.Counter(zip(names, values, strict=True))


def _template_of(key: Any) -> str:
    """The route template a queued request is counted under."""
    if isinstance(key, str):
        return key
    # A Starlette route (or FastAPI route context) that served a request with
    # no mount on the way; None when no route matched.
    name = getattr(key, "path_format", None) or UNMATCHED
    if not isinstance(name, str):
        raise TypeError(f"route {key!r} has no path_format string")
    if name.endswith("/{path}") and getattr(key, "path", None) == "":
        return UNMATCHED  # under Mount("/"), a request nothing inside matched
    return name


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
