"""Built-in commands, grouped by concern. All are diagnostics: they run on the
control thread, touch only thread-safe state, and answer while the app loop is blocked."""

from __future__ import annotations

import asyncio
import difflib
import faulthandler
import gc
import inspect
import linecache
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Iterable, Iterator
from typing import Any

from ._commands import Commands
from ._control import CommandContext, LogRestore, unknown_command
from ._protocol import Response
from ._server import audit_logger

__all__ = ["builtin_commands"]

builtin_commands = Commands()
command = builtin_commands.command

_STACK_LIMIT = 40


# -- introspection ------------------------------------------------------------


@command(readonly=True, diagnostic=True)
def ping() -> str:
    """Answer "pong": the worker and its control thread are alive."""
    return "pong"


@command(name="help", readonly=True, diagnostic=True)
def help_(ctx: CommandContext, command: str = "") -> Any:
    """List every command with its arguments and help text (or just ``command``)."""
    commands = [c.to_help() for c in ctx.control.commands if not command or c.name == command]
    handler = ctx.control.handler
    if command and not commands:
        if handler is not None:
            return Response.failure(
                f"{command!r} is not a registered command; the app's Go-style handler ({_name_of(handler)})"
                " answers it, and has no help of its own"
            )
        return Response.failure(unknown_command(command, ctx.control.commands))
    if handler is not None and not command:
        doc = inspect.cleandoc(getattr(handler, "__doc__", None) or "").strip()
        return {"commands": commands, "handler": {"name": _name_of(handler), "doc": doc}}
    return {"commands": commands}


def _name_of(handler: Any) -> str:
    return str(getattr(handler, "__qualname__", None) or type(handler).__qualname__)


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None)
    if version is None and mod is not None:
        try:
            from importlib.metadata import version as dist_version

            return dist_version(module)
        except Exception:
            return None
    return str(version) if version is not None else None


def caller_modules(frame: types.FrameType | None) -> Iterator[str]:
    """The modules of ``frame`` and of each frame that called it, innermost first ("" where unnamed)."""
    while frame is not None:
        name = frame.f_globals.get("__name__")
        yield name if isinstance(name, str) else ""
        frame = frame.f_back


_ASGI_SERVERS = ("uvicorn", "hypercorn", "granian", "daphne")
"""ASGI servers, by the top-level package their lifespan calls the app from."""


def server_software(frame: types.FrameType | None) -> str | None:
    """The ASGI server that runs the code of ``frame`` (its caller's frames), with gunicorn
    when that runs it: ``"gunicorn 23.0.0 + uvicorn 0.34.0"``; None for one it does not know.

    Told by the frames that called the lifespan, not by what is imported: an app
    module that imports uvicorn (for ``uvicorn.run`` under ``__main__``) may run
    under hypercorn or granian.
    """
    packages: set[str] = set()
    server = None
    for module in caller_modules(frame):
        top = module.partition(".")[0]
        packages.add(top)
        if server is None and top in _ASGI_SERVERS:
            server = top  # the innermost: the one that speaks ASGI to the app
    if server is None:
        return None
    software = f"{server} {_version(server)}"
    return f"gunicorn {_version('gunicorn')} + {software}" if "gunicorn" in packages else software


@command(readonly=True, diagnostic=True)
def info(ctx: CommandContext) -> dict[str, Any]:
    """Pid, uptime, host, and versions of Python, the ASGI server and the framework."""
    from . import __version__

    framework = None
    for name in ("fastapi", "starlette"):
        if name in sys.modules:
            framework = f"{name} {_version(name)}"
            break
    control = ctx.control
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": socket.gethostname(),
        "uptime_s": time.time() - control.started_at,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "server": ctx.control.server_software,
        "framework": framework,
        "unixsock_asgi": __version__,
        "socket": control.socket_path,
        "socket_dir": control.socket_dir,
    }


# -- statistics ---------------------------------------------------------------


