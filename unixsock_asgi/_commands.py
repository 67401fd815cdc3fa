"""A registry of typed commands: ``@commands.command`` and argument binding.

Arguments are the handler's keyword parameters. Their annotations (str, int,
float, bool, Enum, ``X | None``, ``Union``, list, dict, Any) are checked
before the handler runs, so a missing, unknown or ill-typed argument gets a
failure that names it and says why. A parameter called ``ctx`` receives the
:class:`CommandContext` and is not an argument.
"""

from __future__ import annotations

import enum
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, overload

__all__ = ["ArgumentError", "Command", "Commands", "Parameter"]

F = TypeVar("F", bound=Callable[..., Any])

_MISSING: Any = inspect.Parameter.empty


class ArgumentError(ValueError):
    """A command's arguments do not fit its signature."""


@dataclass(frozen=True)
class Parameter:
    """One argument of a command, as ``help`` shows it."""

    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def to_help(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type_name, "required": self.required}
        if not self.required:
            out["default"] = self.default.value if isinstance(self.default, enum.Enum) else self.default
        return out


@dataclass
class Command:
    """A registered command: its function and how it is to be run."""

    name: str
    func: Callable[..., Any]
    doc: str = ""
    readonly: bool = False
    diagnostic: bool = False
    params: list[Parameter] = field(default_factory=list)
    wants_ctx: bool = False
    is_async: bool = False

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` against the signature and return the keyword arguments."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            expected = ", ".join(known) or "no arguments"
            raise ArgumentError(f"unknown argument {unknown[0]!r} for {self.name!r}; it takes: {expected}")
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.name not in args:
                if p.required:
                    raise ArgumentError(
                        f"missing required argument {p.name!r} ({p.type_name}) for {self.name!r}"
                    )
                continue
            try:
                kwargs[p.name] = coerce(args[p.name], p.annotation)
            except (TypeError, ValueError) as exc:
                raise ArgumentError(f"argument {p.name!r} of {self.name!r}: {exc}") from None
        return kwargs

    def to_help(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "readonly": self.readonly,
            "diagnostic": self.diagnostic,
            "args": [p.to_help() for p in self.params],
        }


class Commands:
    """A registry of commands.

    ::

        commands = Commands()

        @commands.command(readonly=True)
        def greet(name: str, times: int = 1) -> str:
            "Say hello."
            return " ".join([f"hello {name}"] * times)
    """

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    @overload
    def command(self, func: F, /) -> F: ...

    @overload
    def command(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        readonly: bool = False,
        diagnostic: bool = False,
    ) -> Callable[[F], F]: ...

    def command(
        self,
        func: F | None = None,
        /,
        *,
        name: str | None = None,
        readonly: bool = False,
        diagnostic: bool = False,
    ) -> F | Callable[[F], F]:
        """Register a function as a command (usable bare or with options).

        ``name`` defaults to the function's name; the docstring is the help
        text. ``readonly`` marks commands that change nothing. ``diagnostic``
        commands run on the control thread, so they answer even while the
        app's event loop is blocked; they must be thread-safe.
        """

        def register(fn: F) -> F:
            self.add(fn, name=name, readonly=readonly, diagnostic=diagnostic)
            return fn

        return register(func) if func is not None else register

    def add(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        readonly: bool = False,
        diagnostic: bool = False,
    ) -> Command:
        """Register ``func`` (the non-decorator form of :meth:`command`)."""
        cmd_name = name or func.__name__
        sig = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func)
        except Exception:  # unresolved forward references: fall back to raw annotations
            hints = {}
        params: list[Parameter] = []
        wants_ctx = False
        for p in sig.parameters.values():
            if p.name == "ctx":
                wants_ctx = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"command {cmd_name!r}: *args/**kwargs are not supported")
            annotation = hints.get(p.name, p.annotation)
            params.append(Parameter(p.name, Any if annotation is _MISSING else annotation, p.default))
        command = Command(
            name=cmd_name,
            func=func,
            doc=inspect.cleandoc(func.__doc__ or "").strip(),
            readonly=readonly,
            diagnostic=diagnostic,
            params=params,
            wants_ctx=wants_ctx,
            is_async=inspect.iscoroutinefunction(func),
        )
        self._commands[cmd_name] = command
        return command

    def include(self, other: Commands) -> None:
        """Add every command of ``other``; later registrations win on a name clash."""
        self._commands.update(other._commands)

    def get(self, name: str) -> Command | None:
        """The command called ``name``, or None."""
        return self._commands.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(sorted(self._commands.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._commands)


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def coerce(value: Any, annotation: Any) -> Any:
    """Check ``value`` against ``annotation``; convert where it is lossless.

    Strings that spell booleans (``on``/``off``...) become bools and integral
    numbers are accepted as floats; anything else of the wrong type raises.
    """
    if annotation is Any or annotation is _MISSING:
        return value
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"expected {_type_name(annotation)}, got {_describe(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value
        raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if origin in (list, dict):
        annotation = origin
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _coerce_enum(value, annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            if math.isfinite(number):
                return number
            raise ValueError(f"expected a finite number, got {value!r}")
        raise ValueError(f"expected a number, got {_describe(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {_describe(value)}")
    if annotation in (list, dict):
        if isinstance(value, annotation):
            return value
        raise ValueError(
            f"expected {'an array' if annotation is list else 'an object'}, got {_describe(value)}"
        )
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise ValueError(f"expected {annotation.__name__}, got {_describe(value)}")
    return value


def _coerce_enum(value: Any, enum_type: type[enum.Enum]) -> enum.Enum:
    for member in enum_type:
        if value == member.value or (isinstance(value, str) and value.lower() == member.name.lower()):
            return member
    choices = ", ".join(str(m.value) for m in enum_type)
    raise ValueError(f"expected one of {choices}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _type_name(annotation: Any) -> str:
    if annotation is Any or annotation is _MISSING:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        return f"{name} | null" if len(args) < len(typing.get_args(annotation)) else name
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(str(m.value) for m in annotation)
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    if origin in names:
        return names[origin]
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))
