"""``unixsock-asgi``: talk to one worker's control socket, or to every worker in a directory.

::

    unixsock-asgi send TARGET CMD [key=value ...] [--json] [--timeout S] [--persist]
    unixsock-asgi ls DIR [--json] [--remove-stale]
    unixsock-asgi shell TARGET
    unixsock-asgi top TARGET [--interval S] [--once]
    unixsock-asgi metrics TARGET [--prefix P] [--output FILE]
    unixsock-asgi overrides show DIR [--json]
    unixsock-asgi overrides clear DIR

TARGET is a socket file or a socket directory (every live worker in it).

Exit status: 0 when every worker answered success; 1 when any answered
failure, timed out or could not be reached; 2 for a usage error or when there
is nothing to talk to (no such path, no live worker). Whenever the status is
not 0, one line on stderr says what went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from . import __version__
from ._fleet import (
    BACK_TO_DEFAULT,
    CONTROL_FLAGS,
    FOREIGN_STATS,
    LONE_SURROGATES,
    STATUS_ERROR,
    TERMINAL_CONTROLS,
    AskedWorkers,
    FanOutResult,
    OverrideError,
    OverridesFileError,
    Target,
    TargetError,
    UntrustedDirectory,
    WorkerResult,
    aggregate,
    check_can_persist,
    clear_overrides,
    fan_out,
    is_stats_snapshot,
    mark_foreign_stats,
    open_checked_directory,
    override_key,
    overrides_path,
    persist_override,
    read_overrides_document,
    remove_stale_sockets,
    render_prometheus,
    replace_file,
    resolve_target,
    untrusted_overrides_file,
    well_formed_override,
    worker_flag,
    workers_owner,
)
from ._protocol import _parse_value, check_unicode

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "main"]

EXIT_OK = 0
"""Every worker answered success."""
EXIT_FAILED = 1
"""A worker answered failure, timed out or could not be reached."""
EXIT_USAGE = 2
"""Bad command line, or nothing to talk to."""

PROG = "unixsock-asgi"
DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a worker: longer than the workers' ``app_timeout`` (5 s), so
that a worker whose app loop is blocked has the time to say so."""
STATS_TIMEOUT = 3.0
"""For ``ls`` and ``metrics``, which ask only ``stats``: the control thread answers it even
while the app's loop is blocked (in 0.2 s, the CLI's start included), so a worker silent
for 3 s is stopped or hung, and one such worker held every listing up for 10 s."""
_WITHOUT_ROUTES = {"routes": False}  # ls and top need no per-route figures


class UsageError(Exception):
    """A command line that cannot be run, or a target with nothing to talk to (exit status 2)."""


class _Failed(Exception):
    """Something went wrong after the command was sent (exit status 1)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()  # main() names the program
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


# --------------------------------------------------------------------------- formatting


def _finite(value: Any) -> float | None:
    """A number a worker reported, as a float; None for anything else, infinite or beyond a double."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def format_duration(seconds: Any) -> str:
    """Latency for humans: ``850us``, ``12.3ms``, ``1.25s``; ``-`` when unknown."""
    seconds = _finite(seconds)
    if seconds is None:
        return "-"
    if abs(seconds) >= 1e6:  # no latency: what a broken or hostile worker sends, kept short
        return f"{seconds:.3g}s"
    # The unit after rounding: 0.9997 s is 1s, not 1e+03ms.
    if round(seconds * 1e6) < 1000:
        return f"{seconds * 1e6:.0f}us"
    if float(f"{seconds * 1e3:.3g}") < 1000:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.3g}s" if seconds < 999.5 else f"{seconds:.0f}s"


def format_uptime(seconds: Any) -> str:
    """Uptime for humans: ``42s``, ``7m03s``, ``2h05m``, ``3d04h``."""
    number = _finite(seconds)
    if number is None:
        return "-"
    if abs(number) >= 1e9:  # over thirty years: kept short
        return f"{number:.3g}s"
    s = int(number)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_bytes(n: Any) -> str:
    """Sizes for humans in at most 5 characters, binary units: ``512K``, ``48.2M``, ``1.5G``."""
    value = _finite(n)
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1000 or unit == "T":
            if abs(value) >= 1e6:  # no process's: kept short
                return f"{value:.3g}{unit}"
            return f"{value:.1f}{unit}" if value < 100 and unit != "B" else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: Any) -> str:
    """An integer, or ``-`` when unknown."""
    number = _finite(n)
    if number is None:
        return "-"
    if abs(number) >= 1e15:  # beyond any count a process makes: kept short
        return f"{number:.3g}"
    return str(int(n))


def format_args(args: Mapping[str, Any]) -> str:
    """``key=value ...`` as it would be typed: plain words bare, anything else as JSON."""
    parts = []
    for key, value in args.items():
        text = value if isinstance(value, str) and _parse_value(value) == value and " " not in value else None
        parts.append(f"{key}={text if text is not None else json.dumps(value)}")
    return " ".join(parts)


