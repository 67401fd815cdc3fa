"""A registry of typed commands: ``@commands.command`` and argument binding.

Arguments are the handler's keyword parameters. Their annotations (str, int,
float, bool, Enum, ``X | None``, ``Union``, list, dict, Any) are checked
before the handler runs, so a missing, unknown or ill-typed argument gets a
failure that names it and says why. A parameter called ``ctx`` receives the
:class:`CommandContext` and is not an argument.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import math
import reprlib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, overload

from ._exceptions import ArgumentError
from ._protocol import short_repr

__all__ = ["Command", "Commands", "Parameter"]

F = TypeVar("F", bound=Callable[..., Any])

_MISSING: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class Parameter:
    """One argument of a command, as ``help`` shows it."""

    name: str
    annotation: Any
    default: Any = _MISSING
    pass_default: bool = False
    """The default, converted as an argument would be ('PRO' to ``Tier.PRO``), is not the
    function's own: it is passed when the argument is left out."""

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def to_help(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type_name, "required": self.required}
        if not self.required:
            out["default"] = _help_value(self.default)
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
    ctx_param: str = "ctx"
    """The parameter that receives the :class:`CommandContext` (when ``wants_ctx``)."""
    is_async: bool = False
    inline: bool = False
    """Run on the control loop itself, not on a handler thread: for plain diagnostic
    commands that never block (the built-ins). Others may block, so a thread runs them."""

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` against the signature and return the keyword arguments."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            expected = ", ".join(known) or "no arguments"
            raise ArgumentError(
                f"unknown argument {short_repr(unknown[0])} for {self.name!r}; it takes: {expected}"
            )
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.name not in args:
                if p.required:
                    raise ArgumentError(
                        f"missing required argument {p.name!r} ({p.type_name}) for {self.name!r}"
                    )
                if p.pass_default:
                    kwargs[p.name] = p.default
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
        cmd_name = name or getattr(func, "__name__", None)
        if not callable(func):
            raise TypeError(f"a command is a function, not {type(func).__name__} {func!r}")
        if not isinstance(cmd_name, str) or not cmd_name:
            raise TypeError(f"{func!r} has no __name__ to name a command by: pass name=")
        self._check_free(cmd_name, func, "pass name= to register another under a different name")
        sig = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func)
        except Exception:  # a name only imported for type checkers, say: each is resolved below
            hints = {}
        params: list[Parameter] = []
        ctx_param: str | None = None
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"command {cmd_name!r}: *args/**kwargs are not supported")
            if p.kind is p.POSITIONAL_ONLY:
                raise TypeError(
                    f"command {cmd_name!r}: argument {p.name!r} is positional-only;"
                    " arguments are given by name (drop the '/')"
                )
            annotation = hints.get(p.name, p.annotation)
            if p.name == "ctx" or _is_context(annotation):
                if ctx_param is not None:
                    raise TypeError(
                        f"command {cmd_name!r}: both {ctx_param!r} and {p.name!r} ask for the context"
                    )
                ctx_param = p.name
                continue
            if isinstance(annotation, str):
                annotation = _resolve(func, p.name, annotation, cmd_name)
            if annotation is _MISSING:
                annotation = Any
            problem = _unsupported(annotation)
            if problem:
                raise TypeError(
                    f"command {cmd_name!r}: argument {p.name!r} is annotated {_annotation_text(annotation)},"
                    f" {problem}; arguments are JSON values: use {_SUPPORTED}"
                )
            if p.default is None and annotation is not Any:
                try:
                    coerce(None, annotation)
                except (TypeError, ValueError):
                    # ``n: int = None``: ``int | None``, as PEP 484 first had it and Python 3.10's
                    # get_type_hints still reads it, on every version alike.
                    annotation = typing.Optional[annotation]  # noqa: UP045 (a runtime object)
            default = _checked_default(cmd_name, p, annotation)
            converted = default is not p.default and not _alike(default, p.default)
            params.append(Parameter(p.name, annotation, default, pass_default=converted))
        command = Command(
            name=cmd_name,
            func=func,
            doc=inspect.cleandoc(func.__doc__ or "").strip(),
            readonly=readonly,
            diagnostic=diagnostic,
            params=params,
            wants_ctx=ctx_param is not None,
            ctx_param=ctx_param or "ctx",
            is_async=inspect.iscoroutinefunction(func),
        )
        self._commands[cmd_name] = command
        return command

    def include(self, other: Commands) -> None:
        """Add every command of ``other``.

        A name both registries give to different functions is refused, as
        :meth:`add` refuses it, and then none of ``other``'s commands is added.
        """
        for name, command in other._commands.items():
            self._check_free(name, command.func, "rename one of the two")
        self._commands.update(other._commands)

    def _check_free(self, name: str, func: Callable[..., Any], hint: str) -> None:
        existing = self._commands.get(name)
        # The same function registered again (a module reloaded, say) replaces itself.
        if existing is not None and _func_name(existing.func) != _func_name(func):
            raise ValueError(
                f"command {name!r} is registered already (by {_func_name(existing.func)}); {hint}"
            )

    def get(self, name: str) -> Command | None:
        """The command called ``name``, or None."""
        return self._commands.get(name)

    def __getitem__(self, name: str) -> Command:
        """The command called ``name``; KeyError naming the registered ones."""
        try:
            return self._commands[name]
        except KeyError:
            known = ", ".join(sorted(self._commands)) or "none are registered"
            raise KeyError(f"no command {name!r}; commands: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(sorted(self._commands.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._commands)


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _alike(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``[1.0]`` is not ``[1]``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_alike, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_alike(a[key], b[key]) for key in a)
    return bool(a == b)


_JSON_LIKE = (type(None), bool, int, float, str, list, dict, enum.Enum)
"""Defaults checked against their annotation: what an operator could send, or a member."""


def _checked_default(cmd_name: str, p: inspect.Parameter, annotation: Any) -> Any:
    """A parameter's default as its annotation takes it, as if an operator had sent it
    (an Enum member for its name, say).

    Checked where it is written, as a Setting's default is: else the handler would
    get it, unchecked, whenever the argument is left out. A float default that JSON
    cannot carry (``math.inf``: no limit) is Python's to give, and stays; so does a
    default that is no JSON-like value at all (a sentinel that tells "left out" apart).
    """
    if p.default is p.empty or not isinstance(p.default, _JSON_LIKE):
        return p.default  # a sentinel (``_UNSET = object()``), a tuple: Python's own, unchecked
    try:
        return coerce(p.default, annotation)
    except (TypeError, ValueError) as exc:
        if isinstance(p.default, float) and not math.isfinite(p.default):
            try:
                coerce(0.0, annotation)
            except (TypeError, ValueError):
                pass
            else:
                return p.default
        raise TypeError(
            f"command {cmd_name!r}: argument {p.name!r} defaults to {reprlib.repr(p.default)},"
            f" which its annotation {_annotation_text(annotation)} refuses: {exc}"
        ) from None


def coerce(value: Any, annotation: Any, *, strict: bool = False) -> Any:
    """Check ``value`` against ``annotation``; convert where it is lossless.

    Strings that spell booleans (``on``/``off``...) and the numbers 1 and 0
    become bools, integral numbers are accepted as floats, and an Enum member
    is found by its name too; anything else of the wrong type raises.
    ``strict`` leaves out those conversions: a Union tries every option
    strictly, in order, before it converts, so that ``bool | int`` given 1
    is the int and ``Color | str`` given ``"red"`` is the member.
    """
    if annotation is Any or annotation is _MISSING:
        return value
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        if (
            len(real) == 1
            and typing.get_origin(real[0]) in (list, dict)
            and isinstance(value, typing.get_origin(real[0]))
        ):
            return coerce(value, real[0])  # list[X] | None given an array: which item is wrong
        for strictly in (True, False):
            for option in real:
                try:
                    return coerce(value, option, strict=strictly)
                except (TypeError, ValueError):
                    continue
        raise ValueError(f"expected {_type_name(annotation)}, got {_describe(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for strictly in (True, False) if not strict else (True,):
            for choice in choices:
                # By type too: 1 == True == 1.0, but Literal[1] does not take true or 1.0.
                if _same(choice.value if isinstance(choice, enum.Enum) else choice, value, strictly):
                    return choice
        raise ValueError(f"expected one of {', '.join(map(_literal_text, choices))}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {_describe(value)}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(coerce(item, item_type, strict=strict))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {_describe(value)}")
        value_type = (typing.get_args(annotation) or (str, Any))[1]
        out = {}
        for key, item in value.items():
            try:
                out[key] = coerce(item, value_type, strict=strict)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"key {key!r}: {exc}") from None
        return out
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _coerce_enum(value, annotation, strict)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if strict:
            raise ValueError(f"expected true or false, got {_describe(value)}")
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if type(value) is int and value in (0, 1):  # x=1 on a command line is a number
            return value == 1
        raise ValueError(f"expected true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {_describe(value)}")
    if annotation is float:
        if strict and type(value) is int:
            raise ValueError(f"expected a number, got {_describe(value)}")
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
        raise ValueError(f"expected a string, got {_describe(value)}{_as_text_hint(value)}")
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


def _coerce_enum(value: Any, enum_type: type[enum.Enum], strict: bool = False) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    for member in enum_type:
        # By type too: an IntEnum does not take true or 2.0.
        if _same(member.value, value, strict):
            return member
    if not strict and isinstance(value, str):
        # By name: an exact one (aliases included) before one that differs in case only,
        # and that only when no other name does (M for mega, m for milli).
        exact = enum_type.__members__.get(value)
        if exact is not None:
            return exact
        folded = {m for name, m in enum_type.__members__.items() if name.lower() == value.lower()}
        if len(folded) == 1:
            return folded.pop()
    choices = ", ".join(str(m.value) for m in enum_type)
    raise ValueError(f"expected one of {choices}, got {_describe(value)}")


def _same(expected: Any, value: Any, strict: bool = False) -> bool:
    """``value`` from JSON is ``expected``: equal and of its type (unless ``strict``, an integer is a float too)."""
    if type(value) is type(expected) or (not strict and type(expected) is float and type(value) is int):
        return bool(value == expected)
    return False


def _as_text_hint(value: Any) -> str:
    """How to send as text what a command line read as a JSON literal (``value=123``)."""
    if isinstance(value, float):
        return """ (quote a number to send it as text: '"1.50"')"""
    if value is None or isinstance(value, (bool, int)):
        text = json.dumps(value)
        return f""" (to send the text {text}, quote it: '"{text}"')"""
    return ""


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


def _literal_text(choice: Any) -> str:
    """A Literal's choice as a client sends it: JSON words, an Enum member by its value."""
    if isinstance(choice, enum.Enum):
        choice = choice.value
    if choice is None or isinstance(choice, bool):
        return json.dumps(choice)
    return repr(choice)


def _type_name(annotation: Any) -> str:
    if annotation is Any or annotation is _MISSING or annotation is object:  # object: any JSON value
        return "any"
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        # Python 3.10 wraps a None default's annotation in Optional, around a Literal[..., None] too.
        nullable = len(args) < len(typing.get_args(annotation)) and "null" not in name.split(" | ")
        return f"{name} | null" if nullable else name
    if origin is typing.Literal:
        return " | ".join(_literal_text(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(str(m.value) for m in annotation)
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    inner = typing.get_args(annotation)
    if origin is list and inner and inner[0] is not Any:
        return f"array of {_type_name(inner[0])}"
    if origin is dict and len(inner) == 2 and inner[1] is not Any:
        return f"object of {_type_name(inner[1])}"
    if origin in names:
        return names[origin]
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


_SUPPORTED = (
    "str, int, float, bool, an Enum, a Literal, list[...] or dict[str, ...] of those,"
    " X | None, a Union of those, or Any"
)
_PLAIN_TYPES = (str, int, float, bool)


def _unsupported(annotation: Any) -> str:
    """Why ``annotation`` cannot type a command argument, or "" when it can."""
    if annotation is Any or annotation is object:
        return ""
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        for option in typing.get_args(annotation):
            if option is not type(None) and (problem := _unsupported(option)):
                return problem
        return ""
    if origin is typing.Literal:
        odd = [
            a
            for a in typing.get_args(annotation)
            if not isinstance(a, (*_PLAIN_TYPES, enum.Enum, type(None)))
        ]
        return f"which allows {odd[0]!r}, not a JSON value" if odd else ""
    if origin is list:
        args = typing.get_args(annotation)
        return _unsupported(args[0]) if args else ""
    if origin is dict:
        args = typing.get_args(annotation)
        if args and args[0] not in (str, Any):
            return "whose keys are not strings (JSON object keys are)"
        return _unsupported(args[1]) if args else ""
    if annotation in (*_PLAIN_TYPES, list, dict):
        return ""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        odd = [m for m in annotation if not isinstance(m.value, (*_PLAIN_TYPES, type(None)))]
        return f"whose member {odd[0].name} has the value {odd[0].value!r}, not a JSON value" if odd else ""
    return "which no JSON value is"


def _func_name(func: Callable[..., Any]) -> str:
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str):  # a functools.partial, a callable object: its repr says it all
        return repr(func)
    return f"{getattr(func, '__module__', '?')}.{qualname}"


def _annotation_text(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _is_context(annotation: Any) -> bool:
    """Whether ``annotation`` names :class:`CommandContext` (resolved or not)."""
    if isinstance(annotation, str):
        return annotation.rpartition(".")[2].strip("'\"") == "CommandContext"
    return getattr(annotation, "__name__", None) == "CommandContext" and getattr(
        annotation, "__module__", ""
    ).startswith("unixsock_asgi")


def _resolve(func: Callable[..., Any], name: str, annotation: str, cmd_name: str) -> Any:
    """Resolve one string annotation (``from __future__ import annotations``) in ``func``'s module."""
    target: Any = inspect.unwrap(func)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = type(target).__call__  # a callable object
    holder = types.SimpleNamespace(__annotations__={name: annotation})
    try:
        return typing.get_type_hints(holder, globalns=getattr(target, "__globals__", {}))[name]
    except Exception as exc:
        raise TypeError(
            f"command {cmd_name!r}: the annotation {annotation!r} of argument {name!r} cannot be"
            f" resolved ({type(exc).__name__}: {exc}); arguments are checked by their types, so the"
            " names in annotations must exist at run time in the function's module (define it at"
            " module level, or import it outside TYPE_CHECKING)"
        ) from None


def _member_values(value: Any) -> Any:
    """``value`` with every Enum member in it as its value, lists and dicts looked into."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_member_values(item) for item in value]
    if isinstance(value, dict):
        return {key: _member_values(item) for key, item in value.items()}
    return value


def _help_value(value: Any) -> Any:
    """A default as ``help`` shows it: itself when it is plain JSON, else its text."""
    value = _member_values(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value
