"""``ControlSocketMiddleware``: a control socket and request statistics for any ASGI app.

Pure ASGI (no ``BaseHTTPMiddleware``). Nothing starts at import or at
construction, because gunicorn ``--preload`` forks after both: the control
server starts when the app's ``lifespan.startup.complete`` goes out and stops
at shutdown, in a ``try/finally`` so that it never outlives the app.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

from ._builtins import builtin_commands, caller_modules, server_software
from ._commands import Commands
from ._control import AllCommands, AppHandler, ControlPlane
from ._settings import Settings
from ._stats import LIVE_LIMIT, UNMATCHED, Stats, routes_behind

__all__ = ["ControlSocketMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("unixsock_asgi")

_MAINTENANCE = "<maintenance>"
_MAINTENANCE_BODY = b'{"error":"maintenance","detail":"this server is in maintenance; retry later"}'
CLIENT_CLOSED_REQUEST = 499
"""Status counted for a request whose app was told the client had gone (``http.disconnect``)
before it started a response (nginx's "client closed request"): what the app
sends then reaches nobody, and the server sends nothing either."""
_perf_counter = time.perf_counter


class ControlSocketMiddleware:
    """Give an ASGI app a UNIX-socket control plane and per-route statistics.

    ::

        app = Starlette(routes=..., middleware=[
            Middleware(ControlSocketMiddleware, socket_dir="/run/myapp", name="myapp"),
        ])

    Wrap the top-level app: the middleware needs the lifespan events, and
    ``--lifespan off`` means no control socket.

    ``path`` is the socket file (``{pid}`` is replaced by the worker's pid);
    ``socket_dir`` instead binds ``<socket_dir>/<name>-<pid>.sock``, removes
    stale sockets there and applies persisted overrides at startup. A socket
    that cannot be started logs a warning and the app serves on, unless
    ``strict=True``, which fails startup with a clear message.

    ``app_timeout`` bounds commands that run on the app's loop; ``socket_mode``,
    ``allowed_uids``/``allowed_gids``, ``max_connections``, ``idle_timeout``
    and ``max_message_size`` are passed to the control server.
    """

    def __init__(
        self,
        app: ASGIApp,
        path: str | os.PathLike[str] | None = None,
        *,
        socket_dir: str | os.PathLike[str] | None = None,
        name: str = "app",
        handler: AppHandler | None = None,
        commands: Commands | None = None,
        settings: Settings | None = None,
        stats: Stats | None = None,
        strict: bool = False,
        health_path: str = "/health",
        maintenance_exempt: Iterable[str] | None = None,
        retry_after: int = 30,
        app_timeout: float = 5.0,
        socket_mode: int = 0o600,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        max_connections: int = 64,
        idle_timeout: float = 60.0,
        max_message_size: int = 1 << 20,
    ) -> None:
        if path is None and socket_dir is None:
            raise TypeError("ControlSocketMiddleware needs path= or socket_dir=")
        if path is not None and socket_dir is not None:
            raise TypeError("pass path= or socket_dir=, not both")
        self.app = app
        self.path: str | None = None if path is None else _fspath(path, "path")
        self.socket_dir: str | None = None if socket_dir is None else _fspath(socket_dir, "socket_dir")
        self.name = name
        self.strict = strict
        # Looked up live (commands registered after this count); replaced built-ins are warned of at startup.
        registry = AllCommands(commands, builtin_commands)
        self.stats: Stats = stats if stats is not None else Stats()
        self._route_trees: dict[int, _RouteTree] = {}  # see _route_key
        self.control: ControlPlane = ControlPlane(
            app,
            commands=registry,
            settings=settings if settings is not None else Settings(),
            stats=self.stats,
            handler=handler,
            server_options={
                "socket_mode": socket_mode,
                "allowed_uids": frozenset(allowed_uids),
                "allowed_gids": frozenset(allowed_gids),
                "max_connections": max_connections,
                "idle_timeout": idle_timeout,
                "max_message_size": max_message_size,
            },
            app_timeout=app_timeout,
            health_path=health_path,
            # None: the health path, whichever it is (the load balancer goes on seeing the
            # worker's own health in maintenance). One path given as a str is that path,
            # not its characters.
            maintenance_exempt=(health_path,)
            if maintenance_exempt is None
            else (maintenance_exempt,)
            if isinstance(maintenance_exempt, str)
            else tuple(maintenance_exempt),
            retry_after=retry_after,
        )

    def socket_path(self) -> str:
        """The socket path this process binds (depends on the pid)."""
        pid = str(os.getpid())
        if self.socket_dir is not None:
            name = self.name
            if not isinstance(name, str) or not name or "/" in name or "\0" in name:
                raise ValueError(f"name must be a file name (no '/'), not {name!r}")
            return os.path.join(self.socket_dir, f"{name}-{pid}.sock")
        assert self.path is not None
        return self.path.replace("{pid}", pid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        # The per-request hot path, kept in this one frame: closures to learn
        # the status, the clock read twice, one append to the request's group.
        if self.control.gate and await self._gated(scope, send):
            return
        root_path = scope.get("root_path", "")
        status: Any = None  # until the app starts a response (or is told the client has gone)

        def send_with_status(message: Message) -> Awaitable[None]:
            # Not async: it hands back send's own awaitable, so that the app's
            # ``await send(...)`` costs no extra coroutine.
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = message["status"]
            return send(message)

        async def receive_watching() -> Message:
            # Only when the app reads: most GET handlers never call it.
            nonlocal status
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                status = CLIENT_CLOSED_REQUEST  # whatever the app sends next, nobody gets it
            return message

        stats = self.stats
        stats.started += 1  # in flight until added
        start = _perf_counter()
        failed = True
        try:
            await self.app(scope, receive_watching, send_with_status)
            failed = False
        finally:
            seconds = _perf_counter() - start
            if status is None:  # no response started: the server answers 500
                status = 500
            # Stats.add(), inline: the route template is looked up when the
            # group is counted; a Starlette route (or FastAPI route context,
            # or None) is grouped by its id and kept in its group.
            route: Any = scope.get("route")
            if route is None or "fastapi" in scope or scope.get("root_path", "") is not root_path:
                try:
                    route = _route_key(scope, root_path, self._route_trees)
                except Exception:  # never let a strange scope keep the request from being counted
                    logger.debug("no route key for %r", scope.get("path"), exc_info=True)
                    route = UNMATCHED
                key = (route if isinstance(route, str) else id(route), scope["method"], status, failed)
            else:
                key = (id(route), scope["method"], status, failed)
            try:
                values = stats.live[key]
            except KeyError:
                stats.add_group(key, route, seconds)
            except Exception:  # an unhashable status, or one whose hash fails
                stats.refuse(key)
            else:
                values.append(seconds)
                if len(values) > LIVE_LIMIT:
                    stats.rotate()

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _app_path(scope: Scope) -> str:
        """The path as the app routes it (without the server's ``root_path``)."""
        path: str = scope["path"]
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        return path

    async def _gated(self, scope: Scope, send: Send) -> bool:
        """Answer 503 when maintenance is on or the health check is made to fail."""
        control = self.control
        if control.awaiting_lifespan:
            self._no_lifespan("an HTTP request")
            if not control.gate:
                return False
        path = self._app_path(scope)
        if control.maintenance and path not in control.maintenance_exempt:
            body = _MAINTENANCE_BODY
            headers = [(b"retry-after", str(control.retry_after).encode())]
            route = _MAINTENANCE
        elif control.health_failing and path == control.health_path:
            body = b'{"status":"failing","detail":"health check failed by an operator"}'
            headers = []
            route = control.health_path
        else:
            return False
        start = time.perf_counter()
        await _answer_503(send, body, headers)
        self.stats.record(route, scope["method"], 503, time.perf_counter() - start, False)
        return True

    def _no_lifespan(self, what: str) -> None:
        """The first request, and no lifespan began: say once why there is no socket."""
        self.control.lifespan_began()
        logger.warning(
            "no control socket: %s got %s but no lifespan startup, so it never"
            " started one; the server runs without the lifespan protocol (uvicorn --lifespan off, daphne),"
            " or the middleware is not on the top-level app (a mounted app gets no lifespan)",
            type(self).__name__,
            what,
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = self.control
        if control.awaiting_lifespan:  # a websocket-only app (Channels under daphne, say)
            self._no_lifespan("a websocket connection")
        if control.maintenance and self._app_path(scope) not in control.maintenance_exempt:
            # No new sessions during maintenance (open ones go on): refused at the
            # handshake. Where the server lets the app answer the handshake itself
            # (the websocket.http.response extension: uvicorn, hypercorn, granian),
            # with the 503 and Retry-After of any other request; else with 1013 "try
            # again later", which servers turn into a 403 that says nothing of maintenance.
            if (await receive())["type"] == "websocket.connect":
                if "websocket.http.response" in (scope.get("extensions") or {}) and not _denial_logs_error():
                    retry_after = [(b"retry-after", str(control.retry_after).encode())]
                    await _answer_503(send, _MAINTENANCE_BODY, retry_after, kind="websocket.http")
                else:
                    await send({"type": "websocket.close", "code": 1013, "reason": "maintenance"})
            return
        stats = self.stats
        accepted = False  # a handshake the app refuses (closing first, or no route) is no connection

        def send_watching(message: Message) -> Awaitable[None]:
            nonlocal accepted
            if not accepted and message["type"] == "websocket.accept":
                accepted = True
                stats.websockets_active += 1
                stats.websockets_total += 1
            return send(message)

        try:
            await self.app(scope, receive, send_watching)
        finally:
            if accepted:
                stats.websockets_active -= 1

    # -- lifespan ------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.control.lifespan_began()
        self.control.server_software = server_software(sys._getframe())
        app_received_startup = False
        startup_sent = False
        refused: str | None = None  # strict mode turned startup.complete into startup.failed

        async def receive_wrapper() -> Message:
            nonlocal app_received_startup
            if refused is not None:
                # The server was told startup failed and will send nothing more;
                # let the app's lifespan run its shutdown so it releases its resources.
                return {"type": "lifespan.shutdown"}
            message = await receive()
            if message["type"] == "lifespan.startup":
                app_received_startup = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal startup_sent, refused
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                startup_sent = True
                error = await self._start_control(scope)
                if error is not None and self.strict:
                    refused = error
                    message = {"type": "lifespan.startup.failed", "message": error}
            elif kind == "lifespan.startup.failed":
                startup_sent = True
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.control.stop()
                if refused is not None:
                    return  # the server is no longer listening for lifespan messages
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
            if refused is not None:
                # Like Starlette's router after startup.failed: servers expect the app to raise.
                raise RuntimeError(refused)
        except BaseException:
            if app_received_startup or startup_sent:
                raise
            # The app does not speak the lifespan protocol: speak it on its behalf.
            await self._own_lifespan(scope, receive, send)
        else:
            if not startup_sent:
                # It returned without a word (``if scope["type"] != "http": return``),
                # which servers take for "no lifespan": speak it on its behalf too.
                await self._own_lifespan(scope, receive, send, startup_received=app_received_startup)
        finally:
            self.control.stop()

    async def _own_lifespan(
        self, scope: Scope, receive: Receive, send: Send, *, startup_received: bool = False
    ) -> None:
        if not startup_received and (await receive())["type"] != "lifespan.startup":  # pragma: no cover
            return
        error = await self._start_control(scope)
        if error is not None and self.strict:
            await send({"type": "lifespan.startup.failed", "message": error})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()
        self.control.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _start_control(self, scope: Scope) -> str | None:
        """Start the control server; return an error message instead of raising."""
        if self.control.server is not None:
            return None
        path = self.path or self.socket_dir
        enabled = _enable_own_loggers()
        if enabled:
            logger.warning(
                "logger(s) %s were disabled, as a logging configuration applied after they were made"
                " does to the loggers it does not name (disable_existing_loggers): enabled again, as"
                " they carry the control socket's warnings and its audit log; to quieten them, name"
                " them in the configuration with a level",
                ", ".join(enabled),
            )
        try:
            path = self.socket_path()
            self.control.app_thread_id = threading.get_ident()
            await self.control.start(path, self.socket_dir, dict(scope) | {"state": scope.get("state")})
        except Exception as exc:
            self.control.stop()
            error = f"control socket {path} could not start: {exc}"
            if self.strict:
                logger.error("%s", error)
            else:
                logger.warning("%s; the app serves on without it", error)
            return error
        logger.info("control socket listening on %s", self.control.socket_path)
        return None


def _fspath(path: str | os.PathLike[str], name: str) -> str:
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or os.PathLike[str], not {path!r}")
    return text


_SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl"


def _denial_logs_error() -> bool:
    """Whether uvicorn's websockets-sansio protocol (its default with the websockets
    package) runs this handshake: it answers a handshake the app refuses with a response,
    then logs "ASGI callable returned without completing handshake." at ERROR for it
    (uvicorn PR 3138), an alert for every client turned away during maintenance.

    Told by the frames that called the app, not by ``send``: a middleware outside this
    one may have wrapped it.
    """
    return _SANSIO in caller_modules(sys._getframe(1))


async def _answer_503(
    send: Send, body: bytes, headers: list[tuple[bytes, bytes]], kind: str = "http"
) -> None:
    """A 503 with a JSON ``body``: to a request (``kind`` "http"), or to a websocket handshake
    refused ("websocket.http", the ``websocket.http.response`` extension)."""
    await send(
        {
            "type": f"{kind}.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": f"{kind}.response.body", "body": body})


def _enable_own_loggers() -> list[str]:
    """Enable this library's loggers where a logging configuration disabled them; return their names.

    ``logging.config.dictConfig`` (uvicorn's ``log_config`` too) disables every
    logger made before it runs that it does not name, unless told
    ``disable_existing_loggers: False``. Configured by ``uvicorn.run(app,
    log_config=...)``, after the app's module and this library were imported,
    that silences the warning that no control socket started and the audit log
    of every command: by accident, as a configuration that meant to silence
    them would name them.
    """
    enabled = []
    for name, known in list(logging.root.manager.loggerDict.items()):
        if (
            (name == "unixsock_asgi" or name.startswith("unixsock_asgi."))
            and isinstance(known, logging.Logger)
            and known.disabled
        ):
            known.disabled = False
            enabled.append(name)
    return sorted(enabled)


_MAX_MOUNT_DEPTH = 16
_MountChains = list[tuple["re.Pattern[str]", str, Any]]
"""Every chain of mounts in an app's route tree: (pattern of its prefix, template, last mount)."""
_Endpoints = dict[int, list[tuple[Any, "re.Pattern[str] | None"]]]
"""The routes of an app's route tree by the id of their endpoint, each with the
pattern of the mount chain it is under (None at the top)."""


class _RouteTree(NamedTuple):
    """What ``_route_key`` knows of one app's routes, found once per top-level router
    (and again, at most every ``_REFRESH_AFTER_S``, when a route it does not know turns up)."""

    router: Any
    chains: _MountChains
    endpoints: _Endpoints
    built_at: float

    @classmethod
    def of(cls, router: Any) -> _RouteTree:
        endpoints: _Endpoints = {}
        chains = _mount_chains(getattr(router, "routes", None), endpoints=endpoints)
        return cls(router, chains, endpoints, time.monotonic())


_REFRESH_AFTER_S = 10.0


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex that a path matched by ``template`` (``/{tenant}/v1``) matches in full."""
    parts = re.split(r"(\{[^}]*\})", template)
    return re.compile(
        "".join(
            (".+" if part.endswith(":path}") else "[^/]+")
            if part.startswith("{") and part.endswith("}")
            else re.escape(part)
            for part in parts
        )
    )


def _mount_chains(
    routes: Any,
    prefix: str = "",
    depth: int = 0,
    path: frozenset[int] = frozenset(),
    *,
    endpoints: _Endpoints | None = None,
    under: re.Pattern[str] | None = None,
) -> _MountChains:
    """The mount chains under ``routes``, in the order Starlette tries them (depth first).

    ``path`` holds the ids of the route lists on the way down, so that an app
    mounted inside itself is not walked again; at most ``_MAX_CHAINS`` chains.
    The routes met on the way are indexed by endpoint into ``endpoints``, with
    ``under``, the pattern of the chain of mounts they are under.
    """
    chains: _MountChains = []
    if depth > _MAX_MOUNT_DEPTH or not isinstance(routes, list | tuple) or id(routes) in path:
        return chains
    path |= {id(routes)}
    for route in routes:
        if len(chains) >= _MAX_CHAINS:
            break
        try:
            _index_endpoint(endpoints, getattr(route, "endpoint", None), route, under)
            mount_path, path_format = getattr(route, "path", None), getattr(route, "path_format", None)
            if (
                isinstance(mount_path, str)
                and isinstance(path_format, str)
                and path_format.endswith("/{path}")
            ):  # a Mount
                template = prefix + mount_path
                pattern = _template_pattern(template)
                chains.append((pattern, template, route))
                # What a Mount puts in the scope as the endpoint (FastAPI's router sets no route).
                _index_endpoint(endpoints, getattr(route, "app", None), route, under)
                chains += _mount_chains(
                    routes_behind(route), template, depth + 1, path, endpoints=endpoints, under=pattern
                )
            elif getattr(route, "routes", None) or isinstance(getattr(route, "host", None), str):
                # a Host: routes of its own (or behind middleware), no path
                chains += _mount_chains(
                    routes_behind(route), prefix, depth + 1, path, endpoints=endpoints, under=under
                )
        except Exception:  # a route that fails to describe itself is left out of the tree, not the others
            logger.debug("mount tree: %r left out", route, exc_info=True)
    return chains[:_MAX_CHAINS]


_MAX_CHAINS = 1000


def _index_endpoint(
    endpoints: _Endpoints | None, endpoint: Any, route: Any, under: re.Pattern[str] | None
) -> None:
    if endpoint is not None and endpoints is not None and len(endpoints) < _MAX_CHAINS:
        endpoints.setdefault(id(endpoint), []).append((route, under))


def _mounted_key(route: Any, matched: str, chains: _MountChains) -> str:
    """The key of a request whose mounts matched ``matched`` (the raw ``root_path`` extension).

    The first chain of mounts whose template matches it in full gives the
    prefix, so ``Mount("/{tenant}")`` counts one template for every tenant;
    when none does (a prefix made by something other than Starlette's
    mounts), the matched path itself is the prefix.
    """
    prefix, last = matched, None
    for pattern, chain_template, mount in chains:
        if pattern.fullmatch(matched):
            prefix, last = chain_template, mount
            break
    template = getattr(route, "path_format", None)
    if route is last or not isinstance(template, str) or not template:
        return prefix + "/{path}"  # the mounted app has no routes of its own (static files, raw ASGI)
    if last is None and template.endswith("/{path}") and matched.endswith(getattr(route, "path", "\0")):
        return prefix + "/{path}"  # the same, seen without the tree
    return prefix + template


def _route_key(scope: Scope, root_path: str, trees: dict[int, _RouteTree]) -> Any:
    """What a request is counted under, when it is not a plain Starlette route: never the raw path.

    FastAPI (>= 0.120) leaves the include-prefixed template in its effective
    route context, a long-lived object grouped by its id (Stats reads its
    ``path_format``, like a Starlette route's). A route that matched without
    saying so (FastAPI's router sets ``scope["route"]`` for its own routes
    only: ``/docs``, ``add_route``) is found by the endpoint it set. Under
    mounts, the prefix is the template of the chain of mounts that matched
    (see ``_mounted_key``). ``trees`` caches what is known of each app's
    routes by its top-level router.
    """
    route = scope.get("route")
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        context = fastapi_scope.get("effective_route_context")
        included = getattr(context, "starlette_route", None)  # a plain route of an included router
        if getattr(context, "path_format", None):
            route = context
        elif getattr(included, "path_format", None):
            route = included
    extended = scope.get("root_path", "")
    matched = ""  # what mounts on the way added to root_path
    if extended is not root_path and isinstance(extended, str):
        matched = extended[len(root_path) :] if extended.startswith(root_path) else extended
    tree: _RouteTree | None = None
    if route is None and scope.get("endpoint") is not None:
        tree = _tree_of(scope, trees)
        route = _route_of_endpoint(scope, tree.endpoints, matched)
        if route is None and time.monotonic() - tree.built_at > _REFRESH_AFTER_S:
            tree = _tree_of(scope, trees, refresh=True)  # a route added since the tree was built?
            route = _route_of_endpoint(scope, tree.endpoints, matched)
    if not matched:  # no mount on the way
        return route
    return _mounted_key(route, matched, (tree or _tree_of(scope, trees)).chains)


def _tree_of(scope: Scope, trees: dict[int, _RouteTree], *, refresh: bool = False) -> _RouteTree:
    router = scope.get("router")
    known = trees.get(id(router))
    if refresh or known is None or known.router is not router:
        if len(trees) >= 100:  # an app has one top-level router
            trees.clear()
        known = trees[id(router)] = _RouteTree.of(router)
    return known


def _route_of_endpoint(scope: Scope, endpoints: _Endpoints, matched: str) -> Any:
    """The route whose endpoint the router put in the scope; None if none in the tree matches.

    A candidate must sit under the mounts that matched (``matched``, what
    they added to ``root_path``) and match the request itself, as the router
    asked it (an endpoint may serve several routes, some added later).
    """
    partial = None
    for candidate, under in endpoints.get(id(scope["endpoint"]), ()):
        if (under.fullmatch(matched) is None) if under is not None else matched:
            continue  # under other mounts than those that matched
        match = getattr(candidate.matches(scope)[0], "name", "")
        if match == "FULL":
            return candidate
        if match == "PARTIAL" and partial is None:
            partial = candidate
    return partial
