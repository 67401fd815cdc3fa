"""Request statistics: exact counters and mergeable log-bucketed latency histograms.

Finished requests are grouped by the app's thread as they finish and counted
one group at a time under a lock (see :class:`Stats`), so counts are exact
whichever thread reads them.

The histogram is DDSketch-style: a value ``v`` (seconds) goes to bucket
``ceil(log(v) / log(GAMMA))`` and is reported as the bucket's midpoint
``2 * GAMMA**i / (GAMMA + 1)``, so every quantile is within ``RELATIVE_ERROR``
of a true sample. Buckets are fixed, so histograms from many processes merge
exactly by adding counts, and percentiles are computed after the merge.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from itertools import accumulate
from operator import itemgetter
from typing import Any

__all__ = [
    "GAMMA",
    "OTHER_ROUTES",
    "RELATIVE_ERROR",
    "ROUTES_LIMIT",
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
OTHER_ROUTES = "<other>"
"""Route key of requests under route names beyond ``ROUTES_LIMIT`` distinct ones."""
ROUTES_LIMIT = 1000
"""Distinct route names counted apart (besides ``UNMATCHED`` and what the gate
records): an app has a fixed set of templates, but prefixes made by something
other than Starlette's mounts could grow them (and the ``stats`` payload)
without bound."""

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Methods are client-controlled: anything else is counted as OTHER, so that a
# client cannot grow the counters without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_METHOD_KEYS = (*sorted(_METHODS), "OTHER")
_ROUTE_NAMES_LIMIT = 10000  # distinct route objects remembered (an app has a fixed set)
_QUANTILES = (("p50_s", 0.5), ("p90_s", 0.9), ("p99_s", 0.99))
_QUANTILE_LEVELS = tuple(q for _, q in _QUANTILES)


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


def within(value: float, smallest: float, largest: float) -> float:
    """A bucket's ``value`` kept within the observations' range, where it is known
    (``smallest`` inf or 0.0, ``largest`` 0.0: not known); the largest wins."""
    if smallest < math.inf and value < smallest:
        value = smallest
    if largest and value > largest:
        value = largest
    return value


class LatencyHistogram:
    """A sparse histogram over fixed logarithmic buckets (seconds)."""

    __slots__ = ("buckets", "count", "max", "min", "sum")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count: int = 0
        self.sum: float = 0.0
        self.max: float = 0.0
        self.min: float = math.inf
        """The smallest observation; inf while there is none, 0.0 when unknown (merged with
        a payload of a version that did not send it)."""

    def record(self, seconds: float) -> None:
        """Add one observation."""
        # The range first: a snapshot a signal handler takes midway sees it wider, never
        # narrower than the buckets (a stale min would lift a quantile far above its bucket).
        if seconds > self.max:
            self.max = seconds
        if seconds < self.min:
            self.min = seconds
        i = _bucket(seconds)
        b = self.buckets
        b[i] = b.get(i, 0) + 1
        self.count += 1
        self.sum += seconds

    def record_many(self, values: list[float], also: LatencyHistogram | None = None) -> None:
        """Add many observations (to ``also`` too, when given); sorts ``values`` in place.

        Sorted, the values of one bucket are a run found by bisection: the
        work is one step per bucket the values fall in, not one per value.
        """
        if not values:
            return
        values.sort()
        for hist in (self, also) if also is not None else (self,):  # the range first (see record)
            if values[-1] > hist.max:
                hist.max = values[-1]
            if values[0] < hist.min:
                hist.min = values[0]
        n = len(values)
        buckets = self.buckets
        other = also.buckets if also is not None else None
        pos = 0
        while pos < n:
            i = _bucket(values[pos])
            end = n if i >= _MAX_BUCKET else bisect_right(values, _UPPER[i - _MIN_BUCKET], pos + 1)
            if _bucket(values[end - 1]) != i or (end < n and _bucket(values[end]) == i):
                # Within an ulp of a boundary, GAMMA**i and the logarithm can
                # disagree: the logarithm (what record() uses) decides.
                end = bisect_right(values, i, pos + 1, n, key=_bucket)
            buckets[i] = buckets.get(i, 0) + end - pos
            if other is not None:
                other[i] = other.get(i, 0) + end - pos
            pos = end
        total = sum(values)
        self.count += n
        self.sum += total
        if also is not None:
            also.count += n
            also.sum += total

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's counts to this one."""
        for i, c in list(other.buckets.items()):
            self.buckets[i] = self.buckets.get(i, 0) + c
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1), within RELATIVE_ERROR; None when empty.

        Nearest rank: the bucket of the ``ceil(q * n)``-th smallest value. With
        it, the quantile of merged histograms lies between the workers' own, give
        or take a bucket (a worker's is capped at its own max; an interpolated
        rank could put the fleet's p99 far above every worker's). Kept within the
        smallest and the largest observation: a bucket's value may lie beyond both
        (a route that always sleeps 200 ms would read p50 194 ms).
        """
        return self._quantiles((q,))[0]

    def _quantiles(
        self, qs: tuple[float, ...], items: list[tuple[int, int]] | None = None
    ) -> list[float | None]:
        """:meth:`quantile` of each of ``qs``; ``items`` are the buckets' sorted items, if at hand."""
        if items is None:
            items = sorted(self.buckets.items())
        cumulative = list(accumulate(map(itemgetter(1), items)))
        total = cumulative[-1] if cumulative else 0
        if total <= 0:
            return [None] * len(qs)
        found: list[float | None] = []
        for q in qs:
            # The first bucket whose running count reaches the rank.
            at = min(bisect_left(cumulative, max(1, math.ceil(q * total))), len(items) - 1)
            found.append(within(_bucket_value(items[at][0]), self.min, self.max))
        return found

    def to_payload(self) -> dict[str, Any]:
        """JSON form: counts by bucket index plus the figures derived from them."""
        buckets = dict(self.buckets)  # atomic copy; recording may go on meanwhile
        items = sorted(buckets.items())
        hist = LatencyHistogram()
        hist.buckets = buckets
        hist.count = sum(buckets.values())
        hist.max, hist.min = self.max, self.min
        payload: dict[str, Any] = {
            "count": hist.count,
            "sum_s": self.sum,
            "min_s": self.min if self.min < math.inf else 0.0,
            "max_s": self.max,
            "gamma": GAMMA,
            "buckets": list(map(list, items)),
        }
        for (key, _), value in zip(_QUANTILES, hist._quantiles(_QUANTILE_LEVELS, items), strict=True):
            payload[key] = value
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild a histogram from :meth:`to_payload` output (of any process); ValueError
        when it cannot be merged with this version's (see :func:`histogram_problem`)."""
        hist = cls()
        hist._add_payload(payload)
        return hist

    def _add_payload(self, payload: Mapping[str, Any], *, checked: bool = False) -> None:
        """Add a payload's counts (checked by :func:`histogram_problem` unless ``checked``)."""
        if not checked and (problem := histogram_problem(payload)):
            raise ValueError(problem)
        buckets = self.buckets
        added = False
        for i, c in payload.get("buckets", ()):
            if c > 0:  # a count below one (a malformed payload) adds nothing
                buckets[i] = buckets.get(i, 0) + c
                added = True
        self.count = sum(buckets.values())
        self.sum += float(payload.get("sum_s", 0.0))
        self.max = max(self.max, float(payload.get("max_s", 0.0)))
        if added:  # from a version without min_s: no floor is known any more
            self.min = min(self.min, float(payload.get("min_s", 0.0)))


