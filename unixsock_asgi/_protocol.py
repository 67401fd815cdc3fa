"""The wire protocol, sans-I/O: bytes in, requests out; responses in, bytes out.

Two framings share one socket and are chosen per connection by its first byte:

* **frame mode** (byte-compatible with the Go library ``unixsock``): a 4-byte
  big-endian length ``N``, one ``:`` byte, then ``N`` bytes of UTF-8 JSON.
  Lengths are capped at 16 MiB, so a valid frame always begins with ``0x00``.
* **line mode** (for ``socat``/``nc -U``): a first byte that can begin a line
  of text (printable ASCII, whitespace, a UTF-8 lead byte). Each line is a JSON
  request object or ``cmd key=value ...``; each reply is one JSON line.

Any other first byte is taken as a frame header, so that an oversized length
(``0xFFFFFF00``, say) is refused at once rather than read as a line.

Nothing here touches a socket, a clock or a thread, so that the parser can be
unit-tested and fuzzed on its own (as h11 does for HTTP/1.1).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import json.encoder
import math
import re
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "HARD_MAX_MESSAGE_SIZE",
    "STATUS_FAIL",
    "STATUS_OK",
    "Close",
    "ConnectionProtocol",
    "Mode",
    "ProtocolViolation",
    "Request",
    "Response",
    "decode_response",
    "encode_frame",
    "encode_request",
    "parse_line",
    "read_frame_header",
]

STATUS_OK = "success"
"""Status of a command that succeeded (the Go library's ``STATUS_OK``)."""
STATUS_FAIL = "failure"
"""Status of a command that failed (the Go library's ``STATUS_FAIL``)."""

HARD_MAX_MESSAGE_SIZE = 16 << 20
"""No frame may be larger than this, whatever a server or client allows."""

_HEADER = struct.Struct(">I")
STOPPING_PAYLOAD: Mapping[str, Any] = MappingProxyType({"server_stopping": True})
"""The payload of the failure a command cut short by its server stopping gets: the fleet
counts the worker as gone (a deploy, a recycled worker), not as failed."""

_HEADER_SIZE = _HEADER.size + 1  # length + b":"

Mode = Literal["frame", "line"]

_QUIT_WORDS = frozenset({"quit", "exit"})

_COMPACT_AFTER = 1 << 16
"""Parsed bytes a connection's buffer keeps at its head before it drops them."""

# First bytes that can begin a line of text: printable ASCII, whitespace and
# the bytes that lead a multi-byte UTF-8 character.
_LINE_START = frozenset([0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0xC2, 0xF5)])


@dataclass
class Response:
    """The outcome of one command: a status word, an error message and a payload.

    A client's reply also knows what it answers: ``request`` (the command as
    sent) and ``path`` (the socket), both None on a Response made by hand.
    They are not fields: never sent, compared, shown or in ``dataclasses.asdict()``
    (the request's arguments may hold a secret that a logged reply must not).
    """

    status: str = STATUS_OK
    error: str = ""
    payload: Any = None

    @property
    def request(self) -> Request | None:
        """The command this answers, as a client sent it (None on a Response made by hand)."""
        return self.__dict__.get("_request")

    @property
    def path(self) -> str | None:
        """The socket this came from, when a client received it."""
        return self.__dict__.get("_path")

    def _answering(self, request: Request, path: str) -> Response:
        """Told by the client that received it what it answers."""
        self.__dict__.update(_request=request, _path=path)
        return self

    @property
    def ok(self) -> bool:
        """True when the command succeeded."""
        return self.status == STATUS_OK

    @classmethod
    def success(cls, payload: Any = None) -> Response:
        """A successful response carrying ``payload``."""
        return cls(STATUS_OK, "", payload)

    @classmethod
    def failure(cls, error: str, payload: Any = None) -> Response:
        """A failed response with a message saying what went wrong."""
        return cls(STATUS_FAIL, error, payload)

    def to_dict(self) -> dict[str, Any]:
        """The response as the JSON object that goes on the wire."""
        return {"status": self.status, "error": self.error, "payload": self.payload}

    def raise_for_status(self) -> Response:
        """Raise :class:`~unixsock_asgi.CommandFailed` unless the command succeeded.

        Its message says which command failed on which socket, when the
        response came from a client: ``/run/app/w-1.sock: 'set' failed: ...``.
        """
        if not self.ok:
            from ._exceptions import CommandFailed

            error = self.error or "command failed"
            if self.request is not None:
                error = f"{self.request.cmd!r} failed: {error}"
            if self.path is not None:
                error = f"{self.path}: {error}"
            raise CommandFailed(error, response=self)
        return self


