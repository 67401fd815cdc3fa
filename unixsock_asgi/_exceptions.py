"""Exceptions: one class per failure; catch :class:`UnixSockError` for all of them.

::

    UnixSockError
    ├── TransportError
    │   ├── ConnectError        cannot reach the socket
    │   ├── TimeoutException    no reply within the timeout
    │   └── ProtocolError       the reply broke the wire protocol or this client's limit
    ├── CommandFailed           the server answered "failure" (raise_for_status)
    ├── ArgumentError           arguments that do not fit a command (also a ValueError)
    └── BindError               a server cannot take its socket path
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._protocol import Request, Response

__all__ = [
    "ArgumentError",
    "BindError",
    "CommandFailed",
    "ConnectError",
    "ProtocolError",
    "TimeoutException",
    "TransportError",
    "UnixSockError",
]


class UnixSockError(Exception):
    """Base class of the errors of talking to a socket, of commands and of binding.

    Mistakes in a call itself (an empty command name, an option that cannot
    work) are plain ``TypeError``/``ValueError``, as in httpx.
    """


class TransportError(UnixSockError):
    """Talking to the socket failed; the command may or may not have run."""


class ConnectError(TransportError):
    """The socket could not be reached: missing, refused, or permission denied."""


class TimeoutException(TransportError):
    """The peer did not answer within the configured timeout."""


class ProtocolError(TransportError):
    """The reply could not be read: not the unixsock wire protocol, larger than this
    client's ``max_message_size``, or the connection closed before it; also a request
    sent with ``respond=False`` that the server refused as it arrived (too large) when the
    refusal cut the write short (a smaller one is refused unseen: nothing is read)."""


class CommandFailed(UnixSockError):
    """The server answered with status "failure" (raised by ``raise_for_status``).

    ``response`` is the failure reply; ``request`` the command it answers
    (None for a Response made by hand). The message names the socket and the
    command when they are known.
    """

    def __init__(self, message: str, *, response: Response) -> None:
        super().__init__(message)
        self.response = response

    @property
    def request(self) -> Request | None:
        """The command as sent, when the response came from a client."""
        return self.response.request

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (a process pool's worker raising it): ``response`` is keyword-only, so the
        # class (a subclass too) is rebuilt without __init__, with its attributes and notes.
        return (_rebuilt, (type(self), self.args), self.__dict__)


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    return exc


class ArgumentError(UnixSockError, ValueError):
    """A command's arguments do not fit its signature (from :meth:`Command.bind`; the
    server answers it as a failure naming the argument)."""


class BindError(UnixSockError):
    """A server could not bind its socket path (in use, not a socket, too long)."""
