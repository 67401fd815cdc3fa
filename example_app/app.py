"""The example app: JSON routes, runtime settings and two custom control commands.

Every worker binds ``$EXAMPLE_APP_SOCKET_DIR/example_app-<pid>.sock``.
Try, while it runs::

    unixsock-asgi send "$DIR" stats
    unixsock-asgi send "$DIR" set name=greeting value="good morning"
    unixsock-asgi send "$DIR" restock item_id=2 quantity=5
    unixsock-asgi send "$DIR" set_log_level level=DEBUG logger=example_app ttl=600
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from unixsock_asgi import CommandContext, Commands, ControlSocketMiddleware, Response, Setting, Settings

from . import SOCKET_NAME, default_socket_dir

__all__ = ["app", "commands", "settings"]

log = logging.getLogger("example_app")

# Read by name (settings["greeting"]) or, typed for mypy, by the Setting itself (settings[DISCOUNT]).
DISCOUNT = Setting("discount_percent", int, 0, "Discount applied to every price", minimum=0, maximum=90)

settings = Settings(
    Setting("greeting", str, "hello", "What GET / answers with"),
    Setting("slow_delay_s", float, 0.2, "How long GET /slow takes", minimum=0, maximum=30),
    DISCOUNT,
    Setting("show_stock", bool, True, "Whether item responses include the stock count"),
)

commands = Commands()

_CATALOG = {
    1: {"id": 1, "name": "teapot", "price": 25.0, "stock": 3},
    2: {"id": 2, "name": "kettle", "price": 40.0, "stock": 0},
    3: {"id": 3, "name": "mug", "price": 8.5, "stock": 12},
}


@commands.command
async def restock(ctx: CommandContext, item_id: int, quantity: int) -> dict[str, Any] | Response:
    """Add ``quantity`` units of an item to the live catalog (runs on the app's loop)."""
    # An expected failure is a reply; an exception would be logged with its traceback, as a bug.
    if quantity <= 0:
        return Response.failure(f"quantity must be positive, got {quantity}")
    catalog: dict[int, dict[str, Any]] = ctx.state["catalog"]
    if item_id not in catalog:
        return Response.failure(f"no item {item_id}; items: {sorted(catalog)}")
    catalog[item_id]["stock"] += quantity
    cache: dict[tuple[int, int, bool], dict[str, Any]] = ctx.app_state.render_cache
    for key in [key for key in cache if key[0] == item_id]:
        del cache[key]  # its stock changed
    return {"item_id": item_id, "stock": catalog[item_id]["stock"]}


@commands.command
def flush_cache(ctx: CommandContext) -> dict[str, int]:
    """Drop every cached item rendering (they are kept per item and settings)."""
    cache: dict[tuple[int, int, bool], Any] = ctx.app_state.render_cache
    dropped = len(cache)
    cache.clear()
    return {"dropped": dropped}


def _price(item: dict[str, Any], discount: int) -> float:
    return round(float(item["price"]) * (100 - discount) / 100, 2)


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"message": settings["greeting"], "pid": os.getpid()})


async def list_items(request: Request) -> JSONResponse:
    catalog = request.state.catalog
    discount = settings[DISCOUNT]  # an int; read once: a `set` may come meanwhile
    return JSONResponse(
        {
            "items": [
                {"id": i["id"], "name": i["name"], "price": _price(i, discount)} for i in catalog.values()
            ]
        }
    )


async def get_item(request: Request) -> JSONResponse:
    text: str = request.path_params["item_id"]
    # Item ids are small numbers: anything else is no item (int() of 5,000 digits would raise).
    item_id = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
    item = request.state.catalog.get(item_id)
    if item_id is None or item is None:
        return JSONResponse({"error": f"no item {text[:40]}"}, status_code=404)
    # Rendered once per item and settings: a `set` shows on the next request. Each
    # setting is read once (a `set` may come meanwhile), and the key is what is rendered.
    key = (item_id, settings[DISCOUNT], settings["show_stock"])
    cache: dict[tuple[int, int, bool], dict[str, Any]] = request.app.state.render_cache
    body = cache.get(key)
    if body is None:
        body = {"id": item_id, "name": item["name"], "price": _price(item, key[1])}
        if key[2]:
            body["stock"] = item["stock"]
        cache[key] = body
    log.debug("served item %d to %s", item_id, request.client.host if request.client else "?")
    return JSONResponse(body)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def slow(request: Request) -> JSONResponse:
    delay = settings["slow_delay_s"]
    await asyncio.sleep(delay)
    return JSONResponse({"slept_s": delay})


async def block(request: Request) -> JSONResponse:
    """Blocks the event loop on purpose (at most 10 s): what ``stacks`` is for."""
    try:
        seconds = float(request.query_params.get("seconds", "1"))
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= 10:
        return JSONResponse({"error": "seconds must be a number from 0 to 10"}, status_code=400)
    time.sleep(seconds)
    return JSONResponse({"blocked_s": seconds})


async def fail(request: Request) -> JSONResponse:
    raise RuntimeError("this route fails on purpose")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    app.state.render_cache = {}
    log.info("example app starting (pid %d)", os.getpid())
    yield {"catalog": {k: dict(v) for k, v in _CATALOG.items()}}
    log.info("example app stopping (pid %d)", os.getpid())


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     [%(process)d] %(name)s: %(message)s"))
    for name in ("example_app", "unixsock_asgi"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
            lg.propagate = False


_configure_logging()

app = Starlette(
    routes=[
        Route("/", index),
        Route("/items", list_items),
        Route("/items/{item_id}", get_item),
        Route("/health", health),
        Route("/slow", slow),
        Route("/block", block),
        Route("/fail", fail),
    ],
    lifespan=lifespan,
    middleware=[
        Middleware(
            ControlSocketMiddleware,
            socket_dir=os.environ.get("EXAMPLE_APP_SOCKET_DIR") or default_socket_dir(),
            name=SOCKET_NAME,
            commands=commands,
            settings=settings,
            health_path="/health",
        )
    ],
)