@dataclass
class Request:
    """One command as it arrived: name, arguments and delivery flags."""

    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    respond: bool = True
    close: bool = True
    id: Any = None
    # Go clients always send a ``response`` field; their Response.Payload is a
    # Go string, so payloads sent back to them must be JSON text, not objects.
    go_client: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The request as the JSON object that goes on the wire.

        ``respond`` and ``close`` are always present: a Go server reads an
        absent boolean as ``false``.
        """
        obj: dict[str, Any] = {
            "cmd": self.cmd,
            "args": self.args,
            "respond": self.respond,
            "close": self.close,
        }
        if self.id is not None:
            obj["id"] = self.id
        return obj


@dataclass
class ProtocolViolation:
    """Input that is not a valid request.

    ``fatal`` means the byte stream can no longer be trusted (a bad header, an
    oversized length, EOF inside a frame): reply once, then close.
    """

    error: str
    fatal: bool = False
    id: Any = None
    # What the request said of itself, where it could be read: a request with
    # ``respond: false`` gets no reply even when it is refused, one with
    # ``close: true`` has its connection closed after the refusal.
    cmd: str = ""
    respond: bool = True
    close: bool = False


@dataclass
class Close:
    """The peer asked to end the conversation (``quit``) or sent EOF cleanly."""


Event = Request | ProtocolViolation | Close


MAX_NESTING = 500
"""How deep a request's arrays and objects may nest: the same on every Python (the decoder
gives up near 1,000 levels on 3.11 and takes 5,000 and more on 3.13), and deeper than any
command's arguments need."""

_JSON_STRING = re.compile(r'"[^"]*"')  # with escaped backslashes and quotes taken out first
_BRACKETS = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> bool:
    """Whether ``text`` nests arrays and objects more than :data:`MAX_NESTING` deep."""
    if text.count("[") + text.count("{") <= MAX_NESTING:  # two C scans: a command ends here
        return False
    depth = 0
    # Brackets outside strings. Escapes go first, so that a string is one ``"..."`` and
    # the pattern cannot backtrack: each step is linear in the text (an unclosed
    # string of escaped quotes made a pattern that handled escapes itself quadratic).
    outside = _JSON_STRING.sub("", text.replace("\\\\", "").replace('\\"', ""))
    for bracket in _BRACKETS.findall(outside):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_NESTING:
            return True
    return False


