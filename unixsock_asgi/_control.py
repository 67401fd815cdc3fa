"""The control plane of one worker: its server, its live state, and command dispatch.

Where commands run:

* ``diagnostic`` commands (every built-in but ``drain``'s waiting is also
  done there) run on the control server's own thread and loop, so they answer
  while the app's loop is blocked; they only touch thread-safe state.
* Every other command, and the monolithic fallback handler, runs on the app's
  event loop (so it may touch app objects and await the app's resources),
  bounded by ``app_timeout``. When the app loop does not even pick the call
  up in time, the reply says the loop appears blocked and for how long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _compat
from ._checks import is_seconds, whole_number
from ._commands import Command, Commands
from ._exceptions import ArgumentError
from ._protocol import STATUS_FAIL, STATUS_OK, Response, short_repr
from ._server import RequestContext, ServerConfig, UnixSockServer, _takes_context, audit, raised_failure
from ._settings import Settings
from ._sockets import PeerCredentials
from ._stats import Stats

__all__ = ["CommandContext", "ControlPlane"]

logger = logging.getLogger("unixsock_asgi")


AppHandler = Callable[[str, dict[str, Any]], Any] | Callable[[str, dict[str, Any], "CommandContext"], Any]
"""The Go-style monolithic handler: ``handler(cmd, args)`` or ``handler(cmd, args, ctx)``, sync or async."""


@dataclass
class CommandContext:
    """What a command handler gets as ``ctx``: live access to the running app."""

    control: ControlPlane
    peer: PeerCredentials
    logger: logging.Logger
    request_id: Any = None

    @property
    def app(self) -> Any:
        """The app the server runs: Starlette's or FastAPI's instance (the lifespan's
        ``scope["app"]``), also when the middleware sits in its middleware list; else
        the ASGI app the middleware wraps."""
        host = self.control.host_app
        return host if host is not None else self.control.app

    @property
    def state(self) -> dict[str, Any]:
        """The lifespan state dict (what the app's lifespan yielded), live."""
        return self.control.lifespan_state

    @property
    def app_state(self) -> Any:
        """Starlette's ``app.state``, where the app has one, else None."""
        return self.control.app_state

    @property
    def stats(self) -> Stats:
        """This worker's request statistics."""
        return self.control.stats

    @property
    def settings(self) -> Settings:
        """The app's runtime settings."""
        return self.control.settings

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The app's event loop."""
        return self.control.app_loop


@dataclass(frozen=True)
class LogRestore:
    """A ttl'd ``set_log_level`` waiting to be undone."""

    handle: asyncio.TimerHandle
    level: int
    """The level to put back."""
    set_to: int
    """The level the change set: undone only while the logger is still at it."""
    redisable: bool
    """The logger was disabled and ``enable=true`` enabled it: disabled again at the revert."""


@dataclass
class _LoopMonitor:
    """Measures the app loop's lag with a periodic task; the control thread reads it."""

    interval: float = 0.5
    last_tick: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    async def run(self, stats: Stats) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            self.last_tick = time.monotonic()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            stats.loop_lag_s = lag
            stats.loop_lag_total_s += lag
            if lag > stats.loop_lag_max_s:
                stats.loop_lag_max_s = lag

    def blocked_for(self) -> float:
        """Seconds since the loop last ran the monitor, beyond the expected interval."""
        return max(0.0, time.monotonic() - self.last_tick - self.interval)


def unknown_command(cmd: str, commands: Iterable[Command]) -> str:
    """The failure for a command nobody answers, with the registered names it is close to."""
    # Bounded: difflib's cost grows with the name's length times the names', and names are short.
    near = (
        difflib.get_close_matches(cmd, [c.name for c in commands], n=3, cutoff=0.75) if len(cmd) <= 64 else []
    )
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return f"unknown command {short_repr(cmd)}{hint}; 'help' lists the commands"


class AllCommands:
    """The app's commands over the built-ins, looked up live: a command the app
    registers after wrapping (or after startup) is found too."""

    def __init__(self, app_commands: Commands | None, builtins: Commands) -> None:
        self.app_commands = app_commands
        self.builtins = builtins

    def get(self, name: str) -> Command | None:
        found = self.app_commands.get(name) if self.app_commands is not None else None
        return found if found is not None else self.builtins.get(name)

    def replaced(self) -> list[str]:
        """Names of built-ins the app's commands replace."""
        return [c.name for c in self.app_commands or () if c.name in self.builtins]

    def __iter__(self) -> Iterator[Command]:
        merged = {c.name: c for c in self.builtins}
        merged.update((c.name, c) for c in self.app_commands or ())
        return iter(sorted(merged.values(), key=lambda c: c.name))


class _ReadOnlyNames:
    """The names of the read-only commands, looked up live (``ServerConfig.quiet_commands``)."""

    def __init__(self, commands: AllCommands) -> None:
        self.commands = commands

    def __contains__(self, name: object) -> bool:
        command = self.commands.get(name) if isinstance(name, str) else None
        return command is not None and command.readonly


class ControlPlane:
    """One worker's control plane. Created by the middleware; started in its lifespan."""

    def __init__(
        self,
        app: Any,
        *,
        commands: AllCommands,
        settings: Settings,
        stats: Stats,
        handler: AppHandler | None,
        server_options: dict[str, Any],
        app_timeout: float,
        health_path: str,
        maintenance_exempt: tuple[str, ...],
        retry_after: int,
    ) -> None:
        self.app = app
        self.commands = commands
        self.settings = settings
        self.stats = stats
        self.handler = handler
        self._handler_ctx = handler is not None and _takes_context(handler)
        self.server_options = server_options
        self.app_timeout = app_timeout
        self.health_path = health_path
        self.maintenance_exempt: frozenset[str] = frozenset(maintenance_exempt)
        self.default_retry_after: int = retry_after
        self.retry_after: int = retry_after  # the same object: see _check_options
        self.health_failing: bool = False
        self.maintenance: bool = False
        # Until a lifespan starts, the first request checks whether one ever will.
        self.awaiting_lifespan: bool = True
        self.gate: bool = True  # health_failing, maintenance or awaiting_lifespan: one check on the hot path
        self.lifespan_state: dict[str, Any] = {}
        self.app_state: Any = None
        self.host_app: Any = None  # the lifespan's scope["app"]: see CommandContext.app
        self.app_loop: asyncio.AbstractEventLoop | None = None
        self.app_thread_id: int | None = None
        self.server_software: str | None = None
        """The ASGI server that started the lifespan (``info``'s ``server``)."""
        self.server: UnixSockServer | None = None
        self.socket_path: str | None = None
        self.socket_dir: str | None = None
        self.started_at: float = time.time()
        self._pid = os.getpid()
        self.monitor: _LoopMonitor = _LoopMonitor()
        self.log_restores: dict[str, LogRestore] = {}

    # -- health and maintenance -------------------------------------------

    def _regate(self) -> None:
        self.gate = self.health_failing or self.maintenance or self.awaiting_lifespan

    def lifespan_began(self) -> None:
        self.awaiting_lifespan = False
        self._regate()

    def set_health(self, failing: bool) -> None:
        self.health_failing = failing
        self._regate()

    def set_maintenance(self, on: bool, retry_after: int | None = None) -> None:
        """Maintenance on (with ``retry_after``, else the configured one) or off."""
        # Off, back to the configured one: ``health`` shows what the next maintenance_on sends.
        self.retry_after = self.default_retry_after if retry_after is None or not on else retry_after
        self.maintenance = on
        self._regate()

    # -- lifecycle --------------------------------------------------------

    async def start(self, path: str, socket_dir: str | None, scope: dict[str, Any]) -> None:
        """Bind the control socket and begin serving; runs on the app loop at startup."""
        try:
            self.app_loop = asyncio.get_running_loop()
        except RuntimeError:  # hypercorn -k trio: the lifespan runs, on no asyncio loop
            raise RuntimeError(
                "the server runs the app on no asyncio event loop (trio, say), and the control socket"
                " needs one: run it on asyncio or uvloop (uvicorn, hypercorn's default worker, granian)"
            ) from None
        if self._pid != os.getpid():  # made before a fork (gunicorn --preload): this process's uptime
            self._pid = os.getpid()
            self.started_at = time.time()
            self.stats.restart_clock()
        state = scope.get("state")
        if isinstance(state, dict):
            self.lifespan_state = state
        self.host_app = scope.get("app")
        # Not ``or``: Starlette's State has a length, so an empty one is false.
        app_state = getattr(self.host_app, "state", None)
        self.app_state = app_state if app_state is not None else getattr(self.app, "state", None)
        options = dict(self.server_options)
        options.setdefault("handler_timeout", max(330.0, self.app_timeout * 2))
        # What changes something stays at INFO in the audit log; what only reads (and is polled) not.
        options.setdefault("quiet_commands", _ReadOnlyNames(self.commands))
        # Options that cannot work fail here, before any override is applied: a persisted
        # maintenance_on must not be left on in a worker that then has no socket to turn it off.
        self._check_options()
        config = ServerConfig(path=path, **options)
        # Its blocking steps in a thread that ends with them: the app loop's default executor
        # would keep its threads, idle, in every worker's thread count.
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unixsock-start")
        try:
            if socket_dir is not None:
                from ._fleet import remove_stale_sockets
                from ._sockets import ensure_private_directory

                # Before anything is read from it (stale sockets, overrides): only this user may
                # write it. Used by its real path from then on, the one that was checked.
                socket_dir = await self.app_loop.run_in_executor(pool, ensure_private_directory, socket_dir)
                path = os.path.join(socket_dir, os.path.basename(path))
                await self.app_loop.run_in_executor(pool, remove_stale_sockets, socket_dir)
            self.socket_dir = socket_dir
            replaced = self.commands.replaced()
            if replaced:
                logger.warning(
                    "the app's command(s) %s replace the built-in one(s) of the same name",
                    ", ".join(map(repr, replaced)),
                )
            if socket_dir is not None:
                # Before the socket takes commands: an operator's change sent as soon as it
                # appears must not be undone by an override applied a moment later.
                await self._apply_overrides(socket_dir)
            server = UnixSockServer(handler=self.dispatch, config=dataclasses.replace(config, path=path))
            started = pool.submit(server.start)
            try:
                await asyncio.wrap_future(started)
            except asyncio.CancelledError:
                # Startup cancelled while the thread binds: the bind goes on, and nothing here
                # would hold the server to stop it. Stopped once it has started.
                def stop_once_started(bind: concurrent.futures.Future[Any]) -> None:
                    if not bind.cancelled() and bind.exception() is None:
                        server.stop()

                started.add_done_callback(stop_once_started)
                raise
            except Exception as exc:
                self._drop_persisted_gates(exc)
                raise
            self.server = server
            self.socket_path = server.path
            # From now: made before a fork (gunicorn --preload) or long before startup, the
            # monitor would read that wait as the loop's lag until its task first runs.
            self.monitor.last_tick = time.monotonic()
            self.monitor.task = self.app_loop.create_task(self.monitor.run(self.stats))
        finally:
            pool.shutdown(wait=False)

    def _check_options(self) -> None:
        """The middleware's own options that cannot work: a ValueError naming the first."""
        timeout = self.app_timeout
        if not is_seconds(timeout):
            raise ValueError(
                f"app_timeout must be a positive number of seconds (inf: no limit), not {timeout!r}"
            )
        retry_after = whole_number(self.default_retry_after, 0)
        if retry_after is None:
            raise ValueError(
                f"retry_after must be a whole number of seconds of at least 0, not {self.default_retry_after!r}"
            )
        if self.retry_after is self.default_retry_after:  # not one maintenance_on gave meanwhile
            self.retry_after = retry_after
        self.default_retry_after = retry_after  # 30 for 30.0, from a configuration
        for name, paths in (
            ("health_path", [self.health_path]),
            ("maintenance_exempt", self.maintenance_exempt),
        ):
            for given in paths:
                if not isinstance(given, str) or not given.startswith("/"):
                    raise ValueError(
                        f"{name} holds paths as the app sees them, starting with '/', not {given!r}"
                    )

    async def _apply_overrides(self, socket_dir: str) -> None:
        from ._fleet import PERSISTABLE_COMMANDS, load_overrides

        for override in load_overrides(socket_dir):
            cmd, args = override.get("cmd"), override.get("args") or {}
            if not isinstance(cmd, str):
                continue
            if cmd not in PERSISTABLE_COMMANDS:  # what --persist writes, and nothing else
                logger.warning("persisted override %r skipped: not a command that can be persisted", cmd)
                continue
            if cmd == "set_log_level" and isinstance(args, dict):
                # It worked when persisted; this worker may not have made the logger yet
                # while a close name exists: no did-you-mean at startup.
                args = {**args, "create": True}
            response = await self.invoke(cmd, args, PeerCredentials(os.getpid(), os.getuid(), os.getgid()))
            if response.ok:
                logger.info("applied persisted override %s %s", cmd, args)
            else:
                logger.warning("persisted override %s %s failed: %s", cmd, args, response.error)

    def _drop_persisted_gates(self, why: Exception) -> None:
        """Turn off what the overrides turned on that keeps requests away, in a worker
        whose socket did not start: nothing could ever turn it off there."""
        kept = [
            name
            for name, on in (("maintenance", self.maintenance), ("health_fail", self.health_failing))
            if on
        ]
        if kept:
            self.set_maintenance(False)
            self.set_health(False)
            logger.warning(
                "persisted %s not kept: this worker's control socket could not start (%s),"
                " so nothing could turn %s off",
                " and ".join(kept),
                why,
                "them" if len(kept) > 1 else "it",
            )

    def stop(self) -> None:
        """Stop the server and the loop monitor; safe to call more than once."""
        if self.monitor.task is not None:
            self.monitor.task.cancel()
            self.monitor.task = None
        for pending in self.log_restores.values():
            pending.handle.cancel()
        self.log_restores.clear()
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    # -- dispatch ---------------------------------------------------------

    async def dispatch(self, cmd: str, args: dict[str, Any], rctx: RequestContext) -> Response:
        """The control server's handler: runs on the control thread's loop."""
        return await self.invoke(cmd, args, rctx.peer, rctx.request_id)

    async def invoke(
        self, cmd: str, args: dict[str, Any], peer: PeerCredentials, request_id: Any = None
    ) -> Response:
        """Run one command by name, on whichever loop it belongs."""
        command = self.commands.get(cmd)
        # A logger per registered command only: a logger lives as long as the process,
        # and a name from the socket would make one (and one per dotted prefix) per name.
        name = "unixsock_asgi.commands" if command is None else f"unixsock_asgi.commands.{command.name}"
        ctx = CommandContext(self, peer, logging.getLogger(name), request_id)
        if command is None:
            if self.handler is None:
                return Response.failure(unknown_command(cmd, self.commands))
            call_args = (cmd, args, ctx) if self._handler_ctx else (cmd, args)
            return _as_response(await self._run_on_app_loop(cmd, self.handler, call_args, {}, peer))
        try:
            kwargs = command.bind(args)
        except ArgumentError as exc:
            return Response.failure(str(exc))
        if command.wants_ctx:
            kwargs[command.ctx_param] = ctx
        if command.diagnostic or self.app_loop is None or _on_loop(self.app_loop):
            server = self.server
            server_loop = server.loop if server is not None else None
            if command.inline or command.is_async or server_loop is None or not _on_loop(server_loop):
                result = command.func(**kwargs)
            else:
                # An app's plain diagnostic command may block: on a handler thread, so
                # that the control loop goes on answering other connections meanwhile.
                assert server is not None
                result = await asyncio.wrap_future(server._submit_blocking(command.func, **kwargs))
            if inspect.isawaitable(result):
                result = await result
            return _as_response(result)
        return _as_response(await self._run_on_app_loop(cmd, command.func, (), kwargs, peer))

    async def _run_on_app_loop(
        self,
        cmd: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        peer: PeerCredentials,
    ) -> Any:
        loop = self.app_loop
        assert loop is not None
        # Whoever comes first: the app loop starting the call, or this thread giving
        # up on it. A call given up on never starts later, once the loop unblocks:
        # the reply said it did not run, and an operator may send it again.
        handshake = threading.Lock()
        started: list[float] = []
        abandoned: list[bool] = []
        awaiting: list[bool] = []  # a plain function's body is done; what it returned is awaited
        # The connection ended while the call was on the app's loop, and how the call ended:
        # whichever of the two threads comes second writes the audit line no reply gives.
        unanswered: list[bool] = []
        overdue: list[bool] = []  # its reply went at app_timeout, saying it still ran
        ended: list[str] = []

        async def run() -> Any:
            with handshake:
                if abandoned:
                    raise asyncio.CancelledError
                started.append(time.monotonic())
            status = "cancelled"
            try:
                result = func(*args, **kwargs)
                if inspect.isawaitable(result):
                    awaiting.append(True)
                    result = await result
                status = str(result.status) if isinstance(result, Response) else STATUS_OK
                return result
            except asyncio.CancelledError as exc:
                if _compat.cancelled_from_outside():  # app_timeout, or the app's loop closing
                    raise
                # Its own (it awaited a task that was cancelled): a failure like any other,
                # not a hang-up that ends the connection without a reply.
                status = STATUS_FAIL
                return raised_failure(cmd, exc)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                # Answered here, so that a TimeoutError it raises is not taken for app_timeout's,
                # and SystemExit raised out of a task would stop the app's loop: the whole server.
                status = STATUS_FAIL
                return raised_failure(cmd, exc)
            finally:
                with handshake:
                    ended.append(status)
                    late = bool(unanswered)
                    after_reply = bool(overdue)
                if late:
                    audit(peer, cmd, status, begun, note=_UNANSWERED)
                elif after_reply:
                    audit(peer, cmd, status, begun, note=_OVERDUE)

        def give_up() -> None:
            # Cancelling the future alone lets a call that has not started yet run once,
            # when the loop unblocks: the cancellation reaches its task after its first step.
            future.cancel()
            with handshake:
                if not started:
                    abandoned.append(True)

        begun = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            async with _compat.timeout(self.app_timeout):
                # Shielded: a client that hangs up does not stop a command on the app's
                # loop (only app_timeout does, below); it runs on, its reply unsent.
                return await asyncio.shield(asyncio.wrap_future(future))
        except TimeoutError:
            give_up()
            if not started:
                blocked = self.monitor.blocked_for()
                return Response.failure(
                    f"the app's event loop appears blocked (no progress for {blocked:.1f}s):"
                    f" {cmd!r} did not start within {self.app_timeout:g}s;"
                    " 'stacks' and 'tasks' still answer and show where it is stuck"
                )
            # Answered now, while it may yet finish: when it does, the audit log says how.
            with handshake:
                overdue.append(True)
                status = ended[0] if ended else None
            if status is not None:  # it ended as the timeout fired
                audit(peer, cmd, status, begun, note=_OVERDUE)
            if not awaiting:  # a plain function is running the app's loop: nothing can stop it
                return Response.failure(
                    f"{cmd!r} did not finish within {self.app_timeout:g}s on the app's loop and is still"
                    " running (a plain function cannot be stopped): it may yet finish, so check before"
                    " sending it again"
                )
            return Response.failure(
                f"{cmd!r} did not finish within {self.app_timeout:g}s on the app's loop and is cancelled"
                " at its next await (if it blocks the loop instead, it runs on to its end)"
            )
        except asyncio.CancelledError:
            if not _compat.cancelled_from_outside():
                # Not this connection's task: the call's own, cancelled on the app's loop.
                return Response.failure(
                    f"{cmd!r} was cancelled on the app's loop (is the app shutting down?)"
                )
            # The connection ended (its peer hung up) while the call was on the app's loop: it
            # runs on, bounded by app_timeout all the same (cancelled at its next await), and
            # since no reply will say how it ended, the audit log does when it ends.
            with handshake:
                unanswered.append(True)
                status = ended[0] if ended else None
            if status is not None:  # it ended as the connection did
                audit(peer, cmd, status, begun, note=_UNANSWERED)
            else:
                remaining = self.app_timeout - (time.perf_counter() - begun)
                asyncio.get_running_loop().call_later(max(0.0, remaining), give_up)
            raise
        except Exception as exc:
            return raised_failure(cmd, exc)


_UNANSWERED = (
    " (ended on the app's loop after its connection ended or its server stopped: its client was not told how)"
)
_OVERDUE = " (ended on the app's loop after its reply at app_timeout)"


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _as_response(result: Any) -> Response:
    return result if isinstance(result, Response) else Response.success(result)
