"""unixsock-asgi: a UNIX-domain-socket control plane for running ASGI web servers."""

from ._client import AsyncClient, Client
from ._commands import Command, Commands
from ._control import CommandContext
from ._exceptions import (
    ArgumentError,
    BindError,
    CommandFailed,
    ConnectError,
    ProtocolError,
    TimeoutException,
    TransportError,
    UnixSockError,
)
from ._middleware import ControlSocketMiddleware
from ._protocol import STATUS_FAIL, STATUS_OK, Request, Response
from ._server import RequestContext, ServerConfig, UnixSockServer
from ._settings import Setting, Settings
from ._sockets import PeerCredentials
from ._stats import LatencyHistogram, Stats

__version__ = "0.1.0"

__all__ = [
    "STATUS_FAIL",
    "STATUS_OK",
    "ArgumentError",
    "AsyncClient",
    "BindError",
    "Client",
    "Command",
    "CommandContext",
    "CommandFailed",
    "Commands",
    "ConnectError",
    "ControlSocketMiddleware",
    "LatencyHistogram",
    "PeerCredentials",
    "ProtocolError",
    "Request",
    "RequestContext",
    "Response",
    "ServerConfig",
    "Setting",
    "Settings",
    "Stats",
    "TimeoutException",
    "TransportError",
    "UnixSockError",
    "UnixSockServer",
    "__version__",
]
