"""What a ``profile`` costs the app while it samples.

The 5-route Starlette app of ``bench_middleware.py``, wrapped in
``ControlSocketMiddleware`` with its control plane started for real (the
lifespan runs in this process), serves batches of in-process requests on this
thread's event loop: the app loop. Each round times one batch while no
profile runs (the baseline, in the same run) and one while a real ``profile``
command, sent over the control socket from another thread, samples the app
loop's thread. The ratio is the app's requests/s with the profile over
without. Wall time, not the thread's CPU clock: a sample holds the GIL,
which stops the app's thread without using its CPU.

Run: ``python bench/bench_profile.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench_middleware as bm  # this directory: the script's

from unixsock_asgi import Client

INTERVALS = (0.01, 0.001)
BATCH_SECONDS = 0.15  # each batch is sized to take about this long


async def start_lifespan(app: Any) -> asyncio.Task[None]:
    """Run the app's lifespan until startup completes (the control socket is up)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message.get("message"))

    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
    )
    await asyncio.wait_for(started.wait(), 10)
    return task


async def serve(app: Any, scopes: list[dict[str, Any]]) -> float:
    """Serve fresh copies of ``scopes`` one after the other; the wall seconds it took."""
    fresh = [dict(scope) for scope in scopes]
    start = time.perf_counter()
    for scope in fresh:
        await app(scope, bm.receive_request, bm.discard)
    return time.perf_counter() - start


async def one_round(
    app: Any, scopes: list[dict[str, Any]], socket: str, interval: float
) -> tuple[float, dict[str, Any]]:
    """Requests/s while a profile samples, over requests/s while none does; and its answer."""
    gc.collect()
    without = await serve(app, scopes)
    answer: dict[str, Any] = {}

    def run_profile() -> None:
        reply = Client(socket, timeout=30).send(
            "profile", {"seconds": BATCH_SECONDS * 2 + 0.3, "interval": interval, "limit": 5}
        )
        assert reply is not None and reply.ok, reply
        answer.update(reply.payload)

    sampler = threading.Thread(target=run_profile)
    sampler.start()
    await asyncio.sleep(0.15)  # it has started sampling
    gc.collect()
    with_profile = await serve(app, scopes)
    while sampler.is_alive():
        await asyncio.sleep(0.01)
    return without / with_profile, answer


async def run(rounds: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory(prefix="usab-") as socket_dir:
        app = bm.build_app("ours", 5, "starlette", socket_dir=socket_dir)
        lifespan = await start_lifespan(app)
        (socket,) = Path(socket_dir).glob("*.sock")
        paths = bm.request_paths(5)
        scopes = [bm.http_scope(paths[i % len(paths)]) for i in range(2000)]
        await serve(app, scopes)  # warm
        per_second = len(scopes) / await serve(app, scopes)
        scopes = [bm.http_scope(paths[i % len(paths)]) for i in range(int(per_second * BATCH_SECONDS))]
        rows = []
        for interval in INTERVALS:
            ratios, rates, held, busy = [], [], [], []
            for _ in range(rounds):
                ratio, answer = await one_round(app, scopes, str(socket), interval)
                ratios.append(ratio)
                rates.append(answer["ticks"] / answer["seconds"])
                held.append(answer["sampling_s"] / answer["ticks"])
                # The app was busy through the batch: its frames, not the loop's wait.
                top = answer["top"][0]["frame"] if answer["top"] else "-"
                busy.append(top)
            low, high, _ = bm.median_interval(ratios)
            rate = statistics.median(rates)
            per_sample = statistics.median(held)
            rows.append(
                [
                    f"every {interval * 1000:g} ms",
                    str(rounds),
                    f"{statistics.median(ratios):.3f}",
                    f"{low:.3f}-{high:.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    f"{rate:.0f}",
                    f"{per_sample * 1e6:.0f} µs",
                    f"{rate * per_sample:.2%}",
                ]
            )
        lifespan.cancel()
        print(
            f"(batches of {len(scopes)} requests, about {BATCH_SECONDS:g} s each; busiest line last round: {busy[-1]})"
        )
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    rows = asyncio.run(run(args.rounds))
    header = [
        "profile sampling",
        "rounds",
        "req/s with / without",
        "95% interval",
        "min-max",
        "samples/s",
        "stack read",
        "share of the time",
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    print(
        f"Python {sys.version.split()[0]}; the app's thread serves requests without pause while the profile samples it."
    )


if __name__ == "__main__":
    main()
