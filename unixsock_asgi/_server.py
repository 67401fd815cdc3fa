"""The control server: a UNIX socket served by its own event loop in its own thread.

Threading model: :meth:`UnixSockServer.start` binds the socket in the calling
thread (so errors surface there) and then runs a private asyncio loop in a
daemon thread named ``unixsock-server``. Connections are served on that loop,
so the server answers even while the host application's loop is busy or
blocked. Async handlers run on the server loop, inside their connection's task
from their first step on; plain functions run in a small thread pool so that a
slow one cannot stall other connections. Handlers that must touch another
loop's objects (an ASGI app's, say) hop there themselves; the ASGI middleware
does exactly that.

Connections are asyncio protocols, not streams: a request is parsed and, when
its handler finishes without suspending, answered within the callback that
read it, with no task wake-up and no extra turn of the loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import fcntl
import inspect
import logging
import os
import queue
import re
import select
import socket
import struct
import sys
import termios
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Container, Coroutine, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _compat
from ._checks import is_seconds, whole_number
from ._protocol import (
    HARD_MAX_MESSAGE_SIZE,
    STATUS_OK,
    STOPPING_PAYLOAD,
    ConnectionProtocol,
    Event,
    Mode,
    ProtocolViolation,
    Request,
    Response,
    short_repr,
)
from ._sockets import BoundSocket, PeerCredentials, bind_unix_socket, peer_credentials, peer_groups

__all__ = ["Handler", "RequestContext", "ServerConfig", "UnixSockServer"]

logger = logging.getLogger("unixsock_asgi.server")
audit_logger = logging.getLogger("unixsock_asgi.audit")
_PLAIN_NAME = re.compile(r"[\w.:-]{1,200}", re.ASCII)

Handler = Callable[[str, dict[str, Any]], Any] | Callable[[str, dict[str, Any], "RequestContext"], Any]
"""``handler(cmd, args)`` or ``handler(cmd, args, ctx)``, sync or async."""


@dataclass
class ServerConfig:
    """Every option of a :class:`UnixSockServer`, with its default."""

    path: str
    max_message_size: int = 1 << 20
    """Largest request accepted, in bytes (the Go library's default: 1 MiB)."""
    timeout: float = 5.0
    """Seconds for the rest of a message to arrive once it has begun, and for a write."""
    idle_timeout: float = 60.0
    """Seconds a connection may sit between requests before it is closed."""
    handler_timeout: float | None = 30.0
    """Seconds a handler may run before the reply says it timed out (None: no limit)."""
    max_connections: int = 64
    """Connections served at once. A new one beyond them closes the one idle the longest;
    when none is idle, it is answered "busy" and closed."""
    allowed_uids: frozenset[int] = frozenset()
    """Uids that may talk besides the server's own and root."""
    allowed_gids: frozenset[int] = frozenset()
    """Gids whose members may talk too: by the peer's primary group, or a supplementary
    group it had when it connected."""
    socket_mode: int = 0o600
    """File mode of the socket; widen it (0o660) together with ``allowed_gids``."""
    handler_threads: int = 4
    """Threads that run plain (non-async) handlers."""
    quiet_commands: Container[str] = frozenset()
    """Commands whose successes the audit log records at DEBUG, not INFO: read-only ones
    that tools poll (``top`` asks every worker for ``stats`` each refresh)."""

    def __post_init__(self) -> None:
        path = os.fspath(self.path)
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty str or os.PathLike[str], not {self.path!r}")
        self.path = path
        for name in ("allowed_uids", "allowed_gids"):
            given = getattr(self, name)
            try:
                ids = frozenset(given)
            except TypeError:
                raise TypeError(f"{name} must be a collection of ids, not {given!r}") from None
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{name} must hold whole numbers of at least 0, not {given!r}")
            setattr(self, name, ids)
        size = whole_number(self.max_message_size, 1)
        if size is None:
            raise ValueError(
                f"max_message_size must be a whole number of bytes of at least 1, not {self.max_message_size!r}"
            )
        self.max_message_size = min(size, HARD_MAX_MESSAGE_SIZE)  # more is the protocol's limit, as ever
        mode = self.socket_mode
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            hint = ""
            if isinstance(mode, int) and set(str(mode)) <= set("01234567") and len(str(mode)) == 3:
                hint = f" (did you mean 0o{mode}? {mode} is decimal)"
            raise ValueError(f"socket_mode {mode!r} is not a permission mode from 0o000 to 0o777{hint}")
        for name in ("max_connections", "handler_threads"):
            value = whole_number(getattr(self, name), 1)
            if value is None:
                raise ValueError(f"{name} must be a whole number of at least 1, not {getattr(self, name)!r}")
            setattr(self, name, value)
        for name in ("timeout", "idle_timeout", "handler_timeout"):
            value = getattr(self, name)
            if name == "handler_timeout" and value is None:
                continue  # no limit
            if not is_seconds(value):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


@dataclass
class RequestContext:
    """What a handler may know about the request beyond ``cmd`` and ``args``."""

    peer: PeerCredentials
    mode: Mode
    server: UnixSockServer
    request_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _takes_context(fn: Callable[..., Any]) -> bool:
    """Whether a handler takes ``(cmd, args, ctx)``; TypeError when it takes neither that nor ``(cmd, args)``."""
    if not callable(fn):
        raise TypeError(f"the handler must be a function of (cmd, args) or (cmd, args, ctx), not {fn!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    for given in ((None, None, None), (None, None)):
        try:
            sig.bind(*given)
            break
        except TypeError:
            continue
    else:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"the handler {name}{sig} cannot be called as (cmd, args) nor as (cmd, args, ctx)")
    positional = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 3


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


def _to_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    return Response.success(result)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a __str__ that raises: the failure reply still goes out
        text = "(its text could not be read)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UnixSockServer:
    """A UNIX-socket command server with one monolithic handler.

    ``handler(cmd, args)`` or ``handler(cmd, args, ctx)``, sync or async,
    returns a :class:`Response` or any JSON value (a success payload). An
    exception in a handler becomes a failure reply; it never reaches the
    connection, the server, or the process hosting it.

    Use ``start()``/``stop()`` or ``with UnixSockServer(...) as server:``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        handler: Handler | None = None,
        *,
        config: ServerConfig | None = None,
        **options: Any,
    ) -> None:
        if handler is None:
            raise TypeError("UnixSockServer needs a handler(cmd, args[, ctx])")
        if config is None:
            if path is None:
                raise TypeError("UnixSockServer needs a path or a config")
            config = ServerConfig(path=os.fspath(path), **options)
        elif options or path is not None:
            raise TypeError("pass either a config or a path and options, not both")
        self.config = config
        self.handler = handler
        self._handler_async = _is_async(handler)
        self._handler_ctx = _takes_context(handler)
        self._uid = os.getuid()
        self._bound: BoundSocket | None = None
        self._pid = 0  # the process that bound it
        self._released = False  # its socket file was let go: never unlink at that path again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._pool: _DaemonPool | None = None
        self._active = 0
        self._opening = 0  # connections accepted whose transport is not made yet
        self._refusing = 0  # refused connections waiting to be told why
        self._refusals_logged = _Throttle(1.0)
        self._unencodable_logged = _Throttle(1.0)
        self._lock = threading.Lock()
        self.started_at: float | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def path(self) -> str:
        """The socket path (absolute once started)."""
        return self._bound.path if self._bound else self.config.path

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's private event loop while it runs."""
        return self._loop

    def start(self) -> UnixSockServer:
        """Bind the socket and start serving in a daemon thread.

        Raises :class:`~unixsock_asgi.BindError` when the path cannot be taken.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("server already started")
            self._bound = bind_unix_socket(self.config.path, mode=self.config.socket_mode)
            self._released = False
            ready = threading.Event()
            failure: list[BaseException] = []
            self._thread = threading.Thread(
                target=self._run, args=(ready, failure), name="unixsock-server", daemon=True
            )
            self._thread.start()
            ready.wait()
            if failure:
                self._thread.join()
                self._thread = None
                self._bound.unlink_if_ours()
                self._bound.sock.close()
                raise failure[0]
            self.started_at = time.time()
            self._pid = os.getpid()
            atexit.register(self._remove_at_exit)
            logger.debug("serving on %s", self._bound.path)
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close connections and remove the socket file if it is ours.

        A command still running is cut short, and its client told so in a failure reply.
        """
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            if os.getpid() != self._pid:
                # A child forked from the process that serves: the server and its
                # socket are the parent's, and its thread does not run here. Only
                # the child's copy of the listener is closed (else connects would
                # still succeed once the parent is gone, and never be answered).
                self._thread = None
                atexit.unregister(self._remove_at_exit)
                if self._bound is not None:
                    self._bound.sock.close()
                return
            stopping = self._stopping
            if stopping is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(stopping.set)
                except RuntimeError:
                    pass  # the loop already finished
            thread.join(timeout)
            self._thread = None
            atexit.unregister(self._remove_at_exit)
            if self._bound is not None and not self._released:
                self._bound.unlink_if_ours()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def _remove_at_exit(self) -> None:
        # The process exits without stop(): uvicorn's second Ctrl-C, say, skips
        # the lifespan's shutdown. Leave no socket file behind, but a child
        # forked meanwhile leaves its parent's alone.
        if self._bound is not None and os.getpid() == self._pid and not self._released:
            self._bound.unlink_if_ours()

    def __enter__(self) -> UnixSockServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready, failure))
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            ready.set()

    async def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        assert self._bound is not None
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(
                lambda: _Connection(self, loop), sock=self._bound.sock
            )
        except BaseException as exc:  # pragma: no cover - create_unix_server on a bound sock
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._shut_down(loop, self._server)

    async def _shut_down(self, loop: asyncio.AbstractEventLoop, server: asyncio.AbstractServer) -> None:
        """Stop accepting, end every connection, close the listener; about a second at most."""
        assert self._bound is not None
        # No new client finds the socket: one that tries now is told nothing
        # is there, rather than connecting to be reset a moment later. Once
        # the listener is closed its inode number may go to a new server's
        # socket at this path: nothing here unlinks at the path after this.
        self._bound.unlink_if_ours()
        self._released = True
        # Stop accepting first but keep the server open until the connections
        # accepted so far have their transports: asyncio cannot give one a
        # transport once its server is closed, and leaves its socket open.
        try:
            loop.remove_reader(self._bound.sock.fileno())
        except (OSError, ValueError, NotImplementedError):  # pragma: no cover - not a selector loop
            pass
        # Connections asyncio accepted in its last batch (up to 100) wait as tasks whose first
        # step makes their protocol, and so counts them in _opening: let those steps run first,
        # or they find the server closed and asyncio leaves their sockets open, unanswered.
        await asyncio.sleep(0)
        deadline = loop.time() + 1.0
        while self._opening and loop.time() < deadline:
            await asyncio.sleep(0.001)  # each aborts itself in connection_made: the server is stopping
        server.close()
        tasks: dict[asyncio.Task[None], _Connection] = {}
        for connection in list(self._connections):
            connection.stop()
            if connection.task is not None:
                tasks[connection.task] = connection
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()  # again: a cut-short handler had a second to clean up
            if pending:
                _, pending = await asyncio.wait(pending, timeout=0.1)
            for task in pending:
                running = tasks[task].running
                logger.warning(
                    "command %s did not end when cancelled: the server stops without it",
                    shown_name(running.cmd) if running is not None else "(none)",
                )
        while self._connections and loop.time() < deadline + 1.0:
            await asyncio.sleep(0.001)  # connection_lost closes the sockets
        for connection in list(self._connections):
            connection.abort()  # a peer that did not take its last reply meanwhile

    # -- connections -------------------------------------------------------

    def _allowed(self, peer: PeerCredentials, sock: socket.socket | None) -> bool:
        """The server's own user, root, an allowed uid, or a peer in an allowed group: its
        own (primary) group, or one of the supplementary groups it had when it connected,
        as the socket file's group permission lets it in."""
        cfg = self.config
        if peer.uid in (self._uid, 0) or peer.uid in cfg.allowed_uids or peer.gid in cfg.allowed_gids:
            return True
        return bool(
            cfg.allowed_gids
            and sock is not None
            and not cfg.allowed_gids.isdisjoint(peer_groups(sock, peer.pid))
        )

    def _refusal(self, peer: PeerCredentials, sock: socket.socket | None) -> str | None:
        """Why this peer may not talk now, or None (refusals logged once a second at most)."""
        if not self._allowed(peer, sock):
            if (more := self._refusals_logged.allow()) is not None:
                audit_logger.warning(
                    "refused peer pid=%d uid=%d gid=%d%s", peer.pid, peer.uid, peer.gid, _more(more)
                )
            return "permission denied"
        if self._active >= self.config.max_connections and not self._evict_idle():
            refusal = (
                f"busy: {self.config.max_connections} connections already open,"
                " each running a command or reading a message begun under a second ago"
            )
            if (more := self._refusals_logged.allow()) is not None:
                logger.warning("refused a connection: %s%s", refusal, _more(more))
            return refusal
        return None

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest for its next request, to let a new one in.

        False when none waits (each has a request running, half read, or
        replies the peer has not taken). A tool that leaks idle connections
        then costs the oldest of them, not every operator's access until the
        idle timeout.
        """
        idle = [(since, c) for c in self._connections if (since := c.waiting_since) is not None]
        what = "idle the longest"
        if not idle:
            # Else one sending its message slowly: clients write a message at once, so one begun
            # a second ago and not finished is a peer trickling bytes, and 64 of them, each
            # finishing a message just in time and beginning the next, held every slot.
            slow_since = asyncio.get_running_loop().time() - SLOW_MESSAGE_S
            idle = [
                (began, c)
                for c in self._connections
                if (began := c.message_began) is not None and began < slow_since
            ]
            what = "slowest to send its message"
            if not idle:
                return False
        _, oldest = min(idle, key=lambda pair: pair[0])
        if (more := self._refusals_logged.allow()) is not None:
            logger.warning(
                "closed the connection %s (peer pid=%d uid=%d) to let another in: %d connections open%s",
                what,
                oldest.peer.pid,
                oldest.peer.uid,
                self.config.max_connections,
                _more(more),
            )
        oldest.evict()
        return True

    def _encode(
        self, proto: ConnectionProtocol, request: Request | ProtocolViolation, response: Response
    ) -> bytes:
        try:
            return proto.encode_reply(request, response)
        except Exception as exc:  # TypeError, ValueError, RecursionError, or a payload's __str__ failing
            failure = Response.failure(f"reply could not be encoded: {_describe(exc)}")
            if isinstance(request, Request) and (held := self._unencodable_logged.allow()) is not None:
                # A handler's bug, which only its peer would hear of: the audit line, written
                # when the handler returned, says how the command itself ended.
                logger.warning(
                    "the reply to %s could not be encoded (%s): its peer got a failure instead%s",
                    shown_name(request.cmd),
                    _describe(exc),
                    f" ({held} more since the last such line)" if held else "",
                )
        try:
            return proto.encode_reply(request, failure)
        except Exception:  # the request's own id cannot be sent back (nested too deeply to encode)
            return proto.encode_reply(None, failure)

    async def dispatch(self, request: Request, ctx: RequestContext) -> Response:
        """Run the handler for one request and turn whatever happens into a Response."""
        outcome = self._begin(request, ctx.peer, ctx.mode, ctx)
        return outcome if isinstance(outcome, Response) else await outcome

    def _begin(
        self, request: Request, peer: PeerCredentials, mode: Mode, ctx: RequestContext | None = None
    ) -> Response | Awaitable[Response]:
        """Start the handler: its Response when it finished at once, else an awaitable of it.

        An async handler takes its first step right here, like Python 3.12's
        eager tasks: most finish without suspending and then need no timer
        and no further await. One that suspends, and every plain function
        (which runs in the thread pool), completes in :meth:`_complete`.
        """
        start = time.perf_counter()
        if self._handler_ctx:  # the context is built only for handlers that take it
            if ctx is None:
                ctx = RequestContext(peer, mode, self, request.id)
            args: tuple[Any, ...] = (request.cmd, request.args, ctx)
        else:
            args = (request.cmd, request.args)
        if not self._handler_async:
            return self._complete(request, peer, start, None, args)
        try:
            coro = self.handler(*args)
            if type(coro) is not types.CoroutineType:
                # Declared async but returned another awaitable (a Task, a Future): await it.
                return self._complete(request, peer, start, _await(coro), args)
            first = coro.send(None)
        except StopIteration as done:
            result = done.value
            response = result if isinstance(result, Response) else Response(STATUS_OK, "", result)
        except asyncio.CancelledError as exc:
            if _compat.cancelled_from_outside():
                raise  # as when it is raised after the first step: the connection ends
            response = self._raised(request, exc)  # the handler's own (see _finish_handler)
        except BaseException as exc:  # SystemExit in a handler must not end the server
            response = self._raised(request, exc)
        else:
            return self._complete(request, peer, start, _resume(coro, first), args)
        self._audit(request, peer, response, start)
        return response

    async def _complete(
        self,
        request: Request,
        peer: PeerCredentials,
        start: float,
        resumed: Awaitable[Any] | None,
        args: tuple[Any, ...],
    ) -> Response:
        try:
            result = await self._finish_handler(resumed, args)
            response = result if isinstance(result, Response) else Response(STATUS_OK, "", result)
        except TimeoutError:
            response = Response.failure(
                f"handler for {short_repr(request.cmd)} timed out after {self.config.handler_timeout:g}s"
            )
        except _NotStarted:
            response = Response.failure(
                f"handler for {short_repr(request.cmd)} did not start within {self.config.handler_timeout:g}s:"
                f" all {self.config.handler_threads} handler threads are busy (plain handlers that hang"
                " hold them); it will not run"
            )
        except _HandlerRaised as raised:
            response = self._raised(request, raised.exc)
        except asyncio.CancelledError:
            # The connection ended while the handler ran: its peer hung up (no reply goes
            # out), or the server stops (Connection.stop says so); it was asked for all the same.
            audit(peer, request.cmd, "cancelled", start)
            raise
        self._audit(request, peer, response, start)
        return response

    async def _finish_handler(self, resumed: Awaitable[Any] | None, args: tuple[Any, ...]) -> Any:
        queued: list[concurrent.futures.Future[Any]] = []
        try:
            async with _compat.timeout(self.config.handler_timeout):
                # Inside the timeout, whatever the handler raises (a TimeoutError of
                # its own included) is wrapped, so that a bare TimeoutError leaving
                # this block always means the handler timeout expired.
                try:
                    if resumed is not None:
                        return await resumed
                    queued.append(self._submit_blocking(self.handler, *args))
                    result = await asyncio.wrap_future(queued[0])
                    if inspect.isawaitable(result):
                        return await _await(result)
                    return result
                except asyncio.CancelledError as exc:
                    if _compat.cancelled_from_outside():  # the timeout, a hang-up, the server stopping
                        raise
                    # The handler's own (it awaited a task that was cancelled): a failure,
                    # not a hang-up that ends the connection without a reply.
                    raise _HandlerRaised(exc) from None
                except BaseException as exc:  # SystemExit in a handler must not end the server
                    raise _HandlerRaised(exc) from None
        except TimeoutError:
            # The timeout cancelled the call; one still waiting for a thread is off the queue.
            if queued and queued[0].cancelled():
                raise _NotStarted from None
            raise

    def _submit_blocking(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run a plain (maybe blocking) function on a handler thread; from the server's loop."""
        if self._pool is None:
            self._pool = _DaemonPool(self.config.handler_threads, "unixsock-handler")
        return self._pool.submit(fn, *args, **kwargs)

    def _raised(self, request: Request, exc: BaseException) -> Response:
        return raised_failure(request.cmd, exc)

    def _audit(self, request: Request, peer: PeerCredentials, response: Response, start: float) -> None:
        audit(peer, request.cmd, response.status, start, quiet=request.cmd in self.config.quiet_commands)


