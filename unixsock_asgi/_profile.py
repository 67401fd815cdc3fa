"""A sampling profiler read from the control thread (the ``profile`` command), and
the arithmetic on its answers that the command line shares with it.

A sample is one read of a thread's stack with ``sys._current_frames()``: no
tracing hook, nothing in the app's code path. Stacks are kept folded (outermost
frame first, joined by ``;``, with the number of samples that were in it), the
format flame-graph tools read, so that the answers of several workers add up
to one profile of the fleet. What a thread waits in (the app loop for I/O,
another thread on a lock or a queue) is counted apart, as ``idle``.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Profiler", "is_profile", "merge_profiles", "summarize"]

DEPTH_MAX = 128
"""Frames read from a stack, innermost first; a deeper stack is cut, its root marked ``...``."""
STACKS_MAX = 10_000
"""Distinct stacks a profile keeps; samples of further ones are counted in ``omitted``."""
FOLDED_MAX = 1_000
"""Distinct stacks in an answer, the most sampled; the rest are counted in ``omitted``."""

# The innermost Python frame of a thread that waits. The app loop's: asyncio's
# loop waiting for I/O in its selector; a loop written in C (uvloop) shows the
# frame that started it. Another thread's: a lock, an event or a queue.
_LOOP_IDLE = frozenset(
    {
        ("selectors.py", "select"),
        ("runners.py", "run"),
        ("base_events.py", "run_until_complete"),
        ("base_events.py", "run_forever"),
    }
)
_THREAD_IDLE = _LOOP_IDLE | {
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("queue.py", "get"),
    ("thread.py", "_worker"),  # concurrent.futures' idle worker, in SimpleQueue.get
}
_OWN_THREADS = "unixsock-"  # the control server's threads: never sampled


def _path_prefixes() -> list[str]:
    """Where modules are imported from, longest first: a file is shown below one of them."""
    prefixes = {
        os.path.join(os.path.abspath(entry), "") for entry in sys.path if isinstance(entry, str) and entry
    }
    return sorted(prefixes, key=len, reverse=True)


class Profiler:
    """Samples threads' stacks; :meth:`sample` once per tick, :meth:`result` at the end.

    ``app_thread_id`` is the app loop's thread. With ``all_threads`` every
    thread is sampled but the control server's and the sampling one, each
    stack under a root frame naming its thread (``thread NAME``).
    """

    def __init__(self, app_thread_id: int | None, *, all_threads: bool = False) -> None:
        self.app_thread_id = app_thread_id
        self.all_threads = all_threads
        self.ticks = 0
        self.samples = 0
        self.idle = 0
        self.omitted = 0
        self.stacks: Counter[tuple[Any, ...]] = Counter()
        self._prefixes = _path_prefixes()
        self._frames: dict[tuple[types.CodeType, int], int] = {}  # frame -> its number in _labels
        self._labels: list[str] = []
        self._idle_codes: dict[
            types.CodeType, tuple[bool, bool]
        ] = {}  # code -> (idle in the loop, in a thread)

    def sample(self) -> None:
        """Read the stacks once."""
        self.ticks += 1
        own = threading.get_ident()
        frames = sys._current_frames()
        if not self.all_threads:
            frame = frames.get(self.app_thread_id) if self.app_thread_id is not None else None
            if frame is not None and self.app_thread_id != own:
                self._add(frame, None, loop=True)
            return
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in frames.items():
            name = names.get(ident, f"{ident}")
            if ident == own or name.startswith(_OWN_THREADS):
                continue
            self._add(frame, name, loop=ident == self.app_thread_id)

    def _add(self, frame: types.FrameType, thread: str | None, *, loop: bool) -> None:
        self.samples += 1
        if self._is_idle(frame.f_code, loop):
            self.idle += 1
            return
        stack: list[Any] = []
        seen: types.FrameType | None = frame
        while seen is not None and len(stack) < DEPTH_MAX:
            key = (seen.f_code, seen.f_lineno or seen.f_code.co_firstlineno)
            number = self._frames.get(key)
            if number is None:
                number = self._frames[key] = len(self._labels)
                self._labels.append(self._label(*key))
            stack.append(number)
            seen = seen.f_back
        if seen is not None:
            stack.append("...")
        if thread is not None:
            stack.append(f"thread {thread}")
        folded = tuple(stack)
        if folded in self.stacks or len(self.stacks) < STACKS_MAX:
            self.stacks[folded] += 1
        else:
            self.omitted += 1

    def _is_idle(self, code: types.CodeType, loop: bool) -> bool:
        known = self._idle_codes.get(code)
        if known is None:
            where = (os.path.basename(code.co_filename), code.co_name)
            known = self._idle_codes[code] = (where in _LOOP_IDLE, where in _THREAD_IDLE)
        return known[0] if loop else known[1]

    def _label(self, code: types.CodeType, line: int) -> str:
        filename = code.co_filename
        for prefix in self._prefixes:
            if filename.startswith(prefix):
                filename = filename[len(prefix) :]
                break
        name = getattr(code, "co_qualname", code.co_name)  # Python 3.11+
        # ";" separates the frames of a folded stack, and a newline its lines.
        return f"{name} ({filename}:{line})".replace(";", ",").replace("\n", " ")

    def folded(self) -> dict[str, int]:
        """Every stack kept, outermost frame first, with its samples."""
        text: dict[str, int] = {}
        for stack, count in self.stacks.items():
            frames = [part if isinstance(part, str) else self._labels[part] for part in reversed(stack)]
            line = ";".join(frames)
            text[line] = text.get(line, 0) + count
        return text

    def result(self, limit: int) -> dict[str, Any]:
        """The answer: counts, the ``limit`` busiest lines and functions, the folded stacks."""
        return summarize(
            {
                "threads": "all" if self.all_threads else "app",
                "ticks": self.ticks,
                "samples": self.samples,
                "idle": self.idle,
                "omitted": self.omitted,
                "folded": self.folded(),
            },
            limit,
        )


_LOOP_CALLBACK = ("Handle._run (asyncio/events.py:", "_run (asyncio/events.py:")  # 3.10 has no co_qualname
"""The frame in which asyncio's loop runs a callback (a task's step): the frames outside it are the loop's."""


