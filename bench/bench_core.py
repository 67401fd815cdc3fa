"""Core benchmark: our control server against a bare asyncio UNIX-socket echo server.

Run ``python bench/bench_core.py`` (``--help`` for the knobs). Not a test.

Both servers run the same way: in a subprocess, with their event loop in a
daemon thread of that process (ours does that itself), so neither shares a GIL
with the clients. Clients do the same thing against both: send a message of
the same size and read the whole reply on a persistent connection.

* latency: one client in this process, one request at a time, one persistent
  connection per row; the rows take turns every 100 round trips; the median
  of every round trip, over several rounds.
* throughput: N client processes (multiprocessing, so they do not share a
  GIL either) hammer the server at once; wall time per request, median of
  interleaved rounds.

Rows: ``bare`` is the floor (asyncio echo). ``ours/raw`` sends our request
frame with the same raw-socket client code as ``bare``, so the difference is
the server's work. ``ours/Client`` uses :class:`unixsock_asgi.Client` with
``close=False``, the whole stack a caller sees.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.synchronize
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from unixsock_asgi import Client, UnixSockServer
from unixsock_asgi._protocol import Request, encode_request

REQUEST = encode_request(Request("ping", {}, respond=True, close=False))
MP = multiprocessing.get_context("fork")

# With two CPUs or more, servers run on one and clients on another, so that
# the scheduler moving them around does not decide the numbers.
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
SERVER_CPUS = {_CPUS[-1]} if len(_CPUS) >= 2 else set()
CLIENT_CPUS = set(_CPUS[:-1]) if len(_CPUS) >= 2 else set()


def pin(cpus: set[int]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


# -- servers (each in its own process, loop in a daemon thread) ------------------


async def _pong(cmd: str, args: dict[str, Any]) -> str:
    return "pong"


def _serve_ours(
    path: str, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> None:
    pin(SERVER_CPUS)
    server = UnixSockServer(path, _pong, max_connections=256).start()
    ready.set()
    stop.wait()
    server.stop()


def _serve_bare(
    path: str, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> None:
    pin(SERVER_CPUS)
    loop = asyncio.new_event_loop()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def serve() -> None:
        server = loop.run_until_complete(asyncio.start_unix_server(echo, path, limit=1 << 16))
        ready.set()
        loop.run_forever()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    stop.wait()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    os.unlink(path)


@contextmanager
def server_process(kind: str, path: str) -> Iterator[None]:
    ready, stop = MP.Event(), MP.Event()
    target = _serve_bare if kind == "bare" else _serve_ours
    proc = MP.Process(target=target, args=(path, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(10):
            raise RuntimeError(f"{kind} server did not start")
        yield
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- clients ---------------------------------------------------------------------


def _reply_length(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(REQUEST)
        header = sock.recv(5, socket.MSG_WAITALL)
        (length,) = struct.unpack(">I", header[:4])
        return 5 + int(length)


def make_ops(kind: str, path: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """Return (one round trip, close) for a client of ``kind`` on a persistent connection."""
    if kind == "ours/Client":
        client = Client(path, close=False)

        def call() -> None:
            client.send("ping")

        return call, client.close
    # The raw client: identical code for the floor and for ours, only the sizes differ.
    message = REQUEST
    reply_len = len(REQUEST) if kind == "bare" else _reply_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sendall, recv = sock.sendall, sock.recv

    def roundtrip() -> None:
        sendall(message)
        got = 0
        while got < reply_len:
            chunk = recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            got += len(chunk)

    return roundtrip, sock.close


LATENCY_SLICE = 100
"""Round trips a kind makes before the next kind takes its turn."""


def measure_latency(kinds: tuple[str, ...], paths: dict[str, str], ops: int) -> dict[str, list[int]]:
    """Round-trip samples of every kind, taken in turns of LATENCY_SLICE.

    Each kind keeps its own persistent connection; the kinds alternate every
    LATENCY_SLICE round trips (a few ms), so a burst of load on the machine
    falls on all of them alike rather than on whichever kind was running.
    """
    ops_of = {kind: make_ops(kind, paths["bare" if kind == "bare" else "ours"]) for kind in kinds}
    try:
        for call, _ in ops_of.values():
            for _ in range(min(ops // 10, 500)):
                call()
        clock = time.perf_counter_ns
        samples: dict[str, list[int]] = {kind: [] for kind in kinds}
        for _ in range(0, ops, LATENCY_SLICE):
            for kind in kinds:
                call = ops_of[kind][0]
                out = samples[kind]
                for _ in range(LATENCY_SLICE):
                    t0 = clock()
                    call()
                    out.append(clock() - t0)
        return samples
    finally:
        for _, close in ops_of.values():
            close()


def _throughput_worker(
    kind: str, path: str, ops: int, barrier: multiprocessing.synchronize.Barrier, done: Any
) -> None:
    pin(CLIENT_CPUS)
    call, close = make_ops(kind, path)
    try:
        for _ in range(20):
            call()
        barrier.wait(30)
        for _ in range(ops):
            call()
        done.put(None)
    except BaseException as exc:
        done.put(repr(exc))
        raise
    finally:
        close()


def measure_throughput(kind: str, path: str, clients: int, ops: int) -> float:
    """Wall-clock ns per request with ``clients`` processes sending ``ops`` requests each."""
    barrier = MP.Barrier(clients + 1)
    done: Any = MP.SimpleQueue()
    procs = [
        MP.Process(target=_throughput_worker, args=(kind, path, ops, barrier, done), daemon=True)
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(60)
        t0 = time.perf_counter_ns()
        for _ in procs:
            error = done.get()
            if error is not None:
                raise RuntimeError(f"{kind} client failed: {error}")
        elapsed = time.perf_counter_ns() - t0
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return elapsed / (clients * ops)


# -- the run ---------------------------------------------------------------------

KINDS = ("bare", "ours/raw", "ours/Client")


def run(rounds: int, latency_ops: int, clients: int, throughput_ops: int) -> None:
    tmp = tempfile.mkdtemp(prefix="bench-core-")
    paths = {"bare": os.path.join(tmp, "bare.sock"), "ours": os.path.join(tmp, "ours.sock")}
    pin(CLIENT_CPUS)  # the latency client is this process
    latency: dict[str, list[int]] = {k: [] for k in KINDS}
    round_medians: dict[str, list[float]] = {k: [] for k in KINDS}
    throughput: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        with server_process("bare", paths["bare"]), server_process("ours", paths["ours"]):
            for r in range(rounds):
                # Interleave, rotating the order each round, so drift hits every row alike.
                order = KINDS[r % 3 :] + KINDS[: r % 3]
                for kind, samples in measure_latency(order, paths, latency_ops).items():
                    latency[kind] += samples
                    round_medians[kind].append(statistics.median(samples))
                for kind in order:
                    path = paths["bare" if kind == "bare" else "ours"]
                    throughput[kind].append(measure_throughput(kind, path, clients, throughput_ops))
                print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for path in paths.values():
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(tmp)

    floor_lat = statistics.median(latency["bare"])
    floor_thr = statistics.median(throughput["bare"])
    print()
    pinned = (
        f"servers on cpu {sorted(SERVER_CPUS)}, clients on {sorted(CLIENT_CPUS)}"
        if SERVER_CPUS
        else "unpinned"
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus ({pinned}), {rounds} interleaved rounds")
    print(
        f"request {len(REQUEST)} bytes; latency {latency_ops} round trips/round; throughput {clients} client"
    )
    print(f"processes x {throughput_ops} requests/round")
    print(
        "x bare: median of all samples over bare's; paired: median over rounds of the ratio of round medians"
    )
    print()
    header = (
        f"{'server/client':<14} {'lat p50 ns':>11} {'p90 ns':>9} {'x bare':>7} {'paired':>7} "
        f"{'round p50 range':>17} {'32c ns/op':>10} {'x bare':>7}"
    )
    print(header.replace("32c", f"{clients}c"))
    print("-" * len(header))
    for kind in KINDS:
        samples = sorted(latency[kind])
        p50 = statistics.median(samples)
        p90 = samples[int(len(samples) * 0.9)]
        lo, hi = min(round_medians[kind]), max(round_medians[kind])
        thr = statistics.median(throughput[kind])
        # Each round's median over the same round's bare median: the machine's
        # state drifts between rounds, and a ratio within one round cancels it.
        paired = statistics.median(
            m / b for m, b in zip(round_medians[kind], round_medians["bare"], strict=True)
        )
        print(
            f"{kind:<14} {p50:>11,.0f} {p90:>9,.0f} {p50 / floor_lat:>7.2f} {paired:>7.2f} "
            f"{f'{lo:,.0f}-{hi:,.0f}':>17} {thr:>10,.0f} {thr / floor_thr:>7.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--latency-ops", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--throughput-ops", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a short run to see that it works")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.latency_ops, args.throughput_ops = 2, 500, 50
    run(args.rounds, args.latency_ops, args.clients, args.throughput_ops)


if __name__ == "__main__":
    main()
