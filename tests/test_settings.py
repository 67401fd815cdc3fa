"""Runtime settings: declared types, validation, atomic set."""

from __future__ import annotations

import sys
import threading
from typing import Any, cast

import pytest

from unixsock_asgi import Setting, Settings


def make() -> Settings:
    return Settings(
        Setting("greeting", str, "hello", "Greeting"),
        Setting("delay_s", float, 0.5, minimum=0, maximum=10),
        Setting("enabled", bool, True),
    )


def test_values_read_by_item_attribute_and_get() -> None:
    settings = make()
    assert (
        settings["greeting"] == "hello"
        and settings.greeting == "hello"
        and settings.get("greeting") == "hello"
    )
    assert list(settings) == ["greeting", "delay_s", "enabled"] and "enabled" in settings
    with pytest.raises(AttributeError):
        _ = settings.nope


def test_set_validates_then_applies_and_returns_old_and_new() -> None:
    settings = make()
    assert settings.set("delay_s", 2) == (0.5, 2.0)
    assert settings["delay_s"] == 2.0
    with pytest.raises(ValueError, match="at most 10"):
        settings.set("delay_s", 11)
    with pytest.raises(ValueError, match="expected true or false"):
        settings.set("enabled", "perhaps")
    with pytest.raises(KeyError, match="unknown setting 'colour'; settings: greeting, delay_s, enabled"):
        settings.set("colour", "red")
    assert settings["delay_s"] == 2.0 and settings["enabled"] is True  # failed sets changed nothing
    assert settings.reset("delay_s") == (2.0, 0.5)
    described = settings.describe()["delay_s"]
    assert described == {"value": 0.5, "default": 0.5, "type": "number", "doc": ""}


def test_assigning_a_setting_is_a_checked_set_that_every_reader_sees() -> None:
    # As a plain attribute it would have hidden every later set() from settings.greeting,
    # and skipped the checks.
    settings = make()
    settings.greeting = "hi"
    settings["delay_s"] = 3
    assert (settings.greeting, settings["greeting"], settings.delay_s) == ("hi", "hi", 3.0)
    assert settings.set("greeting", "from the operator") == ("hi", "from the operator")
    assert settings.greeting == "from the operator"
    with pytest.raises(ValueError, match="at most 10"):
        settings.delay_s = 11
    with pytest.raises(KeyError, match="unknown setting 'colour'"):
        settings["colour"] = "red"
    with pytest.raises(AttributeError, match="no setting 'greting' is declared"):
        settings.greting = "typo"
    with pytest.raises(AttributeError, match="cannot be removed"):
        del settings.greeting
    assert settings.delay_s == 3.0 and "greting" not in vars(settings)


def test_declaration_errors() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Settings(Setting("a", int, 1), Setting("a", int, 2))
    with pytest.raises(ValueError, match="expected an integer"):
        Settings(Setting("a", int, "one"))
    bounds: Any = (1, 65535)  # untyped, as from a config file: the type checker would refuse it
    with pytest.raises(TypeError, match="positional"):  # the bounds go by name
        Setting("port", int, 80, "", *bounds)


def test_concurrent_sets_never_expose_a_value_that_was_not_set() -> None:
    settings = Settings(Setting("n", int, 0))
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(settings["n"])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 2001):
            settings.set("n", i)
    finally:
        stop.set()
        thread.join(10)
    assert seen <= set(range(2001)) and settings["n"] == 2000


def test_plain_enum_and_optional_bounded_settings() -> None:
    import enum
    from typing import Optional

    class Level(enum.Enum):
        LOW = "low"
        HIGH = "high"

    settings = Settings(
        Setting("level", Level, Level.LOW),
        Setting("max_items", Optional[int], None, minimum=1),  # noqa: UP045 - the spelling under test
        Setting("cap", int | None, 10, minimum=1, maximum=100),
    )
    assert settings.set("level", Level.HIGH) == (Level.LOW, Level.HIGH)
    assert settings.set("level", "low") == (Level.HIGH, Level.LOW)
    assert settings.set("max_items", 5) == (None, 5)
    assert settings.set("cap", None) == (10, None)
    with pytest.raises(ValueError, match=r"^must be at least 1, got 0"):
        settings.set("cap", 0)
    with pytest.raises(TypeError, match="minimum and maximum apply to int and float settings, not string"):
        Setting("name", str, "x", minimum=1)


def test_a_declaration_is_checked_where_it_is_written() -> None:
    import datetime

    # A type no JSON value has could never be set: refused like a command argument's.
    with pytest.raises(TypeError, match="setting 'when' is typed datetime, which no JSON value is"):
        Setting("when", datetime.datetime, datetime.datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="setting 'n': its default 'abc' is refused: expected an integer"):
        Setting("n", int, "abc")
    with pytest.raises(ValueError, match="setting 'n': its default 0 is refused: must be at least 1"):
        Setting("n", int, 0, minimum=1)


def test_a_typo_in_a_read_names_the_settings_there_are() -> None:
    settings = make()
    with pytest.raises(KeyError, match="unknown setting 'greting'; settings: greeting, delay_s, enabled"):
        _ = settings["greting"]
    with pytest.raises(AttributeError, match="unknown setting 'greting'; settings: greeting, delay_s"):
        _ = settings.greting
    with pytest.raises(ValueError, match=r"^must be at most 10, got 11\.0"):
        settings.set("delay_s", 11)  # the name is the caller's; the set command adds it once
    import copy

    assert copy.copy(settings)["greeting"] == "hello"  # dunder probes are plain AttributeErrors