def _loads(text: bytes | str, *, request: bool = False) -> Any:
    """Parse JSON; every failure is a ValueError.

    Bytes must be UTF-8 (``json.loads`` would also guess UTF-16/32 and let
    encoded lone surrogates through), and nesting too deep to parse is
    reported rather than raised as RecursionError. A ``request`` may not
    hold an integer beyond a double either (a reply may: see
    :func:`_no_huge_integer` for what is sent).
    """
    strict = request and _long_digit_run(text)
    if isinstance(text, bytes):
        text = text.decode()
    if request and _too_deep(text):
        raise ValueError(f"JSON nested too deeply (more than {MAX_NESTING} levels)")
    # Integers are checked one by one (a Python call each) only where one may be too big.
    scan_once, decode = (_scan_request, _decode_request) if strict else (_scan_once, _decode)
    try:
        # The decoder's scanner alone, without json.loads' two regex passes:
        # a message that is exactly one JSON value (the usual case) is done here.
        obj, end = scan_once(text, 0)
    except StopIteration:
        end = -1  # not a value at offset 0 (or leading whitespace): let json.loads say why
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(text):
        try:
            obj = decode(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


class NotUnicodeError(ValueError):
    """A JSON string escapes a lone surrogate: valid JSON, but no Unicode text."""


def check_unicode(obj: Any) -> None:
    """Raise :class:`NotUnicodeError` if a string in ``obj`` (a key too) holds a lone surrogate.

    JSON can escape one (``"\\ud800"``) though it is no Unicode text: it
    cannot be encoded as UTF-8, so a setting or argument holding one would
    break whatever later writes it out (a JSON response, a log file, a
    terminal). Go's decoder replaces it with U+FFFD; a request holding one
    is refused here instead, saying so.
    """
    # Walked with a stack of its own, not re-encoded: what the decoder just managed
    # to nest, json.dumps may not (a RecursionError, a few levels short of its limit).
    pending = [obj]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            match = None if value.isascii() else _SURROGATE.search(value)
            if match:
                raise NotUnicodeError(
                    f"a string holds a lone surrogate (\\u{ord(match.group()):04x}), which is not Unicode text"
                )
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number out of range: {text}")
    return value


_DOUBLE_DIGITS = 309
"""Digits of the smallest integers beyond a double (about ``1.8e308``); shorter ones always fit."""
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONGEST_FITTING = b"0" * _DOUBLE_DIGITS


def _long_digit_run(data: bytes | str) -> bool:
    """True if ``data`` has a run of 309 digits or more, where an integer beyond a double would be.

    One C pass: almost every message has none and is spared any further check.
    """
    if len(data) < _DOUBLE_DIGITS:
        return False
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")  # a lone surrogate is no digit
    return _LONGEST_FITTING in data.translate(_DIGITS_AS_ZERO)


def _int_in_range(text: str) -> int:
    value = int(text)
    if len(text) >= _DOUBLE_DIGITS:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number out of range: {text[:12]}... ({len(text)} characters)") from None
    return value


# Strict JSON, as Go's encoding/json and jq read it: no NaN or Infinity either
# way, and no integer beyond a double (Go's float64, JavaScript) in a request.
_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_no_constant, parse_float=_finite
).scan_once
_decode = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).decode
_scan_request: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_no_constant, parse_float=_finite, parse_int=_int_in_range
).scan_once
_decode_request = json.JSONDecoder(
    parse_constant=_no_constant, parse_float=_finite, parse_int=_int_in_range
).decode
_STRING = re.compile(rb'"[^"]*"')
_LONG_DIGITS = re.compile(rb"(?<![0-9])[0-9]{309,}")


def _no_huge_integer(body: bytes) -> bytes:
    """Refuse JSON (as our encoders write it) with an integer beyond a double; return it otherwise.

    Digits in strings are text: with escaped backslashes and quotes taken out,
    each string is one ``"..."`` to blank. Every step is linear in the body.
    """
    if _long_digit_run(body):
        outside = _STRING.sub(b'""', body.replace(b"\\\\", b"").replace(b'\\"', b""))
        for match in _LONG_DIGITS.finditer(outside):
            _int_in_range(match[0].decode())
    return body


def _reply_default(value: Any) -> Any:
    """What a reply sends for a value JSON has no form for; anything else is refused.

    The few types with one obvious JSON form: an Enum member as its value, a
    date or time in ISO 8601, a set as an array (sorted where it sorts), a
    dataclass as an object, a Decimal, UUID or path as its text. Not ``str()``
    of anything: a client could not tell a set's repr from a string.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (Response, Request)):  # a relayed reply: as on the wire, not what a client keeps
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    for module, name in (("decimal", "Decimal"), ("uuid", "UUID"), ("pathlib", "PurePath")):
        # Only if the app imported it: otherwise no value can be one.
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(value, kind):
            return str(value)
    raise TypeError(f"a value of type {type(value).__name__} is not JSON")


# Built once: json.dumps with options builds a new encoder on every call.
_REPLY_UTF8 = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_reply_default
).encode
_REPLY_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_reply_default).encode
_REQUEST_UTF8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_REQUEST_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def _reply_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON for a reply.

    Text with a lone surrogate (valid as a JSON escape, so a request can carry
    one, but not encodable as UTF-8) is sent with ASCII escapes instead.
    """
    try:
        body = _REPLY_UTF8(obj).encode()
    except UnicodeEncodeError:
        body = _REPLY_ASCII(obj).encode()
    return _no_huge_integer(body)


