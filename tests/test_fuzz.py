"""Property tests: the parser never raises on any input, and a live server survives anything."""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unixsock_asgi import Client, UnixSockServer
from unixsock_asgi._protocol import (
    Close,
    ConnectionProtocol,
    Event,
    ProtocolViolation,
    Request,
    Response,
    decode_response,
    parse_line,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

unicode_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)  # hypothesis leaves out surrogates
    | st.text(st.sampled_from(["a", " ", "\\", "\U0001f600", "\u017c"]), max_size=6)
)
# Lone surrogates, often: a JSON escape can carry one, UTF-8 cannot. Requests
# holding one are refused; replies may hold one (a file name's undecodable byte).
# A high surrogate directly before a low one is a pair, which JSON reads back as one character.
lone_surrogates = st.text(
    st.sampled_from(["a", " ", "\ud800", "\udfff", "\U0001f600", "\u017c"]), max_size=6
).filter(lambda s: "\ud800\udfff" not in s)


def json_trees(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
        ),
        max_leaves=25,
    )


json_values = json_trees(unicode_scalars | lone_surrogates)
unicode_values = json_trees(unicode_scalars)
json_objects = st.dictionaries(st.text(max_size=10), unicode_values, max_size=5)
requests = st.fixed_dictionaries(
    {"cmd": st.text(min_size=1, max_size=20)},
    optional={"args": json_objects, "respond": st.booleans(), "close": st.booleans(), "id": unicode_values},
)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def holds_lone_surrogate(value: Any) -> bool:
    return bool(_LONE_SURROGATE.search(json.dumps(value, ensure_ascii=False)))


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + b":" + body


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(proto: ConnectionProtocol, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in [*chunks, b""]:
        out = proto.receive_data(chunk)
        assert isinstance(out, list)
        for event in out:
            assert isinstance(event, (Request, ProtocolViolation, Close))
            if isinstance(event, ProtocolViolation):
                # Every violation can be answered, in either mode.
                decode_response(_body(proto, proto.encode_reply(event, Response.failure(event.error))))
        events += out
    assert proto.closed
    return events


def _body(proto: ConnectionProtocol, reply: bytes) -> bytes:
    return reply if proto.mode == "line" else reply[5:]


# -- sans-I/O ------------------------------------------------------------------


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"\x00", b"\x00\x00\x00", b"{", b"ping ", b"\xff"]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=8),
    limit=st.sampled_from([8, 64, 1 << 20]),
)
def test_arbitrary_bytes_in_any_chunking_only_produce_events(
    prefix: bytes, data: bytes, cuts: list[int], limit: int
) -> None:
    whole = prefix + data
    events = feed(ConnectionProtocol(limit), chunked(whole, cuts))
    if whole[:1] == b"\x00":
        # Frame parsing does not depend on how the bytes were split.
        assert events == feed(ConnectionProtocol(limit), [whole])


@FUZZ
@given(value=json_values, line=st.booleans())
def test_arbitrary_json_bodies(value: Any, line: bool) -> None:
    body = json.dumps(value).encode()
    proto = ConnectionProtocol()
    events = proto.receive_data(body + b"\n" if line else frame(body))
    if line and not body.startswith(b"{"):
        # Not a JSON object: read as ``cmd key=value`` text, which may or may not parse.
        assert all(isinstance(e, (Request, ProtocolViolation)) for e in events)
        return
    assert len(events) == 1
    event = events[0]
    valid = (
        isinstance(value, dict)
        and isinstance(value.get("cmd"), str)
        and value["cmd"] != ""
        and isinstance(value.get("args", {}), (dict, type(None)))
        and isinstance(value.get("respond", True), bool)
        and isinstance(value.get("close", True), bool)
        and not holds_lone_surrogate(value)
    )
    assert isinstance(event, Request) == valid
    if isinstance(event, ProtocolViolation):
        assert not event.fatal


@FUZZ
@given(obj=requests, line=st.booleans())
def test_valid_requests_round_trip(obj: dict[str, Any], line: bool) -> None:
    body = json.dumps(obj).encode()
    proto = ConnectionProtocol()
    (event,) = proto.receive_data(body + b"\n" if line else frame(body))
    assert isinstance(event, Request)
    assert event.cmd == obj["cmd"]
    assert event.args == obj.get("args", {})
    assert event.respond == obj.get("respond", True)
    assert event.close == obj.get("close", not line)
    assert event.id == obj.get("id")
    response, req_id = decode_response(_body(proto, proto.encode_reply(event, Response.success(event.args))))
    assert response == Response.success(event.args)
    assert req_id == event.id


