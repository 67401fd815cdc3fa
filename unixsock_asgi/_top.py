"""``unixsock-asgi top``: a live, refreshing view of every worker (uwsgitop for ASGI).

Rates and latency percentiles are computed between two refreshes: requests/s
from the difference of each worker's request counter, p50/p99 from the
difference of its latency bucket counts (so they describe the last interval,
and the total row merges the workers' buckets before taking percentiles).

Plain ANSI, no curses: the screen is redrawn in place on a terminal, frames
are printed one after another without escape codes when ``TERM=dumb``, and
colour is left out under ``NO_COLOR``. ``q`` quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
import unicodedata
from collections.abc import Container, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from ._fleet import (
    STATUS_TIMEOUT,
    FanOutResult,
    Target,
    _is_count,
    fan_out,
    mark_foreign_stats,
    mark_unusable_stats,
    pid_from_socket_name,
)
from ._stats import LatencyHistogram, _is_number
from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    failure_summary,
    flagged_workers,
    format_bytes,
    format_count,
    format_duration,
    format_uptime,
    nobody_answered,
    one_line,
    terminal_safe,
)

__all__ = ["TopView", "run_top"]

_QUIT_KEYS = frozenset("qQ")
_ROUTES_KEYS = frozenset("rR")
GONE_SHOWN_S = 60.0
"""How long a worker that answered and then vanished (exited, recycled, killed) stays on the view."""
STATUS_GONE = "gone"
WIDE_COLUMNS = 83
"""Terminals wider than this get a ``4XX/S`` column (the view is 77 columns without it)."""
_NOBODY = object()
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Sample:
    """What one worker reported at one refresh."""

    at: float
    requests: int
    buckets: dict[int, int]
    epoch: Any = None
    """When its counters started (``started_at``) and how many times they were reset."""
    errors: int = 0
    """Its 5xx responses so far."""
    client_errors: int = 0
    """Its 4xx responses so far."""
    bounds: tuple[float, float] = (0.0, 0.0)
    """Its smallest and largest latency so far (0.0: not known); see :func:`_bounds`."""


@dataclass
class WorkerRow:
    """One line of the view: a worker's figures, with rates over the last interval."""

    pid: int | None
    socket: str
    status: str
    requests_per_s: float | None = None
    requests: Any = None
    in_flight: Any = None
    errors_5xx: Any = None
    errors_per_s: float | None = None
    """5xx responses per second over the last interval (what an error spike shows in)."""
    client_errors_per_s: float | None = None
    """4xx responses per second over the last interval (shown on terminals wide enough)."""
    exceptions: Any = None
    p50_s: float | None = None
    p99_s: float | None = None
    loop_lag_s: Any = None
    rss_bytes: Any = None
    uptime_s: Any = None
    interval_buckets: dict[int, int] | None = None
    latency_bounds: tuple[float, float] = (0.0, 0.0)
    last_answered: float | None = None
    """For a gone worker: when it last answered (``time.time()``)."""
    error: str = ""
    """Why a worker that did not answer success did not (shown after its status)."""


@dataclass
class _RouteSample:
    """One route's counters in one worker's answer."""

    requests: int
    errors: int
    buckets: dict[int, int]
    client_errors: int = 0
    bounds: tuple[float, float] = (0.0, 0.0)


@dataclass
class RouteRow:
    """One route's figures over the fleet: rates over the last interval, summed over the workers."""

    route: str
    requests: int = 0
    """Its requests since the workers started (or their last ``stats_reset``), every worker's."""
    requests_per_s: float | None = None
    errors_per_s: float | None = None
    client_errors_per_s: float | None = None
    """4xx responses per second: a link broken by a deploy, a client retrying a bad token."""
    interval_buckets: dict[int, int] = field(default_factory=dict)
    latency_bounds: list[tuple[float, float]] = field(default_factory=list)
    """Each worker's smallest and largest latency of this route, where it served it this interval."""


@dataclass
class _Gone:
    """A worker that answered at an earlier refresh and is no longer there."""

    row: WorkerRow
    missed_at: float


