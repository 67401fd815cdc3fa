"""Blocking and asyncio clients that share everything but their I/O (httpx's twins)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import math
import os
import socket
import stat
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, overload

from . import _compat
from ._checks import is_seconds, whole_number
from ._exceptions import ConnectError, ProtocolError, TimeoutException, TransportError
from ._protocol import (
    HARD_MAX_MESSAGE_SIZE,
    Request,
    Response,
    decode_response,
    encode_request,
    read_frame_header,
)

__all__ = ["AsyncClient", "Client"]

_HEADER_SIZE = 5
_SPARE_AFTER = 1 << 16  # frames that may not fit the socket's buffer at once (see AsyncClient._write)


def _connect_error(path: str, exc: OSError) -> ConnectError:
    if isinstance(exc, FileNotFoundError):
        hint = "no socket file there; is the server running, and is the path right?"
    elif isinstance(exc, ConnectionRefusedError):
        hint = _not_a_socket(path) or "nothing is listening (a stale socket left by a process that is gone?)"
    elif isinstance(exc, PermissionError):
        hint = "permission denied; check the socket's owner, group and mode"
    elif exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
        hint = "that path is not a listening socket"
    else:
        hint = exc.strerror or str(exc)
    return ConnectError(f"cannot connect to {path}: {hint}")


def _not_a_socket(path: str) -> str:
    """What is at ``path`` when it is not a socket (connecting to a plain file is refused too)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    what = (
        "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "a special file"
    )
    return f"that path is {what}, not a socket (is the path right?)"


BACKLOG_FULL = "the server's backlog is full (it accepts no connections: stopped, hung or flooded)"


async def _connect_unix(path: str) -> socket.socket:
    """A connected non-blocking UNIX socket, tried again while the server's backlog is full.

    Not ``open_unix_connection(path)``: a UNIX socket's connect never is "in
    progress", it fails with EAGAIN when the listen backlog is full, which
    asyncio takes for a connect under way; it then reports a connection that
    is none, and the first write fails as if the server had dropped it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    delay = 0.005
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:  # the backlog is full: until the caller's timeout
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
    except BaseException:
        sock.close()
        raise


def _transport_error(path: str, exc: OSError) -> TransportError:
    text = exc.strerror or str(exc)
    if isinstance(exc, ConnectionResetError):
        text += " (the server dropped the connection unanswered: it may be flooded, with its max_connections open)"
    return TransportError(f"{path}: {text}")


class _Unchanged(enum.Enum):
    UNCHANGED = enum.auto()


_UNCHANGED = _Unchanged.UNCHANGED
"""``options()``'s timeout left out (None is a timeout: none)."""


def _checked_timeout(timeout: float | None) -> float | None:
    """A timeout as given: a positive number of seconds, or None (wait for ever; so is inf)."""
    if timeout is None:
        return None
    if not is_seconds(timeout):
        raise ValueError(f"timeout must be a positive number of seconds or None (no limit), not {timeout!r}")
    return None if timeout == math.inf else timeout


def _checked_size(size: Any, name: str) -> int:
    """The largest reply accepted; more than the protocol allows is the protocol's limit."""
    checked = whole_number(size, 1)
    if checked is None:
        raise ValueError(f"{name} must be a whole number of bytes of at least 1, not {size!r}")
    return min(checked, HARD_MAX_MESSAGE_SIZE)


