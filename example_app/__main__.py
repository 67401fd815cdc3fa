"""``python -m example_app``: run the example app under uvicorn with its control sockets."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import SOCKET_NAME, default_socket_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve HTTP on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    parser.add_argument(
        "--socket-dir",
        default=default_socket_dir(),
        help="directory of the control sockets, one per worker (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    parser.add_argument(
        "--limit-max-requests", type=int, default=None, help="recycle a worker after this many requests"
    )
    args = parser.parse_args(argv)

    import uvicorn

    socket_dir = os.path.abspath(args.socket_dir)
    os.environ["EXAMPLE_APP_SOCKET_DIR"] = socket_dir  # read by every worker process
    quoted = shlex.quote(socket_dir)
    print(
        f"example_app: HTTP on http://{args.host}:{args.port}, {args.workers} worker(s)\n"
        f"example_app: control sockets: {socket_dir}/{SOCKET_NAME}-<pid>.sock (one per worker)\n"
        f"example_app: try  unixsock-asgi send {quoted} stats\n"
        f"example_app:  or  unixsock-asgi top {quoted}\n"
        f"example_app:  or  socat - UNIX-CONNECT:$(ls {quoted}/*.sock | head -n1)   # then type: help",
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