def audit(
    peer: PeerCredentials, cmd: str, status: str, start: float, *, quiet: bool = False, note: str = ""
) -> None:
    """One line to the audit logger: who sent which command, how it ended, how long it took
    (since ``start``, a ``time.perf_counter()``). A successful ``quiet`` command (read-only, the
    kind tools poll) at DEBUG, the rest at INFO."""
    level = logging.DEBUG if quiet and status == STATUS_OK else logging.INFO
    if audit_logger.isEnabledFor(level):
        audit_logger.log(
            level,
            "peer pid=%d uid=%d cmd=%s status=%s duration_ms=%.2f%s",
            peer.pid,
            peer.uid,
            shown_name(cmd),
            status,
            (time.perf_counter() - start) * 1000,
            note,
        )


def shown_name(cmd: str) -> str:
    """A command name for a log line: as it is when a plain name, else quoted (so that it cannot
    forge a log line), and cut short."""
    return cmd if _PLAIN_NAME.fullmatch(cmd) else short_repr(cmd)


class _NotStarted(Exception):
    """A plain handler's call timed out while it waited for a thread: it was taken off the queue."""


_REFUSING_MAX = 16
"""Refused connections waiting (up to a second) to be told why; more are dropped at once."""
SLOW_MESSAGE_S = 1.0
"""With every slot taken and none idle, a connection whose message began this long ago and
is not all there yet is closed to let a new one in (clients write a message at once)."""


