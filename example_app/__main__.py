"""``python -m example_app``: run the example app under uvicorn with its control sockets."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import shlex
import socket
import sys

from . import SOCKET_NAME, default_socket_dir

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


def _problem(host: str, port: int, socket_dir: str) -> str | None:
    """Why the app could not serve as the banner will say, found before anything starts.

    Only what is plain to see: the middleware makes a missing socket directory
    itself (0700, with any missing above it) and says why if it cannot.
    """
    existing = socket_dir
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--socket-dir {socket_dir}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--socket-dir {socket_dir}: this user cannot write {existing}"
    if existing == socket_dir and os.stat(socket_dir).st_mode & 0o022:
        return (
            f"--socket-dir {socket_dir}: other users may write it (they could add sockets the CLI"
            " would talk to); name a directory of your own, or a new one inside it"
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: uvicorn binds what it resolves to, and says so if it cannot
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        if ip.version == 6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another copy running?); pick one with --port"
            return f"cannot serve on {host}:{port}: {exc.strerror}"
    return None


def _live_sockets(socket_dir: str) -> list[str]:
    """The sockets in ``socket_dir`` that something answers on (another run of the app, say)."""
    live = []
    for name in sorted(os.listdir(socket_dir)):
        if name.endswith(".sock"):
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(0.5)
                try:
                    probe.connect(os.path.join(socket_dir, name))
                except OSError:
                    continue  # stale (the app removes it) or not a socket
                live.append(name)
    return live


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve HTTP on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument(
        "--workers", type=_at_least_one, default=1, help="uvicorn worker processes (default: 1)"
    )
    parser.add_argument(
        "--socket-dir",
        default=default_socket_dir(),
        help="directory of the control sockets, one per worker (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="uvicorn's log level")
    parser.add_argument(
        "--limit-max-requests",
        type=_at_least_one,
        default=None,
        help="end a worker after this many requests: with --workers 2 or more uvicorn starts a"
        " fresh one (a new control socket); with one worker the server exits",
    )
    args = parser.parse_args(argv)

    socket_dir = os.path.abspath(args.socket_dir)
    problem = _problem(args.host, args.port, socket_dir)
    if problem is not None:
        parser.exit(2, f"{parser.prog}: {problem}\n")

    live = _live_sockets(socket_dir) if os.path.isdir(socket_dir) else []
    if live:
        print(
            f"example_app: note: {socket_dir} already has {len(live)} live socket(s) ({', '.join(live)}):"
            " the CLI will count them with this run's workers (--socket-dir keeps runs apart)",
            flush=True,
        )

    import uvicorn

    os.environ["EXAMPLE_APP_SOCKET_DIR"] = socket_dir  # read by every worker process
    quoted = shlex.quote(socket_dir)
    print(
        f"example_app: HTTP on http://{args.host}:{args.port}, {args.workers} worker(s)\n"
        f"example_app: control sockets: {socket_dir}/{SOCKET_NAME}-<pid>.sock (one per worker)\n"
        f"example_app: try  unixsock-asgi send {quoted} stats\n"
        f"example_app:  or  unixsock-asgi top {quoted}\n"
        f'example_app:  or  socat - "UNIX-CONNECT:$(ls {quoted}/*.sock | head -n1)"   # then type: help',
        flush=True,
    )
    uvicorn.run(
        "example_app.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        limit_max_requests=args.limit_max_requests,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
