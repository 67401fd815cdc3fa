"""The sans-I/O protocol on its own: bytes in, events out; responses in, bytes out."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import pytest

from unixsock_asgi import CommandFailed
from unixsock_asgi._protocol import (
    HARD_MAX_MESSAGE_SIZE,
    MAX_NESTING,
    STATUS_FAIL,
    STATUS_OK,
    Close,
    ConnectionProtocol,
    Event,
    ProtocolViolation,
    Request,
    Response,
    decode_response,
    encode_frame,
    encode_request,
    parse_line,
    read_frame_header,
)

pytestmark = pytest.mark.timeout(10)


def frame(obj: Any) -> bytes:
    """A frame built by hand, independently of encode_frame."""
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + b":" + body


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + b":" + body


def only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def only_request(events: list[Event]) -> Request:
    event = only(events)
    assert isinstance(event, Request), event
    return event


def only_violation(events: list[Event]) -> ProtocolViolation:
    event = only(events)
    assert isinstance(event, ProtocolViolation), event
    return event


def frame_reply(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack(">I", data[:4])
    assert data[4:5] == b":"
    assert len(data) == 5 + length
    obj = json.loads(data[5:])
    assert isinstance(obj, dict)
    return obj


# -- encoding -------------------------------------------------------------


def test_encode_frame_is_length_colon_compact_json() -> None:
    data = encode_frame({"cmd": "ping", "args": {}})
    body = b'{"cmd":"ping","args":{}}'
    assert data == struct.pack(">I", len(body)) + b":" + body


def test_encode_frame_counts_utf8_bytes_not_characters() -> None:
    data = encode_frame({"name": "żółw"})
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 5
    assert json.loads(data[5:].decode()) == {"name": "żółw"}
    assert length > len('{"name":"żółw"}')


def test_encode_frame_refuses_more_than_the_hard_limit() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame("x" * HARD_MAX_MESSAGE_SIZE)


def test_encode_request_always_carries_respond_and_close() -> None:
    # A Go server reads an absent boolean as false, so both must be explicit.
    obj = json.loads(encode_request(Request("stats", {"a": 1}, respond=True, close=False))[5:])
    assert obj == {"cmd": "stats", "args": {"a": 1}, "respond": True, "close": False}
    with_id = json.loads(encode_request(Request("x", id=7))[5:])
    assert with_id["id"] == 7


def test_read_frame_header() -> None:
    assert read_frame_header(struct.pack(">I", 12) + b":", 100) == 12
    with pytest.raises(ValueError, match="5 bytes"):
        read_frame_header(b"\x00\x00", 100)
    with pytest.raises(ValueError, match="expected ':'"):
        read_frame_header(struct.pack(">I", 12) + b";", 100)
    with pytest.raises(ValueError, match="101 bytes exceeds the limit of 100"):
        read_frame_header(struct.pack(">I", 101) + b":", 100)


# -- frame mode -----------------------------------------------------------


def test_one_frame_becomes_one_request() -> None:
    proto = ConnectionProtocol()
    req = only_request(
        proto.receive_data(frame({"cmd": "set", "args": {"k": [1, 2]}, "respond": False, "close": False}))
    )
    assert proto.mode == "frame"
    assert (req.cmd, req.args, req.respond, req.close, req.go_client) == (
        "set",
        {"k": [1, 2]},
        False,
        False,
        False,
    )
    assert not proto.has_partial


def test_frame_defaults_respond_and_close_to_true_and_args_to_empty() -> None:
    req = only_request(ConnectionProtocol().receive_data(frame({"cmd": "ping"})))
    assert (req.args, req.respond, req.close) == ({}, True, True)
    req = only_request(ConnectionProtocol().receive_data(frame({"cmd": "ping", "args": None})))
    assert req.args == {}


def test_frame_fed_byte_by_byte() -> None:
    proto = ConnectionProtocol()
    data = frame({"cmd": "echo", "args": {"text": "hello"}})
    for i in range(len(data) - 1):
        assert proto.receive_data(data[i : i + 1]) == []
        assert proto.has_partial
    req = only_request(proto.receive_data(data[-1:]))
    assert req.args == {"text": "hello"}
    assert not proto.has_partial


def test_pipelined_frames_in_one_chunk_come_out_in_order() -> None:
    proto = ConnectionProtocol()
    data = b"".join(frame({"cmd": f"c{i}", "close": False}) for i in range(5))
    events = proto.receive_data(data)
    assert [e.cmd for e in events if isinstance(e, Request)] == [f"c{i}" for i in range(5)]
    assert len(events) == 5


@pytest.mark.parametrize("cut", range(1, 40))
def test_pipelined_frames_split_anywhere(cut: int) -> None:
    data = frame({"cmd": "a"}) + frame({"cmd": "b"}) + frame({"cmd": "c"})
    proto = ConnectionProtocol()
    events = proto.receive_data(data[:cut]) + proto.receive_data(data[cut:])
    assert [e.cmd for e in events if isinstance(e, Request)] == ["a", "b", "c"]


def test_length_above_limit_is_fatal_from_the_header_alone() -> None:
    proto = ConnectionProtocol(max_message_size=1024)
    violation = only_violation(proto.receive_data(struct.pack(">I", 0xFFFFFF00) + b":"))
    assert violation.fatal
    assert "4294967040 bytes exceeds the limit of 1024 bytes" in violation.error
    assert proto.closed
    assert not proto.has_partial
    assert proto.receive_data(b"more bytes") == []


def test_max_message_size_is_capped_at_the_hard_limit() -> None:
    proto = ConnectionProtocol(max_message_size=1 << 40)
    assert proto.max_message_size == HARD_MAX_MESSAGE_SIZE


def test_bad_colon_byte_is_fatal() -> None:
    proto = ConnectionProtocol()
    violation = only_violation(proto.receive_data(b"\x00\x00\x00\x02;{}"))
    assert violation.fatal
    assert "expected ':'" in violation.error
    assert proto.closed


def test_invalid_json_is_not_fatal() -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(raw_frame(b"{not json") + frame({"cmd": "ping"}))
    assert len(events) == 2
    assert isinstance(events[0], ProtocolViolation)
    assert not events[0].fatal
    assert events[0].error.startswith("invalid JSON")
    assert isinstance(events[1], Request)
    assert not proto.closed


def test_non_utf8_body_is_not_fatal() -> None:
    proto = ConnectionProtocol()
    violation = only_violation(proto.receive_data(raw_frame(b'{"cmd": "\xff\xfe"}')))
    assert not violation.fatal
    assert "invalid JSON" in violation.error


def test_utf8_only_no_utf16_guessing_or_encoded_surrogates() -> None:
    proto = ConnectionProtocol()
    utf16 = '{"cmd": "ping"}'.encode("utf-16-le")
    raw_surrogate = b'{"cmd": "\xed\xa0\x80"}'  # U+D800 encoded as if it were a character
    events = proto.receive_data(raw_frame(utf16) + raw_frame(raw_surrogate))
    assert [type(e) for e in events] == [ProtocolViolation, ProtocolViolation]


@pytest.mark.parametrize("mode", ["frame", "line"])
def test_requests_escaping_lone_surrogates_are_refused_and_the_connection_goes_on(mode: str) -> None:
    # "\ud800" is valid JSON text but no Unicode text: let into a setting, it broke every
    # response the app rendered with it (a JSON response cannot encode it) and the CLI's output.
    proto = ConnectionProtocol()
    bodies = [
        b'{"cmd": "set", "args": {"name": "greeting", "value": "\\ud800"}, "id": 7, "close": false}',
        b'{"cmd": "\\udfff", "close": false}',
        b'{"cmd": "x", "args": {"\\udc80key": 1}, "close": false}',
        b'{"cmd": "echo", "args": {"pair": "\\ud83d\\ude00", "text": "\\\\ud800"}, "close": false}',
    ]
    data = b"".join(b + b"\n" if mode == "line" else raw_frame(b) for b in bodies)
    *events, fine = proto.receive_data(data)
    refused = [e for e in events if isinstance(e, ProtocolViolation) and not e.fatal and not e.close]
    assert len(refused) == len(events) == 3
    errors = [e.error for e in refused]
    assert errors == [
        "a string holds a lone surrogate (\\ud800), which is not Unicode text",
        "a string holds a lone surrogate (\\udfff), which is not Unicode text",
        "a string holds a lone surrogate (\\udc80), which is not Unicode text",
    ]
    assert refused[0].id == 7
    # A pair is one character; an escaped backslash before "ud800" is text.
    assert isinstance(fine, Request) and fine.args == {"pair": "\U0001f600", "text": "\\ud800"}
    # The refusal of a cmd that is itself a lone surrogate still goes out, ASCII-escaped.
    data = proto.encode_reply(refused[1], Response.failure(errors[1]))
    body = data if mode == "line" else data[5:]
    body.decode()  # valid UTF-8
    reply, _ = decode_response(body)
    assert reply.error == errors[1]


def test_requests_nest_at_most_max_nesting_deep_on_every_python() -> None:
    # The decoder's own limit moved: near 1,000 levels on 3.11, 5,000 and more on 3.13. And the
    # surrogate check re-encoded the request, where json.dumps gave up (RecursionError) a few
    # levels short of what the decoder had just parsed: the connection died unanswered.
    def request(levels: int) -> bytes:  # the request's object, its arguments' and arrays inside
        arrays = levels - 2
        return b'{"cmd": "x", "args": {"a": ' + b"[" * arrays + b'"\\u0041"' + b"]" * arrays + b"}}"

    for levels in (3, MAX_NESTING):
        for data in (raw_frame(request(levels)), request(levels) + b"\n"):
            (event,) = ConnectionProtocol().receive_data(data)
            assert isinstance(event, Request), (levels, event)
    for levels in (MAX_NESTING + 1, 990, 5000):
        for data in (raw_frame(request(levels)), request(levels) + b"\n"):
            (event,) = ConnectionProtocol().receive_data(data)
            assert isinstance(event, ProtocolViolation), (levels, event)
            assert event.error == f"invalid JSON: JSON nested too deeply (more than {MAX_NESTING} levels)"
    # A key=value value too deep for JSON is the plain text it is, as any other that does not parse.
    (event,) = ConnectionProtocol().receive_data(b"x k=" + b"[" * 990 + b"]" * 990 + b"\n")
    assert isinstance(event, Request) and event.args == {"k": "[" * 990 + "]" * 990}


def test_line_mode_values_escaping_lone_surrogates_are_refused() -> None:
    violation = parse_line('set name=greeting value="\\ud800"')
    assert isinstance(violation, ProtocolViolation)
    assert (
        violation.error
        == "argument 'value': a string holds a lone surrogate (\\ud800), which is not Unicode text"
    )
    assert parse_line("echo a=\\ud800") == Request("echo", {"a": "\\ud800"}, close=False)  # a plain word


def test_replies_holding_lone_surrogates_go_out_ascii_escaped() -> None:
    # A handler's own data (a file name's undecodable byte, say) may hold one: the reply still goes out.
    for mode in ("frame", "line"):
        proto = ConnectionProtocol()
        proto.feed(b"p" if mode == "line" else b"\x00")
        data = proto.encode_reply(Request("ls"), Response.success({"k": "\udfff \u017c"}))
        body = data if mode == "line" else data[5:]
        body.decode()  # valid UTF-8
        reply, _ = decode_response(body)
        assert reply.payload == {"k": "\udfff \u017c"}


@pytest.mark.timeout(20)
def test_the_nesting_check_is_linear_in_an_unclosed_string_of_escaped_quotes() -> None:
    # Past 500 brackets the check blanks out strings: a pattern that handled escapes itself
    # restarted at every quote of '"\\"\\"...' and took 88 s for 128 KB (hours at 1 MiB),
    # holding the GIL, so the web app froze with the control loop.
    body = b"[" * (MAX_NESTING + 1) + b'"' + b'\\"' * 500_000  # just under 1 MiB
    (event,) = ConnectionProtocol().receive_data(raw_frame(body))
    assert isinstance(event, ProtocolViolation) and event.error.startswith("invalid JSON")
    line = b'{"cmd":"echo","args":{"text":' + body[1:] + b"\n"
    (event,) = ConnectionProtocol().receive_data(line)
    assert isinstance(event, ProtocolViolation) and event.error.startswith("invalid JSON")
    # Escapes taken out first still leave brackets inside strings out of the count.
    inside = '{"cmd": "x", "args": {"a": "' + '\\\\\\"[{' * 600 + '"}}'
    (event,) = ConnectionProtocol().receive_data(inside.encode() + b"\n")
    assert isinstance(event, Request) and event.args == {"a": '\\"[{' * 600}


@pytest.mark.timeout(20)
def test_splitting_a_line_is_linear_in_quotes_after_equals_signs() -> None:
    # Whether a quote after "=" begins a value looked for an earlier "=" in the word so far:
    # 128 KB of "='" took 11 s, a 1 MiB line minutes, with the control loop blocked.
    request = parse_line("cmd a=b" + "='" * 500_000)
    assert isinstance(request, Request) and request.args == {"a": "b" + "='" * 500_000}
    assert parse_line("set name=motd value='good morning'") == Request(
        "set", {"name": "motd", "value": "good morning"}, close=False
    )
    # A value is JSON where it parses as JSON, whitespace before it included; a word without a decoder call.
    assert parse_line("x a=' 5' b=' [1]' c=' x' d=nice").args == {  # type: ignore[union-attr]
        "a": 5,
        "b": [1],
        "c": " x",
        "d": "nice",
    }
    # Past the first "=", a quote is a letter: the word ends at the space.
    assert parse_line("x a=b='c d'").error == 'argument "d\'" is not key=value'  # type: ignore[union-attr]


def test_deeply_nested_json_is_a_violation_not_a_crash() -> None:
    proto = ConnectionProtocol()
    violation = only_violation(proto.receive_data(raw_frame(b"[" * 100_000)))
    assert not violation.fatal
    assert "nested too deeply" in violation.error


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"args": {}}, "request has no 'cmd'"),
        ({"cmd": None}, "request has no 'cmd'"),
        ({"cmd": 5}, "'cmd' must be a string, got number"),
        ({"cmd": ["a"]}, "'cmd' must be a string, got array"),
        ({"cmd": True}, "'cmd' must be a string, got boolean"),
        ({"cmd": ""}, "'cmd' must not be empty"),
        ({"cmd": "x", "args": [1]}, "'args' must be a JSON object, got array"),
        ({"cmd": "x", "args": "a=1"}, "'args' must be a JSON object, got string"),
        ({"cmd": "x", "args": 3}, "'args' must be a JSON object, got number"),
        ({"cmd": "x", "respond": "yes"}, "'respond' must be true or false, got string"),
        ({"cmd": "x", "respond": 1}, "'respond' must be true or false, got number"),
        ({"cmd": "x", "close": None}, "'close' must be true or false, got null"),
        ({"cmd": "x", "close": {}}, "'close' must be true or false, got object"),
        ([{"cmd": "x"}], "request must be a JSON object, got array"),
        ("ping", "request must be a JSON object, got string"),
    ],
)
def test_malformed_requests_are_non_fatal_violations(obj: Any, message: str) -> None:
    proto = ConnectionProtocol()
    violation = only_violation(proto.receive_data(frame(obj)))
    assert violation.error == message
    assert not violation.fatal
    assert not proto.closed


def test_violation_keeps_the_request_id() -> None:
    proto = ConnectionProtocol()
    violation = only_violation(proto.receive_data(frame({"id": "abc", "cmd": 1})))
    assert violation.id == "abc"
    reply = frame_reply(proto.encode_reply(violation, Response.failure(violation.error)))
    assert reply["id"] == "abc"
    assert reply["response"]["status"] == STATUS_FAIL


def test_half_frame_then_eof_is_fatal() -> None:
    proto = ConnectionProtocol()
    data = frame({"cmd": "ping"})
    assert proto.receive_data(data[:9]) == []
    violation = only_violation(proto.receive_data(b""))
    assert violation.fatal
    assert violation.error == f"connection closed mid-frame: got 4 of {len(data) - 5} bytes"
    assert proto.closed


def test_half_header_then_eof_is_fatal() -> None:
    proto = ConnectionProtocol()
    assert proto.receive_data(b"\x00\x00") == []
    violation = only_violation(proto.receive_data(b""))
    assert violation.fatal
    assert "mid-header: got 2 of 5 bytes" in violation.error


def test_clean_eof_is_close() -> None:
    proto = ConnectionProtocol()
    assert isinstance(only(proto.receive_data(b"")), Close)
    assert proto.closed
    proto = ConnectionProtocol()
    only_request(proto.receive_data(frame({"cmd": "ping"})))
    assert isinstance(only(proto.receive_data(b"")), Close)


# -- line mode ------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "mode"),
    [
        (b"\x00", "frame"),
        (b"\x01", "frame"),
        (b"\xff", "frame"),  # an oversized length, refused as a frame, not read as text
        (b"\x80", "frame"),
        (b"p", "line"),
        (b"{", "line"),
        (b" ", "line"),
        (b"\t", "line"),
        (b"\n", "line"),
        ("ż".encode(), "line"),
    ],
)
def test_first_byte_chooses_the_mode(first: bytes, mode: str) -> None:
    proto = ConnectionProtocol()
    proto.receive_data(first)
    assert proto.mode == mode


def test_json_line_defaults_to_keeping_the_connection() -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(b'{"cmd": "echo", "args": {"a": 1}}\n{"cmd": "bye", "close": true}\n')
    first, second = events
    assert isinstance(first, Request)
    assert isinstance(second, Request)
    assert (first.cmd, first.args, first.respond, first.close) == ("echo", {"a": 1}, True, False)
    assert second.close is True


def test_invalid_json_line_is_not_fatal() -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(b'{"cmd": \nping\n')
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].error.startswith("invalid JSON")
    assert isinstance(events[1], Request)
    assert events[1].cmd == "ping"


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ("set n=5", {"n": 5}),
        ("set n=-2.5 e=1e3", {"n": -2.5, "e": 1000.0}),
        ("set a=true b=false c=null", {"a": True, "b": False, "c": None}),
        ('set name="hello world"', {"name": "hello world"}),
        ('set q="say \\"hi\\" now"', {"q": 'say "hi" now'}),
        ("set xs=[1, 2, 3]", {"xs": [1, 2, 3]}),
        ('set o={"a": [1, {"b": 2}], "c": "d e"}', {"o": {"a": [1, {"b": 2}], "c": "d e"}}),
        ("set level=debug", {"level": "debug"}),
        ("set url=http://x/?a=b", {"url": "http://x/?a=b"}),
        ("set empty=", {"empty": ""}),
        ("set   a=1\t b=2  ", {"a": 1, "b": 2}),
        ("set n=" + "[" * 5000 + "]" * 5000, {"n": "[" * 5000 + "]" * 5000}),  # too deep for JSON: plain text
        ("set n=" + "[" * 501 + "]" * 501, {"n": "[" * 501 + "]" * 501}),  # deeper than MAX_NESTING too
        ('set n="' + "[" * 600 + '"', {"n": "[" * 600}),  # brackets in a string do not nest
    ],
)
def test_key_value_lines(line: str, args: dict[str, Any]) -> None:
    req = parse_line(line)
    assert isinstance(req, Request)
    assert req.cmd == "set"
    assert req.args == args
    assert (req.respond, req.close) == (True, False)


def test_bare_command_line() -> None:
    req = only_request(ConnectionProtocol().receive_data(b"stats\n"))
    assert (req.cmd, req.args) == ("stats", {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("set level", "argument 'level' is not key=value"),
        ("set =5", "argument '=5' is not key=value"),
        ('set a="open', "unterminated string"),
        # Without the check, "b=2" went into a's value, a string '{"x": 1 b=2'.
        ('set a={"x": 1 b=2', "unclosed '{' or '[' (quote a plain-text value: key='...')"),
        ("set a=[1, 2 b=2", "unclosed '{' or '[' (quote a plain-text value: key='...')"),
    ],
)
def test_bad_key_value_lines(line: str, message: str) -> None:
    violation = parse_line(line)
    assert isinstance(violation, ProtocolViolation)
    assert violation.error == message
    assert not violation.fatal


@pytest.mark.parametrize("word", ["quit", "exit", "QUIT", "  quit  "])
def test_quit_closes(word: str) -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(b"ping\n" + word.encode() + b"\nignored\n")
    assert isinstance(events[0], Request)
    assert isinstance(events[1], Close)
    assert len(events) == 2
    assert proto.closed


def test_crlf_and_blank_lines() -> None:
    events = ConnectionProtocol().receive_data(b"ping\r\n\r\n\n  \nstats a=1\r\n")
    assert [(e.cmd, e.args) for e in events if isinstance(e, Request)] == [("ping", {}), ("stats", {"a": 1})]
    assert len(events) == 2


def test_line_split_byte_by_byte() -> None:
    proto = ConnectionProtocol()
    data = b'set name="a b" n=[1, 2]\n'
    for i in range(len(data) - 1):
        assert proto.receive_data(data[i : i + 1]) == []
    req = only_request(proto.receive_data(data[-1:]))
    assert req.args == {"name": "a b", "n": [1, 2]}


def test_over_long_line_is_fatal() -> None:
    proto = ConnectionProtocol(max_message_size=64)
    violation = only_violation(proto.receive_data(b"x" * 100 + b"\n"))
    assert violation.fatal
    assert "exceeds the limit of 64 bytes" in violation.error
    assert proto.closed


def test_over_long_unterminated_line_is_fatal_without_waiting_for_the_newline() -> None:
    proto = ConnectionProtocol(max_message_size=64)
    assert proto.receive_data(b"y" * 40) == []
    violation = only_violation(proto.receive_data(b"y" * 40))
    assert violation.fatal


def test_non_utf8_line_is_not_fatal() -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(b"set a=\xff\xfe\nping\n")
    assert isinstance(events[0], ProtocolViolation)
    assert "not valid UTF-8" in events[0].error
    assert not events[0].fatal
    assert isinstance(events[1], Request)


def test_deeply_nested_json_line_is_a_violation() -> None:
    violation = only_violation(
        ConnectionProtocol().receive_data(b'{"cmd": "x", "args": ' + b"[" * 100_000 + b"\n")
    )
    assert "nested too deeply" in violation.error


def test_eof_ends_an_unterminated_line() -> None:
    proto = ConnectionProtocol()
    assert proto.receive_data(b"ping") == []
    events = proto.receive_data(b"")
    assert isinstance(events[0], Request)
    assert events[0].cmd == "ping"
    assert isinstance(events[1], Close)


def test_line_reply_is_one_json_line_with_the_id() -> None:
    proto = ConnectionProtocol()
    req = only_request(proto.receive_data(b'{"cmd": "x", "id": 42}\n'))
    data = proto.encode_reply(req, Response.success({"a": "ü"}))
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert json.loads(data) == {"status": STATUS_OK, "error": "", "payload": {"a": "ü"}, "id": 42}
    plain = proto.encode_reply(None, Response.failure("busy"))
    assert json.loads(plain) == {"status": STATUS_FAIL, "error": "busy", "payload": None}


# -- replies in frame mode and the Go client rule --------------------------


def test_frame_reply_shape() -> None:
    proto = ConnectionProtocol()
    req = only_request(proto.receive_data(frame({"cmd": "stats", "id": [1, "x"]})))
    reply = frame_reply(proto.encode_reply(req, Response.success({"n": 1})))
    assert reply == {
        "cmd": "stats",
        "response": {"status": STATUS_OK, "error": "", "payload": {"n": 1}},
        "id": [1, "x"],
    }


def _go_request(cmd: str) -> bytes:
    return frame(
        {
            "cmd": cmd,
            "args": {},
            "response": {"status": "", "error": "", "payload": ""},
            "respond": True,
            "close": True,
        }
    )


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        ({"a": [1, 2]}, '{"a":[1,2]}'),
        ([1, "x"], '[1,"x"]'),
        (3, "3"),
        (True, "true"),
        (None, ""),
        ("already text", "already text"),
    ],
)
def test_go_clients_get_the_payload_as_a_string(payload: Any, wire: str) -> None:
    proto = ConnectionProtocol()
    req = only_request(proto.receive_data(_go_request("stats")))
    assert req.go_client
    reply = frame_reply(proto.encode_reply(req, Response.success(payload)))
    assert reply["response"]["payload"] == wire
    assert isinstance(reply["response"]["payload"], str)


def test_our_clients_get_the_payload_as_json() -> None:
    proto = ConnectionProtocol()
    req = only_request(proto.receive_data(frame({"cmd": "stats"})))
    assert not req.go_client
    reply = frame_reply(proto.encode_reply(req, Response.success({"a": [1, 2]})))
    assert reply["response"]["payload"] == {"a": [1, 2]}


# -- decode_response --------------------------------------------------------


def test_decode_our_frame_reply() -> None:
    proto = ConnectionProtocol()
    req = only_request(proto.receive_data(frame({"cmd": "x", "id": 9})))
    response, req_id = decode_response(proto.encode_reply(req, Response.failure("no", {"why": 1}))[5:])
    assert response == Response(STATUS_FAIL, "no", {"why": 1})
    assert req_id == 9
    assert not response.ok


def test_decode_the_go_servers_reply() -> None:
    # A Go server echoes the whole request with its response filled in.
    body = json.dumps(
        {
            "cmd": "stats",
            "args": {"verbose": True},
            "response": {"status": "success", "error": "", "payload": '{"requests":3}'},
            "respond": True,
            "close": True,
        }
    )
    response, req_id = decode_response(body)
    assert response.ok
    assert response.payload == '{"requests":3}'
    assert req_id is None


def test_decode_a_go_failure_with_a_null_error() -> None:
    response, _ = decode_response('{"cmd":"x","response":{"status":"failure","error":null,"payload":""}}')
    assert response.status == STATUS_FAIL
    assert response.error == ""


def test_decode_a_line_reply() -> None:
    response, req_id = decode_response(b'{"status":"success","error":"","payload":[1],"id":"a"}\n')
    assert response == Response.success([1])
    assert req_id == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1]", "must be a JSON object, got list"),
        (b'{"cmd": "x"}', "no response object"),
        (b'{"response": "ok"}', "no response object"),
        (b'{"response": {"status": 1}}', "status must be a string"),
    ],
)
def test_decode_rejects_what_is_not_a_reply(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_response(body)


def test_a_relayed_reply_is_sent_as_on_the_wire_not_with_what_its_client_kept() -> None:
    # A handler that returns another server's reply: its request (args may hold secrets)
    # and the socket it came from stay where they were.
    upstream = Response.failure("no", payload=[1])
    upstream._answering(Request("login", {"token": "secret"}), "/run/other.sock")  # as a client does
    data = ConnectionProtocol(1 << 20).encode_reply(
        Request("relay"), Response.success({"upstream": upstream, "sent": upstream.request})
    )
    body = data[data.index(b":") + 1 :]
    decoded, _ = decode_response(body)
    assert decoded.payload == {
        "upstream": {"status": "failure", "error": "no", "payload": [1]},
        "sent": Request("login", {"token": "secret"}).to_dict(),
    }
    assert "other.sock" not in body.decode()


def test_response_ok_and_raise_for_status() -> None:
    ok = Response.success("pong")
    assert ok.ok
    assert ok.raise_for_status() is ok
    failed = Response.failure("disk full", payload={"free": 0})
    assert not failed.ok
    with pytest.raises(CommandFailed, match=r"^disk full$") as info:
        failed.raise_for_status()
    assert info.value.response is failed
    with pytest.raises(CommandFailed, match=r"^command failed$") as info:
        Response("failure").raise_for_status()
    assert info.value.request is None  # made by hand: nothing to name
    # What a client's reply knows is not part of it: not compared, shown, or in asdict() (a log line).
    known = Response.failure("x")._answering(Request("login", {"token": "secret"}), "/s")
    assert known == Response.failure("x") and "secret" not in repr(known)
    assert dataclasses.asdict(known) == {"status": "failure", "error": "x", "payload": None}
    assert failed.to_dict() == {"status": STATUS_FAIL, "error": "disk full", "payload": {"free": 0}}


# -- strict JSON, refused requests' own flags, replies past the hard limit ------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"cmd": "echo", "args": {"x": NaN}}', "NaN is not JSON"),
        (b'{"cmd": "echo", "args": {"x": -Infinity}}', "-Infinity is not JSON"),
        (b'{"cmd": "echo", "args": {"x": 1e999}}', "number out of range"),
        (b'{"cmd": "echo", "args": {"x": 2' + b"0" * 308 + b"}}", "number out of range"),
        (b'{"cmd": "echo", "args": {"x": -2' + b"0" * 308 + b"}}", "number out of range"),
    ],
)
def test_nan_and_infinity_are_not_json(body: bytes, message: str) -> None:
    violation = only_violation(ConnectionProtocol().receive_data(raw_frame(body)))
    assert message in violation.error and not violation.fatal
    assert parse_line("echo x=NaN") == Request("echo", {"x": "NaN"}, close=False)  # a string, then


def test_integers_beyond_a_double_are_refused_both_ways() -> None:
    # 309 digits still fit (up to about 1.8e308): the check is of the value, not of the length.
    (fits,) = ConnectionProtocol().receive_data(frame({"cmd": "echo", "args": {"x": 10**308}}))
    assert isinstance(fits, Request) and fits.args == {"x": 10**308}
    assert parse_line("echo x=2" + "0" * 308) == Request("echo", {"x": "2" + "0" * 308}, close=False)
    assert parse_line('{"cmd": "echo", "args": {"x": 2' + "0" * 308 + "}}") == ProtocolViolation(
        "invalid JSON: number out of range: 200000000000... (309 characters)", cmd=""
    )
    with pytest.raises(ValueError, match="number out of range"):
        encode_frame({"cmd": "set", "args": {"value": 10**400}})
    with pytest.raises(ValueError, match="number out of range"):
        ConnectionProtocol().encode_reply(None, Response.success({"n": [-(10**400)]}))
    digits = "9" * 400  # only text: sent as it is
    reply = frame_reply(ConnectionProtocol().encode_reply(None, Response.success(digits)))
    assert reply["response"]["payload"] == digits
    with pytest.raises(ValueError, match="number out of range"):  # a Go client gets the payload's JSON text
        ConnectionProtocol().encode_reply(Request("n", go_client=True), Response.success({"n": 10**400}))
    (text,) = ConnectionProtocol().receive_data(frame({"cmd": "echo", "args": {"x": digits, "y": -1}}))
    assert isinstance(text, Request) and text.args == {"x": digits, "y": -1}
    # A lone surrogate (a file name's undecodable byte) still reaches a Go client, ASCII-escaped.
    go = frame_reply(
        ConnectionProtocol().encode_reply(Request("f", go_client=True), Response.success(["\udcff"]))
    )
    assert go["response"]["payload"] == '["\udcff"]'


def test_nan_is_never_encoded() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_frame({"cmd": "set", "args": {"value": float("nan")}})
    with pytest.raises(ValueError, match="not JSON compliant"):
        ConnectionProtocol().encode_reply(None, Response.success(float("inf")))


def test_a_refused_request_keeps_what_it_said_of_respond_close_and_cmd() -> None:
    proto = ConnectionProtocol()
    events = proto.receive_data(
        frame({"cmd": "echo", "args": [1], "respond": False})
        + frame({"cmd": "", "close": True})
        + frame({"cmd": "echo", "args": 1})
    )
    quiet, closing, plain = (e for e in events if isinstance(e, ProtocolViolation))
    assert (quiet.cmd, quiet.respond, quiet.close) == ("echo", False, False)
    assert (closing.cmd, closing.respond, closing.close) == ("", True, True)
    assert (plain.respond, plain.close) == (True, False)  # close left out: the connection stays
    assert frame_reply(proto.encode_reply(plain, Response.failure(plain.error)))["cmd"] == "echo"


def test_a_reply_past_the_hard_limit_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="exceeds the protocol's"):
        ConnectionProtocol().encode_reply(None, Response.success("x" * HARD_MAX_MESSAGE_SIZE))
    line_mode = ConnectionProtocol()
    request = only_request(line_mode.receive_data(b"huge\n"))
    with pytest.raises(ValueError, match="exceeds the protocol's"):  # a line too: the same bound
        line_mode.encode_reply(request, Response.success("x" * HARD_MAX_MESSAGE_SIZE))
    assert line_mode.encode_reply(request, Response.success("x" * 100)).endswith(b'"' + b"x" * 100 + b'"}\n')


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ("set name=greeting value='good morning'", {"name": "greeting", "value": "good morning"}),
        ("set value='  two  spaces '", {"value": "  two  spaces "}),
        ("set value='\"42\"'", {"value": "42"}),  # as in a shell: the quotes go, JSON is read after
        ("set value='42'", {"value": 42}),
        ("say msg=it's", {"msg": "it's"}),  # an apostrophe inside a word is a letter
        ("set value=''", {"value": ""}),
        ("set value='a b''c d'", {"value": "a bc d"}),  # quoted parts next to each other join
        ('set value={"a": "it\'s"}', {"value": {"a": "it's"}}),
    ],
)
def test_single_quotes_work_as_in_a_shell_where_a_value_begins(line: str, args: dict[str, Any]) -> None:
    request = parse_line(line)
    assert isinstance(request, Request), request
    assert request.args == args


def test_an_unterminated_single_quote_is_refused() -> None:
    violation = parse_line("set value='good morning")
    assert isinstance(violation, ProtocolViolation) and violation.error == "unterminated string"
    empty = parse_line("set '' x=1")  # an empty word is still a word, and not key=value
    assert isinstance(empty, ProtocolViolation) and empty.error == "argument '' is not key=value"


def test_a_byte_order_mark_before_a_line_is_dropped() -> None:
    # What a file saved by a Windows editor starts with, piped through socat.
    bom = "\ufeff".encode()
    events = ConnectionProtocol().receive_data(bom + b"ping\n" + bom + b'{"cmd": "stats"}\n' + bom + b"\n")
    assert [(e.cmd, e.args) for e in events if isinstance(e, Request)] == [("ping", {}), ("stats", {})]
    assert all(isinstance(e, Request) for e in events)