class _Throttle:
    """Lets one event a period through, and counts those it held back meanwhile."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        """None to hold this one back; else how many were held back since the last let through."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._period
        held, self._held = self._held, 0
        return held


def _more(held: int) -> str:
    return f" ({held} more refused since the last such line)" if held else ""


class _DaemonPool(concurrent.futures.Executor):
    """Threads for plain handlers, daemon threads: a handler that hangs never keeps the process from exiting.

    (``ThreadPoolExecutor`` joins its threads at interpreter exit.) At most
    ``size`` threads, started as calls arrive.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, lambda: fn(*args, **kwargs)))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1  # one idle thread takes it
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del future, call, item
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Queued calls are cancelled; running ones finish (or hang) on their own.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class _HandlerRaised(Exception):
    """Carries an exception raised by a handler out of the handler timeout block."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting ``coro``, whose first step already yielded ``yielded``.

    ``await coro`` cannot be used for a coroutine that has started: this is
    ``yield from`` picking up where that first step left off. Whatever the
    task sends or throws in goes to ``coro``; what it yields goes to the task.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value


# An async handler takes its first step inside the data_received callback, as
# its connection's task, in that task's contextvars context, as Python 3.12's
# eager tasks do (so current_task(), asyncio.timeout and context variables
# work there). Without these two functions (they are not public API), or
# before Python 3.11 (no context= for tasks), every request goes through the
# connection's task.
_enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = None
_leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = None
if sys.version_info >= (3, 11):
    _enter_task = getattr(asyncio.tasks, "_enter_task", None)
    _leave_task = getattr(asyncio.tasks, "_leave_task", None)