@command(readonly=True, diagnostic=True)
def stats(ctx: CommandContext, routes: bool = True) -> dict[str, Any]:
    """Request counts by route, status and method; latency histograms; process figures."""
    payload = ctx.stats.snapshot(routes=routes)
    monitor = ctx.control.monitor
    if monitor.task is not None:
        # The lag is measured when the loop runs its monitor again: while the loop is
        # blocked, how long it has been blocked so far is its lag (it was 0 until then).
        blocked = monitor.blocked_for()
        process = payload["process"]
        if blocked > process["loop_lag_s"]:
            process["loop_lag_s"] = blocked
            process["loop_lag_max_s"] = max(process["loop_lag_max_s"], blocked)
    control = ctx.control
    # What an operator set on this worker, where every view of the fleet shows it: a
    # health_fail or maintenance left on after a deploy is otherwise seen by nobody.
    payload["control"] = {"health_failing": control.health_failing, "maintenance": control.maintenance}
    return payload


@command(diagnostic=True)
def stats_reset(ctx: CommandContext) -> dict[str, Any]:
    """Zero the request counters and histograms (in-flight gauges stay)."""
    return {"reset": True, "requests_before": ctx.stats.reset()}


# -- logging ------------------------------------------------------------------


def _existing_logger(name: str) -> logging.Logger | None:
    """The logger called ``name`` if the process has it; never makes one."""
    if not name or name == "root":
        return logging.getLogger()
    found = logging.root.manager.loggerDict.get(name)
    return found if isinstance(found, logging.Logger) else None


# set_log_level may make a logger the app has not made yet (it may make it later),
# within bounds: a logger lives as long as the process, with one entry per dotted prefix.
_NEW_LOGGER_NAME = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*){0,15}")
_NEW_LOGGER_NAME_MAX = 128
_NEW_LOGGERS_MAX = 256
_new_loggers: set[str] = set()
_NAME_RULE = f"dotted words of letters, digits, _ or -, at most {_NEW_LOGGER_NAME_MAX} characters"


def _makeable(name: str) -> bool:
    """A name a logger may be made under (and described by before it is): bounded."""
    return len(name) <= _NEW_LOGGER_NAME_MAX and _NEW_LOGGER_NAME.fullmatch(name) is not None


def _near_loggers(name: str) -> list[str]:
    """Existing loggers whose names are close to ``name``: what a typo meant.

    Not a logger's parent or child: ``sqlalchemy`` when only ``sqlalchemy.pool``
    exists, or ``sqlalchemy.engine.Engine`` before the engine is made, is no typo.
    """
    known = list(logging.root.manager.loggerDict.items())
    if name in dict(known):  # a placeholder: the parent of loggers that exist
        return []
    names = [
        n
        for n, lg in known
        if isinstance(lg, logging.Logger) and not n.startswith(name + ".") and not name.startswith(n + ".")
    ]
    return difflib.get_close_matches(name, names, n=3, cutoff=0.8)


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"


_MAX_TTL_S = 7 * 86400


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        if not 0 <= level <= 100:  # logging's own go from 0 (NOTSET) to 50 (CRITICAL)
            raise ValueError(f"log level must be between 0 and 100, got {level}")
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        known = ", ".join(logging.getLevelName(n) for n in (10, 20, 30, 40, 50))
        raise ValueError(f"unknown log level {level!r}; use one of {known} or a number")
    return value


def _describe_logger(lg: logging.Logger) -> dict[str, Any]:
    return {
        "logger": lg.name,
        "level": logging.getLevelName(lg.level),
        "effective": logging.getLevelName(lg.getEffectiveLevel()),
        # logging.config's disable_existing_loggers (on by default) silences every logger made
        # before it ran, whatever its level.
        "disabled": lg.disabled,
    }


_DISABLED_NOTE = (
    "this logger is disabled (logging.config disables the loggers made before it runs, unless"
    " disable_existing_loggers=False): it logs nothing at any level; enable=true enables it"
)

