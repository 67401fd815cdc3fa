"""The sampling profiler behind ``profile``: real threads sampled, and its answers added up."""

from __future__ import annotations

import selectors
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from unixsock_asgi._profile import FOLDED_MAX, STACKS_MAX, Profiler, is_profile, merge_profiles, summarize
from unixsock_asgi.cli import folded_lines, reply_timeout

pytestmark = pytest.mark.timeout(30)

QUALIFIED = "Thread." if sys.version_info >= (3, 11) else ""  # code objects have a co_qualname from 3.11


def _spin(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        total += sum(range(200))  # the line a sample finds it busy in, most of the time


@contextmanager
def _thread(target: Callable[[threading.Event], Any], name: str = "worker") -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def _sample(profiler: Profiler, times: int = 60) -> dict[str, Any]:
    for _ in range(times):
        profiler.sample()
        time.sleep(0.002)
    return profiler.result(limit=10)


def _waits_in_select(stop: threading.Event) -> None:
    with selectors.DefaultSelector() as selector:
        while not stop.is_set():
            selector.select(0.01)  # as asyncio's loop waits for I/O


def _waits_on_an_event(stop: threading.Event) -> None:
    stop.wait()


def test_samples_name_the_line_a_thread_is_busy_in() -> None:
    with _thread(_spin) as thread:
        result = _sample(Profiler(thread.ident))
    assert result["ticks"] == 60 and result["samples"] == 60
    assert result["idle"] <= 3  # a sample may catch it between two lines of the loop, not waiting
    top = result["top"][0]
    assert top["frame"].startswith("_spin (") and "test_profile.py:" in top["frame"], result["top"]
    assert top["samples"] >= 50
    assert sum(result["folded"].values()) == result["samples"] - result["idle"]
    (stack,) = [s for s in result["folded"] if s.endswith(top["frame"])][:1]
    assert stack.split(";")[0].startswith(f"{QUALIFIED}_bootstrap (")  # outermost first
    # Every busy sample is inside _spin, on whichever of its lines (or in Event.is_set).
    spin = next(c for c in result["cumulative"] if c["function"].startswith("_spin ("))
    assert spin["samples"] == result["samples"] - result["idle"]


def test_a_loop_waiting_in_its_selector_is_idle_but_a_loop_waiting_on_a_lock_is_not() -> None:
    with _thread(_waits_in_select) as thread:
        waiting_for_io = _sample(Profiler(thread.ident), 30)
    assert waiting_for_io["idle"] >= 25 and waiting_for_io["samples"] == 30
    with _thread(_waits_on_an_event) as thread:
        blocked = _sample(Profiler(thread.ident), 30)
    # The app loop's thread stuck on a lock is what a profile is for: busy, in the wait.
    assert blocked["idle"] == 0
    assert blocked["top"][0]["frame"].split(" (")[0] in ("Condition.wait", "Event.wait", "wait")


def test_every_thread_under_its_name_but_the_control_sockets_own_and_idle_waits_apart() -> None:
    with (
        _thread(_spin, name="busy-one") as busy,
        _thread(_spin, name="unixsock-handler-0"),
        _thread(_waits_on_an_event, name="pool-idle"),
    ):
        result = _sample(Profiler(busy.ident, all_threads=True), 40)
    assert result["threads"] == "all"
    roots = {stack.split(";")[0] for stack in result["folded"]}
    assert "thread busy-one" in roots
    assert not any("unixsock-" in root for root in roots)
    assert "thread pool-idle" not in roots  # waiting on an event: idle, for a thread other than the loop's
    assert result["idle"] >= 35  # pool-idle's samples (and the main thread's, asleep between ticks)
    assert result["top"][0]["frame"].startswith("_spin (")


def _profile(folded: dict[str, int], **counts: int) -> dict[str, Any]:
    samples = counts.get("samples", sum(folded.values()))
    return {
        "threads": "app",
        "ticks": samples,
        "samples": samples,
        "idle": 0,
        "omitted": 0,
        **counts,
        "folded": folded,
    }


LOOP = "<module> (m.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)"


def test_cumulative_leaves_out_the_loops_frames_and_lists_inner_functions_first_on_a_tie() -> None:
    folded = {
        f"{LOOP};run_asgi (h11_impl.py:400);handler (app.py:10);slow (app.py:20)": 6,
        f"{LOOP};run_asgi (h11_impl.py:400);handler (app.py:12)": 4,
        f"{LOOP};run_asgi (h11_impl.py:400);handler (app.py:10);slow (app.py:21)": 2,
    }
    result = summarize(_profile(folded), limit=10)
    assert result["top"] == [
        {"frame": "slow (app.py:20)", "samples": 6},
        {"frame": "handler (app.py:12)", "samples": 4},
        {"frame": "slow (app.py:21)", "samples": 2},
    ]
    # Functions, whatever line: handler's three lines count once per sample, and the
    # loop's frames (Handle._run and what runs it) are not listed.
    assert result["cumulative"] == [
        {"function": "handler (app.py)", "samples": 12},
        {"function": "run_asgi (h11_impl.py)", "samples": 12},
        {"function": "slow (app.py)", "samples": 8},
    ]
    assert summarize(_profile(folded), limit=1)["cumulative"] == [
        {"function": "handler (app.py)", "samples": 12}
    ]


def test_the_loops_frames_are_known_without_qualified_names_too() -> None:
    on_3_10 = "<module> (m.py:1);_run_once (asyncio/base_events.py:1896);_run (asyncio/events.py:80)"
    result = summarize(_profile({f"{on_3_10};run_asgi (h11_impl.py:400)": 3}), limit=10)
    assert result["cumulative"] == [{"function": "run_asgi (h11_impl.py)", "samples": 3}]


def test_a_recursive_function_counts_once_per_sample() -> None:
    result = summarize(_profile({"walk (t.py:3);walk (t.py:5);walk (t.py:5)": 7}), limit=5)
    assert result["cumulative"] == [{"function": "walk (t.py)", "samples": 7}]


def test_an_answer_keeps_the_most_sampled_stacks_and_counts_the_rest_as_omitted() -> None:
    folded = {f"f{i} (x.py:1)": 1 for i in range(FOLDED_MAX + 5)}
    folded["hot (x.py:2)"] = 50
    result = summarize(_profile(folded, omitted=3), limit=2)
    assert len(result["folded"]) == FOLDED_MAX and result["folded"]["hot (x.py:2)"] == 50
    assert result["omitted"] == 3 + 6  # as given, and the six least sampled stacks of one sample
    assert result["top"][0] == {"frame": "hot (x.py:2)", "samples": 50}


def test_a_profiler_keeps_a_bounded_number_of_distinct_stacks() -> None:
    profiler = Profiler(None)
    profiler.stacks.update({(i,): 1 for i in range(STACKS_MAX)})
    with _thread(_spin) as thread:
        profiler.app_thread_id = thread.ident
        profiler.sample()
        profiler.sample()
    assert len(profiler.stacks) == STACKS_MAX
    assert profiler.omitted == 2


def test_workers_profiles_add_up_and_odd_figures_are_not_counted() -> None:
    one = _profile({"a (x.py:1);b (x.py:2)": 5}, idle=10, samples=15, ticks=15)
    two = _profile({"a (x.py:1);b (x.py:2)": 3, "a (x.py:1);c (x.py:3)": 4}, idle=1, samples=8, ticks=8)
    odd = {
        "folded": {"a (x.py:1);c (x.py:3)": True, "d (x.py:4)": -2},
        "samples": "many",
        "idle": None,
        "ticks": 1.5,
    }
    assert all(map(is_profile, (one, two, odd))) and not is_profile({"samples": 1}) and not is_profile([])
    total = merge_profiles([one, two, odd], limit=5)
    assert total["workers"] == 3
    assert (total["samples"], total["idle"], total["ticks"]) == (23, 11, 23)
    assert total["folded"] == {"a (x.py:1);b (x.py:2)": 8, "a (x.py:1);c (x.py:3)": 4, "d (x.py:4)": 0}
    assert total["top"][:2] == [{"frame": "b (x.py:2)", "samples": 8}, {"frame": "c (x.py:3)", "samples": 4}]
    assert folded_lines(total) == ["a (x.py:1);b (x.py:2) 8", "a (x.py:1);c (x.py:3) 4", "d (x.py:4) 0"]


def test_the_command_line_waits_as_long_as_a_built_in_takes_by_default() -> None:
    assert reply_timeout({}, 10.0, "profile") == 15.0
    assert reply_timeout({"seconds": 30}, 10.0, "profile") == 40.0
    assert reply_timeout({}, 10.0, "drain") == 40.0  # drain's timeout is 30 s unless given
    assert reply_timeout({"timeout": 2}, 10.0, "drain") == 12.0
    assert reply_timeout({"seconds": 3}, 10.0, "an_apps_own") == 13.0
    assert reply_timeout({"seconds": True}, 10.0) == 10.0