@FUZZ
@given(cmd=st.text(max_size=10), error=st.text(max_size=10), payload=json_values, req_id=json_values)
def test_frame_replies_are_the_dict_encoded(cmd: str, error: str, payload: Any, req_id: Any) -> None:
    # Frame replies are assembled from encoded parts; they must be exactly the
    # bytes of encoding the reply object, ASCII-escaped when UTF-8 cannot carry it.
    proto = ConnectionProtocol()
    proto.receive_data(b"\x00")
    request = Request(cmd or "x", {}, id=req_id)
    response = Response("failure" if error else "success", error, payload)
    obj: dict[str, Any] = {
        "cmd": request.cmd,
        "response": {"status": response.status, "error": error, "payload": payload},
    }
    if req_id is not None:
        obj["id"] = req_id
    try:
        expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        expected = json.dumps(obj, separators=(",", ":")).encode()
    assert proto.encode_reply(request, response) == struct.pack(">I", len(expected)) + b":" + expected


@FUZZ
@given(
    cmd=st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True).filter(lambda c: c not in ("quit", "exit")),
    args=st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), json_values, max_size=5),
)
def test_key_value_lines_carry_any_json_value(cmd: str, args: dict[str, Any]) -> None:
    line = " ".join([cmd, *(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in args.items())])
    req = parse_line(line)
    if holds_lone_surrogate(args):
        assert isinstance(req, ProtocolViolation) and "lone surrogate" in req.error, req
        return
    assert isinstance(req, Request), req
    assert req.cmd == cmd
    assert req.args == args


# -- a live server -------------------------------------------------------------


class ErrorRecords(logging.Handler):
    """Collects ERROR records from the server and asyncio loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UnixSockServer, ErrorRecords]]:
    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        return {"cmd": cmd, "args": args}

    errors = ErrorRecords()
    loggers = [logging.getLogger("unixsock_asgi.server"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(errors)
    path: Path = tmp_path_factory.mktemp("fuzz") / "ctl.sock"
    server = UnixSockServer(
        path, handler, timeout=0.3, idle_timeout=0.3, handler_timeout=2, max_message_size=4096
    )
    try:
        server.start()
        yield server, errors
    finally:
        server.stop()
        for logger in loggers:
            logger.removeHandler(errors)
    assert not server.running


def exchange(path: str, chunks: list[bytes], half_close: bool = True) -> bytes:
    """Send ``chunks`` on a fresh connection, then read everything until the server closes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    received = bytearray()
    try:
        sock.connect(path)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed while we were still sending
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return bytes(received)


def check_replies(sent: bytes, received: bytes) -> None:
    """Whatever the server sent back is a sequence of well-formed replies in the client's framing."""
    probe = ConnectionProtocol()
    probe.receive_data(sent[:1])
    if probe.mode == "line":
        lines = received.split(b"\n")
        assert lines[-1] == b""
        for line in lines[:-1]:
            decode_response(line)
        return
    offset = 0
    while offset < len(received):
        (length,) = struct.unpack_from(">I", received, offset)
        assert received[offset + 4 : offset + 5] == b":"
        end = offset + 5 + length
        assert end <= len(received)
        decode_response(received[offset + 5 : end])
        offset = end


def check_alive(server: UnixSockServer, errors: ErrorRecords, n: Any) -> None:
    response = Client(server.path, timeout=5).send("echo", {"n": n})
    assert response is not None
    assert response.payload == {"cmd": "echo", "args": {"n": n}}
    assert server.running
    assert not errors.records, [r.getMessage() for r in errors.records]


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"\x00", b"\x00\x00\x00", b"{", b"echo ", b"\xff"]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=4),
)
def test_live_server_survives_arbitrary_bytes(
    live: tuple[UnixSockServer, ErrorRecords], prefix: bytes, data: bytes, cuts: list[int]
) -> None:
    server, errors = live
    sent = prefix + data
    check_replies(sent, exchange(server.path, chunked(sent, cuts)))
    check_alive(server, errors, len(sent))


@FUZZ
@given(values=st.lists(json_values | requests, min_size=1, max_size=4), line=st.booleans())
def test_live_server_survives_arbitrary_json(
    live: tuple[UnixSockServer, ErrorRecords], values: list[Any], line: bool
) -> None:
    server, errors = live
    bodies = [json.dumps(v).encode() for v in values]
    sent = b"".join(b + b"\n" for b in bodies) if line else b"".join(frame(b) for b in bodies)
    check_replies(sent, exchange(server.path, [sent]))
    check_alive(server, errors, len(sent))


@settings(max_examples=10, deadline=None)
@given(data=st.binary(min_size=1, max_size=64))
def test_live_server_closes_connections_that_stall(
    live: tuple[UnixSockServer, ErrorRecords], data: bytes
) -> None:
    # No half-close here: the server must end the connection on its own timeouts.
    server, errors = live
    check_replies(data, exchange(server.path, [data], half_close=False))
    check_alive(server, errors, None)
