"""The control server: a UNIX socket served by its own event loop in its own thread.

Threading model: :meth:`UnixSockServer.start` binds the socket in the calling
thread (so errors surface there) and then runs a private asyncio loop in a
daemon thread named ``unixsock-server``. Connections are served on that loop,
so the server answers even while the host application's loop is busy or
blocked. Async handlers run on the server loop; plain functions run in a small
thread pool so that a slow one cannot stall other connections. Handlers that
must touch another loop's objects (an ASGI app's, say) hop there themselves;
the ASGI middleware does exactly that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _compat
from ._protocol import (
    STATUS_OK,
    ConnectionProtocol,
    Mode,
    ProtocolViolation,
    Request,
    Response,
)
from ._sockets import BoundSocket, PeerCredentials, bind_unix_socket, peer_credentials

__all__ = ["Handler", "RequestContext", "ServerConfig", "UnixSockServer"]

logger = logging.getLogger("unixsock_asgi.server")
audit_logger = logging.getLogger("unixsock_asgi.audit")

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
    handler_timeout: float = 30.0
    """Seconds a handler may run before the reply says it timed out."""
    max_connections: int = 64
    """Connections served at once; more are answered "busy" and closed."""
    allowed_uids: frozenset[int] = frozenset()
    """Uids that may talk besides the server's own and root."""
    allowed_gids: frozenset[int] = frozenset()
    """Gids whose members (by primary gid of the peer) may talk too."""
    socket_mode: int = 0o600
    """File mode of the socket; widen it (0o660) together with ``allowed_gids``."""
    handler_threads: int = 4
    """Threads that run plain (non-async) handlers."""