_NO_HANDLER_NOTE = (
    "no handler takes this logger's records: the process has configured no logging for it or"
    " the loggers above it (uvicorn configures only its own), so its records below WARNING go"
    " nowhere; give it or the root logger a handler (logging.basicConfig in the app, or a"
    " root or logger entry with handlers in uvicorn's --log-config)"
)


@command(readonly=True, diagnostic=True)
def loggers() -> dict[str, Any]:
    """Every logger the process knows, with its own and its effective level."""
    names = sorted(
        n for n, lg in list(logging.root.manager.loggerDict.items()) if isinstance(lg, logging.Logger)
    )
    out = {"root": _describe_logger(logging.getLogger())}
    for name in names:
        out[name] = _describe_logger(logging.getLogger(name))
    return {"loggers": out}


@command(readonly=True, diagnostic=True)
def get_log_level(logger: str = "") -> Any:
    """The level of ``logger`` (the root logger by default)."""
    lg = _existing_logger(logger)
    if lg is not None:
        return _describe_logger(lg)
    if not _makeable(logger):
        return Response.failure(
            f"no logger {_shown(logger)} in this process, and none could be made under that name"
            f" ({_NAME_RULE}); 'loggers' lists those there are"
        )
    # Not made yet: it would start at NOTSET and inherit from its nearest existing parent.
    parent = logger.rpartition(".")[0]
    while parent and _existing_logger(parent) is None:
        parent = parent.rpartition(".")[0]
    inherited = _existing_logger(parent) or logging.getLogger()
    return {
        "logger": logger,
        "level": "NOTSET",
        "effective": logging.getLevelName(inherited.getEffectiveLevel()),
        "exists": False,
        "did_you_mean": _near_loggers(logger),
    }


