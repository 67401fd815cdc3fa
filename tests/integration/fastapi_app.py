"""A FastAPI app for the integration tests, configured by environment variables.

UNIXSOCK_TEST_SOCKET  socket path (``{pid}`` allowed)
UNIXSOCK_TEST_STRICT  "1" for strict=True
UNIXSOCK_TEST_WRAP_SEND  "1" for a middleware outside ours that wraps ``send`` (tracing does)
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from unixsock_asgi import CommandContext, Commands, ControlSocketMiddleware

commands = Commands()


@commands.command(readonly=True)
async def lifespan_state(ctx: CommandContext) -> dict[str, Any]:
    """The lifespan state as the app sees it (runs on the app loop)."""
    return {"keys": sorted(ctx.state), "db": ctx.state.get("db"), "app_state_ready": ctx.app_state.ready}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    app.state.ready = True
    yield {"db": {"users": 2}}


api = APIRouter()
inner = APIRouter(prefix="/inner")


@api.get("/users/{user_id}")
async def get_user(user_id: int, request: Request) -> dict[str, Any]:
    return {"id": user_id, "db_users": request.state.db["users"]}


@inner.get("/things/{name}")
async def get_thing(name: str) -> dict[str, str]:
    return {"name": name}


api.include_router(inner)

app = FastAPI(lifespan=lifespan)
app.include_router(api, prefix="/api/v1")


@app.get("/block")
def block_sync_route_is_threaded() -> dict[str, str]:
    return {"ok": "sync routes run in a thread and do not block the loop"}


@app.get("/block-loop")
async def block_loop(seconds: float = 1.0) -> dict[str, float]:
    time.sleep(min(seconds, 10.0))  # blocks the event loop on purpose
    return {"blocked_s": seconds}


legacy = Starlette(routes=[Route("/pages/{slug}", lambda request: PlainTextResponse("page"))])
app.mount("/legacy", legacy)


async def raw_files(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"file"})


app.mount("/static", raw_files)


async def long_poll(scope: Any, receive: Any, send: Any) -> None:
    """Waits for the client to go away, and answers nothing (a raw long poll)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def no_answer(scope: Any, receive: Any, send: Any) -> None:
    """Returns without a response, the client still there: the server answers 500."""


app.mount("/longpoll", long_poll)
app.mount("/no-answer", no_answer)


@app.post("/upload")
async def upload(request: Request) -> dict[str, int]:
    return {"bytes": len(await request.body())}  # ClientDisconnect when the upload is aborted


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return  # (a client that only shook hands)
    await websocket.close()


app.add_middleware(
    ControlSocketMiddleware,
    path=os.environ.get("UNIXSOCK_TEST_SOCKET", "/tmp/unixsock-test-{pid}.sock"),
    commands=commands,
    strict=os.environ.get("UNIXSOCK_TEST_STRICT") == "1",
    app_timeout=0.5,
)


class WrapSend:
    """Wraps ``send``, as tracing middleware does."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await self.app(scope, receive, wrapped)


if os.environ.get("UNIXSOCK_TEST_WRAP_SEND") == "1":
    app.add_middleware(WrapSend)