@dataclass
class RequestContext:
    """What a handler may know about the request beyond ``cmd`` and ``args``."""

    peer: PeerCredentials
    mode: Mode
    server: UnixSockServer
    request_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _takes_context(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
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
    text = str(exc)
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
            for key in ("allowed_uids", "allowed_gids"):
                if key in options:
                    options[key] = frozenset(options[key])
            config = ServerConfig(path=os.fspath(path), **options)
        elif options or path is not None:
            raise TypeError("pass either a config or a path and options, not both")
        self.config = config
        self.handler = handler
        self._handler_async = _is_async(handler)
        self._handler_ctx = _takes_context(handler)
        self._uid = os.getuid()
        self._bound: BoundSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._active = 0
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
            logger.debug("serving on %s", self._bound.path)
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close connections and remove the socket file if it is ours."""
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            stopping = self._stopping
            if stopping is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(stopping.set)
                except RuntimeError:
                    pass  # the loop already finished
            thread.join(timeout)
            self._thread = None
            if self._bound is not None:
                self._bound.unlink_if_ours()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

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
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=self._bound.sock, limit=1 << 16
            )
        except BaseException as exc:  # pragma: no cover - start_unix_server on a bound sock
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=2.0)

    # -- connections -------------------------------------------------------

    def _allowed(self, peer: PeerCredentials) -> bool:
        cfg = self.config
        return peer.uid in (self._uid, 0) or peer.uid in cfg.allowed_uids or peer.gid in cfg.allowed_gids

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One coroutine frame serves the whole connection: it is resumed on
        # every read, and each extra level of ``await`` would cost on each.
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        cfg = self.config
        watchdog = _ReadDeadline(asyncio.get_running_loop(), task)
        counted = False
        try:
            try:
                peer = peer_credentials(writer.get_extra_info("socket"))
            except OSError:
                peer = PeerCredentials(0, -1, -1)
            proto = ConnectionProtocol(cfg.max_message_size)
            refusal = self._refusal(peer)
            if refusal is not None:
                await self._refuse(reader, writer, proto, refusal)
                return
            self._active += 1
            counted = True
            transport = writer.transport
            read, write = reader.read, writer.write
            timeout, idle_timeout = cfg.timeout, cfg.idle_timeout
            while not proto.closed:
                partial = proto.has_partial
                watchdog.arm(timeout if partial else idle_timeout)
                try:
                    data = await read(1 << 16)
                except asyncio.CancelledError:
                    if not watchdog.expired:
                        raise
                    watchdog.acknowledge()
                    if partial:
                        error = f"timed out after {timeout:g}s waiting for the rest of the message"
                        write(proto.encode_reply(None, Response.failure(error)))
                        await self._drain(writer)
                    return
                watchdog.disarm()
                for event in proto.receive_data(data):
                    if isinstance(event, Request):
                        outcome = self._begin(event, peer, proto.mode or "frame")
                        response = outcome if isinstance(outcome, Response) else await outcome
                        if event.respond:
                            write(self._encode(proto, event, response))
                        if event.close:
                            await self._drain(writer)
                            return
                    elif isinstance(event, ProtocolViolation):
                        write(proto.encode_reply(event, Response.failure(event.error)))
                        audit_logger.info(
                            "peer pid=%d uid=%d sent bad input: %s", peer.pid, peer.uid, event.error
                        )
                        if event.fatal:
                            await self._drain(writer)
                            return
                    else:  # Close
                        return
                if transport.get_write_buffer_size():
                    await self._drain(writer)
        except (asyncio.CancelledError, ConnectionError, TimeoutError):
            pass
        except Exception:  # pragma: no cover - a bug here must not kill the server
            logger.exception("unexpected error on a control connection")
        finally:
            watchdog.close()
            if counted:
                self._active -= 1
            self._connections.discard(task)
            writer.close()

    def _refusal(self, peer: PeerCredentials) -> str | None:
        """Why this peer may not talk now, or None."""
        if not self._allowed(peer):
            audit_logger.warning("refused peer pid=%d uid=%d gid=%d", peer.pid, peer.uid, peer.gid)
            return "permission denied"
        if self._active >= self.config.max_connections:
            refusal = f"busy: {self.config.max_connections} connections already open"
            logger.warning("refused a connection: %s", refusal)
            return refusal
        return None

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proto: ConnectionProtocol,
        refusal: str,
    ) -> None:
        cfg = self.config
        # Read the first bytes only to learn which framing to answer in.
        try:
            async with _compat.timeout(min(cfg.timeout, 1.0)):
                data = await reader.read(1 << 16)
        except TimeoutError:
            return
        proto.receive_data(data)
        writer.write(proto.encode_reply(None, Response.failure(refusal)))
        async with _compat.timeout(cfg.timeout):
            await writer.drain()

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        # Usually the socket took the whole reply at once: nothing to wait for,
        # and no timer to arm and cancel.
        if writer.transport.get_write_buffer_size() == 0 and not writer.transport.is_closing():
            return
        async with _compat.timeout(self.config.timeout):
            await writer.drain()

    def _encode(self, proto: ConnectionProtocol, request: Request, response: Response) -> bytes:
        try:
            return proto.encode_reply(request, response)
        except (TypeError, ValueError, RecursionError) as exc:
            return proto.encode_reply(request, Response.failure(f"reply could not be encoded: {exc}"))

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
        except asyncio.CancelledError:
            raise  # as when it is raised after the first step: the connection ends
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
                f"handler for {request.cmd!r} timed out after {self.config.handler_timeout:g}s"
            )
        except _HandlerRaised as raised:
            response = self._raised(request, raised.exc)
        self._audit(request, peer, response, start)
        return response

    async def _finish_handler(self, resumed: Awaitable[Any] | None, args: tuple[Any, ...]) -> Any:
        async with _compat.timeout(self.config.handler_timeout):
            # Inside the timeout, whatever the handler raises (a TimeoutError of
            # its own included) is wrapped, so that a bare TimeoutError leaving
            # this block always means the handler timeout expired.
            try:
                if resumed is not None:
                    return await resumed
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self.config.handler_threads, thread_name_prefix="unixsock-handler"
                    )
                handler: Callable[..., Any] = self.handler
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, lambda: handler(*args))
                if inspect.isawaitable(result):
                    return await _await(result)
                return result
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # SystemExit in a handler must not end the server
                raise _HandlerRaised(exc) from None

    def _raised(self, request: Request, exc: BaseException) -> Response:
        logger.debug("handler for %r raised", request.cmd, exc_info=exc)
        return Response.failure(_describe(exc))

    def _audit(self, request: Request, peer: PeerCredentials, response: Response, start: float) -> None:
        if audit_logger.isEnabledFor(logging.INFO):
            audit_logger.info(
                "peer pid=%d uid=%d cmd=%s status=%s duration_ms=%.2f",
                peer.pid,
                peer.uid,
                request.cmd,
                response.status,
                (time.perf_counter() - start) * 1000,
            )


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


class _ReadDeadline:
    """The read timeout of one connection, re-armed without a timer per request.

    ``asyncio.timeout`` schedules and cancels a timer each time; here arming
    only stores a deadline, and a timer is scheduled when none is pending or
    the new deadline comes before the pending one. When the timer fires
    early (the deadline moved on) it is scheduled again; when it fires past
    an armed deadline the connection's task is cancelled and ``expired`` set.
    """

    __slots__ = ("_deadline", "_handle", "_loop", "_task", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self._loop = loop
        self._task = task
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False

    def arm(self, delay: float) -> None:
        deadline = self._loop.time() + delay
        self._deadline = deadline
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        self._deadline = None

    def acknowledge(self) -> None:
        """The caller has handled the expiry: withdraw the cancellation."""
        self.expired = False
        _compat.uncancel(self._task)

    def close(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        self._deadline = None
        self.expired = True
        self._task.cancel()