@command(diagnostic=True)
def set_log_level(
    ctx: CommandContext,
    level: str | int,
    logger: str = "",
    ttl: float | None = None,
    create: bool = False,
    enable: bool = False,
) -> Any:
    """Set ``logger``'s level (root by default; uvicorn's loggers too). With ``ttl``
    seconds, the level before the change comes back afterwards, unless the app has
    set another one meanwhile. A logger the process has not made yet is made, unless
    its name is close to one it has (a typo): then ``create=true`` makes it anyway.
    ``enable=true`` also enables a logger that logging.config disabled (until the ttl)."""
    try:
        number = _level_number(level)
    except ValueError as exc:
        return Response.failure(str(exc))
    if ttl is not None and not 0 < ttl <= _MAX_TTL_S:
        return Response.failure(
            f"ttl must be a positive number of seconds, at most {_MAX_TTL_S} (a week), got {_exactly(ttl)}"
        )
    lg = _existing_logger(logger)
    made = False
    if lg is None:
        if not _makeable(logger):
            return Response.failure(
                f"no logger {_shown(logger)} in this process, and that is not a name to make one under"
                f" ({_NAME_RULE}); 'loggers' lists those there are"
            )
        if logger not in _new_loggers and len(_new_loggers) >= _NEW_LOGGERS_MAX:
            return Response.failure(
                f"no logger {_shown(logger)} in this process, and {_NEW_LOGGERS_MAX} have been made from the"
                " socket already; 'loggers' lists those there are"
            )
        near = _near_loggers(logger)
        if near and not create:
            return Response.failure(
                f"no logger {_shown(logger)} in this process; did you mean {' or '.join(map(repr, near))}?"
                " (create=true makes it anyway, for code that makes it later)"
            )
        _new_loggers.add(logger)
        lg = logging.getLogger(logger)
        made = True
    key = lg.name
    # NOTSET too, where what it would inherit is above INFO.
    if lg is audit_logger and _audit_level_after(lg, number) > logging.INFO:
        return Response.failure(
            f"the audit logger {key!r} is not quietened from the socket (it records who sent what);"
            " its level is the app's logging configuration's to set"
        )
    if audit_logger.isEnabledFor(logging.INFO) and _audit_level_after(lg, number) > logging.INFO:
        # Said while it is still heard: the audit lines of the commands that follow are not.
        audit_logger.warning(
            "peer pid=%d uid=%d sets the level of %r to %s%s: the audit lines of later commands"
            " are not logged while it stands",
            ctx.peer.pid,
            ctx.peer.uid,
            key,
            logging.getLevelName(number),
            f" for {ttl:g}s" if ttl is not None else "",
        )
    restores = ctx.control.log_restores
    old = lg.level
    original, redisable = old, False
    pending = restores.pop(key, None)
    if pending is not None:
        pending.handle.cancel()
        # Untouched since, a ttl'd change over a ttl'd change reverts to the first level;
        # else the app set a level of its own between the two, and its configuration stands.
        if old == pending.set_to:
            original = pending.level
            redisable = pending.redisable and not lg.disabled
    lg.setLevel(number)
    if enable and lg.disabled:
        lg.disabled = False
        redisable = True
    result: dict[str, Any] = {
        "logger": key,
        "old": logging.getLevelName(old),
        "new": logging.getLevelName(number),
        "ttl": ttl,
        "reverts_to": None,
        "made": made,
        "disabled": lg.disabled,
    }
    if lg.disabled:
        result["note"] = _DISABLED_NOTE
    elif number < logging.WARNING and not lg.hasHandlers():
        result["note"] = _NO_HANDLER_NOTE  # a DEBUG level that shows nothing, and why
    if ttl is not None:
        loop = asyncio.get_running_loop()
        audit = logging.getLogger("unixsock_asgi")

        def restore() -> None:
            restores.pop(key, None)
            if lg.level != number:  # the app set another level since: that one stands
                audit.info(
                    "log level of %r not reverted after %gs: it was set to %s meanwhile",
                    key,
                    ttl,
                    logging.getLevelName(lg.level),
                )
                return
            lg.setLevel(original)
            if redisable:
                lg.disabled = True
            audit.info("log level of %r reverted to %s after %gs", key, logging.getLevelName(original), ttl)

        restores[key] = LogRestore(loop.call_later(ttl, restore), original, number, redisable)
        result["reverts_to"] = logging.getLevelName(original)
    return result


def _audit_level_after(lg: logging.Logger, number: int) -> int:
    """The audit logger's effective level once ``lg`` is set to ``number``."""
    current: logging.Logger | None = audit_logger
    while current is not None:
        level = number if current is lg else current.level
        if level:
            return level
        current = current.parent
    return logging.NOTSET


# -- runtime settings ---------------------------------------------------------


@command(name="settings", readonly=True, diagnostic=True)
def settings_(ctx: CommandContext) -> dict[str, Any]:
    """Every runtime setting with its value, default, type and help text."""
    return {"settings": ctx.settings.describe()}


@command(name="get", readonly=True, diagnostic=True)
def get_(ctx: CommandContext, name: str) -> Any:
    """The current value of setting ``name``."""
    try:
        return {"name": name, "value": ctx.settings.get(name)}
    except KeyError as exc:
        return Response.failure(str(exc.args[0]))