def raised_failure(cmd: str, exc: BaseException) -> Response:
    """The reply to a handler that raised (its last line); its traceback goes to the log."""
    logger.warning("command %s raised %s\n%s", short_repr(cmd), _logged(_describe(exc)), _traceback_text(exc))
    return Response.failure(_describe(exc))


_LOGGED_CHARACTERS = 1000


def _logged(text: str) -> str:
    """An exception's text as a log line shows it: one line (its line breaks and other control
    characters escaped, so that a value from the socket in it cannot forge a line of its own),
    and at most ``_LOGGED_CHARACTERS`` characters of it."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    if len(text) > _LOGGED_CHARACTERS:
        text = f"{text[:_LOGGED_CHARACTERS]}... ({len(text)} characters)"
    return text


def _traceback_text(exc: BaseException) -> str:
    """A traceback without the carets Python 3.11 places by parsing source lines with ``ast``:
    that parser's depth counter is shared by all threads (CPython gh-106905), and a
    handler's exception is logged on the control thread while the app's may parse too,
    which can leave every later ``compile()`` in the process failing with SystemError."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(exc.__traceback__):
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    lines.append(_logged(_describe(exc)))  # not format_exception_only: its text may come from the socket
    return "".join(lines)


# On Linux a UNIX socket polls POLLHUP only once its peer closed both ways (a
# half-close is POLLRDHUP); BSD kernels (macOS) report a half-close as POLLHUP too.
_POLLHUP_IS_HANGUP = sys.platform.startswith("linux") and hasattr(select, "poll")
_HANGUP_CHECK_S = 1.0
"""How often a connection whose handler is running checks that its peer is still there."""