def _request_json(obj: Any) -> bytes:
    try:
        body = _REQUEST_UTF8(obj).encode()
    except UnicodeEncodeError:
        body = _REQUEST_ASCII(obj).encode()
    return _no_huge_integer(body)


def encode_frame(obj: Any) -> bytes:
    """Serialise ``obj`` as one frame: length, ``:``, compact UTF-8 JSON."""
    body = _request_json(obj)
    if len(body) > HARD_MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {len(body)} bytes exceeds {HARD_MAX_MESSAGE_SIZE}")
    return _HEADER.pack(len(body)) + b":" + body


def encode_request(request: Request) -> bytes:
    """A request as one frame."""
    return encode_frame(request.to_dict())


def read_frame_header(header: bytes, max_message_size: int) -> int:
    """Validate a 5-byte frame header and return the body length.

    Raises ``ValueError`` with a readable message when the header is invalid
    or announces more than ``max_message_size`` bytes.
    """
    if len(header) != _HEADER_SIZE:
        raise ValueError(f"frame header must be {_HEADER_SIZE} bytes, got {len(header)}")
    (length,) = _HEADER.unpack_from(header)
    if header[4:5] != b":":
        raise ValueError(f"malformed frame: expected ':' after the length, got {header[4:5]!r}")
    if length > max_message_size:
        raise ValueError(f"message of {length} bytes exceeds the limit of {max_message_size} bytes")
    return int(length)


def decode_response(body: bytes | str) -> tuple[Response, Any]:
    """Decode a reply body into a :class:`Response` and the echoed ``id``.

    Accepts this project's frame replies (``{"cmd", "response": {...}}``), the
    Go server's (the whole request with ``response`` filled in) and line-mode
    replies (the response object itself). Raises ``ValueError`` on anything else.
    """
    try:
        obj = _loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"reply is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"reply must be a JSON object, got {type(obj).__name__}")
    inner = obj.get("response", obj)
    if not isinstance(inner, dict) or "status" not in inner:
        raise ValueError("reply has no response object with a 'status'")
    status = inner.get("status")
    error = inner.get("error") or ""
    if not isinstance(status, str):
        raise ValueError("reply status must be a string")
    return Response(status, str(error), inner.get("payload")), obj.get("id")


def _request_from_obj(obj: Any, *, escapes: bool) -> Request | ProtocolViolation:
    """The request a decoded JSON value makes; ``escapes``: its text had a ``\\u`` escape."""
    if not isinstance(obj, dict):
        return ProtocolViolation(f"request must be a JSON object, got {_json_type(obj)}")
    req_id = obj.get("id")
    cmd = obj.get("cmd")
    respond = obj.get("respond", True)
    close = obj.get("close", True)

    def refused(error: str) -> ProtocolViolation:
        return ProtocolViolation(
            error,
            id=req_id,
            cmd=cmd if isinstance(cmd, str) else "",
            respond=respond if isinstance(respond, bool) else True,
            close=obj.get("close") is True,  # said so: a bad request that did not keeps its connection
        )

    if escapes:  # only an escape can put a lone surrogate in UTF-8 text
        try:
            check_unicode(obj)
        except NotUnicodeError as exc:
            return refused(str(exc))
    if cmd is None:
        return refused("request has no 'cmd'")
    if not isinstance(cmd, str):
        return refused(f"'cmd' must be a string, got {_json_type(cmd)}")
    if not cmd:
        return refused("'cmd' must not be empty")
    args = obj.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        return refused(f"'args' must be a JSON object, got {_json_type(args)}")
    if not isinstance(respond, bool):
        return refused(f"'respond' must be true or false, got {_json_type(respond)}")
    if not isinstance(close, bool):
        return refused(f"'close' must be true or false, got {_json_type(close)}")
    return Request(cmd, args, respond, close, req_id, go_client="response" in obj)


SHOWN_CHARACTERS = 200
"""At most this much of a name from the socket is quoted back in a message or a log line."""