def _logged(value: Any) -> str:
    """A value as a log line shows it: bounded, so that big values sent in a loop cannot fill the disk."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:160]}... ({len(text)} characters)"


@command(name="set", diagnostic=True)
def set_(ctx: CommandContext, name: str, value: Any) -> Any:
    """Validate and apply a new value for setting ``name``; returns old and new."""
    try:
        old, new = ctx.settings.set(name, value)
    except KeyError as exc:
        return Response.failure(str(exc.args[0]))
    except (TypeError, ValueError) as exc:
        return Response.failure(f"setting {name!r}: {exc}")
    ctx.logger.info("setting %s changed from %s to %s", name, _logged(old), _logged(new))
    return {"name": name, "old": old, "new": new}


# -- health, maintenance, drain -------------------------------------------------


def _health(ctx: CommandContext) -> dict[str, Any]:
    control = ctx.control
    return {
        "health_failing": control.health_failing,
        "health_path": control.health_path,
        "maintenance": control.maintenance,
        "maintenance_exempt": sorted(control.maintenance_exempt),
        "retry_after": control.retry_after,
        "in_flight": control.stats.in_flight,
    }


@command(readonly=True, diagnostic=True)
def health(ctx: CommandContext) -> dict[str, Any]:
    """Whether the health path fails, maintenance is on, and what is in flight."""
    return _health(ctx)


@command(diagnostic=True)
def health_fail(ctx: CommandContext) -> dict[str, Any]:
    """Make the health path answer 503 so a load balancer drains this worker.

    Workers that share a listening port (uvicorn --workers, gunicorn) are
    drained together: send it to all of them, or the health check flaps.
    """
    ctx.control.set_health(failing=True)
    return _health(ctx)


@command(diagnostic=True)
def health_ok(ctx: CommandContext) -> dict[str, Any]:
    """Let the health path answer normally again."""
    ctx.control.set_health(failing=False)
    return _health(ctx)


@command(diagnostic=True)
def maintenance_on(ctx: CommandContext, retry_after: int | None = None) -> Any:
    """Answer 503 with Retry-After on every path but the exempt ones."""
    if retry_after is not None and not 0 <= retry_after <= _MAX_TTL_S:
        return Response.failure(f"retry_after must be between 0 and {_MAX_TTL_S} seconds, got {retry_after}")
    ctx.control.set_maintenance(True, retry_after)
    return _health(ctx)


@command(diagnostic=True)
def maintenance_off(ctx: CommandContext) -> dict[str, Any]:
    """Serve every path normally again."""
    ctx.control.set_maintenance(False)
    return _health(ctx)


def _exactly(value: float) -> str:
    """``value`` short where that is exact: a refused 300.0001 must not read as 300."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@command(diagnostic=True)
async def drain(ctx: CommandContext, timeout: float = 30.0, quiet: float = 1.0) -> Any:
    """Wait until no request is in flight and none has started for ``quiet`` seconds
    (at most ``timeout`` seconds, max 300; ``quiet`` is capped at ``timeout``, 0 checks
    in-flight alone). Run ``health_fail`` first: while the load balancer still sends
    requests, the drain waits, and fails at ``timeout`` saying they still arrive."""
    if not 0 <= timeout <= 300:
        return Response.failure(f"timeout must be between 0 and 300 seconds, got {_exactly(timeout)}")
    if not 0 <= quiet <= 300:
        return Response.failure(f"quiet must be between 0 and 300 seconds, got {_exactly(quiet)}")
    quiet = min(quiet, timeout)
    stats = ctx.stats
    start = time.monotonic()
    deadline = start + timeout
    # The gate's own answers (503s of health_fail and maintenance) do not count as
    # started: only requests that reach the app keep the drain waiting.
    seen = stats.started
    arrived = 0
    last_arrival = start
    while True:
        now = time.monotonic()
        # In flight first: a request that starts and ends between the two
        # reads is then seen by the count of requests started.
        in_flight = stats.in_flight
        started = stats.started
        if started != seen:
            arrived += started - seen
            seen, last_arrival = started, now
        if in_flight == 0 and now - last_arrival >= quiet:
            break
        if now >= deadline:
            waited = now - start
            payload = {
                "drained": False,
                "in_flight": in_flight,
                "waited_s": waited,
                "arrived": arrived,
                "websockets_active": stats.websockets_active,
            }
            if in_flight:
                return Response.failure(
                    f"still {in_flight} request(s) in flight after {waited:.1f}s", payload=payload
                )
            return Response.failure(
                f"requests still arrive: {arrived} started in {waited:.1f}s, the last {now - last_arrival:.1f}s ago"
                " (is the load balancer still sending? health_fail first; quiet=0 waits for"
                " in-flight requests alone, if what arrives is probes)",
                payload=payload,
            )
        await asyncio.sleep(min(0.02, max(0.0, deadline - now)))
    # Websocket sessions are long-lived and not waited for; how many are open is said.
    result: dict[str, Any] = {
        "drained": True,
        "in_flight": 0,
        "waited_s": time.monotonic() - start,
        "arrived": arrived,
        "websockets_active": stats.websockets_active,
    }
    control = ctx.control
    if not (control.health_failing or control.maintenance):
        # True of the last `quiet` seconds only: nothing keeps the next request away.
        result["note"] = (
            f"nothing was in flight for {quiet:g}s, but this worker still takes requests ({arrived}"
            " arrived while it drained): its health check passes and maintenance is off; send"
            " health_fail (or maintenance_on) first for a drain that lasts"
        )
    return result