def table(rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """Rows of cells as aligned text; ``align`` has an ``l`` or ``r`` per column.

    Columns without a letter are right-aligned, except the first (a name).
    """
    rows = [[one_line(cell) for cell in row] for row in rows]  # a route's name, an error: one row each
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            how = align[i] if i < len(align) else ("l" if i == 0 else "r")
            cells.append(cell.ljust(widths[i]) if how == "l" else cell.rjust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return lines


def _status_count(snapshot: Mapping[str, Any], status_class: str) -> Any:
    by_status = snapshot.get("by_status")
    return by_status.get(status_class, 0) if isinstance(by_status, Mapping) else None


_FLAG_WORDS = {flag: flag.replace("_", " ") for flag in CONTROL_FLAGS}  # "health failing", "maintenance"


def worker_flags(snapshot: Any) -> list[str]:
    """What an operator turned on in a worker (from its ``stats``): ``health failing``, ``maintenance``."""
    if not isinstance(snapshot, Mapping):
        return []
    return [words for flag, words in _FLAG_WORDS.items() if worker_flag(snapshot, flag)]


def flagged_workers(results: Sequence[WorkerResult]) -> list[str]:
    """``health failing: 11770; maintenance: 11771 11772`` parts, for the workers so set."""
    parts = []
    results = sorted(results, key=lambda r: (r.pid or 0, r.socket))
    for flag, words in _FLAG_WORDS.items():
        pids = [
            _worker_label(r)
            for r in results
            if r.ok and isinstance(r.payload, Mapping) and worker_flag(r.payload, flag)
        ]
        if pids:
            parts.append(f"{words}: {' '.join(pids)}")
    return parts


def _worker_label(result: WorkerResult) -> str:
    return str(result.pid) if result.pid is not None else socket_name(result.socket)


def _stats_row(label: str, snap: Mapping[str, Any]) -> list[str]:
    latency = snap.get("latency") if isinstance(snap.get("latency"), Mapping) else {}
    process = snap.get("process") if isinstance(snap.get("process"), Mapping) else {}
    assert isinstance(latency, Mapping) and isinstance(process, Mapping)
    return [
        label,
        format_uptime(snap.get("uptime_s")),
        format_count(snap.get("requests_total")),
        format_count(snap.get("in_flight")),
        format_count(_status_count(snap, "5xx")),
        format_count(snap.get("exceptions_total")),
        format_duration(latency.get("p50_s")),
        format_duration(latency.get("p99_s")),
        format_duration(process.get("loop_lag_s")),
        format_bytes(process.get("rss_bytes")),
    ]


_STATS_HEADER = ["WORKER", "UPTIME", "REQUESTS", "IN-FLT", "5XX", "EXC", "P50", "P99", "LOOP-LAG", "RSS"]


def render_stats(outcome: FanOutResult, total: Mapping[str, Any]) -> list[str]:
    """The ``stats`` answers as a table: a row per worker, then the fleet total, then routes."""
    rows = [_STATS_HEADER]
    # Servers of the protocol whose 'stats' is their own: their answers, after the table.
    foreign: list[str] = []
    for r in sorted(outcome.results, key=lambda r: (r.pid or 0, r.socket)):
        if r.ok and is_stats_snapshot(r.payload):
            rows.append(_stats_row(_worker_label(r), r.payload))
            continue
        rows.append(
            [_worker_label(r), "OTHER" if r.ok else r.status.upper(), *[""] * (len(_STATS_HEADER) - 2)]
        )
        if r.ok:
            foreign += [
                "",
                f"{socket_name(r.socket)}: {FOREIGN_STATS}; it answered:",
                *_payload_lines(r.payload),
            ]
    rows.append(_stats_row(f"TOTAL({total.get('workers', 0)})", total))
    lines = table(rows)
    flagged = flagged_workers(outcome.results)
    if flagged:
        lines.append("set by an operator: " + "; ".join(flagged))
    routes = total.get("routes")
    if isinstance(routes, Mapping) and routes:
        route_rows = [["ROUTE", "REQUESTS", "5XX", "EXC", "P50", "P99"]]
        for template, figures in routes.items():
            latency = figures.get("latency", {})
            route_rows.append(
                [
                    str(template),
                    format_count(figures.get("requests")),
                    format_count(_status_count(figures, "5xx")),
                    format_count(figures.get("exceptions")),
                    format_duration(latency.get("p50_s")),
                    format_duration(latency.get("p99_s")),
                ]
            )
        lines += ["", *table(route_rows)]
    return lines + foreign


def _doc_summary(doc: Any) -> str:
    """The first sentence of a docstring, however its lines were wrapped."""
    paragraph = " ".join(_plain(doc).strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _plain(doc: Any) -> str:
    """A docstring as a terminal shows it: reST's ````code```` as `code`."""
    return str(doc or "").replace("``", "`")


_WHERE_IT_RUNS = {
    True: "Diagnostic: answers even while the app's event loop is blocked.",
    False: "Runs on the app's event loop: waits while it is blocked.",
}


def render_help(payload: Any) -> list[str]:
    """A worker's ``help`` payload as a command list: signature, then the first sentence of its doc.

    The help of one command (``help command=NAME``) shows its whole doc.
    """
    commands = payload.get("commands") if isinstance(payload, Mapping) else None
    if not isinstance(commands, list):
        return _payload_lines(payload)
    commands = [c for c in commands if isinstance(c, Mapping)]
    if len(commands) == 1 and not payload.get("handler"):
        doc = _plain(commands[0].get("doc")).strip()  # cleaned by the worker (inspect.getdoc)
        diagnostic = commands[0].get("diagnostic")  # another program's help may say anything
        where = _WHERE_IT_RUNS[diagnostic] if isinstance(diagnostic, bool) else None
        return [
            _help_signature(commands[0]),
            *(f"  {line}".rstrip() for line in doc.splitlines()),
            *(["", f"  {where}"] if where else []),
        ]
    rows = [
        (
            _help_signature(c),
            one_line(_doc_summary(c.get("doc"))) + (" (read-only)" if c.get("readonly") else ""),
        )
        for c in commands
    ]
    width = min(max((len(sig) for sig, _ in rows), default=0), _HELP_SIGNATURE_WIDTH)
    lines: list[str] = []
    for sig, doc in rows:
        if len(sig) > width:
            lines += [sig, f"{'':{width}}  {doc}".rstrip()]  # long signature: doc on its own line
        else:
            lines.append(f"{sig.ljust(width)}  {doc}".rstrip())
    # What waits while the app's loop is blocked, said where an operator looks when it is.
    on_app_loop = [one_line(str(c.get("name"))) for c in commands if c.get("diagnostic") is False]
    if on_app_loop:
        lines += [
            "",
            f"On the app's event loop, waiting while it is blocked: {', '.join(on_app_loop)}"
            " (the others answer even then).",
        ]
    handler = payload.get("handler")
    if isinstance(handler, Mapping):
        doc = _doc_summary(handler.get("doc"))
        lines += [
            "",
            one_line(f"Any other command goes to the app's handler, {handler.get('name')}")
            + (f": {doc}" if doc else "."),
        ]
    return lines


def _help_signature(command: Mapping[str, Any]) -> str:
    params = []
    args = command.get("args")
    for arg in args if isinstance(args, list) else []:
        if not isinstance(arg, Mapping):
            continue  # another program's help, in another shape
        kind = arg.get("type", "any")
        default = arg.get("default")
        if arg.get("required"):
            params.append(f"{arg.get('name')}=<{kind}>")
        elif default is None or default == "":
            params.append(f"[{arg.get('name')}=<{kind}>]")
        else:
            shown = default if isinstance(default, str) else json.dumps(default, ensure_ascii=False)
            params.append(f"[{arg.get('name')}=<{kind}, default {shown}>]")
    return one_line(f"{command.get('name')} {' '.join(params)}".rstrip())


_HELP_SIGNATURE_WIDTH = 36


def _payload_lines(payload: Any) -> list[str]:
    if payload is None:
        return []
    if isinstance(payload, str):
        # On newlines only: splitlines() also breaks at \r, \f and the like, which are shown as escapes.
        return payload.removesuffix("\n").split("\n")
    # On newlines only: JSON escapes its own, and splitlines() would also break at \x85 or \u2028.
    return json.dumps(payload, indent=2, sort_keys=True, default=str, ensure_ascii=False).split("\n")


def render_answers(cmd: str, outcome: FanOutResult, *, single_target: bool) -> list[str]:
    """Human output of any command: identical answers are grouped, each group shown once."""
    if cmd == "stats" and any(is_stats_snapshot(r.payload) for r in outcome.successes):
        total = aggregate(cmd, outcome)
        return render_stats(outcome, total)
    groups: dict[str, list[WorkerResult]] = {}
    for r in sorted(outcome.results, key=lambda r: (r.pid or 0, r.socket)):
        key = json.dumps([r.status, r.error, r.payload], sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    lines: list[str] = []
    for members in groups.values():
        first = members[0]
        body = render_help(first.payload) if cmd == "help" and first.ok else _payload_lines(first.payload)
        if not (single_target and len(outcome.results) == 1):
            who = "worker" if len(members) == 1 else f"{len(members)} workers"
            pids = " ".join(_worker_label(m) for m in members)
            head = f"[{who} {pids}] {first.status}"
            lines.append(f"{head}: {one_line(first.error)}" if first.error else head)
        # else one socket asked, and a failure is said once, on stderr (failure_summary)
        lines += body
    return lines


def failure_summary(outcome: FanOutResult, *, single_target: bool = False) -> str:
    """One line naming the workers that did not answer success, and why (same reasons grouped).

    One socket asked (``single_target``) is not named: the operator just did.
    """
    bad = [r for r in outcome.results if not r.ok]
    if single_target and len(outcome.results) == 1 and bad:
        return terminal_safe(one_line(f"{bad[0].status}: {bad[0].error or 'no message'}"))
    reasons: dict[str, list[str]] = {}
    for r in bad:
        reasons.setdefault(one_line(f"{r.status}: {r.error or 'no message'}"), []).append(
            socket_name(r.socket)
        )
    details = "; ".join(f"{', '.join(sockets)}: {reason}" for reason, sockets in reasons.items())
    return terminal_safe(f"{len(bad)} of {len(outcome.results)} workers did not succeed: {details}")


_UNSAFE = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*TERMINAL_CONTROLS, *LONE_SURROGATES)
    if code not in (0x09, 0x0A)  # tab and newline lay text out; they do not drive the terminal
}


def terminal_safe(text: str) -> str:
    """``text`` with the characters that drive a terminal shown as escapes.

    What workers send (errors, payload strings, route names, help) is shown as
    text, never as cursor moves, colours, title changes or a carriage return
    that overwrites the line.
    """
    return text.translate(_UNSAFE)


_LINE_BREAKS = {0x0A: "\\n", 0x09: "\\t"}


def one_line(text: str) -> str:
    """``text`` kept on its line: newlines and tabs as escapes.

    For what a worker or its socket's name puts in a line of ours (an error, a
    table cell, a list of names): it cannot start a line that looks like
    another worker's answer, nor push a table's columns about. Payload text
    keeps its lines.
    """
    return text.translate(_LINE_BREAKS)


def socket_name(path: str) -> str:
    """A socket's file name, on one line (the directory's owner names its sockets)."""
    return one_line(os.path.basename(path))


# --------------------------------------------------------------------------- commands


def parse_command_args(pairs: Iterable[str]) -> dict[str, Any]:
    """``key=value`` words as a dict; a value is a JSON literal if it parses, else a string."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {pair!r} is not key=value")
        args[key] = _parse_value(value)
        try:
            # Escaped (\\ud800) or bytes of the command line that are not UTF-8 (surrogateescape).
            check_unicode([key, args[key]])
        except ValueError as exc:
            raise UsageError(f"argument {key!r}: {exc}") from None
    return args


def help_topic(cmd: str, words: Sequence[str]) -> str | None:
    """The command a bare word after ``help`` asks about (``help drain``, as a shell's help takes a
    name), or None: anything else is ``key=value`` words."""
    if cmd == "help" and len(words) == 1 and "=" not in words[0]:
        return words[0]
    return None


_OWN_DURATIONS = {"drain": {"timeout": 30.0}}
"""The built-ins' arguments that say how long they take, when not given: their defaults."""


def reply_timeout(args: Mapping[str, Any], timeout: float, cmd: str = "") -> float:
    """How long to wait for a reply: ``timeout``, plus the longest of the command's own
    ``timeout`` and ``quiet`` arguments (``drain timeout=30`` may take 30 s before it
    answers, ``drain quiet=12`` at least 12 s), those of a built-in ``cmd`` that are
    not given counted at their defaults (``drain`` alone waits up to 30 s)."""
    given = {**_OWN_DURATIONS.get(cmd, {}), **args}
    own = [
        value
        for value in (given.get("timeout"), given.get("quiet"))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
    ]
    return timeout + max(own, default=0)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _metric_prefix(text: str) -> str:
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot start a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        )
    return text


def _resolve(path: str, *, directory_only: bool = False) -> Target:
    try:
        target = resolve_target(path)
    except TargetError as exc:
        raise UsageError(f"nothing to talk to: {exc}") from None
    if directory_only and not target.is_directory:
        raise UsageError(f"{path}: not a directory (this command works on a socket directory)")
    return target


def _ask(
    target: Target, cmd: str, args: Mapping[str, Any], timeout: float, *, polling: bool = False
) -> tuple[FanOutResult, UsageError | _Failed | None]:
    """Every worker's answer, and what to say when no worker answered at all."""
    sockets = target.sockets()
    if not sockets:
        return FanOutResult(), no_sockets(target)
    outcome = asyncio.run(fan_out(sockets, cmd, args, timeout=timeout, polling=polling))
    return outcome, nobody_answered(target, outcome)


def no_sockets(target: Target) -> UsageError:
    """What to say about a directory without a socket in it."""
    return UsageError(f"nothing to talk to: no worker sockets (*.sock) in {target.path}")


def nobody_answered(target: Target, outcome: FanOutResult) -> UsageError | _Failed | None:
    """What to say when no worker answered at all, or None when one did."""
    if outcome.results:
        return None
    if outcome.gone:
        # Not "nothing to talk to" (2): it was asked, and may have run the command.
        return _Failed(f"{gone_text(outcome)}; no live worker answered")
    if target.is_directory and not outcome.stale:
        return no_sockets(target)
    if target.is_directory:
        message = f"{len(outcome.stale)} socket(s) in {target.path}, no live worker"
    else:
        message = f"nothing listens on {target.path} (its process is gone)"
    return UsageError(f"nothing to talk to: {message}")


def _run_fan_out(target: Target, cmd: str, args: Mapping[str, Any], timeout: float) -> FanOutResult:
    outcome, nobody = _ask(target, cmd, args, timeout)
    if nobody is not None:
        raise nobody
    return outcome


def _write(lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        out.write(terminal_safe(line) + "\n")


def gone_text(outcome: FanOutResult) -> str:
    names = ", ".join(socket_name(p) for p in outcome.gone)
    return f"{len(outcome.gone)} worker(s) exited while asked (the command may have run there): {names}"


def stale_note(outcome: FanOutResult) -> None:
    if outcome.stale:
        names = ", ".join(socket_name(p) for p in outcome.stale)
        _write(
            [f"note: skipped {len(outcome.stale)} stale socket(s) (nothing listens there): {names}"],
            sys.stderr,
        )
    if outcome.gone and outcome.results:  # else the error says so
        _write([f"note: {gone_text(outcome)}"], sys.stderr)


def cmd_send(ns: argparse.Namespace) -> int:
    """``send TARGET CMD [key=value ...]``: run one command on every worker at once."""
    topic = help_topic(ns.cmd, ns.args)
    args = {"command": topic} if topic is not None else parse_command_args(ns.args)
    target = _resolve(ns.target)
    if ns.persist:
        if not target.is_directory:
            raise UsageError("--persist needs a socket directory target (the overrides file lives there)")
        try:
            override_key(ns.cmd, args)
            check_can_persist(target.path)
            read_overrides_document(target.path)  # a file it could not rewrite: say so before sending
        except (OverrideError, OverridesFileError) as exc:
            raise UsageError(f"--persist: {exc} (nothing was sent)") from None
    outcome = _run_fan_out(target, ns.cmd, args, reply_timeout(args, ns.timeout, ns.cmd))
    persisted = not_persisted = unpersisted = ""
    if ns.persist:
        try:
            persisted, not_persisted = _persist(target.path, ns.cmd, args, outcome)
        except _Failed as exc:  # the workers' answers are still shown first
            unpersisted = str(exc)
        if persisted:
            _catch_up(target, ns.cmd, args, reply_timeout(args, ns.timeout, ns.cmd), outcome)
    if ns.json:
        document: dict[str, Any] = {"results": [r.to_dict() for r in outcome.results]}
        total = aggregate(ns.cmd, outcome)
        if total is not None:
            document["total"] = total
        if outcome.stale:
            document["stale"] = outcome.stale
        if outcome.gone:
            document["gone"] = outcome.gone
        if ns.persist:
            document["persisted"] = persisted
        print(json.dumps(document, indent=2, sort_keys=True, default=str))
    else:
        _write(render_answers(ns.cmd, outcome, single_target=not target.is_directory), sys.stdout)
    stale_note(outcome)
    if ns.cmd == "drain" and target.is_directory:
        _note_workers_started_meanwhile(target, outcome)
    if persisted and ns.cmd in BACK_TO_DEFAULT:
        state = "health" if ns.cmd == "health_ok" else "maintenance"
        print(
            f"{persisted}: no {state} override now: workers started later start without one", file=sys.stderr
        )
    elif persisted:
        print(f"persisted to {persisted}: workers started later apply it", file=sys.stderr)
    elif not_persisted:
        print(f"not persisted: {not_persisted}", file=sys.stderr)
    if unpersisted:
        raise _Failed(unpersisted)
    if not outcome.all_ok:
        raise _Failed(failure_summary(outcome, single_target=not target.is_directory))
    return EXIT_OK


def _note_workers_started_meanwhile(target: Target, outcome: FanOutResult) -> None:
    """After a drain: the workers that came up while it ran (a recycled one) were not drained,
    and pass their health check unless health_fail was persisted."""
    asked = {r.socket for r in outcome.results} | set(outcome.stale) | set(outcome.gone)
    try:
        late = [path for path in target.sockets() if path not in asked]
    except OSError:  # the directory went away meanwhile: nothing to say about it here
        return
    if late:
        names = ", ".join(socket_name(p) for p in late)
        note = (
            f"note: {len(late)} worker(s) started while it ran and were not drained: {names}"
            " (a worker started later comes up without a health_fail that was not sent with --persist)"
        )
        _write([note], sys.stderr)  # names from the directory: whoever may write there chose them


def _catch_up(
    target: Target, cmd: str, args: Mapping[str, Any], timeout: float, outcome: FanOutResult
) -> None:
    """Send ``cmd`` to the workers that started after the sockets were listed.

    Such a worker read the overrides file before it was rewritten, or after:
    either way it gets the command (persistable commands may be applied twice).
    """
    asked = {r.socket for r in outcome.results} | set(outcome.stale) | set(outcome.gone)
    late = [path for path in target.sockets() if path not in asked]
    if late:
        extra = asyncio.run(fan_out(late, cmd, args, timeout=timeout))
        outcome.results += extra.results
        outcome.stale += extra.stale
        outcome.gone += extra.gone


def _persist(directory: str, cmd: str, args: Mapping[str, Any], outcome: FanOutResult) -> tuple[str, str]:
    """Make the command durable: the overrides file written, or why not."""
    rejected = [r for r in outcome.results if r.status not in ("success", "timeout", STATUS_ERROR)]
    if rejected:
        # A worker that refuses the command means bad arguments: do not make them durable.
        return "", f"{len(rejected)} worker(s) refused it; workers started later will not apply it"
    if not outcome.successes:
        # None confirmed it, yet those it reached may have applied it: not "none applied it".
        unsure = sum(r.sent for r in outcome.results)
        if unsure:
            return "", (
                f"no worker confirmed it: {unsure} got it without answering and may have applied it"
                " (check, then send it again with --persist)"
            )
        return "", "no worker applied it"
    try:
        persist_override(directory, cmd, args, AskedWorkers.of(outcome.successes))
    except (OverridesFileError, OSError) as exc:
        raise _Failed(f"applied, but not persisted: {exc}") from None
    return overrides_path(directory), ""


def cmd_ls(ns: argparse.Namespace) -> int:
    """``ls DIR``: every worker socket with pid, uptime, requests and in-flight; stale ones flagged."""
    target = _resolve(ns.target)
    sockets = target.sockets()
    if not sockets:
        raise no_sockets(target)
    outcome = mark_foreign_stats(
        asyncio.run(fan_out(sockets, "stats", _WITHOUT_ROUTES, timeout=ns.timeout, polling=True))
    )
    try:
        removed = remove_stale_sockets(target.path) if ns.remove_stale and target.is_directory else []
    except UntrustedDirectory as exc:
        raise _Failed(f"--remove-stale: {exc.strerror}") from None
    if ns.json:
        workers = []
        for r in outcome.results:
            snap = r.payload if r.ok and isinstance(r.payload, Mapping) else {}
            workers.append(
                {
                    "socket": r.socket,
                    "pid": r.pid,
                    "ppid": _parent(snap),
                    "state": "live" if r.ok else r.status,
                    "error": r.error,
                    # None from a worker that does not say (an older version)
                    "health_failing": worker_flag(snap, "health_failing") if "control" in snap else None,
                    "maintenance": worker_flag(snap, "maintenance") if "control" in snap else None,
                    "uptime_s": snap.get("uptime_s"),
                    "requests_total": snap.get("requests_total"),
                    "in_flight": snap.get("in_flight"),
                }
            )
        document = {"workers": workers, "stale": outcome.stale, "gone": outcome.gone, "removed": removed}
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        snaps = {
            r.socket: r.payload if r.ok and isinstance(r.payload, Mapping) else {} for r in outcome.results
        }
        # Workers of more than one master (gunicorn's USR2 upgrade under way, two services
        # sharing the directory): a PARENT column tells the generations apart.
        parents = {_parent(snap) for snap in snaps.values()} - {None}
        with_parent = len(parents) > 1
        rows = [
            ["SOCKET", "PID", *(["PARENT"] if with_parent else []), "UPTIME", "REQUESTS", "IN-FLT", "STATE"]
        ]
        gap = ["-"] * (5 if with_parent else 4)
        for r in sorted(outcome.results, key=lambda r: os.path.basename(r.socket)):
            snap = snaps[r.socket]
            state = ", ".join(["live", *worker_flags(snap)]) if r.ok else f"{r.status.upper()}: {r.error}"
            rows.append(
                [
                    os.path.basename(r.socket),
                    format_count(r.pid),
                    *([format_count(_parent(snap))] if with_parent else []),
                    format_uptime(snap.get("uptime_s")),
                    format_count(snap.get("requests_total")),
                    format_count(snap.get("in_flight")),
                    state,
                ]
            )
        for path in outcome.stale:
            state = "STALE: removed" if path in removed else "STALE: nothing listens (process gone)"
            rows.append([os.path.basename(path), *gap, state])
        for path in outcome.gone:
            rows.append([os.path.basename(path), *gap, "GONE: exited while asked"])
        _write(table(rows, align="lrrrrrl" if with_parent else "lrrrrl"), sys.stdout)
    nobody = nobody_answered(target, outcome)
    if nobody is not None:
        raise nobody
    if not outcome.all_ok:
        raise _Failed(failure_summary(outcome))
    return EXIT_OK


def _parent(snap: Mapping[str, Any]) -> int | None:
    """The worker's parent pid as its ``stats`` says, or None (an older version, a strange value)."""
    ppid = snap.get("ppid")
    return ppid if isinstance(ppid, int) and not isinstance(ppid, bool) and 0 <= ppid < 2**32 else None


def cmd_metrics(ns: argparse.Namespace) -> int:
    """``metrics TARGET``: the fleet's stats in the Prometheus text format, on stdout or to a file."""
    # Whatever it finds is written, a fleet that is down too (asgi_workers 0;
    # systemd removes a stopped service's RuntimeDirectory=), so that an alert
    # fires instead of the last file being served on and on.
    try:
        outcome, down = _ask(_resolve(ns.target), "stats", {}, ns.timeout, polling=True)
        mark_foreign_stats(outcome)
    except UsageError as exc:
        outcome, down = FanOutResult(), exc
    text = render_prometheus(outcome, prefix=ns.prefix)
    if ns.output:
        try:
            _write_atomically(ns.output, text)
        except OSError as exc:
            raise UsageError(f"--output {ns.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
    if down is not None:
        raise down
    if not outcome.all_ok:
        raise _Failed(failure_summary(outcome))
    return EXIT_OK


def _write_atomically(path: str, text: str) -> None:
    """Write a file the way node_exporter's textfile collector needs: never half-written.

    In the directory the walk to it reached, and only if nobody but root, this
    user and its owner could have redirected that walk (another user's link in
    ``/tmp`` could lead root's file into any directory).
    """
    dir_fd = open_checked_directory(os.path.dirname(path) or ".")
    try:
        replace_file(dir_fd, os.path.basename(path), text, 0o644)
    finally:
        os.close(dir_fd)


def cmd_overrides(ns: argparse.Namespace) -> int:
    """``overrides show DIR`` / ``overrides clear DIR``."""
    target = _resolve(ns.directory, directory_only=True)
    if ns.action == "clear":
        try:
            count = clear_overrides(target.path)
        except (OverridesFileError, OSError) as exc:
            raise _Failed(f"cannot clear the overrides of {target.path}: {exc}") from None
        cleared = "an unreadable overrides file" if count is None else f"{count} override(s)"
        _write([f"cleared {cleared} in {target.path}; running workers keep their current state"], sys.stdout)
        return EXIT_OK
    try:
        document = read_overrides_document(target.path)
    except (OverridesFileError, OSError) as exc:
        raise _Failed(str(exc)) from None
    path = overrides_path(target.path)
    try:
        problem = untrusted_overrides_file(os.lstat(path), workers_owner(target.path)[0])
    except OSError:
        problem = ""
    if ns.json:
        if problem:
            document = {**document, "ignored_by_workers": problem}
        print(json.dumps(document, indent=2, sort_keys=True))
        if problem:
            raise _Failed(f"workers ignore {path}: {problem}")
        return EXIT_OK
    entries = document["overrides"]
    if not entries:
        _write([f"no overrides in {target.path}: workers start with their configured defaults"], sys.stdout)
        return EXIT_OK
    # The file is the workers' user's to write: every line through _write (terminal_safe).
    if problem:
        _write(
            [
                f"{len(entries)} override(s) in {path}, which workers IGNORE: {problem}",
                *_override_lines(entries),
            ],
            sys.stdout,
        )
        raise _Failed(f"workers ignore {path}: {problem}")
    _write(
        [
            f"{len(entries)} override(s) in {path}, applied in this order at startup:",
            *_override_lines(entries),
        ],
        sys.stdout,
    )
    return EXIT_OK


def _override_lines(entries: Iterable[Any]) -> Iterator[str]:
    for i, entry in enumerate(entries, 1):
        override = well_formed_override(entry)
        if override is None:
            yield f"{i:3d}. (malformed, workers skip it) {json.dumps(entry, sort_keys=True, default=str)}"
        else:
            yield one_line(f"{i:3d}. {override['cmd']} {format_args(override['args'])}".rstrip())


def cmd_shell(ns: argparse.Namespace) -> int:
    """``shell TARGET``: an interactive prompt with history and completion."""
    from ._shell import run_shell

    return run_shell(_resolve(ns.target), timeout=ns.timeout, history_file=ns.history_file)


def cmd_top(ns: argparse.Namespace) -> int:
    """``top TARGET``: a live view of every worker."""
    from ._top import run_top

    return run_top(
        _resolve(ns.target), interval=ns.interval, once=ns.once, timeout=ns.timeout, routes=ns.routes
    )


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``unixsock-asgi``."""
    parser = _ArgumentParser(
        prog=PROG,
        description="Talk to the control sockets of running ASGI workers: one socket or a directory of them.",
        epilog="Exit status: 0 all workers succeeded, 1 a worker failed or did not answer, "
        "2 usage error or nothing to talk to.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True

    def with_timeout(
        p: argparse.ArgumentParser, default: float = DEFAULT_TIMEOUT, *, runs: bool = False
    ) -> None:
        added = (
            "; a command's own timeout=... or quiet=... argument is added (drain's 30 if not given)"
            if runs
            else ""
        )
        p.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=default,
            metavar="S",
            help=f"seconds to wait for each worker (default {default:g}{added})",
        )

    p = sub.add_parser("send", help="run a command on one worker or on every worker in a directory")
    p.add_argument("target", metavar="TARGET", help="socket file or socket directory")
    p.add_argument("cmd", metavar="CMD", help="command name (try 'help')")
    # A default makes argparse see it as optional (else a missing CMD is said to be "key=value" too).
    p.add_argument(
        "args", nargs="*", default=[], metavar="key=value", help="arguments; values are JSON if they parse"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with every result")
    p.add_argument(
        "--persist",
        action="store_true",
        help="also record the change in DIR/overrides.json so that workers started later apply it",
    )
    with_timeout(p, runs=True)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("ls", help="list the workers of a socket directory")
    p.add_argument("target", metavar="DIR", help="socket directory (or one socket file)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--remove-stale", action="store_true", help="remove the stale sockets listed")
    with_timeout(p, STATS_TIMEOUT)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("shell", help="interactive prompt with history and completion")
    p.add_argument("target", metavar="TARGET", help="socket file or socket directory")
    p.add_argument(
        "--history-file",
        default=os.path.join(os.path.expanduser("~"), ".unixsock_asgi_history"),
        metavar="FILE",
        help="readline history file (default ~/.unixsock_asgi_history; '' for none)",
    )
    with_timeout(p, runs=True)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("top", help="live view of every worker, or of the routes (r toggles, q quits)")
    p.add_argument("target", metavar="TARGET", help="socket file or socket directory")
    p.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        metavar="S",
        help="seconds between refreshes (default 2)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit (implied when stdout is not a terminal)",
    )
    p.add_argument(
        "--routes",
        action="store_true",
        help="show the routes over every worker, busiest first, rather than the workers (r toggles)",
    )
    with_timeout(p, 2.0)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("metrics", help="fleet stats in the Prometheus text format")
    p.add_argument("target", metavar="TARGET", help="socket file or socket directory")
    p.add_argument("--prefix", type=_metric_prefix, default="asgi", help="metric name prefix (default asgi)")
    p.add_argument(
        "--output", metavar="FILE", help="write atomically to FILE (for node_exporter's textfile collector)"
    )
    with_timeout(p, STATS_TIMEOUT)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("overrides", help="show or clear the durable overrides of a socket directory")
    p.add_argument("action", choices=["show", "clear"])
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the overrides file as JSON (show)")
    p.set_defaults(func=cmd_overrides)
    return parser


def _split_send_options(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # ``send DIR set x=1 --json y=2``: argparse stops filling ``args`` at the
    # first option, so key=value words after an option come back as extras.
    ns, extras = parser.parse_known_args(argv)
    if extras:
        if getattr(ns, "command", None) == "send" and all("=" in w and not w.startswith("-") for w in extras):
            ns.args = [*ns.args, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return ns


def _subcommand_hint(parser: argparse.ArgumentParser, words: list[str]) -> str:
    """For ``unixsock-asgi stats DIR``: a worker's command where a subcommand goes."""
    if not words or words[0].startswith("-"):
        return ""  # an option first: the word after it may be its value, not a command
    first = words[0]
    subcommands: list[str] = []
    for action in parser._subparsers._group_actions if parser._subparsers is not None else ():
        subcommands += getattr(action, "choices", None) or ()
    if first in subcommands or len(first) > 64:
        return ""
    near = difflib.get_close_matches(first, subcommands, n=1, cutoff=0.7)
    if near:
        return f"; did you mean {near[0]!r}?"
    rest = words[1:]
    if rest and not rest[0].startswith("-") and rest[0] not in subcommands:
        suggested = shlex.join(["send", rest[0], first, *rest[1:]])
        return f"; to run the workers' own {first!r}, the subcommand is send: {suggested}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 or 2)."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            ns = _split_send_options(parser, words)
        except UsageError as exc:
            raise UsageError(f"{exc}{_subcommand_hint(parser, words)}") from None
        status: int = ns.func(ns)
        return status
    except UsageError as exc:
        print(terminal_safe(f"{PROG}: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except _Failed as exc:
        print(terminal_safe(f"{PROG}: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # ``unixsock-asgi ... | head``: the reader left; that is not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        # A local file the operator may not use (the overrides file, a socket
        # directory that went away): one line, not a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