_MAX_COUNT = 2**53
"""A count a double holds exactly; another server's JSON may carry bigger integers."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def histogram_problem(payload: Any) -> str:
    """Why a histogram payload (another process's) cannot be merged with this version's, or "".

    The same buckets (``gamma``; indices within this version's range: another
    scheme's, or 100,000, whose value overflows a float, are not), integer
    counts and finite sums. A check, not a rebuild: a fleet's ``stats`` makes one
    for every route of every worker.
    """
    if not isinstance(payload, Mapping):
        return "a latency histogram is not an object"
    gamma = payload.get("gamma", GAMMA)
    if not _is_number(gamma) or not math.isclose(gamma, GAMMA, rel_tol=1e-9):
        return f"histogram uses gamma {gamma!r}, this version uses {GAMMA}"
    buckets = payload.get("buckets", ())
    if not isinstance(buckets, (list, tuple)):
        return f"its buckets are {type(buckets).__name__}, not a list"
    for pair in buckets:
        if (
            type(pair) not in (list, tuple)
            or len(pair) != 2
            or type(pair[0]) is not int
            or type(pair[1]) is not int
        ):
            return f"bucket {pair!r} is not a pair of integers"
        if not -_MAX_COUNT <= pair[1] <= _MAX_COUNT:  # replies may carry integers beyond a double
            return f"bucket {pair[0]} counts {pair[1]}, more than {_MAX_COUNT}"
        if not _MIN_BUCKET <= pair[0] <= _MAX_BUCKET:
            return f"bucket index {pair[0]} is out of range ({_MIN_BUCKET} to {_MAX_BUCKET})"
    low, high = payload.get("min_s", 0.0), payload.get("max_s", 0.0)
    if _is_number(low) and _is_number(high) and (low < 0 or (high > 0 and low > high)):
        return f"its min_s {low!r} does not fit its max_s {high!r}"
    for key in ("sum_s", "min_s", "max_s"):
        if not _is_number(payload.get(key, 0.0)):
            return f"its {key} is {payload.get(key)!r}, not a number"
    return ""


def merge_histograms(payloads: Iterable[Mapping[str, Any]], *, checked: bool = False) -> dict[str, Any]:
    """Merge histogram payloads by bucket and recompute percentiles from the merge.

    ValueError on a payload :func:`histogram_problem` refuses, unless ``checked``
    says every one passed it already.
    """
    merged = LatencyHistogram()
    for payload in payloads:
        merged._add_payload(payload, checked=checked)
    return merged.to_payload()


class RouteStats:
    """Counters of one route template."""

    __slots__ = ("by_method", "by_status", "exceptions", "latency", "requests", "unbucketed")

    def __init__(self) -> None:
        self.requests = 0
        """Requests counted: one store, so that a snapshot taken in the middle of counting
        (a signal handler's) never sees latencies on their way into the buckets twice or not at all."""
        self.exceptions = 0
        self.by_status = [0, 0, 0, 0, 0, 0]  # index = status // 100
        # Every key present from the start: one lookup and one store per group.
        self.by_method: dict[str, int] = dict.fromkeys(_METHOD_KEYS, 0)
        self.latency = LatencyHistogram()
        self.unbucketed: list[float] = []
        """Latencies counted but not yet put in the histogram's buckets (see Stats)."""

    def bucket_latencies(self, total: LatencyHistogram | None = None) -> None:
        """Put the waiting latencies into the histogram (and into ``total``'s)."""
        if self.unbucketed:
            values, self.unbucketed = self.unbucketed, []
            self.latency.record_many(values, total)

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


LIVE_LIMIT = 512
"""Durations one group (route, method, status, raised) holds before the app's thread counts every group."""
KEY_LIMIT = 1024
"""Groups the app's thread keeps before it counts them all."""
ROTATE_PATIENCE = 64
"""Times in a row the app's thread finds the lock taken (other threads counting or
taking snapshots) and goes on, before it waits for it: the live groups stay bounded."""
BUCKET_EVERY = 512
"""Latencies a route keeps unsorted before they are put in its histogram's buckets."""
UNBUCKETED_LIMIT = 16384
"""Latencies all routes together keep unsorted at most (about 0.5 MiB)."""

Key = tuple[Any, Any, Any, bool]
"""What finished requests are grouped by as they finish: the route's template, or
its id when it is a route object (Starlette's are unhashable); method; status;
whether the app raised."""


class Stats:
    """Everything one process has counted since start (or the last reset).

    Finished requests are grouped as they finish, by the app's thread alone:
    :attr:`live` maps (route, method, status, raised) to a list of the
    route and the durations of its requests, so that recording a request is
    one dict lookup and one append (:meth:`add`; the middleware inlines it).
    Counting is then one step per group, not per request: the app's thread
    counts everything when a group holds ``LIVE_LIMIT`` durations or there
    are ``KEY_LIMIT`` groups, and starts afresh (:meth:`rotate`; when other
    threads hold the lock, it tries again on the next request, and after
    ``ROTATE_PATIENCE`` tries waits for the lock). Any thread
    may count what is live meanwhile (a snapshot does, first, under the lock,
    so counts are exact): the groups' lists only grow, so it counts each
    list up to its current length and remembers how far it got. Latencies
    wait in a list per route and are put in buckets ``BUCKET_EVERY`` at a
    time, sorted, one step per bucket (all of them when ``UNBUCKETED_LIMIT``
    wait). The process totals are added up as the routes are counted, so
    that a snapshot without routes costs the same whatever their number.

    A snapshot or reset made by a signal handler on the app's thread while
    that thread is counting sees the counters as they stand: a group may be
    half counted (its requests in ``requests_total``, their latencies not yet
    in ``latency``), and a reset then may lose that group.
    """

    def __init__(self) -> None:
        self.started_at: float = time.time()
        self.reset_at: float = self.started_at  # reset() below sets it again
        self._started_mono = time.monotonic()
        self.loop_lag_s: float = 0.0
        self.loop_lag_max_s: float = 0.0
        self.loop_lag_total_s: float = 0.0
        """Every measured lag added up (a counter): its rate is the share of time the loop ran late."""
        self.started = 0
        """HTTP requests the middleware has started (never reset)."""
        self._finished = 0  # HTTP requests the middleware has finished and that are counted (never reset)
        self.websockets_active = 0
        self.live: dict[Key, list[Any]] = {}
        """Finished requests not counted yet: key -> [route, seconds, seconds, ...]. Only the app's thread adds."""
        self._taken: dict[Key, int] = {}  # how far each list of ``live`` is counted
        self._missed = 0  # rotations given up in a row because the lock was taken
        # Re-entrant: a signal handler on the app's thread may take a snapshot
        # while that thread is counting.
        self._lock = threading.RLock()
        self._routes: dict[str, RouteStats] = {}
        self._total = RouteStats()  # every route's counters added up (its ``unbucketed`` stays empty)
        self._unbucketed = 0
        self._counting = False  # counting is under way on this thread (re-entry would split it)
        self._route_names: dict[int, str] = {}
        self._route_objects: list[Any] = []  # keeps the ids in _route_names from being reused
        self.resets: int = -1
        """How many times :meth:`reset` has run (``stats_reset``): the one below is not counted."""
        self.reset()

    def restart_clock(self) -> None:
        """Count uptime from now: for a process forked after these stats were made
        (and ``since_reset_s`` too: this process has not reset them before it started)."""
        self.started_at = self.reset_at = time.time()
        self._started_mono = time.monotonic()

    def reset(self) -> int:
        """Zero every counter; in-flight gauges and the start time are kept.

        Returns how many requests had been counted (live ones included).
        """
        with self._lock:
            self._count_live()
            before = self._total.requests
            self.reset_at = time.time()
            self.resets += 1
            self._routes = {}
            self._total = RouteStats()
            self._unbucketed = 0
            self.websockets_total = 0
            return before

    @property
    def in_flight(self) -> int:
        """HTTP requests started and not finished yet."""
        with self._lock:
            self._count_live()
            # Finished first: a request that finishes meanwhile then counts as
            # in flight, never the other way round (``drain`` relies on it).
            finished = self._finished
            return self.started - finished

    @property
    def routes(self) -> dict[str, RouteStats]:
        """Counters by route template, every finished request counted and bucketed."""
        with self._lock:
            self._settle()
            return self._routes

    def add(self, route: Any, method: str, status: int, seconds: float, raised: bool) -> None:
        """Record a request the middleware started (``started``) that finished: the app's thread only.

        ``route`` is a template or a route object whose ``path_format`` is
        one. The middleware does the same inline, for speed.
        """
        key = (route if isinstance(route, str) else id(route), method, status, raised)
        try:
            values = self.live[key]
        except KeyError:
            self.add_group(key, route, seconds)
        except Exception:  # an unhashable status, or one whose hash fails
            self.refuse(key)
        else:
            values.append(seconds)
            if len(values) > LIVE_LIMIT:
                self.rotate()

    def add_group(self, key: Key, route: Any, seconds: float) -> None:
        """Start the group of a request whose key is not live yet (see :meth:`add`)."""
        if len(self.live) >= KEY_LIMIT:
            self.rotate()
        try:
            self.live[key] = [route, seconds]
        except Exception:  # a status whose comparison fails
            self.refuse(key)

    def refuse(self, key: Any) -> None:
        """A finished request that cannot be grouped (an unhashable status): finished, not counted."""
        try:
            described = repr(key)
        except Exception:
            described = f"a key of {', '.join(type(part).__name__ for part in key)}"
        logger.warning("a request could not be counted: %s", described)
        with self._lock:
            self._finished += 1

    def record(self, route: str, method: str, status: int, seconds: float, exception: bool) -> None:
        """Count one HTTP request now (from any thread), apart from ``started``: a 503 the gate sent."""
        seconds = float(seconds)
        if not 0.0 <= seconds < math.inf:
            raise ValueError(f"a request cannot take {seconds!r} seconds")
        with self._lock:
            self._count_group((route, method, status, exception), route, [seconds], capped=False)
            self._bucket_if_many()

    def flush(self, *, wait: bool = True) -> None:
        """Count the finished requests, from any thread.

        ``wait=False`` returns at once when another thread holds the lock:
        it is counting them or taking a snapshot.
        """
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._count_live()
        finally:
            self._lock.release()

    def rotate(self) -> None:
        """Count every live group and start afresh: the app's thread only (the one that adds).

        Returns at once when another thread holds the lock, so that the next
        request tries again, unless ``ROTATE_PATIENCE`` tries in a row found
        it taken: then it waits.
        """
        if not self._lock.acquire(blocking=self._missed >= ROTATE_PATIENCE):
            self._missed += 1
            return
        self._missed = 0
        try:
            if self._counting:  # re-entered: the counting frame finishes the groups
                return
            live, taken = self.live, self._taken
            self.live, self._taken = {}, {}
            self._count_groups(live, taken)
        finally:
            self._lock.release()

    def _settle(self) -> None:
        """Count what is live and bucket every latency (lock held)."""
        if self._counting:  # re-entered (a signal handler's snapshot): leave it to the counting frame
            return
        self._count_live()
        self._bucket_all()

    def _bucket_all(self) -> None:
        total = self._total.latency
        for rs in self._routes.values():
            if rs.unbucketed:
                rs.bucket_latencies(total)
        self._unbucketed = 0

    def _bucket_if_many(self) -> None:
        if self._unbucketed >= UNBUCKETED_LIMIT:
            self._bucket_all()

    def _count_live(self) -> None:
        """Count the live groups up to their current lengths (lock held, any thread)."""
        if not self._counting:  # else re-entered on this thread (the lock is re-entrant): see _settle
            self._count_groups(self.live, self._taken)

    def _count_groups(self, live: dict[Key, list[Any]], taken: dict[Key, int]) -> None:
        self._counting = True
        try:
            # One C call: the app's thread may add a group meanwhile. The lists
            # only grow, so each is counted up to its length now, once.
            for key, values in list(live.items()):
                first = taken.get(key, 1)
                end = len(values)
                if end > first:
                    taken[key] = end
                    self._finished += end - first
                    self._count_group(key, values[0], values[first:end])
            self._bucket_if_many()
        finally:
            self._counting = False

    def _count_group(self, key: Key, route: Any, seconds: list[float], *, capped: bool = True) -> None:
        """Count requests that share a key: O(1) but for putting aside their durations."""
        _, method, status, raised = key
        try:
            name = self._route_name(route)
            status_class = _status_class(status)
        except Exception:  # what the app sent strangely must not fail another request's counting
            logger.warning(
                "%d request(s) could not be counted: route %r, status %r",
                len(seconds),
                route,
                status,
                exc_info=True,
            )
            return
        rs = self._routes.get(name)
        if rs is None:
            if capped and len(self._routes) >= ROUTES_LIMIT and name != UNMATCHED:
                if OTHER_ROUTES not in self._routes:
                    logger.warning(
                        "more than %d distinct routes: %r and any further ones are counted as %r",
                        ROUTES_LIMIT,
                        name,
                        OTHER_ROUTES,
                    )
                name = OTHER_ROUTES
                rs = self._routes.get(name)
            if rs is None:
                rs = self._routes[name] = RouteStats()
        n = len(seconds)
        method_key = method if method in _METHODS else "OTHER"
        # Read once: a reset by a signal handler meanwhile must not get this
        # route's latencies into its fresh totals without the requests.
        total = self._total
        for counted in (rs, total):  # the route's counters, and the process totals
            counted.requests += n
            counted.by_status[status_class] += n
            counted.by_method[method_key] += n
            if raised:
                counted.exceptions += n
        waiting = rs.unbucketed
        waiting.extend(seconds)
        if len(waiting) >= BUCKET_EVERY:
            self._unbucketed = max(0, self._unbucketed - (len(waiting) - n))
            rs.bucket_latencies(total.latency)
        else:
            self._unbucketed += n

    def _route_name(self, key: Any) -> str:
        """The route template requests are counted under (cached by route object)."""
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

    def snapshot(self, *, routes: bool = True) -> dict[str, Any]:
        """The stable ``stats`` payload (keys documented in README)."""
        now = time.time()
        # The totals are kept as routes are counted, so that a snapshot
        # without routes (what ``top`` and ``ls`` ask for) costs the same
        # whatever the number of routes.
        with self._lock:  # what is live is counted, and nothing counted while copying
            self._settle()
            totals = self._total.to_payload()
            route_payloads = {name: rs.to_payload() for name, rs in self._routes.items()} if routes else {}
        payload: dict[str, Any] = {
            "pid": os.getpid(),
            "ppid": os.getppid(),  # the master: two of them in one directory is an upgrade under way
            "uptime_s": time.monotonic() - self._started_mono,
            "started_at": self.started_at,
            "since_reset_s": now - self.reset_at,
            "resets": self.resets,
            "requests_total": totals["requests"],
            "in_flight": self.in_flight,
            "exceptions_total": totals["exceptions"],
            "by_status": totals["by_status"],
            "by_method": totals["by_method"],
            "latency": totals["latency"],
            "websockets": {"active": self.websockets_active, "total": self.websockets_total},
            "process": {
                **process_figures(),
                "loop_lag_s": self.loop_lag_s,
                "loop_lag_max_s": self.loop_lag_max_s,
                "loop_lag_total_s": self.loop_lag_total_s,
            },
        }
        if routes:
            payload["routes"] = route_payloads
        return payload


def _status_class(status: Any) -> int:
    """Index of ``status``'s class in ``RouteStats.by_status``: 1 to 5, anything out of range 5."""
    code = int(status)
    if code != status:  # "200", 200.5: the app sent something that is not a status
        raise TypeError(f"status {status!r} is not an integer")
    status_class = code // 100
    return status_class if 0 < status_class < 6 else 5


_MAX_WRAPPERS = 16


def routes_behind(mount: Any) -> Any:
    """A mount's routes, or those of the app it mounts behind middleware wrapped around it by hand.

    Starlette's ``Mount.routes`` are its app's (``Mount(middleware=...)``
    included); a ``Mount("/api", app=SomeMiddleware(sub_app))`` hides them, so
    the ``app`` attribute that pure ASGI middleware keep is followed, through
    at most ``_MAX_WRAPPERS`` of them.
    """
    app = mount
    for _ in range(_MAX_WRAPPERS + 2):  # the mount, its wrappers, the app
        try:
            routes = getattr(app, "routes", None)
            if isinstance(routes, list | tuple) and routes:
                return routes
            app = getattr(app, "app", None)
        except Exception:  # a property that fails: no routes to be found this way
            return None
        if app is None:
            break
    return None


def _template_of(key: Any) -> str:
    """The route template a group of requests is counted under."""
    if isinstance(key, str):
        return key
    # A Starlette route (or FastAPI route context) that served a request with
    # no mount on the way; None when no route matched.
    name = getattr(key, "path_format", None) or UNMATCHED
    if not isinstance(name, str):
        raise TypeError(f"route {key!r} has no path_format string")
    if name.endswith("/{path}") and getattr(key, "path", None) == "" and routes_behind(key):
        # Under Mount("/") of an app with routes (behind middleware too), a request none of
        # them matched; an app without (StaticFiles at "/") serves what it is given: "/{path}".
        return UNMATCHED
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