_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None
_INT = struct.Struct("i")


def _unread(transport: asyncio.Transport) -> int:
    """Bytes written to the peer that it has not read yet, as far as this end can see.

    The transport's buffer alone shrinks only when the socket takes more, and
    a UNIX socket wakes its writer only once the peer has emptied three
    quarters of its buffer (about 160 KiB): a peer reading 30 KB/s would seem
    to take nothing for 5 s. On Linux the socket's own queue (SIOCOUTQ) is
    counted too, which shrinks each time the peer has read a kernel buffer
    (32 KiB or less).
    """
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        try:
            size += _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(_INT.size)))[0]
        except (OSError, ValueError):  # closed meanwhile
            pass
    return size


def _peer_hung_up(transport: asyncio.Transport | None) -> bool:
    """Whether the peer closed its end altogether (POLLHUP; a half-close sets only POLLRDHUP)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        return any(events & select.POLLHUP for _, events in poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile
        return False


class _Connection(asyncio.Protocol):
    """One client connection, served from the event loop's callbacks.

    Requests are parsed and, as far as they can be, answered right in
    ``data_received``: no stream, no task wake-up and no extra turn of the
    loop per request. An async handler takes its first step there, in the
    context of this connection's task, and most finish in it. A handler that
    suspends (and every plain function, which runs in the thread pool) is
    handed to that task together with whatever arrived after it; reading
    pauses until the task has answered all of it, so replies go out in order.

    Timeouts: one lazily re-armed timer covers the read side (the idle timeout
    between requests, ``timeout`` for the rest of a begun message); a write
    that the peer does not take within ``timeout`` (the transport stays above
    its high-water mark) aborts the connection.
    """

    def __init__(self, server: UnixSockServer, loop: asyncio.AbstractEventLoop) -> None:
        server._opening += 1
        self._server = server
        self._loop = loop
        cfg = server.config
        self._timeout = cfg.timeout
        self._idle_timeout = cfg.idle_timeout
        self._proto = ConnectionProtocol(cfg.max_message_size)
        self._transport: asyncio.Transport | None = None
        self._peer = PeerCredentials(0, -1, -1)
        self._refusal: str | None = None
        self._counted = False
        self._refusing = False  # counted in the server's refused connections waiting
        self._closing = False
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the task waits on it for work
        self._busy = False  # the task owns the held request and what is buffered behind it
        self._held: tuple[Request, Awaitable[Response] | None] | None = None
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._context = contextvars.copy_context()
        self._deadline: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._in_message = False  # the read deadline is that of a message begun earlier
        # Since when some message has been arriving without a break (a message ended and the
        # next begun in one read is no break): the connection limit's measure of a trickler.
        self._partial_since: float | None = None
        self._write_backlog = 0  # bytes the peer had not read when the write timer was set
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._running: Request | None = None  # the request whose handler the task is running
        self._parting = False  # stopped by the server with a last reply on its way out

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        server._opening -= 1
        if server._stopping is None or server._stopping.is_set():
            transport.abort()  # accepted while the server was stopping
            return
        server._connections.add(self)
        sock = transport.get_extra_info("socket")
        try:
            self._peer = peer_credentials(sock)
        except OSError:
            pass
        self._refusal = server._refusal(self._peer, sock)
        if self._refusal is not None:
            if server._refusing >= _REFUSING_MAX:
                transport.abort()  # a flood: no reply, and no descriptor held for it
                return
            # Wait briefly for the first bytes, only to learn which framing to answer in.
            server._refusing += 1
            self._refusing = True
            self._write_timer = self._loop.call_later(min(self._timeout, 1.0), self.abort)
            return
        server._active += 1
        self._counted = True
        if sys.version_info >= (3, 11):
            self.task = self._loop.create_task(self._work(), context=self._context)
        else:  # pragma: no cover - 3.10 takes no first steps in data_received
            self.task = self._loop.create_task(self._work())
        self._arm(self._idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._refusal is not None:
            self._refuse(data)
            return
        self._proto.feed(data)
        if not self._busy:  # else the task parses it when it gets to it
            self._process()

    def eof_received(self) -> bool:
        if not self._closing:
            if self._refusal is not None:
                self._refuse(b"")
            else:
                self._proto.feed(b"")
                if not self._busy:
                    self._process()
        return not self._closing  # keep the transport until the replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        self._deadline = None
        for timer in (self._deadline_timer, self._write_timer, self._close_timer, self._hangup_timer):
            if timer is not None:
                timer.cancel()
        if self.task is not None and not self.task.done() and not self._parting:
            self.task.cancel()  # (a parting one was cancelled once: its clean-up may await)
        if self._writable is not None and not self._writable.done():
            self._writable.cancel()
        server = self._server
        server._connections.discard(self)
        if self._counted:
            self._counted = False
            server._active -= 1
        if self._refusing:
            self._refusing = False
            server._refusing -= 1

    def pause_writing(self) -> None:
        self._write_paused = True
        assert self._transport is not None
        self._transport.pause_reading()
        self._deadline = None  # not reading: a message begun meanwhile is not the peer's delay
        if self._write_timer is None:
            self._write_backlog = _unread(self._transport)
            self._write_timer = self._loop.call_later(self._timeout, self._write_stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._busy and not self._closing:
            assert self._transport is not None
            self._transport.resume_reading()
            self._arm_read(new_message=True)

    # -- requests ------------------------------------------------------------

    def _process(self) -> None:
        """Answer what can be answered now; hand the rest to the connection's task.

        Requests are parsed one at a time as they are answered: once the
        peer stops taking replies (or a handler suspends), what it sent
        behind stays unparsed bytes, and reading pauses.
        """
        server, loop, task, proto = self._server, self._loop, self.task, self._proto
        assert task is not None
        mode = proto.mode or "frame"
        new_message = False
        while (event := proto.next_event()) is not None:
            new_message = True
            if isinstance(event, Request):
                if _enter_task is None or _leave_task is None:
                    self._hand_over(event, None)
                    return
                _enter_task(loop, task)
                try:
                    outcome = self._context.run(server._begin, event, self._peer, mode)
                except asyncio.CancelledError:
                    self.abort()  # as when it is raised later: the connection ends
                    return
                finally:
                    _leave_task(loop, task)
                if not isinstance(outcome, Response):
                    self._hand_over(event, outcome)
                    return
                if not self._answer(event, outcome):
                    return
            elif not self._other(event):
                return
            if self._write_paused and proto.has_partial:
                self._hand_over(None, None)
                return
        self._arm_read(new_message=new_message)

    def _hand_over(self, request: Request | None, outcome: Awaitable[Response] | None) -> None:
        self._busy = True
        self._deadline = None
        # _partial_since stays: a message begun before this command and still arriving after it
        # is one that was not sent at once (a peer ending one and beginning the next in one write).
        assert self._transport is not None
        self._transport.pause_reading()
        if request is not None:
            self._held = (request, outcome)
            self._running = request
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        if self._hangup_timer is None and _POLLHUP_IS_HANGUP:
            self._hangup_timer = self._loop.call_later(_HANGUP_CHECK_S, self._check_hangup)

    def _check_hangup(self) -> None:
        """While a handler runs, nothing is read: notice a peer that has gone (not one that only
        half-closed, which still reads its replies), so that its handler stops and its slot frees."""
        self._hangup_timer = None
        if not self._busy or self._closing:
            return
        running = self._running
        # A request sent with respond=false is fire-and-forget: its client need not wait.
        if (running is None or running.respond) and _peer_hung_up(self._transport):
            logger.debug("peer hung up while its request ran: cancelling it")
            self.abort()
            return
        self._hangup_timer = self._loop.call_later(_HANGUP_CHECK_S, self._check_hangup)

    async def _work(self) -> None:
        """The connection's task: answers what ``data_received`` could not."""
        try:
            while not self._closing:
                if not self._busy:
                    self._wake = self._loop.create_future()
                    try:
                        await self._wake
                    except asyncio.CancelledError:
                        if self._closing or self._held is None:
                            raise
                        # Requested during a handler's first step (asyncio.timeout
                        # with a deadline already past, say): it is the handler's.
                        # Ask again; it reaches the handler where it is suspended.
                        task = self.task
                        assert task is not None
                        _compat.uncancel(task)
                        task.cancel()
                    self._wake = None
                if await self._work_through() and not self._closing:
                    self._busy = False
                    assert self._transport is not None
                    if not self._write_paused:
                        self._transport.resume_reading()
                    self._arm_read(new_message=True)  # nothing was read meanwhile
        except (asyncio.CancelledError, ConnectionError, TimeoutError):
            if not self._parting:  # else the reply that says why is on its way out
                self.abort()
        except Exception:  # pragma: no cover - a bug here must not kill the server
            logger.exception("unexpected error on a control connection")
            self.abort()
        finally:
            held, self._held = self._held, None
            if held is not None and inspect.iscoroutine(held[1]):
                held[1].close()  # handed over, never awaited: the connection ended first

    async def _work_through(self) -> bool:
        """Answer the held request and what is buffered behind it; False once the connection is closing."""
        server = self._server
        mode = self._proto.mode or "frame"
        held, self._held = self._held, None
        if held is not None:
            request, started = held
            self._running = request
            begun = server._begin(request, self._peer, mode) if started is None else started
            response = begun if isinstance(begun, Response) else await begun
            self._running = None
            if not self._answer(request, response):
                return False
        proto = self._proto
        while True:
            if self._write_paused and proto.has_partial:
                self._writable = self._loop.create_future()
                await self._writable  # the write timer aborts a peer that stopped reading
                self._writable = None
            event = proto.next_event()
            if event is None:
                break
            if isinstance(event, Request):
                self._running = event
                begun = server._begin(event, self._peer, mode)
                response = begun if isinstance(begun, Response) else await begun
                self._running = None
                if not self._answer(event, response):
                    return False
            elif not self._other(event):
                return False
        return not self._closing

    def _answer(self, request: Request, response: Response) -> bool:
        """Send the reply a request asked for; False when the connection is to close."""
        if self._closing or self._transport_closing():
            return False
        if request.respond:
            assert self._transport is not None
            self._transport.write(self._server._encode(self._proto, request, response))
        if request.close:
            self.close()
            return False
        return True

    def _other(self, event: Event) -> bool:
        """Bad input or the end of the conversation; False when the connection is to close."""
        if isinstance(event, ProtocolViolation):
            assert self._transport is not None
            if event.respond or event.fatal:
                self._transport.write(self._server._encode(self._proto, event, Response.failure(event.error)))
            peer = self._peer
            audit_logger.info("peer pid=%d uid=%d sent bad input: %r", peer.pid, peer.uid, event.error)
            if not (event.fatal or event.close):
                return True
        self.close()
        return False

    def _transport_closing(self) -> bool:
        """The peer is gone (a write failed) though connection_lost has not run yet."""
        assert self._transport is not None
        if self._transport.is_closing():
            self._closing = True
            return True
        return False

    def _refuse(self, data: bytes) -> None:
        assert self._refusal is not None and self._transport is not None
        self._proto.feed(data[:1])  # only to learn the framing to answer in: nothing is parsed
        self._transport.write(self._proto.encode_reply(None, Response.failure(self._refusal)))
        self.close()

    # -- closing and timeouts ------------------------------------------------

    @property
    def peer(self) -> PeerCredentials:
        return self._peer

    @property
    def running(self) -> Request | None:
        """The request whose handler the connection's task runs, if any."""
        return self._running

    @property
    def waiting_since(self) -> float | None:
        """When the connection began to wait for its next request, or None if it is not waiting
        (a request running or half read, replies not taken, closing, or not counted)."""
        if (
            not self._counted
            or self._busy
            or self._closing
            or self._in_message
            or self._write_paused
            or self._deadline is None
            or self._proto.has_partial
            or (self._transport is not None and self._transport.get_write_buffer_size())
        ):
            return None
        return self._deadline - self._idle_timeout

    @property
    def message_began(self) -> float | None:
        """Since when (loop time) part of a message has been waiting for the rest without a break,
        or None if none is (a command running, replies not taken, or nothing half read)."""
        if not self._counted or self._busy or self._closing or self._write_paused:
            return None
        return self._partial_since if self._proto.has_partial else None

    def evict(self) -> None:
        """Close a waiting connection to make room: its slot is free at once."""
        if self._counted:
            self._counted = False
            self._server._active -= 1
        self.close()

    def close(self) -> None:
        """Close once what was written has gone out (within ``timeout``)."""
        if self._closing:
            return
        self._closing = True
        self._deadline = None
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size():
            if self._write_timer is not None:  # the close timer watches the peer from now on
                self._write_timer.cancel()
                self._write_timer = None
            self._write_backlog = _unread(transport)
            self._close_timer = self._loop.call_later(self._timeout, self._close_stalled)
        self._discard_unread()
        transport.close()

    def _discard_unread(self) -> None:
        """Read and drop what the peer sent beyond the last request served.

        Closing a socket with unread input makes the kernel reset the
        connection, and the peer would see ECONNRESET rather than EOF after
        its reply (requests pipelined behind one that closes wait unread
        while reading is paused).
        """
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return
        for _ in range(16):  # at most 1 MiB; beyond that the reset is deserved
            try:
                if not os.read(sock.fileno(), 1 << 16):
                    return
            except OSError:  # BlockingIOError: nothing more to read
                return

    def stop(self) -> None:
        """The server is stopping: tell the peer whose command it cuts short, then close.

        Without the reply its client would read a connection closed mid-command,
        as if the server had crashed; every other connection is closed at once.
        """
        running, transport = self._running, self._transport
        if (
            running is None
            or not running.respond
            or self._closing
            or transport is None
            or transport.is_closing()
        ):
            self.abort()
            return
        self._closing = True  # the handler's own reply, should it still come, is not sent
        self._parting = True
        transport.write(
            self._server._encode(
                self._proto,
                running,
                Response.failure(
                    # Cancelled at its next await; but a plain function on a thread, or
                    # a command on the app's loop, may yet finish: nobody would hear of it.
                    f"{short_repr(running.cmd)} was cut short: the server is stopping"
                    " (it may have run in part, or finish unanswered)",
                    dict(STOPPING_PAYLOAD),
                ),
            )
        )
        if self.task is not None:
            self.task.cancel()
        self._discard_unread()
        transport.close()  # once the reply has gone out; the server aborts what is left after a second

    def abort(self) -> None:
        """Close at once, dropping whatever was not sent."""
        self._closing = True
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self._peer_reads():
            self._write_timer = self._loop.call_later(self._timeout, self._write_stalled)
        else:
            logger.debug("closing a connection whose peer did not read for %gs", self._timeout)
            self.abort()

    def _close_stalled(self) -> None:
        self._close_timer = None
        if self._peer_reads():
            self._close_timer = self._loop.call_later(self._timeout, self._close_stalled)
        else:
            self.abort()

    def _peer_reads(self) -> bool:
        """Whether the peer took some of the waiting bytes since the last look (slowly is fine)."""
        if self._transport is None or self._lost:
            return False
        backlog = _unread(self._transport)
        progressed = backlog < self._write_backlog
        self._write_backlog = backlog
        return progressed

    def _arm_read(self, *, new_message: bool) -> None:
        """The read deadline after reading: ``timeout`` from the start of a message, else idle.

        A message's deadline is set once, when it begins (or when reading
        resumes after a handler ran), not on every chunk: a peer that trickles
        a message byte by byte is cut off ``timeout`` after it began.
        """
        if self._write_paused:  # not reading until the peer takes its replies (resume_writing re-arms)
            self._deadline = None
            self._partial_since = None
        elif not self._proto.has_partial:
            self._in_message = False
            self._partial_since = None
            self._arm(self._idle_timeout)
        else:
            if self._partial_since is None:
                self._partial_since = self._loop.time()
            if new_message or not self._in_message or self._deadline is None:
                self._in_message = True
                self._arm(self._timeout)

    def _arm(self, delay: float) -> None:
        """Set the read deadline, without a timer per request.

        Only the deadline is stored; a timer is scheduled when none is pending
        or the new deadline comes before the pending one, and a timer that
        fires before the (moved) deadline schedules itself again.
        """
        deadline = self._loop.time() + delay
        self._deadline = deadline
        timer = self._deadline_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._deadline_timer = self._loop.call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        deadline = self._deadline
        if deadline is None or self._closing:
            return
        if self._loop.time() < deadline:
            self._deadline_timer = self._loop.call_at(deadline, self._deadline_passed)
            return
        self._deadline = None
        if self._proto.has_partial:
            error = f"timed out after {self._timeout:g}s waiting for the rest of the message"
            assert self._transport is not None
            self._transport.write(self._proto.encode_reply(None, Response.failure(error)))
        self.close()