def _buckets(snapshot: Mapping[str, Any]) -> dict[int, int]:
    latency = snapshot.get("latency")
    if not isinstance(latency, Mapping):
        return {}
    return {int(i): int(c) for i, c in latency.get("buckets", [])}


def _bounds(snapshot: Mapping[str, Any]) -> tuple[float, float]:
    """The smallest and the largest latency a snapshot (or a route's figures) counted since its
    counters started: an interval's latencies lie within them. 0.0 where not known."""
    latency = snapshot.get("latency")
    if not isinstance(latency, Mapping):
        return (0.0, 0.0)
    low: Any = latency.get("min_s")
    high: Any = latency.get("max_s")
    return (
        float(low) if _is_number(low) and low > 0 else 0.0,
        float(high) if _is_number(high) and high > 0 else 0.0,
    )


def _merged_bounds(bounds: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The range of several workers' latencies: none known where one worker's is not."""
    pairs = list(bounds)
    lows, highs = [low for low, _ in pairs], [high for _, high in pairs]
    return (min(lows, default=0.0), 0.0 if 0.0 in highs else max(highs, default=0.0))


def _route_samples(snapshot: Mapping[str, Any]) -> dict[str, _RouteSample] | None:
    """A snapshot's routes (None when it was asked without them); routes it cannot use are left out."""
    routes = snapshot.get("routes")
    if not isinstance(routes, Mapping):
        return None
    samples = {}
    for name, figures in routes.items():
        if not isinstance(figures, Mapping):
            continue
        by_status = figures.get("by_status") if isinstance(figures.get("by_status"), Mapping) else {}
        assert isinstance(by_status, Mapping)
        requests: Any = figures.get("requests")
        errors: Any = by_status.get("5xx", 0)
        client_errors: Any = by_status.get("4xx", 0)
        if not (_is_count(requests) and _is_count(errors)):
            continue
        if not _is_count(client_errors):
            client_errors = 0
        try:
            buckets = _buckets(figures)
        except (TypeError, ValueError):
            buckets = {}
        samples[str(name)] = _RouteSample(
            int(requests), int(errors), buckets, int(client_errors), _bounds(figures)
        )
    return samples


def _add_routes(
    into: dict[str, RouteRow],
    now: dict[str, _RouteSample] | None,
    before: dict[str, _RouteSample] | None,
    seconds: float,
) -> None:
    """Add one worker's routes to the fleet's: its totals, and its rates over ``seconds`` since
    ``before`` (None: no figures of its routes to take a difference from)."""
    for name, sample in (now or {}).items():
        row = into.get(name)
        if row is None:
            row = into[name] = RouteRow(name)
        row.requests += sample.requests
        if before is None or seconds <= 0:
            continue
        then = before.get(name, _RouteSample(0, 0, {}))  # a route first served in this interval
        row.requests_per_s = (row.requests_per_s or 0.0) + max(0, sample.requests - then.requests) / seconds
        row.errors_per_s = (row.errors_per_s or 0.0) + max(0, sample.errors - then.errors) / seconds
        row.client_errors_per_s = (row.client_errors_per_s or 0.0) + max(
            0, sample.client_errors - then.client_errors
        ) / seconds
        served = False
        for i, c in sample.buckets.items():
            if c > then.buckets.get(i, 0):
                row.interval_buckets[i] = row.interval_buckets.get(i, 0) + c - then.buckets.get(i, 0)
                served = True
        if served:
            row.latency_bounds.append(sample.bounds)


def _reset(before: _Sample, after: _Sample) -> bool:
    """Whether the counters started afresh between two samples: ``stats_reset``, or a
    process restarted under the same pid (a container's), though the count went up."""
    return bool(before.epoch != after.epoch)


def _quantile(buckets: Mapping[int, int], q: float, bounds: tuple[float, float] = (0.0, 0.0)) -> float | None:
    """The ``q``-quantile of an interval's buckets, kept within ``bounds`` (see :func:`_bounds`)."""
    hist = LatencyHistogram()
    hist.buckets = dict(buckets)
    hist.count = sum(buckets.values())
    hist.min = bounds[0] or math.inf
    hist.max = bounds[1]
    return hist.quantile(q)


class TopView:
    """Turns successive ``stats`` fan-outs into frames of text."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._previous: dict[tuple[str, int | None], _Sample] = {}
        self._answered: dict[str, WorkerRow] = {}  # socket -> the row of its last answer
        self._gone: dict[tuple[str, int | None], _Gone] = {}
        self._last_now: float | None = None  # when the previous fan-out was folded in
        self.just_gone = 0
        """Workers gone since the previous refresh: what they served after their last answer is in no rate."""
        self.show_routes = False
        """Show the routes over the fleet instead of the workers (``r`` toggles; sampling asks for routes)."""
        self.routes: list[RouteRow] = []
        """The routes of the last refresh, busiest first (when the answers had routes)."""
        self._routes_previous: dict[tuple[str, int | None], dict[str, _RouteSample]] = {}
        self.routes_answered = 0
        """Workers whose last answer had their routes (one of an older version may not)."""

    def update(self, outcome: FanOutResult, now: float | None = None) -> list[WorkerRow]:
        """Fold in a new fan-out; return one row per worker, with deltas since the last one.

        A worker that answered before and is missing now (its socket removed or
        stale: it exited, was recycled or killed) follows as a ``gone`` row for
        :data:`GONE_SHOWN_S` seconds, with when it last answered.

        Rates are over the time between a worker's own answers (a fan-out that
        waited for a hung worker's timeout must not stretch the others'), unless
        ``now`` is given: then it stands for every answer's time.
        """
        given = now
        now = time.monotonic() if now is None else now
        self.just_gone = 0
        rows = []
        seen: dict[tuple[str, int | None], _Sample] = {}
        listed = {r.socket for r in outcome.results}
        answering = {r.socket: r.pid for r in outcome.results if r.ok and isinstance(r.payload, Mapping)}
        for socket, last in self._answered.items():
            # Gone: its socket is no longer listed (removed, or stale), or another
            # process answers there now. One that does not answer is still there.
            if socket in listed and answering.get(socket, last.pid) == last.pid:
                continue
            if (socket, last.pid) not in self._gone:
                row = WorkerRow(last.pid, socket, STATUS_GONE, requests=last.requests)
                row.last_answered = last.last_answered
                self._gone[socket, last.pid] = _Gone(row, now)
                self.just_gone += 1
        self._gone = {
            key: g
            for key, g in self._gone.items()
            if answering.get(key[0], _NOBODY) != key[1] and now - g.missed_at < GONE_SHOWN_S
        }
        routes: dict[str, RouteRow] = {}
        seen_routes: dict[tuple[str, int | None], dict[str, _RouteSample]] = {}
        self.routes_answered = 0
        for r in sorted(outcome.results, key=lambda r: (r.pid or 0, r.socket)):
            row = WorkerRow(r.pid, r.socket, r.status, error=r.error)
            rows.append(row)
            if not (r.ok and isinstance(r.payload, Mapping)):
                known = self._answered.get(r.socket)
                if known is not None and pid_from_socket_name(r.socket) is None:
                    row.pid = known.pid  # its socket's name has no pid: the one it answered with
                continue
            row.last_answered = time.time()
            self._answered[r.socket] = row
            snap = r.payload
            process = snap.get("process") if isinstance(snap.get("process"), Mapping) else {}
            assert isinstance(process, Mapping)
            by_status = snap.get("by_status") if isinstance(snap.get("by_status"), Mapping) else {}
            assert isinstance(by_status, Mapping)
            row.requests = snap.get("requests_total")
            row.in_flight = snap.get("in_flight")
            row.errors_5xx = by_status.get("5xx", 0) if _is_count(by_status.get("5xx", 0)) else None
            row.exceptions = snap.get("exceptions_total")
            row.loop_lag_s = process.get("loop_lag_s")
            row.rss_bytes = process.get("rss_bytes")
            row.uptime_s = snap.get("uptime_s")
            requests = int(row.requests or 0)
            errors = row.errors_5xx if isinstance(row.errors_5xx, int) else 0
            client_errors = by_status.get("4xx", 0)
            if not _is_count(client_errors):  # beyond a double's integers: no rate from it
                client_errors = 0
            at = r.answered_at if given is None and r.answered_at is not None else now
            epoch = (snap.get("started_at"), snap.get("resets"))
            sample = _Sample(at, requests, _buckets(snap), epoch, errors, client_errors, _bounds(snap))
            key = (r.socket, r.pid)
            seen[key] = sample
            routes_now = _route_samples(snap)
            if routes_now is not None:
                seen_routes[key] = routes_now
                self.routes_answered += 1
            before = self._previous.get(key)
            routes_before = self._routes_previous.get(key)
            if before is None or requests < before.requests or _reset(before, sample):
                # First sight, a restart or a stats_reset: the figures are for this interval
                # only when its counters started within it (a worker started since the last
                # refresh), else there are none yet.
                before = self._from_zero(snap, at)
                routes_before = {}
            if before is None or at <= before.at:
                _add_routes(routes, routes_now, None, 0.0)
                continue
            _add_routes(routes, routes_now, routes_before, at - before.at)
            row.requests_per_s = (requests - before.requests) / (at - before.at)
            row.errors_per_s = max(0, errors - before.errors) / (at - before.at)
            row.client_errors_per_s = max(0, client_errors - before.client_errors) / (at - before.at)
            delta = {
                i: c - before.buckets.get(i, 0)
                for i, c in sample.buckets.items()
                if c > before.buckets.get(i, 0)
            }
            row.interval_buckets = delta
            row.latency_bounds = sample.bounds
            row.p50_s = _quantile(delta, 0.5, sample.bounds)
            row.p99_s = _quantile(delta, 0.99, sample.bounds)
        self._previous = seen
        self._routes_previous = seen_routes
        self.routes = sorted(
            routes.values(),
            key=lambda rr: (-(rr.requests_per_s or 0.0), rr.requests_per_s is None, -rr.requests, rr.route),
        )
        self._last_now = now
        self._answered = {socket: row for socket, row in self._answered.items() if socket in listed}
        # The latest exits first: when the screen cannot hold them all, the oldest give way.
        recent = sorted(self._gone.values(), key=lambda g: (-g.missed_at, g.row.pid or 0, g.row.socket))
        return rows + [g.row for g in recent]

    def _from_zero(self, snap: Mapping[str, Any], at: float) -> _Sample | None:
        """A zero sample at the previous refresh, for counters that started since then.

        While workers recycle, new ones keep appearing: leaving them out of the
        rates would make the total undercount the fleet's throughput.
        """
        since = snap.get("since_reset_s")
        if self._last_now is None or isinstance(since, bool) or not isinstance(since, (int, float)):
            return None
        window = at - self._last_now
        if not 0.0 <= since <= window:  # NaN fails this too
            return None
        return _Sample(self._last_now, 0, {}, None, 0, 0)

    def frame(
        self,
        outcome: FanOutResult,
        rows: list[WorkerRow],
        *,
        width: int,
        height: int,
        interval: float,
        interactive: bool = True,
        wide: bool | None = None,
    ) -> list[str]:
        """The lines of one screen, each at most ``width - 1`` columns, at most ``height`` lines.

        ``wide`` adds the ``4XX/S`` column; by default, when the width has room for it.
        """
        live = [r for r in rows if r.status == "success"]
        gone = sum(1 for r in rows if r.status == STATUS_GONE)
        silent = len(rows) - len(live) - gone
        total_rate = sum(r.requests_per_s for r in live if r.requests_per_s is not None)
        have_rates = any(r.requests_per_s is not None for r in live)
        merged: dict[int, int] = {}
        for r in live:
            for i, c in (r.interval_buckets or {}).items():
                merged[i] = merged.get(i, 0) + c
        clock = time.strftime("%H:%M:%S")
        keys = (
            ("  (q quits, r workers)" if self.show_routes else "  (q quits, r routes)") if interactive else ""
        )
        undercounts = "the rates undercount" if self.show_routes else "TOTAL undercounts"
        limit = max(20, width - 1)
        # The keys before the whole path: a long one gives way, from its start.
        room = max(10, limit - len(f"unixsock-asgi top    {clock}  every {interval:g}s{keys}"))
        label = self.label if len(self.label) <= room else "..." + self.label[-(room - 3) :]
        header = [
            f"unixsock-asgi top  {label}  {clock}  every {interval:g}s{keys}",
            f"workers {len(live)} live"
            + (f", {silent} not answering" if silent else "")
            + (f", {gone} gone" if gone else "")
            # Counted no more: its requests after its last answer are in no rate (TOTAL is low).
            + (f" ({self.just_gone} just now: {undercounts})" if self.just_gone else "")
            + (
                f"; routes from {self.routes_answered} of them"
                if self.show_routes and self.routes_answered < len(live)
                else ""
            )
            + (f", {len(outcome.stale)} stale socket(s)" if outcome.stale else "")
            + ("; the socket directory is gone" if outcome.directory_gone else ""),
            # A health_fail or maintenance left on after a deploy, where it is seen.
            "set by an operator: " + "; ".join(flagged)
            if (flagged := flagged_workers(outcome.results))
            else "",
        ]
        if self.show_routes:
            return _screen(
                header + self._route_lines(width, max(1, height - len(header) - 2), len(live)), limit, height
            )
        # 77 columns: fits an 80x24 terminal; one wider by 6 shows 4xx responses per second too.
        if wide is None:
            wide = width > WIDE_COLUMNS
        columns = f"{'PID':>7} {'REQ/S':>7} {'REQS':>8} {'INFL':>4}"
        columns += f" {'4XX/S':>5} {'5XX/S':>5} {'EXC':>4}" if wide else f" {'5XX/S':>5} {'EXC':>4}"
        columns += f" {'P50':>7} {'P99':>7} {'LAG':>6} {'RSS':>6} {'UPTIME':>6}"
        body = [columns]
        room = max(1, height - len(header) - 3)  # column line, total line, overflow line
        shown = rows if len(rows) <= room else rows[: room - 1]
        for r in shown:
            body.append(self._row_text(r, wide=wide))
        if len(shown) < len(rows):
            body.append(f"{'':>7} ... {len(rows) - len(shown)} more worker(s) not shown")

        def _sum(attr: str) -> Any:
            values = [getattr(r, attr) for r in live if isinstance(getattr(r, attr), (int, float))]
            return sum(values) if values else None

        lags = [r.loop_lag_s for r in live if isinstance(r.loop_lag_s, (int, float))]
        total = WorkerRow(None, "", "success")
        total.requests_per_s = total_rate if have_rates else None
        total.requests = _sum("requests")
        total.in_flight = _sum("in_flight")
        total.errors_per_s = _sum("errors_per_s")
        total.client_errors_per_s = _sum("client_errors_per_s")
        total.exceptions = _sum("exceptions")
        bounds = _merged_bounds(r.latency_bounds for r in live if r.interval_buckets)
        total.p50_s = _quantile(merged, 0.5, bounds)
        total.p99_s = _quantile(merged, 0.99, bounds)
        total.loop_lag_s = max(lags) if lags else None
        total.rss_bytes = _sum("rss_bytes")
        body.append(self._row_text(total, label="TOTAL", wide=wide))
        return _screen(header + body, limit, height)

    def _route_lines(self, width: int, room: int, live: int) -> list[str]:
        """The routes over the fleet, busiest first: as many as ``room`` lines hold, with the column line
        (``live``: how many workers answered)."""
        numbers = f" {'REQ/S':>7} {'4XX/S':>5} {'5XX/S':>5} {'P50':>7} {'P99':>7} {'REQS':>8}"
        # Measured as shown: escapes for controls, two columns for a wide character.
        names = [terminal_safe(one_line(r.route)) for r in self.routes]
        longest = max((_cells(name) for name in names), default=5)
        name_width = max(12, min(longest, width - 1 - len(numbers)))
        lines = [f"{'ROUTE':<{name_width}}{numbers}"]
        if not self.routes:
            if not live:
                lines.append("no worker answered")
            else:
                lines.append("no request counted yet" if self._routes_previous else "asking for routes...")
            return lines
        shown = self.routes if len(self.routes) <= room else self.routes[: room - 1]
        for r, shown_name in zip(shown, names[: len(shown)], strict=True):
            name = _fit_cells(shown_name, name_width)
            rate = "-" if r.requests_per_s is None else _fitted(r.requests_per_s, 7, ".1f")
            bounds = _merged_bounds(r.latency_bounds)
            p50 = _quantile(r.interval_buckets, 0.5, bounds) if r.interval_buckets else None
            p99 = _quantile(r.interval_buckets, 0.99, bounds) if r.interval_buckets else None
            lines.append(
                f"{name} {rate:>7} {_per_second(r.client_errors_per_s):>5}"
                f" {_per_second(r.errors_per_s):>5}"
                f" {format_duration(p50):>7} {format_duration(p99):>7} {format_count(r.requests):>8}"
            )
        if len(shown) < len(self.routes):
            lines.append(f"... {len(self.routes) - len(shown)} more route(s) not shown")
        return lines

    @staticmethod
    def _row_text(r: WorkerRow, label: str | None = None, *, wide: bool = False) -> str:
        name = label or (str(r.pid) if r.pid is not None else os.path.basename(r.socket)[:7])
        if r.status == STATUS_GONE:
            seen = time.strftime("%H:%M:%S", time.localtime(r.last_answered or 0))
            return f"{name:>7} {'GONE':>7} {format_count(r.requests):>8}  last answered {seen}"
        if r.status != "success":
            # A pid its socket's name does not say (or none): the socket's whole name too.
            named = label is None and (r.pid is None or pid_from_socket_name(r.socket) is None)
            whole = f"  {os.path.basename(r.socket)}" if named else ""
            # Why, as far as the line goes: stderr is the screen's in a live view.
            why = f"  {r.error}" if r.error else ""
            return f"{name:>7} {r.status.upper():>7}{whole}{why}"
        rate = "-" if r.requests_per_s is None else _fitted(r.requests_per_s, 7, ".1f")
        errors = _per_second(r.errors_per_s)
        client_errors = f" {_per_second(r.client_errors_per_s):>5}" if wide else ""
        return (
            f"{name:>7} {rate:>7} {format_count(r.requests):>8} {format_count(r.in_flight):>4}"
            f"{client_errors} {errors:>5} {format_count(r.exceptions):>4}"
            f" {format_duration(r.p50_s):>7} {format_duration(r.p99_s):>7}"
            f" {format_duration(r.loop_lag_s):>6} {format_bytes(r.rss_bytes):>6}"
            f" {format_uptime(r.uptime_s):>6}"
        ).rstrip()


def _cells(text: str) -> int:
    """The columns a terminal gives ``text``: two for a wide character, none for a combining one."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def _screen(lines: list[str], limit: int, height: int) -> list[str]:
    """The lines of a frame as shown: what a worker sent as text, each cut at ``limit`` columns,
    at most ``height`` of them."""
    return [_cut_cells(terminal_safe(one_line(line)), limit) for line in lines][: max(height, 1)]