class _BaseClient:
    """Options, framing and decoding: everything that is not I/O."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None = 10.0,
        max_message_size: int = 1 << 20,
        *,
        respond: bool = True,
        close: bool = True,
    ) -> None:
        self.path: str = os.fspath(path)
        self.timeout: float | None = _checked_timeout(timeout)
        self.max_message_size: int = _checked_size(max_message_size, "max_message_size")
        self.respond: bool = respond
        self.close_after: bool = close

    def options(
        self,
        max_length: int | None = None,
        timeout: float | _Unchanged | None = _UNCHANGED,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> None:
        """Set the maximum reply size, the timeout (None: wait for ever), and the default respond/close flags.

        The Go client's ``Options(maxLength, timeout, respond, close)``; what is
        left out stays as it was: ``options(timeout=60)`` for a long ``drain``.
        """
        if max_length is not None:
            self.max_message_size = _checked_size(max_length, "max_length")
        if not isinstance(timeout, _Unchanged):
            self.timeout = _checked_timeout(timeout)
        if respond is not None:
            self.respond = respond
        if close is not None:
            self.close_after = close

    def _prepare(
        self, cmd: str, args: Mapping[str, Any] | None, respond: bool | None, close: bool | None
    ) -> tuple[Request, bytes]:
        if not isinstance(cmd, str) or not cmd:
            raise ValueError("cmd must be a non-empty string")
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(f"args must be a dict (a JSON object) or None, not {type(args).__name__}")
        respond = self.respond if respond is None else respond
        close = self.close_after if close is None else close
        request = Request(cmd, dict(args or {}), respond, close)
        return request, encode_request(request)

    def _answering(self, request: Request, response: Response | None) -> Response | None:
        """``response``, told what it answers (for ``raise_for_status``'s message)."""
        return response._answering(request, self.path) if response is not None else None

    def _header_length(self, header: bytes) -> int:
        if len(header) < _HEADER_SIZE:
            raise ProtocolError(
                f"{self.path}: connection closed before a reply arrived"
                " (the server closed it, or it does not speak the frame protocol)"
            )
        try:
            return read_frame_header(header, self.max_message_size)
        except ValueError as exc:
            hint = ""
            announced = int.from_bytes(header[:4], "big")
            if self.max_message_size < announced <= HARD_MAX_MESSAGE_SIZE:  # the server may send it
                hint = " (this client's max_message_size: raise it with options() or max_message_size=)"
            raise ProtocolError(f"{self.path}: bad reply: {exc}{hint}") from None

    def _decode(self, body: bytes) -> Response:
        try:
            response, _ = decode_response(body)
        except ValueError as exc:
            raise ProtocolError(f"{self.path}: {exc}") from None
        return response

    def _refused(self, refusal: Response, respond: bool) -> Response:
        """The server refused the request as it arrived (too large, say) and closed: say why."""
        if respond:
            return refusal
        raise ProtocolError(f"{self.path}: the server refused the request: {refusal.error}")

    def _timeout_error(self) -> TimeoutException:
        # Not "is the loop blocked?": a server of ours says so itself, within its app_timeout.
        return TimeoutException(
            f"{self.path}: no reply within {self.timeout:g}s (the command may still run there;"
            " one that takes longer, a drain say, needs a longer timeout: timeout= or options(timeout=...))"
        )


class Client(_BaseClient):
    """A blocking client: ``Client(path).send("ping")``.

    ``send(cmd, args=None, respond=True, close=True)`` as in the Go library;
    with ``close=False`` the connection is kept for the next call and opened
    again transparently when the server has closed it meanwhile. One thread's
    at a time, as a socket is: give each thread its own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None = 10.0,
        max_message_size: int = 1 << 20,
        *,
        respond: bool = True,
        close: bool = True,
    ) -> None:
        super().__init__(path, timeout, max_message_size, respond=respond, close=close)
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (TimeoutError, BlockingIOError):
            sock.close()
            raise ConnectError(f"cannot connect to {self.path}: {BACKLOG_FULL}") from None
        except OSError as exc:
            sock.close()
            raise _connect_error(self.path, exc) from None
        return sock

    def _reusable(self) -> socket.socket | None:
        sock = self._sock
        if sock is None:
            return None
        # Reuse a kept connection only if nothing waits on it: EOF means the
        # server closed it (its idle timeout, say); stray bytes mean it is out
        # of step. The peek must not block, and a socket with a timeout polls
        # before every recv (MSG_DONTWAIT or not), so make it non-blocking.
        sock.settimeout(0)
        try:
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return sock
        except OSError:
            pass
        self.close()
        return None

    @overload
    def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        respond: Literal[True],
        close: bool | None = None,
    ) -> Response: ...
    @overload
    def send(
        self, cmd: str, args: Mapping[str, Any] | None, respond: Literal[True], close: bool | None = None
    ) -> Response: ...
    @overload
    def send(
        self, cmd: str, args: Mapping[str, Any] | None, respond: Literal[False], close: bool | None = None
    ) -> None: ...
    @overload
    def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        respond: Literal[False],
        close: bool | None = None,
    ) -> None: ...
    @overload
    def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None: ...
    def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None:
        """Send one command; return its Response, or None when ``respond`` is false.

        ``respond`` left out takes the client's (``options()``), so type checkers see
        ``Response | None``; ``respond=True`` is typed ``Response``.
        """
        request, frame = self._prepare(cmd, args, respond, close)
        respond, close = request.respond, request.close
        sock = self._reusable()
        reused = sock is not None
        if sock is None:
            sock = self._sock = self._connect()
        finished = False  # an interrupted call (Ctrl-C, say) must not leave its reply for the next one
        try:
            sock.settimeout(self.timeout)
            try:
                refusal = self._write(sock, frame)
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                self.close()  # closed under us between the check and the write
                sock = self._sock = self._connect()
                refusal = self._write(sock, frame)
            if refusal is not None:
                return self._answering(request, self._refused(refusal, respond))
            reply = self._read_reply(sock) if respond else None
            finished = True
            return self._answering(request, reply)
        except TimeoutError:
            self.close()
            raise self._timeout_error() from None
        except TransportError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise _transport_error(self.path, exc) from None
        finally:
            if close or not finished:
                self.close()

    def _write(self, sock: socket.socket, frame: bytes) -> Response | None:
        """Send ``frame``; None, or the refusal the server sent before closing mid-write."""
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as exc:
            try:
                return self._read_reply(sock)
            except (OSError, TransportError):
                raise exc from None
        return None

    def _read_reply(self, sock: socket.socket) -> Response:
        # Usually the whole reply arrives in the first recv; read it in one go
        # rather than header then body, and reset the timeout only when waiting again.
        deadline = math.inf if self.timeout is None else time.monotonic() + self.timeout
        buf = bytearray()
        self._recv_until(sock, buf, _HEADER_SIZE, 1 << 16, deadline)
        length = self._header_length(bytes(buf[:_HEADER_SIZE]))
        end = _HEADER_SIZE + length
        self._recv_until(sock, buf, end, 0, deadline)
        if len(buf) < end:
            raise ProtocolError(
                f"{self.path}: connection closed mid-reply ({len(buf) - _HEADER_SIZE} of {length} bytes)"
            )
        if len(buf) > end:
            self.close()  # bytes beyond the reply: the connection is out of step
        return self._decode(bytes(buf[_HEADER_SIZE:end]))

    @staticmethod
    def _recv_until(sock: socket.socket, buf: bytearray, n: int, read_ahead: int, deadline: float) -> None:
        """Receive into ``buf`` until it holds ``n`` bytes or EOF; raise TimeoutError at the deadline."""
        first = True
        while len(buf) < n:
            if not first and deadline < math.inf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
            first = False
            chunk = sock.recv(max(n - len(buf), read_ahead))
            if not chunk:
                return
            buf += chunk

    def close(self) -> None:
        """Close the connection, if one is open."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """The asyncio twin of :class:`Client`: ``await AsyncClient(path).send("ping")``.

    Tasks may share one: their commands take turns on its connection.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None = 10.0,
        max_message_size: int = 1 << 20,
        *,
        respond: bool = True,
        close: bool = True,
    ) -> None:
        super().__init__(path, timeout, max_message_size, respond=respond, close=close)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # One command at a time on the connection; both belong to one event loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = asyncio.Lock()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self._open(self.path)

    async def _open(
        self, address: str | os.PathLike[str]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``address`` (``self.path``, or what stands for it); errors name ``self.path``."""
        try:
            async with _compat.timeout(self.timeout):
                sock = await _connect_unix(os.fspath(address))
                try:
                    return await asyncio.open_unix_connection(sock=sock, limit=HARD_MAX_MESSAGE_SIZE + 8)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise ConnectError(f"cannot connect to {self.path}: {BACKLOG_FULL}") from None
        except OSError as exc:
            raise _connect_error(self.path, exc) from None

    async def _stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        reader, writer = self._reader, self._writer
        if reader is not None and writer is not None:
            if not (reader.at_eof() or writer.is_closing() or reader._buffer):  # type: ignore[attr-defined]
                return reader, writer, True
            await self.aclose()
        reader, writer = self._reader, self._writer = await self._connect()
        return reader, writer, False

    @overload
    async def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        respond: Literal[True],
        close: bool | None = None,
    ) -> Response: ...
    @overload
    async def send(
        self, cmd: str, args: Mapping[str, Any] | None, respond: Literal[True], close: bool | None = None
    ) -> Response: ...
    @overload
    async def send(
        self, cmd: str, args: Mapping[str, Any] | None, respond: Literal[False], close: bool | None = None
    ) -> None: ...
    @overload
    async def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        respond: Literal[False],
        close: bool | None = None,
    ) -> None: ...
    @overload
    async def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None: ...
    async def send(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None:
        """Send one command; return its Response, or None when ``respond`` is false.

        ``respond`` left out takes the client's (``options()``), so type checkers see
        ``Response | None``; ``respond=True`` is typed ``Response``.
        """
        request, frame = self._prepare(cmd, args, respond, close)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # used from another loop (a later asyncio.run): start afresh there
            self._discard()
            self._loop = loop
            self._turn = asyncio.Lock()
        async with self._turn:
            return self._answering(request, await self._send(frame, request.respond, request.close))

    async def _send(self, frame: bytes, respond: bool, close: bool) -> Response | None:
        reader, writer, reused = await self._stream()
        finished = False  # a cancelled call must not leave its reply for the next one
        try:
            async with _compat.timeout(self.timeout):
                try:
                    refusal = await self._write(reader, writer, frame)
                except (BrokenPipeError, ConnectionResetError):
                    if not reused:
                        raise
                    self._drop()
                    reader, writer = self._reader, self._writer = await self._connect()
                    refusal = await self._write(reader, writer, frame)
                if refusal is not None:
                    return self._refused(refusal, respond)
                reply = await self._read_reply(reader) if respond else None
            finished = True
            return reply
        except TimeoutError:
            await self.aclose()
            raise self._timeout_error() from None
        except TransportError:
            await self.aclose()
            raise
        except OSError as exc:
            await self.aclose()
            raise _transport_error(self.path, exc) from None
        finally:
            if not finished:
                self._drop()  # at once: a cancelled task may not get to await anything more
            elif close:
                await self.aclose()

    async def _write(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes
    ) -> Response | None:
        """Send ``frame``; None, or the refusal the server sent before closing mid-write.

        A frame larger than the socket's buffer can meet a server that refused
        it from its header and closed: the transport then drops the connection
        with the refusal unread, so a duplicate of the socket keeps it readable.
        """
        spare = None
        if len(frame) > _SPARE_AFTER:
            raw = writer.get_extra_info("socket")
            if raw is not None:
                spare = socket.socket(fileno=os.dup(raw.fileno()))
                spare.setblocking(False)
        try:
            writer.write(frame)
            await writer.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            if spare is None:
                raise
            received = bytearray(reader._buffer)  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):  # the rest, already in the kernel's buffer, then EOF
                while chunk := spare.recv(1 << 16):
                    received += chunk
            try:
                length = self._header_length(bytes(received[:_HEADER_SIZE]))
                if len(received) < _HEADER_SIZE + length:
                    raise exc from None
                return self._decode(bytes(received[_HEADER_SIZE : _HEADER_SIZE + length]))
            except TransportError:
                raise exc from None
        finally:
            if spare is not None:
                spare.close()
        return None

    async def _read_reply(self, reader: asyncio.StreamReader) -> Response:
        try:
            header = await reader.readexactly(_HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            header = exc.partial
        length = self._header_length(header)
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                f"{self.path}: connection closed mid-reply ({len(exc.partial)} of {length} bytes)"
            ) from None
        return self._decode(body)

    def _drop(self) -> None:
        """Close the connection without waiting for it."""
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()

    def _discard(self) -> None:
        """Close a connection kept from another event loop, which may be closed by now.

        Its transport needs that loop to close, so its socket is closed here.
        """
        writer = self._writer
        self._reader = self._writer = None
        if writer is None:
            return
        raw = writer.get_extra_info("socket")
        sock = getattr(raw, "_sock", None)  # asyncio's wrapper hides close(); the socket has it
        with contextlib.suppress(OSError):
            if isinstance(sock, socket.socket):
                sock.close()
            elif raw is not None:
                raw.shutdown(socket.SHUT_RDWR)

    async def aclose(self) -> None:
        """Close the connection, if one is open."""
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            self._discard()
            return
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def close(self) -> None:
        """Close the connection (the Go client's ``Quit``)."""
        await self.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
