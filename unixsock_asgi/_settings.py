"""Runtime settings: typed values an app declares and operators change live.

App code reads ``settings["name"]`` (or ``settings.name``, for a name that is not
also a method of :class:`Settings`, such as ``get``; or, typed, ``settings[SETTING]``
with the :class:`Setting` it declared) on every request;
``set`` validates a new value first and then swaps it in with one dict store,
so a reader sees the old value or the new one, never a half-applied change.
"""

from __future__ import annotations

import builtins
import threading
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._commands import _type_name, _unsupported, coerce

__all__ = ["Setting", "Settings"]


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Setting(Generic[T_co]):
    """The declaration of one runtime setting.

    Generic in its value's type, taken from ``type`` when it is a class:
    ``settings[PAGE_SIZE]`` with ``PAGE_SIZE = Setting("page_size", int, 20)`` is an
    ``int`` to a type checker; ``Setting("ratio", float, 1)`` a ``float``. For a
    type that is not a class (``int | None``, a ``Literal``) it comes from the
    default, so say it for an optional one: ``Setting[int | None](..., None)``
    (else it is ``None``); a default the check converts (an Enum member's name)
    makes it ``object``.
    """

    if TYPE_CHECKING:  # what a type checker sees of the dataclass's own __init__

        @overload
        def __init__(
            self,
            name: str,
            type: builtins.type[T_co],
            default: T_co,
            doc: str = "",
            *,
            minimum: float | None = None,
            maximum: float | None = None,
            validate: Callable[[Any], None] | None = None,
        ) -> None: ...
        @overload
        def __init__(
            self,
            name: str,
            type: Any,
            default: T_co,
            doc: str = "",
            *,
            minimum: float | None = None,
            maximum: float | None = None,
            validate: Callable[[Any], None] | None = None,
        ) -> None: ...
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    name: str
    type: Any
    default: T_co
    doc: str = ""
    _: KW_ONLY  # the checks go by name: in Setting("port", int, 80, "", 1, 65535) which is which?
    minimum: float | None = None
    maximum: float | None = None
    validate: Callable[[Any], None] | None = None
    """Extra check: raise ValueError with a message to refuse a value."""

    def __hash__(self) -> int:  # by name: a default may be a list (equal ones share the name)
        return hash(self.name)

    def __post_init__(self) -> None:
        if problem := _unsupported(self.type):
            raise TypeError(f"setting {self.name!r} is typed {_type_name(self.type)}, {problem}")
        if (self.minimum is not None or self.maximum is not None) and not _numeric(self.type):
            raise TypeError(
                f"setting {self.name!r}: minimum and maximum apply to int and float settings,"
                f" not {_type_name(self.type)}"
            )
        try:
            self.check(self.default)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"setting {self.name!r}: its default {self.default!r} is refused: {exc}"
            ) from None

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to the setting's type, or raise ValueError."""
        value = coerce(value, self.type)
        if value is not None:  # None: an optional setting's "unset", with no bounds to check
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be at least {self.minimum}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be at most {self.maximum}, got {value!r}")
        if self.validate is not None:
            self.validate(value)
        return value


def _numeric(annotation: Any) -> bool:
    """int, float, or an optional/union of them."""
    options = (
        [a for a in typing.get_args(annotation) if a is not type(None)]
        if _is_union(annotation)
        else [annotation]
    )
    return bool(options) and all(a in (int, float) for a in options)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Union or isinstance(annotation, types.UnionType)