def _cut_cells(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns (a wide character takes two, a combining one none)."""
    if len(text) <= width // 2 or _cells(text) <= width:  # (the usual line: no need to count)
        return text
    kept, used = [], 0
    for c in text:
        cells = _cells(c)
        if used + cells > width:
            break
        kept.append(c)
        used += cells
    return "".join(kept)


def _fit_cells(text: str, width: int) -> str:
    """``text`` in exactly ``width`` columns: cut with "..." where it is wider, padded where narrower."""
    if _cells(text) > width:
        text = _cut_cells(text, width - 3) + "..."
    return text + " " * (width - _cells(text))


def _per_second(rate: float | None) -> str:
    """A rate in a 5-column cell: one decimal below 100."""
    return "-" if rate is None else _fitted(rate, 5, ".1f" if rate < 100 else ".0f")


def _fitted(number: float, width: int, spec: str) -> str:
    """``number`` in ``spec``, or in e-notation where that is wider than ``width`` (no real rate is)."""
    text = format(number, spec)
    return text if len(text) <= width else format(number, ".0e")


def _colour_allowed(stream: TextIO) -> bool:
    return "NO_COLOR" not in os.environ and os.environ.get("TERM", "") != "dumb" and stream.isatty()


def _decorate(lines: list[str], colour: bool) -> list[str]:
    if not colour or not lines:
        return lines
    # Reverse video for the title and bold for the column names; nothing depends on colour.
    out = list(lines)
    out[0] = f"\x1b[7m{out[0]}\x1b[0m"
    if len(out) > 3:
        out[3] = f"\x1b[1m{out[3]}\x1b[0m"
    return out


async def _sample(
    target: Target, timeout: float, skip: Container[str] = (), *, routes: bool = False
) -> FanOutResult:
    sockets = [path for path in target.sockets() if path not in skip]
    # Figures it cannot take (counts that are not counts, histograms of other buckets) make a
    # worker's row an error rather than the view's end. Routes only for the routes view: each
    # worker builds them on the GIL its app runs on (130 ms with 1,000 routes, see README).
    outcome = mark_unusable_stats(
        mark_foreign_stats(await fan_out(sockets, "stats", {"routes": routes}, timeout=timeout, polling=True))
    )
    outcome.directory_gone = target.is_directory and not sockets and not os.path.isdir(target.path)
    return outcome


def _label(target: Target) -> str:
    return target.path if len(target.path) <= 40 else "..." + target.path[-37:]


def run_top(target: Target, *, interval: float, once: bool, timeout: float, routes: bool = False) -> int:
    """Run the live view until ``q`` (or print one frame with ``once`` or when not on a terminal).

    ``routes`` starts it on the routes over the fleet rather than the workers (``r`` toggles).
    """
    out = sys.stdout
    if once or not out.isatty():
        return asyncio.run(_print_once(target, interval, timeout, out, routes=routes))
    try:
        signum = asyncio.run(_live(target, interval, timeout, out, routes=routes))
    except KeyboardInterrupt:
        return EXIT_OK
    return 128 + signum if signum else EXIT_OK


async def _print_once(
    target: Target, interval: float, timeout: float, out: TextIO, *, routes: bool = False
) -> int:
    """Two samples ``interval`` apart (for rates), then one frame without escape codes."""
    view = TopView(_label(target))
    view.show_routes = routes
    first = await _sample(target, timeout, routes=routes)
    nobody = nobody_answered(target, first)
    if nobody is not None:
        raise nobody
    view.update(first)
    await asyncio.sleep(interval)
    # A worker that did not answer has had its --timeout: it is not waited for twice.
    silent = {r.socket: r for r in first.results if r.status == STATUS_TIMEOUT}
    outcome = await _sample(target, timeout, skip=silent, routes=routes)
    outcome.results += silent.values()
    rows = view.update(outcome)
    size = shutil.get_terminal_size((80, 24))
    # On a terminal the frame fits the screen; into a file or a pipe every worker is
    # listed and no line is cut.
    tty = out.isatty()
    height = size.lines if tty else max(len(rows), len(view.routes)) + 16
    width = size.columns if tty else 1000
    # Into a pipe, the 80-column table (what scripts and README show), whatever the width.
    wide = None if tty else False
    frame = view.frame(
        outcome, rows, width=width, height=height, interval=interval, interactive=False, wide=wide
    )
    for line in frame:
        out.write(line + "\n")
    out.flush()
    nobody = nobody_answered(target, outcome)
    if nobody is not None:
        raise nobody
    if not outcome.all_ok:
        print(f"unixsock-asgi: {failure_summary(outcome)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _foreground_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal whose foreground process group is ours."""
    try:
        return stream.isatty() and os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (OSError, ValueError):  # no controlling terminal, a closed stream
        return False


@contextlib.contextmanager
def _keyboard(fd: int | None) -> Iterator[None]:
    """Single keypresses without echo (cbreak), restored however the view ends."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _unless(event: asyncio.Event, work: Coroutine[Any, Any, FanOutResult]) -> FanOutResult | None:
    """``work``'s result, or None (``work`` cancelled) once ``event`` is set first."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()  # the event came first, or we are cancelled ourselves
    if not task.cancelled():
        await asyncio.wait({task})  # a cancellation of ours still reaches us here
    return None if task.cancelled() else task.result()


async def _live(target: Target, interval: float, timeout: float, out: TextIO, *, routes: bool = False) -> int:
    """Refresh until ``q``; return the number of the signal that ended it (SIGTERM, SIGHUP), else 0."""
    fancy = os.environ.get("TERM", "") != "dumb"
    colour = _colour_allowed(out)
    # Keys only from a terminal whose foreground this is: in a background process group
    # (``timeout 60 unixsock-asgi top``, ``top &``) setting cbreak mode would stop us
    # (SIGTTOU), and keys would never come. There the frames still show; signals end it.
    stdin_fd: int | None = sys.stdin.fileno() if _foreground_terminal(sys.stdin) else None
    loop = asyncio.get_running_loop()
    quit_requested = asyncio.Event()
    wake = asyncio.Event()  # refresh now: the view was switched
    view = TopView(_label(target))
    view.show_routes = routes

    def on_key() -> None:
        assert stdin_fd is not None
        ready, _, _ = select.select([stdin_fd], [], [], 0)
        if not ready:
            return
        data = os.read(stdin_fd, 64)
        if not data or any(chr(b) in _QUIT_KEYS for b in data):
            quit_requested.set()
            wake.set()
        elif any(chr(b) in _ROUTES_KEYS for b in data):
            view.show_routes = not view.show_routes
            wake.set()

    ended_by: list[int] = []

    def on_signal(signum: int) -> None:
        # ``timeout 60 unixsock-asgi top`` or a closed ssh session: leave like ``q``
        # does, so that the terminal gets its screen, cursor and echo back.
        ended_by.append(signum)
        quit_requested.set()
        wake.set()

    with _keyboard(stdin_fd):
        for signum in _ENDING_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        if stdin_fd is not None:
            loop.add_reader(stdin_fd, on_key)
        if fancy:
            out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
        try:
            while not quit_requested.is_set():
                started = loop.time()
                outcome = await _unless(quit_requested, _sample(target, timeout, routes=view.show_routes))
                if outcome is None:
                    break  # q or a signal while workers were being asked: no need to wait for them
                rows = view.update(outcome)
                size = shutil.get_terminal_size((80, 24))
                lines = view.frame(outcome, rows, width=size.columns, height=size.lines, interval=interval)
                try:
                    if fancy:
                        # No newline after the last line: on a full screen it would scroll.
                        body = "\x1b[K\n".join(_decorate(lines, colour))
                        out.write(f"\x1b[H{body}\x1b[K\x1b[J")
                    else:
                        out.write("\n".join(lines) + "\n\n")
                    out.flush()
                except OSError:  # the terminal is gone (SIGHUP)
                    break
                remaining = interval - (loop.time() - started)
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(remaining, 0.05))
                wake.clear()
        finally:
            for signum in _ENDING_SIGNALS:
                loop.remove_signal_handler(signum)
            if stdin_fd is not None:
                loop.remove_reader(stdin_fd)
            if fancy:
                with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                    out.write("\x1b[?25h\x1b[?1049l")  # show the cursor, leave the alternate screen
                    out.flush()
    return ended_by[0] if ended_by else 0