def test_an_apps_validator_runs_once_per_value_and_its_error_class_stays() -> None:
    class TooLoud(ValueError):
        def __init__(self, message: str, *, loudness: int) -> None:
            super().__init__(message)
            self.loudness = loudness

    seen: list[int] = []

    def quiet_enough(volume: int) -> None:
        seen.append(volume)
        if volume > 10:
            raise TooLoud(f"{volume} is too loud", loudness=volume)

    settings = Settings(Setting("volume", int, 1, validate=quiet_enough))
    assert seen == [1]  # the default, checked once
    with pytest.raises(TooLoud, match=r"^11 is too loud") as refused:
        settings.set("volume", 11)
    assert refused.value.loudness == 11  # the app's own exception, attributes and all
    assert str(refused.value) == "11 is too loud"
    if sys.version_info >= (3, 11):  # and its traceback says which setting refused it
        assert refused.value.__notes__ == ["refused as a value of setting 'volume'"]
    shared = ValueError("never")  # one object raised at every refusal: its note is not added again

    def never(value: str) -> None:
        raise shared

    settings.declare(Setting("mode", str, "a", validate=lambda v: None if v == "a" else never(v)))
    for _ in range(3):
        with pytest.raises(ValueError, match="never"):
            settings.set("mode", "b")
    assert getattr(shared, "__notes__", []) == (
        ["refused as a value of setting 'mode'"] if sys.version_info >= (3, 11) else []
    )


PAGE_SIZE = Setting("page_size", int, 20, minimum=1)
LIMIT = Setting[int | None]("limit", int | None, None)
RATIO = Setting("ratio", float, 1)  # a float, though its default is written as an int
TAGS = Setting("tags", list[str], ["a"])  # a list default: unhashable, yet a Setting hashes


def test_a_setting_object_reads_its_value_typed() -> None:
    settings = Settings(PAGE_SIZE, LIMIT, RATIO, TAGS)
    page_size: int = settings[PAGE_SIZE]  # mypy (strict, on the tests) checks these types
    limit: int | None = settings[LIMIT]
    ratio: float = settings[RATIO]
    tags: list[str] = settings[TAGS]
    assert (page_size, limit, ratio, tags) == (20, None, 1.0, ["a"]) and type(ratio) is float
    not_an_int: int = settings[RATIO]  # type: ignore[assignment]  # typed by `float`, not by the default 1
    assert cast(object, not_an_int) == 1.0
    assert PAGE_SIZE in settings and TAGS in settings and "tags" in settings and {TAGS: 1}[TAGS] == 1
    assert Setting("tags", list[str], ["b"]) not in settings and object() not in settings
    # Typed int, not Any: else mypy --strict would call this ignore unused.
    not_text: str = settings[PAGE_SIZE]  # type: ignore[assignment]
    assert cast(object, not_text) == 20
    settings.set("page_size", 50)
    assert settings[PAGE_SIZE] == 50
    # Another declaration under the same name is not this one: its type may differ.
    with pytest.raises(KeyError, match="is not a setting declared here: page_size, limit, ratio, tags"):
        settings[Setting("page_size", str, "20")]
    with pytest.raises(KeyError, match="is not a setting declared here"):
        Settings(LIMIT)[PAGE_SIZE]


def test_a_setting_object_is_written_and_reset_as_its_name_is() -> None:
    settings = Settings(PAGE_SIZE, LIMIT)
    old, new = settings.set(PAGE_SIZE, 30)
    pair: tuple[int, int] = (old, new)  # typed by the Setting (mypy --strict runs on the tests)
    assert pair == (20, 30) and settings.get(PAGE_SIZE) == 30 and settings["page_size"] == 30
    settings[LIMIT] = 7
    assert settings.get("limit") == 7
    assert settings.reset(PAGE_SIZE) == (30, 20) and settings[PAGE_SIZE] == 20
    with pytest.raises(ValueError, match="expected an integer") as refused:
        settings.set(PAGE_SIZE, "many")
    if sys.version_info >= (3, 11):  # the note that names the setting
        assert "refused as a value of setting 'page_size'" in refused.value.__notes__
    with pytest.raises(KeyError, match="is not a setting declared here: page_size, limit"):
        settings.set(Setting("page_size", str, "20"), "x")  # another declaration of that name
    with pytest.raises(KeyError, match="is not a setting declared here"):
        settings[RATIO] = 2.0
    assert settings[PAGE_SIZE] == 20


def test_a_setting_of_a_narrower_type_stands_where_a_wider_one_is_wanted() -> None:
    # mypy --strict checks this file in CI: a Setting is read-only, so a Setting[int] is a
    # Setting[float] and a Setting[object] to a type checker (it was refused before).
    discount = Setting("discount", int, 0)
    wider: Setting[float] = discount
    declared: list[Setting[object]] = [discount, Setting("greeting", str, "hi")]
    settings = Settings(*declared)
    ratio: float = settings[wider]
    assert ratio == 0 and settings.set(wider, 5) == (0, 5) and settings[discount] == 5
