"""Blocking and asyncio clients that share everything but their I/O (httpx's twins)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from types import TracebackType
from typing import Any

from . import _compat
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


def _connect_error(path: str, exc: OSError) -> ConnectError:
    if isinstance(exc, FileNotFoundError):
        hint = "no socket file there; is the server running, and is the path right?"
    elif isinstance(exc, ConnectionRefusedError):
        hint = "nothing is listening (a stale socket left by a process that is gone?)"
    elif isinstance(exc, PermissionError):
        hint = "permission denied; check the socket's owner, group and mode"
    elif exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
        hint = "that path is not a listening socket"
    else:
        hint = exc.strerror or str(exc)
    return ConnectError(f"cannot connect to {path}: {hint}")


class _BaseClient:
    """Options, framing and decoding: everything that is not I/O."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float = 5.0,
        max_message_size: int = 1 << 20,
        *,
        respond: bool = True,
        close: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_message_size = min(max_message_size, HARD_MAX_MESSAGE_SIZE)
        self.respond = respond
        self.close_after = close

    def options(self, max_length: int, timeout: float, respond: bool, close: bool) -> None:
        """Set the maximum reply size, the timeout, and the default respond/close flags.

        The Go client's ``Options(maxLength, timeout, respond, close)``.
        """
        self.max_message_size = min(max_length, HARD_MAX_MESSAGE_SIZE)
        self.timeout = timeout
        self.respond = respond
        self.close_after = close

    def _prepare(
        self, cmd: str, args: dict[str, Any] | None, respond: bool | None, close: bool | None
    ) -> tuple[bytes, bool, bool]:
        if not isinstance(cmd, str) or not cmd:
            raise ValueError("cmd must be a non-empty string")
        respond = self.respond if respond is None else respond
        close = self.close_after if close is None else close
        return encode_request(Request(cmd, dict(args or {}), respond, close)), respond, close

    def _header_length(self, header: bytes) -> int:
        if len(header) < _HEADER_SIZE:
            raise ProtocolError(
                f"{self.path}: connection closed before a reply arrived"
                " (the server closed it, or it does not speak the frame protocol)"
            )
        try:
            return read_frame_header(header, self.max_message_size)
        except ValueError as exc:
            raise ProtocolError(f"{self.path}: {exc}") from None

    def _decode(self, body: bytes) -> Response:
        try:
            response, _ = decode_response(body)
        except ValueError as exc:
            raise ProtocolError(f"{self.path}: {exc}") from None
        return response

    def _timeout_error(self) -> TimeoutException:
        return TimeoutException(
            f"{self.path}: no reply within {self.timeout:g}s (is the server's event loop blocked?"
            " raise the timeout with options())"
        )


class Client(_BaseClient):
    """A blocking client: ``Client(path).send("ping")``.

    ``send(cmd, args=None, respond=True, close=True)`` as in the Go library;
    with ``close=False`` the connection is kept for the next call and opened
    again transparently when the server has closed it meanwhile.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float = 5.0,
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
            raise ConnectError(f"cannot connect to {self.path}: the server's backlog is full") from None
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

    def send(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None:
        """Send one command; return its Response, or None when ``respond`` is false."""
        frame, respond, close = self._prepare(cmd, args, respond, close)
        sock = self._reusable()
        reused = sock is not None
        if sock is None:
            sock = self._sock = self._connect()
        try:
            try:
                sock.settimeout(self.timeout)
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                self.close()  # closed under us between the check and the write
                sock = self._sock = self._connect()
                sock.sendall(frame)
            if not respond:
                return None
            return self._read_reply(sock)
        except TimeoutError:
            self.close()
            raise self._timeout_error() from None
        except TransportError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise TransportError(f"{self.path}: {exc.strerror or exc}") from None
        finally:
            if close:
                self.close()

    def _read_reply(self, sock: socket.socket) -> Response:
        # Usually the whole reply arrives in the first recv; read it in one go
        # rather than header then body, and reset the timeout only when waiting again.
        deadline = time.monotonic() + self.timeout
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
            if not first:
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
    """The asyncio twin of :class:`Client`: ``await AsyncClient(path).send("ping")``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float = 5.0,
        max_message_size: int = 1 << 20,
        *,
        respond: bool = True,
        close: bool = True,
    ) -> None:
        super().__init__(path, timeout, max_message_size, respond=respond, close=close)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with _compat.timeout(self.timeout):
                return await asyncio.open_unix_connection(self.path, limit=HARD_MAX_MESSAGE_SIZE + 8)
        except TimeoutError:
            raise ConnectError(f"cannot connect to {self.path}: the server's backlog is full") from None
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

    async def send(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        respond: bool | None = None,
        close: bool | None = None,
    ) -> Response | None:
        """Send one command; return its Response, or None when ``respond`` is false."""
        frame, respond, close = self._prepare(cmd, args, respond, close)
        reader, writer, reused = await self._stream()
        try:
            async with _compat.timeout(self.timeout):
                try:
                    writer.write(frame)
                    await writer.drain()
                except (BrokenPipeError, ConnectionResetError):
                    if not reused:
                        raise
                    await self.aclose()
                    reader, writer = self._reader, self._writer = await self._connect()
                    writer.write(frame)
                    await writer.drain()
                if not respond:
                    return None
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
        except TimeoutError:
            await self.aclose()
            raise self._timeout_error() from None
        except TransportError:
            await self.aclose()
            raise
        except OSError as exc:
            await self.aclose()
            raise TransportError(f"{self.path}: {exc.strerror or exc}") from None
        finally:
            if close:
                await self.aclose()

    async def aclose(self) -> None:
        """Close the connection, if one is open."""
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
