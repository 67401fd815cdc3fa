"""The command registry: typed argument binding and help."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, Literal

import pytest

from unixsock_asgi import ArgumentError, CommandContext, Commands
from unixsock_asgi._protocol import Request, parse_line


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Speed(enum.Enum):
    HALF = 0.5
    FULL = 1.0


class Prio(enum.IntEnum):
    LOW = 1
    HIGH = 2


commands = Commands()


@commands.command(readonly=True)
def typed(
    name: str,
    count: int,
    ratio: float = 1.0,
    flag: bool = False,
    color: Color = Color.RED,
    limit: int | None = None,
    mode: Literal["fast", "slow"] = "fast",
    tags: list[Any] | None = None,
    anything: Any = None,
) -> dict[str, Any]:
    """Exercise every supported type."""
    return {"name": name, "count": count}


@commands.command(name="with-ctx", diagnostic=True)
async def with_ctx(ctx: CommandContext, level: str | int = "INFO") -> Any:
    """Takes the context, which is not an argument."""
    return level


def bind(cmd: str, **args: Any) -> dict[str, Any]:
    command = commands.get(cmd)
    assert command is not None
    return command.bind(args)


def test_binding_accepts_well_typed_arguments_and_applies_defaults() -> None:
    assert bind("typed", name="a", count=2) == {"name": "a", "count": 2}
    kwargs = bind(
        "typed", name="a", count=2, ratio=3, flag="on", color="BLUE", limit=None, mode="slow", tags=[1]
    )
    assert kwargs["ratio"] == 3.0 and isinstance(kwargs["ratio"], float)
    assert kwargs["flag"] is True
    assert kwargs["color"] is Color.BLUE
    assert kwargs["limit"] is None
    assert kwargs["mode"] == "slow"
    assert bind("typed", name="a", count=1, color="red")["color"] is Color.RED
    assert bind("with-ctx", level=10) == {"level": 10}
    assert bind("with-ctx", level="DEBUG") == {"level": "DEBUG"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"count": 1}, "missing required argument 'name' (string) for 'typed'"),
        (
            {"name": "a", "count": 1, "colour": "red"},
            "unknown argument 'colour' for 'typed'; it takes: name, count",
        ),
        ({"name": "a", "count": "1"}, "argument 'count' of 'typed': expected an integer, got string '1'"),
        ({"name": "a", "count": True}, "expected an integer, got boolean true"),
        ({"name": 5, "count": 1}, "argument 'name' of 'typed': expected a string, got number 5"),
        ({"name": "a", "count": 1, "ratio": "x"}, "expected a number, got string 'x'"),
        ({"name": "a", "count": 1, "flag": "maybe"}, "expected true or false, got string 'maybe'"),
        ({"name": "a", "count": 1, "color": "green"}, "expected one of red, blue, got string 'green'"),
        ({"name": "a", "count": 1, "limit": "x"}, "expected integer | null, got string 'x'"),
        ({"name": "a", "count": 1, "mode": "warp"}, "expected one of 'fast', 'slow', got string 'warp'"),
        ({"name": "a", "count": 1, "tags": {}}, "expected array | null, got an object"),
    ],
)
def test_ill_typed_arguments_name_the_argument_and_say_why(args: dict[str, Any], message: str) -> None:
    command = commands.get("typed")
    assert command is not None
    with pytest.raises(ArgumentError) as info:
        command.bind(args)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("123", """(to send the text 123, quote it: '"123"')"""),
        ("true", """(to send the text true, quote it: '"true"')"""),
        ("null", """(to send the text null, quote it: '"null"')"""),
        ("1.50", """(quote a number to send it as text: '"1.50"')"""),
    ],
)
def test_a_command_line_literal_for_a_string_says_how_to_quote_it(value: str, hint: str) -> None:
    command = commands.get("typed")
    assert command is not None
    typed = parse_line(f"typed name={value} count=1")
    assert isinstance(typed, Request)
    with pytest.raises(ArgumentError) as info:
        command.bind(typed.args)
    assert str(info.value).endswith(hint)
    quoted = parse_line(f"""typed name='"{value}"' count=1""")  # as the hint says
    assert isinstance(quoted, Request)
    assert command.bind(quoted.args)["name"] == value


def test_help_lists_arguments_with_types_defaults_and_flags() -> None:
    command = commands.get("typed")
    assert command is not None
    described = command.to_help()
    assert described["doc"] == "Exercise every supported type."
    assert described["readonly"] is True and described["diagnostic"] is False
    args = {a["name"]: a for a in described["args"]}
    assert args["name"] == {"name": "name", "type": "string", "required": True}
    assert args["color"] == {"name": "color", "type": "red | blue", "required": False, "default": "red"}
    assert args["limit"]["type"] == "integer | null"
    ctx_command = commands.get("with-ctx")
    assert ctx_command is not None and ctx_command.wants_ctx and ctx_command.is_async
    assert [a["name"] for a in ctx_command.to_help()["args"]] == ["level"]


def test_registry_names_include_and_rejects_var_args() -> None:
    other = Commands()

    @other.command
    def extra() -> str:
        """Extra."""
        return "x"

    merged = Commands()
    merged.include(commands)
    merged.include(other)
    assert [c.name for c in merged] == ["extra", "typed", "with-ctx"]
    assert "extra" in merged and len(merged) == 3
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        merged.add(lambda *a: None, name="bad")


def test_annotations_that_cannot_be_resolved_or_checked_are_refused_at_registration() -> None:
    registry = Commands()

    class Local(enum.Enum):  # not visible from the module: the string 'Local' cannot be resolved
        A = "a"

    def pick(x: Local) -> str:
        return "x"

    with pytest.raises(TypeError, match=r"the annotation 'Local' of argument 'x' cannot be resolved"):
        registry.add(pick)

    import datetime
    import decimal

    for annotation in (datetime.datetime, decimal.Decimal, tuple[int, int], set[str], dict[int, str]):

        def handler(value: Any) -> None:
            return None

        handler.__annotations__ = {"value": annotation}
        with pytest.raises(TypeError, match=r"argument 'value' is annotated .*arguments are JSON values"):
            registry.add(handler, name="h")
    assert "h" not in registry and "pick" not in registry


def test_signatures_no_call_could_fit_are_refused_at_registration() -> None:
    registry = Commands()

    def posonly(a: int, /) -> int:
        return a

    with pytest.raises(TypeError, match=r"argument 'a' is positional-only"):
        registry.add(posonly)

    import datetime

    class Odd(enum.Enum):
        PAIR = (1, 2)
        DAY = datetime.date(2020, 1, 1)

    def pick(x: Any) -> str:
        return "x"

    pick.__annotations__ = {"x": Odd}  # (a local class: its name would not resolve)
    with pytest.raises(TypeError, match=r"member PAIR has the value \(1, 2\), not a JSON value"):
        registry.add(pick)

    def scale(a: int, b: int) -> int:
        return a * b

    with pytest.raises(TypeError, match=r"has no __name__ to name a command by: pass name="):
        registry.add(functools.partial(scale, b=2))
    registry.add(functools.partial(scale, b=2), name="double")
    assert registry.get("double") is not None
    with pytest.raises(TypeError, match=r"a command is a function, not int 42"):
        registry.add(42)  # type: ignore[arg-type]
    assert [c.name for c in registry] == ["double"]


def test_a_second_function_under_a_taken_name_is_refused() -> None:
    registry = Commands()

    @registry.command
    def restock() -> str:
        return "first"

    registry.add(restock)  # the same function again: harmless
    with pytest.raises(ValueError, match=r"'restock' is registered already \(by .*restock\); pass name="):

        @registry.command(name="restock")
        def restock_again() -> str:
            return "second"

    command = registry.get("restock")
    assert command is not None and command.func is restock

    def define() -> Callable[[], str]:
        def flush() -> str:  # the same code each time, as importlib.reload makes it again
            return "flushed"

        return flush

    first, reloaded = define(), define()
    registry.add(first)
    registry.add(reloaded)  # a reload replaces its own command
    command = registry.get("flush")
    assert command is not None and command.func is reloaded

    def scale(factor: int, amount: int) -> int:
        return factor * amount

    registry.add(functools.partial(scale, 2), name="double")
    with pytest.raises(
        ValueError, match=r"'double' is registered already \(by functools\.partial\(<function"
    ):
        registry.add(functools.partial(scale, 3), name="double")


def test_include_refuses_a_clash_as_add_does_and_adds_nothing_then() -> None:
    registry = Commands()

    @registry.command
    def restock() -> str:
        return "ours"

    other = Commands()

    @other.command
    def audit() -> str:
        return "audit"

    other.add(lambda: "theirs", name="restock")
    with pytest.raises(ValueError, match=r"'restock' is registered already \(by .*restock\); rename one"):
        registry.include(other)
    assert [c.name for c in registry] == ["restock"]  # not half of other's
    assert registry["restock"].func is restock

    same = Commands()
    same.add(restock)  # the same function in both: harmless
    same.add(audit)
    registry.include(same)
    assert [c.name for c in registry] == ["audit", "restock"]


def test_context_goes_to_a_parameter_annotated_with_it_whatever_its_name() -> None:
    registry = Commands()

    @registry.command
    def stock(context: CommandContext, item: str) -> str:
        return item

    command = registry.get("stock")
    assert command is not None and command.wants_ctx and command.ctx_param == "context"
    assert [p.name for p in command.params] == ["item"]


def test_element_types_booleans_literals_and_int_enums_are_checked_by_type() -> None:
    registry = Commands()

    @registry.command
    def typed2(
        ids: list[int] | None = None,
        weights: dict[str, float] | None = None,
        flag: bool = False,
        n: Literal[1, 2] = 1,
        prio: Prio = Prio.LOW,
    ) -> None:
        return None

    command = registry.get("typed2")
    assert command is not None
    assert command.bind({"ids": [1, 2], "weights": {"a": 1}}) == {"ids": [1, 2], "weights": {"a": 1.0}}
    for args, message in (
        ({"ids": ["1", 2]}, "item 0: expected an integer, got string '1'"),
        ({"weights": {"a": "x"}}, "key 'a': expected a number, got string 'x'"),
        ({"flag": 2}, "expected true or false, got number 2"),
        ({"n": True}, "expected one of 1, 2, got boolean true"),
        ({"n": 1.0}, "expected one of 1, 2, got number 1.0"),
        ({"prio": True}, "expected one of 1, 2, got boolean true"),
        ({"prio": 2.0}, "expected one of 1, 2, got number 2.0"),
    ):
        with pytest.raises(ArgumentError) as info:
            command.bind(args)
        assert message in str(info.value), (args, str(info.value))
    assert command.bind({"flag": 1, "n": 2, "prio": 2}) == {"flag": True, "n": 2, "prio": Prio.HIGH}
    assert command.bind({"flag": 0, "prio": "high"}) == {"flag": False, "prio": Prio.HIGH}


def test_help_shows_a_default_json_cannot_carry_as_its_text() -> None:
    import json
    import math

    registry = Commands()

    @registry.command
    def top_items(limit: float = math.inf, since: Any = object) -> None:
        return None

    command = registry.get("top_items")
    assert command is not None
    described = command.to_help()
    assert described["args"][0]["default"] == "inf"
    assert described["args"][1]["default"] == "<class 'object'>"
    json.dumps(described, allow_nan=False)  # strict JSON


def test_an_integer_is_a_float_choice_and_a_union_takes_the_exact_type_first() -> None:
    registry = Commands()

    @registry.command
    def tune(
        ratio: Literal[0.5, 1.0] = 1.0,  # type: ignore[valid-type]  # (floats in a Literal: not for type checkers)
        speed: Speed = Speed.FULL,
        n: bool | int = 0,
        color: Color | str = "",
        exact: Literal[1.0, 1] = 1,  # type: ignore[valid-type]
    ) -> None:
        return None

    command = registry.get("tune")
    assert command is not None
    bound = command.bind({"ratio": 1, "speed": 1, "n": 1, "color": "red", "exact": 1})
    assert bound == {"ratio": 1.0, "speed": Speed.FULL, "n": 1, "color": Color.RED, "exact": 1}
    assert type(bound["n"]) is int and type(bound["exact"]) is int
    assert command.bind({"n": True, "color": "RED"}) == {"n": True, "color": "RED"}


class Prefix(enum.Enum):
    M = "mega"
    m = "milli"


class Mode(enum.Enum):
    FAST = 1
    QUICK = 1  # an alias of FAST


def test_an_enum_name_matches_exactly_before_it_matches_in_another_case() -> None:
    registry = Commands()

    @registry.command
    def scale(prefix: Prefix, mode: Mode = Mode.FAST) -> None:
        return None

    command = registry.get("scale")
    assert command is not None
    # "m" is milli: it matched M (mega) case-insensitively before, the first in the class.
    assert command.bind({"prefix": "m"})["prefix"] is Prefix.m
    assert command.bind({"prefix": "M"})["prefix"] is Prefix.M
    with pytest.raises(ArgumentError, match="expected one of mega, milli"):
        command.bind({"prefix": "µ"})
    assert command.bind({"prefix": "milli", "mode": "QUICK"})["mode"] is Mode.FAST  # Mode["QUICK"] is
    assert command.bind({"prefix": "milli", "mode": "quick"})["mode"] is Mode.FAST  # its case aside


def test_a_union_of_containers_tries_every_option_strictly_item_by_item_first() -> None:
    registry = Commands()

    @registry.command
    def pick(flags: list[bool] | list[int], colors: list[Color] | list[str] = []) -> None:  # noqa: B006
        return None

    command = registry.get("pick")
    assert command is not None
    # The type no longer depends on the values: [1, 0] were booleans, [1, 2] integers.
    assert command.bind({"flags": [1, 0]})["flags"] == [1, 0]
    assert [type(f) for f in command.bind({"flags": [1, 0]})["flags"]] == [int, int]
    assert command.bind({"flags": [True, False]})["flags"] == [True, False]
    assert command.bind({"flags": [], "colors": ["RED"]})["colors"] == ["RED"]  # as Color | str does
    assert command.bind({"flags": [], "colors": ["red"]})["colors"] == [Color.RED]


def test_help_names_any_json_value_and_literal_choices_as_clients_send_them() -> None:
    registry = Commands()

    @registry.command
    def put(value: object, items: list[object], tint: Literal[Color.RED, None] = None) -> None:
        return None

    command = registry.get("put")
    assert command is not None
    types = {a["name"]: a["type"] for a in command.to_help()["args"]}
    # "object" is what help calls a JSON object (a dict): object takes any value.
    assert types == {"value": "any", "items": "array of any", "tint": "'red' | null"}
    # (3.10 reads the None default as Optional[...] around it: "expected 'red' | null, got ...")
    with pytest.raises(
        ArgumentError, match=r"expected (one of 'red', null|'red' \| null), got string 'blue'"
    ):
        command.bind({"value": 1, "items": [], "tint": "blue"})


def test_argument_error_is_caught_as_the_librarys_and_as_a_value_error() -> None:
    from unixsock_asgi import UnixSockError

    commands = Commands()

    @commands.command
    def scale(workers: int) -> int:
        return workers

    with pytest.raises(ArgumentError) as info:
        command = commands.get("scale")
        assert command is not None
        command.bind({"workers": "many"})
    assert isinstance(info.value, UnixSockError) and isinstance(info.value, ValueError)


def test_a_default_is_checked_where_it_is_written_and_given_as_an_argument_would_be() -> None:
    registry = Commands()
    with pytest.raises(TypeError) as caught:

        @registry.command
        def scale(n: int = "five") -> None:  # type: ignore[assignment]
            return None

    assert str(caught.value) == (
        "command 'scale': argument 'n' defaults to 'five', which its annotation int refuses:"
        " expected an integer, got string 'five'"
    )

    assert "scale" not in registry

    @registry.command
    def limit(n: int = None) -> int | None:  # type: ignore[assignment]  # noqa: RUF013
        return n

    # int | None, as PEP 484 first had it and 3.10's get_type_hints reads it: alike on every version.
    assert registry["limit"].params[0].type_name == "integer | null"
    assert registry["limit"].bind({"n": None}) == {"n": None}

    _unset: Any = object()

    @registry.command
    def page(after: int = _unset, ids: list[int] = ()) -> None:  # type: ignore[assignment]
        return None  # a sentinel tells "left out" from null; a tuple is Python's: neither is checked

    assert registry["page"].bind({}) == {}

    @registry.command
    def tune(
        speed: Speed = "FULL",  # type: ignore[assignment]  # by its name, as an operator may send it
        loud: bool = "no",  # type: ignore[assignment]
        ratio: float = 1,
        cap: float = float("inf"),  # no limit: Python's to give, though JSON cannot carry it
        tags: list[str] = ["a"],  # noqa: B006
        color: Color = Color.RED,
    ) -> None:
        return None

    command = registry["tune"]
    given = command.bind({})
    assert given == {"speed": Speed.FULL, "loud": False, "ratio": 1.0}  # as if sent (tags: as it was)
    assert type(given["ratio"]) is float
    assert command.bind({"speed": "HALF"})["speed"] is Speed.HALF
    assert [a.get("default") for a in command.to_help()["args"]] == [1.0, False, 1.0, "inf", ["a"], "red"]

    @registry.command
    def mix(ratios: list[float] = [1, 2], speeds: list[Speed] = ["HALF"]) -> None:  # type: ignore[list-item]  # noqa: B006
        return None

    # Inside a list too: what help shows is what the handler gets, and what an operator sending it would.
    assert registry["mix"].bind({}) == {"ratios": [1.0, 2.0], "speeds": [Speed.HALF]}
    assert registry["mix"].bind({}) == registry["mix"].bind({"ratios": [1, 2], "speeds": ["HALF"]})
    assert [a["default"] for a in registry["mix"].to_help()["args"]] == [[1.0, 2.0], [0.5]]