def short_repr(text: str) -> str:
    """``repr(text)``, cut to ``SHOWN_CHARACTERS`` characters: a name from the socket, quoted
    back in a reply or a log line, costs what a name costs, however long it was sent."""
    if len(text) <= SHOWN_CHARACTERS:
        return repr(text)
    return f"{text[:SHOWN_CHARACTERS]!r}... ({len(text)} characters)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_JSON_FIRST = frozenset('{["-0123456789tfn')
"""What a JSON value can begin with, after whitespace."""
_JSON_WHITESPACE = " \t\n\r"
_JSON_LITERALS = {"true": True, "false": False, "null": None}
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _parse_value(text: str) -> Any:
    """A line-mode value: the JSON it spells, else the text itself.

    Only what can be JSON goes to the decoder (a plain word costs no decoder
    call and no exception): a word beginning with a quote or a bracket, a
    number as JSON writes one, or a literal.
    """
    value = text.strip(_JSON_WHITESPACE)  # ' 5' is JSON too
    first = value[:1]
    if not first or first not in _JSON_FIRST:
        return text
    if first in "tfn":
        return _JSON_LITERALS.get(value, text)
    if first not in '{["' and _JSON_NUMBER.fullmatch(value) is None:
        return text
    try:
        return _loads(text, request=True)
    except ValueError:
        return text


def parse_line(line: str) -> Request | ProtocolViolation | Close:
    """Parse one line-mode line (without its newline).

    A line starting with ``{`` is a JSON request object. Otherwise it is
    ``cmd key=value ...`` where a value is a JSON literal if it parses as one
    and a plain string otherwise. In line mode ``respond`` and ``close``
    default to true and false: the connection stays open until ``quit``.
    """
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = _loads(text, request=True)
        except ValueError as exc:
            return ProtocolViolation(f"invalid JSON: {exc}")
        if isinstance(obj, dict):
            obj.setdefault("close", False)
        return _request_from_obj(obj, escapes="\\u" in text)
    words = _split_words(text)
    if isinstance(words, ProtocolViolation):
        return words
    cmd, *pairs = words
    if cmd.lower() in _QUIT_WORDS and not pairs:
        return Close()
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return ProtocolViolation(f"argument {short_repr(pair)} is not key=value")
        args[key] = _parse_value(value)
        if "\\u" in value:  # only an escape can put a lone surrogate in UTF-8 text
            try:
                check_unicode(args[key])
            except NotUnicodeError as exc:
                return ProtocolViolation(f"argument {short_repr(key)}: {exc}")
    return Request(cmd, args, respond=True, close=False)


def _split_words(text: str) -> list[str] | ProtocolViolation:
    """Split on whitespace, keeping quoted strings and JSON brackets whole.

    Single quotes work as in a shell where a word or a value begins
    (``value='good morning'``): what they enclose is taken as it is and the
    quotes are dropped; an apostrophe inside a word (``it's``) is a letter.
    """
    words: list[str] = []
    current: list[str] = []
    depth = 0
    quote = False
    single = False
    quoted = False  # the current word had single quotes: '' is an empty word, not none
    closed_at = -1  # where the last single quote closed: 'a''b' goes on quoting
    equals_at = -1  # where the current word's first "=" is: kept, not searched for (linear)
    escaped = False
    for ch in text:
        if ch == "=" and equals_at < 0:
            equals_at = len(current)  # appended below, in whichever branch
        if single:
            if ch == "'":
                single = False
                closed_at = len(current)
            else:
                current.append(ch)
            continue
        if (
            ch == "'"
            and depth == 0
            and not quote
            and (not current or closed_at == len(current) or equals_at == len(current) - 1)
        ):
            single = quoted = True
            continue
        if quote:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quote = False
            continue
        if ch == '"':
            quote = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch.isspace() and depth == 0:
            if current or quoted:
                words.append("".join(current))
                current = []
                quoted = False
                closed_at = -1
            equals_at = -1
            continue
        current.append(ch)
    if quote or single:
        return ProtocolViolation("unterminated string")
    if depth:
        # Everything after it would have become part of one value, silently.
        return ProtocolViolation("unclosed '{' or '[' (quote a plain-text value: key='...')")
    if current or quoted:
        words.append("".join(current))
    if not words:
        return ProtocolViolation("empty command")
    return words