class Settings:
    """A set of declared runtime settings and their current values.

    ::

        settings = Settings(
            Setting("greeting", str, "hello", "What GET / answers with"),
            Setting("slow_delay_s", float, 0.5, "Delay of GET /slow", minimum=0),
        )
        settings["greeting"]            # on every request
        settings.set("greeting", "hi")  # from the control socket: ("hello", "hi")
    """

    def __init__(self, *settings: Setting[Any]) -> None:
        self._declared: dict[str, Setting[Any]] = {}
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        for setting in settings:
            self.declare(setting)

    def declare(self, setting: Setting[Any]) -> None:
        """Add a setting; its default is checked like any other value."""
        if setting.name in self._declared:
            raise ValueError(f"setting {setting.name!r} is declared twice")
        default = coerce(setting.default, setting.type)  # checked whole when the Setting was made
        self._declared[setting.name] = setting
        self._values[setting.name] = default

    @overload
    def __getitem__(self, key: Setting[T]) -> T: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: str | Setting[Any]) -> Any:
        if type(key) is str:
            try:
                return self._values[key]
            except KeyError:
                self._require(key)  # says which settings there are
                raise
        # A Setting: typed, and a typo is an undefined name, not a KeyError at run time.
        if isinstance(key, Setting) and self._declared.get(key.name) is key:
            return self._values[key.name]
        return self._values[self._declared_by(key)]  # an equal one, or a KeyError that says why

    def _declared_by(self, setting: Any) -> str:
        """The name of ``setting`` if it is one declared here (that very object, or an equal one)."""
        name = getattr(setting, "name", None)
        declared = self._declared.get(name) if isinstance(name, str) else None
        if declared is None or (declared is not setting and declared != setting):
            raise KeyError(f"{setting!r} is not a setting declared here: {self._known()}")
        return declared.name

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name]
        if name.startswith("_") or values is None:  # copy, pickle and the like probe for dunders
            raise AttributeError(name)
        raise AttributeError(f"unknown setting {name!r}; settings: {self._known()}")

    def __setattr__(self, name: str, value: Any) -> None:
        # ``settings.greeting = "hi"`` is a set(): checked, and seen by every reader.
        # Stored as a plain attribute, it would hide every later set() from code
        # that reads ``settings.greeting``.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in self.__dict__.get("_declared", ()):
            self.set(name, value)
        else:
            raise AttributeError(f"no setting {name!r} is declared: declare it with Setting(...) first")

    def __setitem__(self, key: str | Setting[Any], value: Any) -> None:
        self.set(key, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"settings cannot be removed ({name!r}): reset() puts one back to its default")

    def __contains__(self, key: object) -> bool:
        """A name, or a Setting, declared here."""
        if isinstance(key, str):
            return key in self._declared
        name = getattr(key, "name", None)
        declared = self._declared.get(name) if isinstance(name, str) else None
        return declared is not None and (declared is key or declared == key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared)

    @overload
    def get(self, name: Setting[T]) -> T: ...
    @overload
    def get(self, name: str) -> Any: ...
    def get(self, name: str | Setting[Any]) -> Any:
        """The current value of a setting, by name or by its ``Setting`` (KeyError if it is not declared)."""
        return self._values[self._require(name).name]

    @overload
    def set(self, name: Setting[T], value: Any) -> tuple[T, T]: ...
    @overload
    def set(self, name: str, value: Any) -> tuple[Any, Any]: ...
    def set(self, name: str | Setting[Any], value: Any) -> tuple[Any, Any]:
        """Validate and apply a new value to a setting, by name or by its ``Setting``; return ``(old, new)``.

        KeyError for an undeclared name; for a refused value, the ValueError or TypeError of the
        check that refused it (an app's ``validate`` raising its own ValueError subclass: that one).
        """
        setting = self._require(name)
        try:
            new = setting.check(value)
        except (TypeError, ValueError) as exc:
            note = f"refused as a value of setting {setting.name!r}"
            # 3.11+: the traceback names the setting (once: a validator may raise one object each time)
            if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
                exc.add_note(note)
            raise
        with self._lock:
            old = self._values[setting.name]
            self._values[setting.name] = new
        return old, new

    @overload
    def reset(self, name: Setting[T]) -> tuple[T, T]: ...
    @overload
    def reset(self, name: str) -> tuple[Any, Any]: ...
    def reset(self, name: str | Setting[Any]) -> tuple[Any, Any]:
        """Put a setting, by name or by its ``Setting``, back to its declared default; return ``(old, new)``."""
        setting = self._require(name)
        return self.set(setting.name, setting.default)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every setting with its value, default, type and help text."""
        values = dict(self._values)
        return {
            name: {
                "value": values[name],
                "default": s.default,
                "type": _type_name(s.type),
                "doc": s.doc,
            }
            for name, s in self._declared.items()
        }

    def _require(self, key: str | Setting[Any]) -> Setting[Any]:
        """The declared setting ``key`` names (or is, or equals): KeyError that says which there are."""
        if not isinstance(key, str):
            return self._declared[self._declared_by(key)]
        try:
            return self._declared[key]
        except KeyError:
            raise KeyError(f"unknown setting {key!r}; settings: {self._known()}") from None

    def _known(self) -> str:
        return ", ".join(self._declared) or "none are declared"
