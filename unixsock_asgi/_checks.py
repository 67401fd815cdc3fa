"""Checks of option values, shared by the server, the clients, the middleware and the fleet.

Each caller says in its own words what it expected: these only tell.
"""

from __future__ import annotations

from typing import Any


def is_seconds(value: Any) -> bool:
    """A positive number of seconds (``inf`` too), not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def whole_number(value: Any, minimum: int) -> int | None:
    """``value`` as an int when it is a whole number of at least ``minimum`` (a whole float,
    ``8.0``, read from a configuration, too); None when it is not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    return None