class ConnectionProtocol:
    """The server side of one connection, without I/O.

    Feed received bytes to :meth:`feed` (``b""`` for EOF) and take the
    events out one at a time with :meth:`next_event`, which parses only as
    far as it is asked to: what a peer pipelines stays bytes until the
    server is ready for it, so a flood of tiny requests costs the buffer it
    arrived in, not an object per request. :meth:`receive_data` does both at
    once. Turn a response into bytes with :meth:`encode_reply`.
    """

    __slots__ = ("_buffer", "_closed", "_eof", "_expect", "_pos", "max_message_size", "mode")

    def __init__(self, max_message_size: int = 1 << 20) -> None:
        self.max_message_size = min(max_message_size, HARD_MAX_MESSAGE_SIZE)
        self.mode: Mode | None = None
        # The bytes as they came while each read holds whole messages (no copy), a
        # bytearray that collects them once one is left over in part.
        self._buffer: bytes | bytearray = b""
        self._pos = 0  # where the unparsed bytes begin in _buffer
        self._expect = -1  # frame body length once a header was read
        self._eof = False
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once a fatal violation, ``quit`` or EOF ended the stream (and was taken out)."""
        return self._closed

    @property
    def has_partial(self) -> bool:
        """True while bytes are waiting that :meth:`next_event` has not made into events.

        Once :meth:`next_event` has returned None, that is part of a message
        whose rest is awaited.
        """
        return len(self._buffer) > self._pos or self._expect >= 0

    def feed(self, data: bytes) -> None:
        """Take bytes from the peer; ``b""`` means the peer sent EOF. Parses nothing."""
        if self._closed or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self.mode is None:
            self.mode = "line" if data[0] in _LINE_START else "frame"
        buf, pos = self._buffer, self._pos
        if pos >= len(buf):  # all parsed: parse from these bytes as they are
            self._buffer, self._pos = data, 0
        elif type(buf) is bytes:  # part of a message is left: collect from now on
            self._buffer, self._pos = bytearray(memoryview(buf)[pos:]) + data, 0
        else:
            buf += data

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes (or EOF) are fed."""
        if self._closed:
            return None
        mode = self.mode
        if mode == "frame":
            return self._next_frame()
        if mode == "line":
            return self._next_line()
        return self._next_frame() if self._eof else None  # closed before its first byte, or not yet

    def receive_data(self, data: bytes) -> list[Event]:
        """:meth:`feed`, then every event that is complete."""
        self.feed(data)
        events: list[Event] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def _fatal(self, error: str) -> ProtocolViolation:
        self._closed = True
        self._drop()
        return ProtocolViolation(error, fatal=True)

    def _close(self) -> Close:
        self._closed = True
        self._drop()
        return Close()

    def _drop(self) -> None:
        self._buffer = b""
        self._pos = 0
        self._expect = -1

    def _take(self, end: int, skip: int = 0) -> bytes:
        """The unparsed bytes up to ``end``; parsing goes on ``skip`` bytes after them (a newline)."""
        buf, pos = self._buffer, self._pos
        taken = buf[pos:end]
        end += skip
        if end >= len(buf):
            self._buffer, end = b"", 0
        elif end > _COMPACT_AFTER and type(buf) is bytearray:
            del buf[:end]  # a bytearray drops its head without moving the rest, mostly
            end = 0
        self._pos = end
        return taken if type(taken) is bytes else bytes(taken)

    def _next_frame(self) -> Event | None:
        buf, pos, expect = self._buffer, self._pos, self._expect
        have = len(buf) - pos
        if expect < 0:
            if have < _HEADER_SIZE:
                if not self._eof:
                    return None
                if have:
                    return self._fatal(f"connection closed mid-header: got {have} of {_HEADER_SIZE} bytes")
                return self._close()
            (expect,) = _HEADER.unpack_from(buf, pos)
            if buf[pos + 4] != 0x3A or expect > self.max_message_size:  # not ":", or too long
                try:  # read_frame_header says which
                    read_frame_header(bytes(buf[pos : pos + _HEADER_SIZE]), self.max_message_size)
                except ValueError as exc:
                    return self._fatal(str(exc))
            pos += _HEADER_SIZE
            have -= _HEADER_SIZE
            self._pos, self._expect = pos, expect
        if have < expect:
            if self._eof:
                return self._fatal(f"connection closed mid-frame: got {have} of {expect} bytes")
            return None
        self._expect = -1
        body = self._take(pos + expect)
        try:
            obj = _loads(body, request=True)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            return ProtocolViolation(f"invalid JSON: {exc}")
        # find(), not ``in``: ``bytes in bytes`` first tries the needle as an integer
        # and raises and clears a TypeError every time (about 900 instructions).
        return _request_from_obj(obj, escapes=body.find(b"\\u") >= 0)

    def _next_line(self) -> Event | None:
        while True:
            buf, pos = self._buffer, self._pos
            nl = buf.find(b"\n", pos)
            if nl < 0:
                have = len(buf) - pos
                if have > self.max_message_size:
                    return self._fatal(self._too_long(have))
                if not self._eof:
                    return None
                if not have:
                    return self._close()
                nl = len(buf)  # EOF ends the last, unterminated line
            if nl - pos > self.max_message_size:
                return self._fatal(self._too_long(nl - pos))
            raw = self._take(nl, skip=1)
            try:
                # A byte order mark (a file a Windows editor saved, piped in) is dropped.
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                return ProtocolViolation(f"line is not valid UTF-8: {exc}")
            if not line.strip():
                continue
            event = parse_line(line)
            if isinstance(event, Close):
                return self._close()
            return event

    def _too_long(self, size: int) -> str:
        return f"line of {size}+ bytes exceeds the limit of {self.max_message_size} bytes"

    def encode_reply(self, request: Request | ProtocolViolation | None, response: Response) -> bytes:
        """Bytes that answer ``request`` with ``response`` in this connection's mode."""
        req_id = request.id if request is not None else None
        payload = response.payload
        if isinstance(request, Request) and request.go_client and not isinstance(payload, str):
            if payload is not None:
                payload = _REPLY_UTF8(payload)
                _no_huge_integer(payload.encode("utf-8", "surrogatepass"))
            else:
                payload = ""
        status, error = response.status, response.error
        if type(status) is not str or type(error) is not str:  # a handler's Response("failure", exc)
            status, error = str(status), str(error)
        resp = {"status": status, "error": error, "payload": payload}
        if self.mode == "line":
            if req_id is not None:
                resp["id"] = req_id
            line = _reply_json(resp)
            if len(line) > HARD_MAX_MESSAGE_SIZE:  # as for a frame: a client reading lines needs a bound too
                raise ValueError(
                    f"a reply of {len(line)} bytes exceeds the protocol's {HARD_MAX_MESSAGE_SIZE}"
                )
            return line + b"\n"
        cmd = request.cmd if request is not None else ""
        try:
            # The reply object assembled from its encoded parts: a quarter of
            # the cost of encoding the dict, and the same bytes.
            body = b"".join(
                (
                    b'{"cmd":',
                    _encode_str(cmd).encode(),
                    b',"response":{"status":',
                    _encode_str(status).encode(),
                    b',"error":',
                    _encode_str(error).encode(),
                    b',"payload":',
                    _no_huge_integer(_REPLY_UTF8(payload).encode()),
                    b"}}"
                    if req_id is None
                    else b'},"id":' + _no_huge_integer(_REPLY_UTF8(req_id).encode()) + b"}",
                )
            )
        except (UnicodeEncodeError, TypeError):
            # A lone surrogate somewhere: encode the whole object, ASCII-escaped.
            obj: dict[str, Any] = {"cmd": cmd, "response": resp}
            if req_id is not None:
                obj["id"] = req_id
            body = _reply_json(obj)
        if len(body) > HARD_MAX_MESSAGE_SIZE:
            raise ValueError(f"a reply of {len(body)} bytes exceeds the protocol's {HARD_MAX_MESSAGE_SIZE}")
        return _HEADER.pack(len(body)) + b":" + body