# -- where is it stuck? ---------------------------------------------------------


def _frames(frames: list[traceback.FrameSummary]) -> list[str]:
    return [f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames]


_SHOWN_MAX = 10_000
_BY_CORO_MAX = 100  # the most numerous; ``coroutines`` counts them all


def _shown_limit(limit: int) -> str | None:
    if not 0 <= limit <= _SHOWN_MAX:
        return f"limit must be between 0 and {_SHOWN_MAX}, got {limit}"
    return None


def _awaited_frames(coro: Any) -> list[traceback.FrameSummary]:
    """Where a task waits: its coroutine's frame, then those of what it awaits, down
    to the innermost, outermost first (``Task.get_stack`` gives a suspended
    coroutine's outermost frame alone: uvicorn's ``run_asgi`` for every request).

    Read from the control thread while the loop may run on: a coroutine that
    finishes meanwhile just ends the chain.
    """
    located: list[tuple[types.FrameType, int]] = []
    seen: set[int] = set()
    while coro is not None and len(located) < _STACK_LIMIT and id(coro) not in seen:
        seen.add(id(coro))
        frame = None
        for attr in ("cr_frame", "gi_frame", "ag_frame"):  # coroutine, generator-based, async generator
            frame = getattr(coro, attr, None)
            if frame is not None:
                break
        if not isinstance(frame, types.FrameType):
            break  # finished, or an awaitable of another kind (a Future: the chain's end)
        located.append((frame, frame.f_lineno))
        awaited = None
        for attr in ("cr_await", "gi_yieldfrom", "ag_await"):
            awaited = getattr(coro, attr, None)
            if awaited is not None:
                break
        coro = _async_generator_behind(awaited)
    summary = traceback.StackSummary.extract(iter(located), lookup_lines=True)
    return list(summary)


_ASEND_TYPES = ("async_generator_asend", "async_generator_athrow")


def _async_generator_behind(awaited: Any) -> Any:
    """``async for`` and ``asynccontextmanager`` await an ``asend`` object of the
    generator, which names it nowhere but in its references: the generator, to
    go on down its frame (a StreamingResponse body, a FastAPI yield dependency)."""
    if type(awaited).__name__ not in _ASEND_TYPES:
        return awaited
    for referent in gc.get_referents(awaited):
        if isinstance(referent, types.AsyncGeneratorType):
            return referent
    return None


_Located = tuple[str, int, str]  # file, line, function
_DUMPED_DEPTH = 100  # frames faulthandler shows of a thread, the innermost
_DUMPED_THREAD = re.compile(r"(?:Current thread|Thread) 0x([0-9a-f]+) \(most recent call first\):")
_DUMPED_FRAME = re.compile(r'  File "(.*)", line (\d+|\?\?\?) in (.*)')
_DUMPED_ESCAPE = re.compile(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})")


def _undumped(text: str) -> str:
    """A name as faulthandler wrote it (``\\xe9`` for ``é``), as it was."""
    return _DUMPED_ESCAPE.sub(lambda m: chr(int(next(g for g in m.groups() if g), 16)), text)