def _function(frame: str) -> str:
    """``name (file:line)`` without its line: the function, wherever in it the frame was."""
    cut = frame.rfind(":")
    return f"{frame[:cut]})" if cut > 0 and frame.endswith(")") else frame


def summarize(profile: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``profile`` with ``top``, ``cumulative`` and its folded stacks cut to :data:`FOLDED_MAX`.

    ``top``: the innermost frames (a line) that samples were in, most first;
    ``cumulative``: the functions on the stack, each counted once per sample,
    those of asyncio's loop left out (the loop's and whatever started it).
    Both count the samples of the folded stacks kept, so that a worker's add
    up over workers the same way; ``omitted`` counts the samples of the stacks
    left out (rare ones: 0 unless a profile saw thousands of distinct stacks).
    """
    folded: Mapping[str, int] = profile["folded"]
    ordered = sorted(folded.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ordered[:FOLDED_MAX])
    omitted = int(profile.get("omitted", 0)) + sum(count for _, count in ordered[FOLDED_MAX:])
    top: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    depth: dict[str, int] = {}  # how far from the root a function was seen: of equal counts, the inner first
    for stack, count in kept.items():
        frames = [frame for frame in stack.split(";") if not frame.startswith("thread ") and frame != "..."]
        if frames:
            top[frames[-1]] += count
        # What asyncio's loop runs is what matters: its own frames (and those that started
        # it) are on every such stack, and would fill the list.
        below_loop = [i for i, frame in enumerate(frames) if frame.startswith(_LOOP_CALLBACK)]
        if below_loop:
            frames = frames[below_loop[-1] + 1 :]
        for level, function in enumerate(map(_function, frames)):
            depth[function] = max(depth.get(function, 0), level)
        for function in set(map(_function, frames)):
            cumulative[function] += count
    inner_first = sorted(cumulative.items(), key=lambda kv: (-kv[1], -depth[kv[0]], kv[0]))
    return {
        **{key: value for key, value in profile.items() if key != "folded"},
        "omitted": omitted,
        "top": [
            {"frame": frame, "samples": n}
            for frame, n in sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        ],
        "cumulative": [{"function": function, "samples": n} for function, n in inner_first[:limit]],
        "folded": kept,
    }


def merge_profiles(profiles: Iterable[Mapping[str, Any]], limit: int) -> dict[str, Any]:
    """The profiles of several workers added up into one, as :func:`summarize` gives it."""
    total: dict[str, Any] = {"ticks": 0, "samples": 0, "idle": 0, "omitted": 0, "workers": 0}
    folded: Counter[str] = Counter()
    threads: set[str] = set()
    for profile in profiles:
        total["workers"] += 1
        for key in ("ticks", "samples", "idle", "omitted"):
            total[key] += _count(profile.get(key))
        threads.add(str(profile.get("threads", "app")))
        for stack, count in _mapping(profile.get("folded")).items():
            folded[str(stack)] += _count(count)
    total["threads"] = "all" if "all" in threads else "app"
    total["folded"] = dict(folded)
    return summarize(total, limit)


def is_profile(payload: Any) -> bool:
    """Whether ``payload`` is an answer of our ``profile``."""
    return (
        isinstance(payload, Mapping) and isinstance(payload.get("folded"), Mapping) and "samples" in payload
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
