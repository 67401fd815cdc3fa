"""unixsock-asgi: a UNIX-domain-socket control plane for running ASGI web servers."""

from ._client import AsyncClient, Client
from ._exceptions import (
    BindError,
    CommandFailed,
    ConnectError,
    ProtocolError,
    TimeoutException,
    TransportError,
    UnixSockError,
)
from ._protocol import STATUS_FAIL, STATUS_OK, Request, Response
from ._server import RequestContext, ServerConfig, UnixSockServer
from ._sockets import PeerCredentials

__version__ = "0.1.0"

__all__ = [
    "STATUS_FAIL",
    "STATUS_OK",
    "AsyncClient",
    "BindError",
    "Client",
    "CommandFailed",
    "ConnectError",
    "PeerCredentials",
    "ProtocolError",
    "Request",
    "RequestContext",
    "Response",
    "ServerConfig",
    "TimeoutException",
    "TransportError",
    "UnixSockError",
    "UnixSockServer",
    "__version__",
]