def _thread_stacks() -> dict[int, list[_Located]]:
    """Every thread's stack, innermost frame first, as ``faulthandler`` reads it: in C,
    with the GIL held throughout, so that no thread moves meanwhile.

    Not by walking other threads' frames from Python (``sys._current_frames()``,
    then ``f_back`` after ``f_back``): a thread that runs between two steps of such
    a walk pops frames under it, and CPython 3.11 has crashed doing that under load
    (it is what makes in-process samplers segfault there). faulthandler shows the
    100 newest threads and the 100 innermost frames of each.
    """
    try:
        out: Any = os.fdopen(os.memfd_create("unixsock-stacks", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):  # not Linux, or no memfd here
        out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the with below)
    with out:
        faulthandler.dump_traceback(out, all_threads=True)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    stacks: dict[int, list[_Located]] = {}
    current: list[_Located] | None = None
    for line in text.splitlines():
        if thread := _DUMPED_THREAD.fullmatch(line):
            current = stacks.setdefault(int(thread.group(1), 16), [])
        elif current is not None and (frame := _DUMPED_FRAME.fullmatch(line)):
            number = int(frame.group(2)) if frame.group(2).isdigit() else 0
            current.append((_undumped(frame.group(1)), number, _undumped(frame.group(3))))
    return stacks


def _thread_stack(thread_id: int) -> list[_Located] | None:
    """One thread's stack, innermost first, for a thread faulthandler left out (more than
    100 threads, the oldest of them the app loop's): walked from Python, with the switch
    interval raised meanwhile so that no other thread runs between two steps."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(max(before, 1.0))
    try:
        frame = sys._current_frames().get(thread_id)
        frames: list[_Located] = []
        while frame is not None and len(frames) < _DUMPED_DEPTH:
            code = frame.f_code
            frames.append((code.co_filename, frame.f_lineno or 0, code.co_name))
            frame = frame.f_back
    finally:
        sys.setswitchinterval(before)
    return frames if frames else None


def _located(frames: Iterable[_Located]) -> list[str]:
    """Frames as :func:`_frames` shows them, each with its line of source (read afterwards)."""
    frames = list(frames)
    for file in {file for file, _, _ in frames}:
        linecache.checkcache(file)  # a file edited since it was read is read again
    return [
        f"{file}:{line} in {name}: {linecache.getline(file, line).strip()}" for file, line, name in frames
    ]


@command(readonly=True, diagnostic=True)
def stacks(ctx: CommandContext, limit: int = 100) -> Any:
    """Every thread's current stack, innermost frame last; the app loop's thread is
    marked and comes first. At most ``limit`` threads are shown; ``count`` says how many there are."""
    if problem := _shown_limit(limit):
        return Response.failure(problem)
    names = {t.ident: t.name for t in threading.enumerate()}
    loop_thread = getattr(ctx.control, "app_thread_id", None)
    dumped = _thread_stacks()
    if loop_thread is not None and loop_thread not in dumped and loop_thread in names:
        walked = _thread_stack(loop_thread)  # the one thread this command is for
        if walked is not None:
            dumped[loop_thread] = walked
    everyone = set(dumped) | set(names)
    chosen = sorted(everyone, key=lambda ident: (ident != loop_thread, names.get(ident, "?"), ident))[:limit]
    threads = [
        {
            "thread_id": ident,
            "name": names.get(ident, "?"),
            "app_loop": ident == loop_thread,
            # The innermost frames, outermost of them first (as a traceback reads).
            "stack": _located(dumped.get(ident, [])[:_STACK_LIMIT][::-1])
            if ident in dumped
            else ["(not read: it ended meanwhile, or faulthandler shows the 100 newest threads alone)"],
        }
        for ident in chosen
    ]
    return {"threads": threads, "count": len(everyone), "omitted": len(everyone) - len(threads)}


def _running_frames(
    task: asyncio.Task[Any], thread_id: int | None, loop: asyncio.AbstractEventLoop
) -> list[str] | None:
    """Where the task the loop is running now is (blocking it, if it takes long): its
    thread's stack from the task's coroutine inwards, outermost first. A suspended
    coroutine's chain of awaits stops at a running one, so it is read from the thread."""
    code = getattr(task.get_coro(), "cr_code", None)
    if thread_id is None or code is None:
        return None
    frames = _thread_stacks().get(thread_id) or _thread_stack(thread_id) or []
    if asyncio.current_task(loop) is not task:
        return None  # it finished, or gave way, meanwhile: the frames read may be another's
    # The task's coroutine: the outermost frame of its code (the thread runs nothing outside
    # a task's step but the loop).
    own = [i for i, (file, _, name) in enumerate(frames) if file == code.co_filename and name == code.co_name]
    if not own:
        # Deeper than the 100 frames read, the task's own is not among them: what is, is its.
        return _located(frames[:_STACK_LIMIT][::-1]) if len(frames) >= _DUMPED_DEPTH else None
    # The innermost frames, as stacks shows them: where it is, under a deep middleware stack.
    return _located(frames[: own[-1] + 1][:_STACK_LIMIT][::-1])


@command(readonly=True, diagnostic=True)
def tasks(ctx: CommandContext, limit: int = 100) -> Any:
    """The app loop's asyncio tasks with the frames they are suspended in; the one the
    loop is running now (the one blocking it, when it is blocked) is marked and comes
    first. At most ``limit`` are shown, taken in turn from each coroutine; ``by_coro``
    counts the tasks of the 100 most numerous."""
    if problem := _shown_limit(limit):
        return Response.failure(problem)
    loop = ctx.loop
    if loop is None:
        return {"tasks": [], "count": 0, "by_coro": {}, "coroutines": 0, "omitted": 0, "running": None}
    groups: dict[str, list[asyncio.Task[Any]]] = {}
    everything = list(asyncio.all_tasks(loop))
    running = asyncio.current_task(loop)  # read from this thread: None while the loop waits
    if running is not None and running not in everything:  # made since all_tasks was read
        everything.append(running)
    for task in everything:
        coro = task.get_coro()
        groups.setdefault(getattr(coro, "__qualname__", type(coro).__name__), []).append(task)
    # Each coroutine's tasks in turn, the most numerous first: 10,000 idle handlers
    # do not hide the one task that differs.
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    chosen: list[tuple[str, asyncio.Task[Any]]] = []
    depth, live = 0, ordered
    while live and len(chosen) < limit:  # one step per task chosen or coroutine dropped
        for qualname, members in live[: limit - len(chosen)]:
            chosen.append((qualname, members[depth]))
        depth += 1
        live = [group for group in live if len(group[1]) > depth]
    if running is not None and limit > 0 and all(task is not running for _, task in chosen):
        if len(chosen) == limit:  # shown whatever the limit: it is the one an operator looks for
            chosen.pop()
        coro = running.get_coro()
        chosen.append((getattr(coro, "__qualname__", type(coro).__name__), running))
    out: list[dict[str, Any]] = []
    for qualname, task in chosen:
        running_at = _running_frames(task, ctx.control.app_thread_id, loop) if task is running else None
        out.append(
            {
                "name": task.get_name(),
                "coro": qualname,
                "done": task.done(),
                "running": task is running,
                "stack": running_at if running_at is not None else _frames(_awaited_frames(task.get_coro())),
            }
        )
    out.sort(key=lambda t: (not t["running"], t["name"]))
    return {
        "tasks": out,
        "count": len(everything),
        "by_coro": {qualname: len(members) for qualname, members in ordered[:_BY_CORO_MAX]},
        "coroutines": len(ordered),
        "omitted": len(everything) - len(out),
        "running": running.get_name() if running is not None else None,
    }


for _builtin in builtin_commands:
    _builtin.inline = True  # none of them blocks: they answer on the control loop itself
del _builtin
