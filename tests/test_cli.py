"""The ``unixsock-asgi`` command line against real sockets: output, exit codes, overrides."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from prometheus_client.parser import text_string_to_metric_families

from unixsock_asgi import Stats, UnixSockServer
from unixsock_asgi._fleet import FOREIGN_STATS, load_overrides, overrides_path, persist_override
from unixsock_asgi._shell import CommandCatalog, completions
from unixsock_asgi.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    format_args,
    format_duration,
    main,
    parse_command_args,
    reply_timeout,
)

from .fleet_workers import HELP, Fleet, ScriptedWorker, fleet, make_stale_socket, socket_dir

__all__ = ["fleet", "socket_dir"]  # fixtures

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@contextlib.contextmanager
def meanwhile(delay: float, action: Callable[[], Any]) -> Iterator[None]:
    """Run ``action`` on a timer ``delay`` seconds into the block (a worker starting mid-command)."""
    timer = threading.Timer(delay, action)
    timer.start()
    try:
        yield
    finally:
        timer.join(5)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message on stderr, got {lines}"
    return lines[0]


def three_busy_workers(fleet: Fleet) -> list[ScriptedWorker]:
    workers = fleet.start(3)
    for n, w in enumerate(workers, 1):
        w.record(*[("/items/{item_id}", 200, 0.002 * n)] * (10 * n))
        w.record(("/", 500, 0.05), exception=True)
    return workers


# --------------------------------------------------------------------------- send


def test_send_stats_json_has_every_worker_and_a_total_that_adds_up(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = three_busy_workers(fleet)
    status, out, err = run(capsys, "send", str(socket_dir), "stats", "--json")
    assert status == EXIT_OK, err
    document = json.loads(out)
    results = document["results"]
    assert sorted(r["pid"] for r in results) == sorted(w.pid for w in workers)
    assert all(r["status"] == "success" and r["error"] == "" for r in results)
    assert all(set(r) == {"socket", "pid", "status", "error", "payload"} for r in results)
    assert sum(r["payload"]["requests_total"] for r in results) == 10 + 20 + 30 + 3
    total = document["total"]
    assert total["requests_total"] == 63 and total["workers"] == 3
    assert total["routes"]["/items/{item_id}"]["requests"] == 60
    assert total["routes"]["/"]["exceptions"] == 3
    assert total["by_status"] == {"2xx": 60, "5xx": 3}


def test_send_stats_prints_a_row_per_worker_and_a_total_row(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = three_busy_workers(fleet)
    status, out, _ = run(capsys, "send", str(socket_dir), "stats")
    assert status == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["WORKER", "UPTIME", "REQUESTS"]
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert {str(w.pid) for w in workers} | {"TOTAL(3)"} == set(rows)
    assert rows["TOTAL(3)"][2] == "63"
    assert rows["TOTAL(3)"][4] == "3"  # 5xx
    assert any(line.startswith("/items/{item_id}") and " 60 " in line for line in lines)


def test_send_to_one_socket_prints_the_bare_payload(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    (worker,) = fleet.start(1)
    status, out, err = run(capsys, "send", str(worker.path), "ping")
    assert (status, out, err) == (EXIT_OK, "pong\n", "")


def test_send_groups_identical_answers(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = fleet.start(3)
    status, out, _ = run(capsys, "send", str(socket_dir), "ping")
    assert status == EXIT_OK
    pids = " ".join(str(w.pid) for w in workers)
    assert out == f"[3 workers {pids}] success\npong\n"


def test_workers_are_named_by_pid_when_their_socket_name_has_none_or_is_the_pid(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # README's own path="/run/shop/{pid}.sock" made rows read "[worker 32187.sock]".
    (named,) = fleet.start(1)
    bare = ScriptedWorker(socket_dir)
    bare.path = socket_dir / "777001.sock"
    bare.server = UnixSockServer(str(bare.path), bare.handle)
    unnamed = ScriptedWorker(socket_dir)
    unnamed.path = socket_dir / "shop.sock"  # the process that listens is asked (this one, here)
    unnamed.server = UnixSockServer(str(unnamed.path), unnamed.handle)
    fleet.workers += [bare.start(), unnamed.start()]
    status, out, _ = run(capsys, "send", str(socket_dir), "ping")
    assert status == EXIT_OK
    pids = sorted([named.pid, 777001, os.getpid()])
    assert out == f"[3 workers {' '.join(map(str, pids))}] success\npong\n"


def test_send_help_lists_commands_with_their_arguments(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2)
    status, out, _ = run(capsys, "send", str(socket_dir), "help")
    assert status == EXIT_OK
    assert any(line.startswith("set_log_level level=<string> [logger=<string>]") for line in out.splitlines())


def test_arguments_reach_every_worker_typed_and_options_may_follow_them(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = fleet.start(2)
    status, out, err = run(
        capsys, "send", str(socket_dir), "set", "name=limits", "--json", "value=[1, 2]", "--timeout", "2"
    )
    assert status == EXIT_OK, err
    assert all(w.commands_seen[-1] == ("set", {"name": "limits", "value": [1, 2]}) for w in workers)
    assert [r["payload"]["new"] for r in json.loads(out)["results"]] == [[1, 2], [1, 2]]


def test_parse_command_args_uses_json_literals_else_strings() -> None:
    parsed = parse_command_args(["a=1", "b=true", "c=hello", "d=", 'e={"k": null}', "f=1.5", "g=a=b"])
    assert parsed == {"a": 1, "b": True, "c": "hello", "d": "", "e": {"k": None}, "f": 1.5, "g": "a=b"}
    assert format_args(parsed) == 'a=1 b=true c=hello d= e={"k": null} f=1.5 g=a=b'


def test_get_reports_whether_workers_agree(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, c = fleet.start(3)
    c.levels["app"] = "DEBUG"
    status, out, _ = run(capsys, "send", str(socket_dir), "get_log_level", "logger=app", "--json")
    assert status == EXIT_OK
    distinct = json.loads(out)["total"]["distinct"]
    assert sorted(len(group["pids"]) for group in distinct) == [1, 2]
    assert {"pids": [c.pid], "payload": {"logger": "app", "level": "DEBUG"}}.items() <= next(
        g for g in distinct if g["pids"] == [c.pid]
    ).items()


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv",
    [
        ["send"],
        ["send", "{dir}"],
        ["frobnicate", "{dir}"],
        ["send", "{dir}", "ping", "notkeyvalue"],
        ["send", "{dir}", "ping", "--bogus"],
        ["top", "{dir}", "--interval", "0"],
        ["overrides", "list", "{dir}"],
        ["send", "{dir}", "ping", "--timeout", "0"],
        ["send", "{dir}", "ping", "--timeout", "-1"],
        ["send", "{dir}", "ping", "--timeout", "nan"],
        ["metrics", "{dir}", "--prefix", "bad prefix"],
        ["metrics", "{dir}", "--output", "{dir}/no/such/dir/app.prom"],
        ["metrics", "{dir}", "--output", "{dir}"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], socket_dir: Path, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(1)
    status, out, err = run(capsys, *[a.replace("{dir}", str(socket_dir)) for a in argv])
    assert status == EXIT_USAGE
    line = one_line(err)
    assert line.startswith("unixsock-asgi: error:")
    assert line.count("unixsock-asgi") == 1  # the program is named once
    assert out == ""
    assert not [p.name for p in socket_dir.iterdir() if p.name.startswith(".metrics")]


def test_a_missing_command_names_only_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "send")
    assert (status, one_line(err)) == (
        EXIT_USAGE,
        "unixsock-asgi: error: send: the following arguments are required: TARGET, CMD (see --help)",
    )
    status, _, err = run(capsys, "send", "/tmp")
    assert one_line(err).endswith("the following arguments are required: CMD (see --help)")


def test_a_directory_the_operator_may_not_list_exits_2_with_one_line(socket_dir: Path, fleet: Fleet) -> None:
    fleet.start(1)
    os.chmod(socket_dir, 0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become an operator without access (root may list anything)
        status = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
            sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            status = 100
            for argv in (
                ["send", str(socket_dir), "ping"],
                ["ls", str(socket_dir)],
                ["metrics", str(socket_dir)],
            ):
                if main(argv) != EXIT_USAGE:
                    status = 101
                    break
            else:
                status = 0
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as pipe:
        err = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(
        line == f"unixsock-asgi: error: nothing to talk to: {socket_dir}: cannot list the directory: "
        "Permission denied (owner uid 0, group 0, mode 0700; this is uid 65534)"
        for line in lines
    ), lines


def test_a_missing_target_exits_2_saying_so(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "send", str(socket_dir / "nope"), "ping")
    assert status == EXIT_USAGE
    assert "nothing to talk to" in one_line(err) and "no such socket or directory" in err


def test_an_empty_directory_exits_2(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["send", str(socket_dir), "ping"],
        ["ls", str(socket_dir)],
        ["top", str(socket_dir), "--once"],
    ):
        status, _, err = run(capsys, *argv)
        assert status == EXIT_USAGE
        assert f"nothing to talk to: no worker sockets (*.sock) in {socket_dir}" in one_line(err), argv


def test_a_directory_of_stale_sockets_exits_2(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_stale_socket(socket_dir / "app-1.sock")
    make_stale_socket(socket_dir / "app-2.sock")
    status, _, err = run(capsys, "send", str(socket_dir), "ping")
    assert status == EXIT_USAGE
    assert "2 socket(s)" in one_line(err) and "no live worker" in err


def test_a_stale_socket_target_exits_2(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = make_stale_socket(socket_dir / "app-1.sock")
    status, _, err = run(capsys, "send", str(stale), "ping")
    assert status == EXIT_USAGE
    assert "nothing listens" in one_line(err)


def test_a_regular_file_target_exits_2(socket_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (socket_dir / "notes.txt").write_text("hi")
    status, _, err = run(capsys, "send", str(socket_dir / "notes.txt"), "ping")
    assert status == EXIT_USAGE
    assert "neither a socket nor a directory" in one_line(err)


def test_stale_sockets_are_skipped_with_a_note(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2)
    make_stale_socket(socket_dir / "app-3.sock")
    status, out, err = run(capsys, "send", str(socket_dir), "ping", "--json")
    assert status == EXIT_OK
    document = json.loads(out)
    assert len(document["results"]) == 2
    assert document["stale"] == [str(socket_dir / "app-3.sock")]
    assert "skipped 1 stale socket(s) (nothing listens there): app-3.sock" in one_line(err)


def test_a_failure_answer_exits_1_naming_the_workers(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2)
    status, out, err = run(capsys, "send", str(socket_dir), "set_log_level", "level=LOUD")
    assert status == EXIT_FAILED
    assert "unknown level" in out
    line = one_line(err)
    assert line.startswith("unixsock-asgi: 2 of 2 workers did not succeed:") and "failure" in line


def test_a_failure_of_the_one_socket_asked_is_said_once_on_stderr(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    (worker,) = fleet.start(1)
    status, out, err = run(capsys, "send", str(worker.path), "set_log_level", "level=LOUD")
    assert status == EXIT_FAILED and out == ""
    assert one_line(err).startswith("unixsock-asgi: failure: unknown level 'LOUD'")


def test_a_hung_worker_exits_1_within_the_timeout_and_others_are_printed(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = fleet.start(2)
    (hung,) = fleet.start(1, reply_delay_s=10.0)
    started = time.monotonic()
    status, out, err = run(capsys, "send", str(socket_dir), "ping", "--timeout", "0.5", "--json")
    assert time.monotonic() - started < 2.0
    assert status == EXIT_FAILED
    results = {r["pid"]: r for r in json.loads(out)["results"]}
    assert all(results[w.pid]["payload"] == "pong" for w in quick)
    assert results[hung.pid]["status"] == "timeout"
    assert f"app-{hung.pid}.sock: timeout" in one_line(err)


def test_a_command_with_its_own_timeout_is_waited_for_that_long_too(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (worker,) = fleet.start(1)
    status, out, err = run(capsys, "send", str(socket_dir), "drain", "timeout=1.0", "--timeout", "0.5")
    assert status == EXIT_OK, err
    assert '"drained": true' in out
    assert worker.commands_seen == [("drain", {"timeout": 1.0})]


# --------------------------------------------------------------------------- --persist and overrides


def test_persist_keeps_hand_edited_entries_that_workers_skip(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(1)
    edited = [{"cmd": "health_fail"}, {"cmd": "set", "args": "oops"}, 5]
    Path(overrides_path(str(socket_dir))).write_text(json.dumps({"version": 1, "overrides": edited}))
    status, _, err = run(capsys, "send", str(socket_dir), "set_log_level", "level=DEBUG", "--persist")
    assert status == EXIT_OK, err
    document = json.loads(Path(overrides_path(str(socket_dir))).read_text())
    assert document["overrides"] == [
        {"cmd": "health_fail", "args": {}},
        {"cmd": "set", "args": "oops"},
        5,
        {"cmd": "set_log_level", "args": {"level": "DEBUG"}},
    ]
    assert load_overrides(str(socket_dir)) == [
        {"cmd": "health_fail", "args": {}},
        {"cmd": "set_log_level", "args": {"level": "DEBUG"}},
    ]
    status, out, _ = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_OK
    assert out.splitlines()[1:] == [
        "  1. health_fail",
        '  2. (malformed, workers skip it) {"args": "oops", "cmd": "set"}',
        "  3. (malformed, workers skip it) 5",
        "  4. set_log_level level=DEBUG",
    ]


def test_persist_writes_the_overrides_file_after_every_worker_accepted(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2)
    status, _, err = run(
        capsys, "send", str(socket_dir), "set_log_level", "level=DEBUG", "logger=app", "--persist"
    )
    assert status == EXIT_OK
    assert "persisted to" in one_line(err)
    assert load_overrides(str(socket_dir)) == [
        {"cmd": "set_log_level", "args": {"level": "DEBUG", "logger": "app"}}
    ]
    assert stat.S_IMODE(os.stat(overrides_path(str(socket_dir))).st_mode) == 0o600

    status, out, _ = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_OK
    assert "1. set_log_level level=DEBUG logger=app" in out
    status, out, _ = run(capsys, "overrides", "show", str(socket_dir), "--json")
    assert json.loads(out)["overrides"] == [
        {"cmd": "set_log_level", "args": {"level": "DEBUG", "logger": "app"}}
    ]

    status, out, _ = run(capsys, "overrides", "clear", str(socket_dir))
    assert status == EXIT_OK and "cleared 1 override(s)" in out
    status, out, _ = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_OK and out.startswith("no overrides in")
    Path(overrides_path(str(socket_dir))).write_text("{corrupt")
    status, out, _ = run(capsys, "overrides", "clear", str(socket_dir))
    assert status == EXIT_OK and "cleared an unreadable overrides file in" in out
    assert not Path(overrides_path(str(socket_dir))).exists()


def test_persist_is_not_the_default(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(1)
    assert run(capsys, "send", str(socket_dir), "health_fail") == (EXIT_OK, ANY, "")
    assert not Path(overrides_path(str(socket_dir))).exists()


def test_health_ok_persisted_says_that_the_override_is_gone(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(1)
    assert run(capsys, "send", str(socket_dir), "health_fail", "--persist")[0] == EXIT_OK
    status, _, err = run(capsys, "send", str(socket_dir), "health_ok", "--persist")
    assert status == EXIT_OK
    path = overrides_path(str(socket_dir))
    assert one_line(err) == f"{path}: no health override now: workers started later start without one"
    assert load_overrides(str(socket_dir)) == []


def test_a_drain_names_the_workers_that_started_while_it_ran(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One recycled (--max-requests) during the drain: it was not drained, and it passes its
    # health check; the drain's "drained" from the others must not read as the whole fleet's.
    fleet.start(1)  # the stand-in's drain takes its timeout
    late: list[Any] = []
    with meanwhile(0.2, lambda: late.extend(fleet.start(1))):
        status, _, err = run(capsys, "send", str(socket_dir), "drain", "timeout=0.6")
    assert status == EXIT_OK
    assert one_line(err) == (
        f"note: 1 worker(s) started while it ran and were not drained: {late[0].path.name}"
        " (a worker started later comes up without a health_fail that was not sent with --persist)"
    )
    assert run(capsys, "send", str(socket_dir), "drain", "timeout=0")[2] == ""  # none came meanwhile
    # Its names are the directory's, whoever wrote there: shown as text, never as terminal controls.
    with meanwhile(0.2, lambda: make_stale_socket(socket_dir / "x\x1b]0;owned\x07-9.sock")):
        err = run(capsys, "send", str(socket_dir), "drain", "timeout=0.6")[2]
    assert "\x1b" not in err and "\x07" not in err and "owned" in err


def test_a_rejected_command_is_not_persisted(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2)
    status, _, err = run(capsys, "send", str(socket_dir), "set_log_level", "level=LOUD", "--persist")
    assert status == EXIT_FAILED
    assert not Path(overrides_path(str(socket_dir))).exists()
    assert "not persisted: 2 worker(s) refused it; workers started later will not apply it" in err


def test_a_command_no_worker_confirmed_in_time_is_not_persisted_and_says_it_may_have_run(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (slow,) = fleet.start(1, reply_delay_s=1.0)
    status, _, err = run(
        capsys, "send", str(socket_dir), "set", "name=motd", "value=later", "--persist", "--timeout", "0.3"
    )
    assert status == EXIT_FAILED
    assert not Path(overrides_path(str(socket_dir))).exists()
    assert err.splitlines()[0] == (
        "not persisted: no worker confirmed it: 1 got it without answering and may have applied it"
        " (check, then send it again with --persist)"
    )
    assert "timeout: no reply within 0.3s" in err.splitlines()[1]
    # It reached the worker, which was running it when the reply was given up on: hence "may
    # have", not "no worker applied it". (Whether it then finishes is the worker's affair: this
    # stand-in's sleep is cancelled by the hang-up on 3.10, and runs on from 3.11.)
    assert slow.commands_seen == [("set", {"name": "motd", "value": "later"})]


def test_a_command_that_reached_no_worker_is_not_said_to_have_maybe_run(
    socket_dir: Path, full_backlog: Callable[[str], socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    full_backlog(str(socket_dir / "app-7.sock"))  # a timeout too, but nothing was sent
    status, _, err = run(
        capsys, "send", str(socket_dir), "set", "name=motd", "value=later", "--persist", "--timeout", "0.5"
    )
    assert status == EXIT_FAILED
    assert err.splitlines()[0] == "not persisted: no worker applied it"
    assert "no connection within 0.5s" in err.splitlines()[1]
    assert not Path(overrides_path(str(socket_dir))).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["set_log_level", "level=DEBUG", "ttl=60"], "ttl"),
        (["stats_reset"], "cannot be persisted"),
    ],
)
def test_persist_refuses_what_cannot_be_durable_before_sending_anything(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (worker,) = fleet.start(1)
    status, _, err = run(capsys, "send", str(socket_dir), *extra, "--persist")
    assert status == EXIT_USAGE
    assert message in one_line(err)
    assert worker.commands_seen == []
    assert not Path(overrides_path(str(socket_dir))).exists()


def test_persist_with_an_overrides_file_it_cannot_read_sends_nothing(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to apply the change everywhere, then fail to persist it and print none of the answers.
    (worker,) = fleet.start(1)
    path = Path(overrides_path(str(socket_dir)))
    path.write_text('{"version": 1, "overrides": [')  # cut short
    path.chmod(0o600)
    status, out, err = run(capsys, "send", str(socket_dir), "health_fail", "--persist", "--json")
    assert status == EXIT_USAGE and out == ""
    assert "cannot read overrides" in one_line(err) and "(nothing was sent)" in one_line(err)
    assert worker.commands_seen == []
    assert path.read_text() == '{"version": 1, "overrides": ['  # left for the operator to fix


def test_persist_needs_a_directory_target(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    (worker,) = fleet.start(1)
    status, _, err = run(capsys, "send", str(worker.path), "health_fail", "--persist")
    assert status == EXIT_USAGE
    assert "socket directory" in one_line(err)
    assert worker.commands_seen == []


def test_overrides_show_of_a_corrupt_file_exits_1(
    socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path(overrides_path(str(socket_dir))).write_text("{oops")
    status, _, err = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_FAILED
    assert "fix or clear it" in one_line(err)


def test_overrides_needs_a_directory(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    (worker,) = fleet.start(1)
    status, _, err = run(capsys, "overrides", "show", str(worker.path))
    assert status == EXIT_USAGE
    assert "not a directory" in one_line(err)


def test_a_workers_command_where_a_subcommand_goes_is_pointed_to_send(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run(capsys, "set", "/run/shop", "name=greeting", "value=hi there")
    assert status == EXIT_USAGE
    assert one_line(err).endswith(
        "to run the workers' own 'set', the subcommand is send: send /run/shop set name=greeting 'value=hi there'"
    )
    status, _, err = run(capsys, "snd", "/run/shop", "ping")
    assert status == EXIT_USAGE and one_line(err).endswith("did you mean 'send'?")
    status, _, err = run(capsys, "send")  # a subcommand missing its arguments: argparse says so, alone
    assert status == EXIT_USAGE and "did you mean" not in err and "workers' own" not in err
    for argv in (["--timeout", "3", "ls", "/tmp"], ["oops", "ls", "/tmp"]):  # an option's value; a subcommand
        status, _, err = run(capsys, *argv)
        assert status == EXIT_USAGE and "workers' own" not in err, err


# --------------------------------------------------------------------------- ls


def test_ls_lists_live_workers_and_flags_stale_sockets(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = three_busy_workers(fleet)
    stale = make_stale_socket(socket_dir / "app-5.sock")
    status, out, _ = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_OK
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    for n, w in enumerate(workers, 1):
        assert rows[w.path.name].split()[1:6] == [str(w.pid), "0s", str(10 * n + 1), "0", "live"]
    assert "STALE" in rows["app-5.sock"]

    status, out, _ = run(capsys, "ls", str(socket_dir), "--json", "--remove-stale")
    assert status == EXIT_OK
    document = json.loads(out)
    assert document["stale"] == document["removed"] == [str(stale)]
    assert {w["pid"] for w in document["workers"]} == {w.pid for w in workers}
    assert not stale.exists()


def test_ls_shows_each_workers_parent_when_two_masters_share_the_directory(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # gunicorn's USR2: the new master's workers serve beside the old one's until it is told to quit.
    old, new, newer = fleet.start(3)
    status, out, _ = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_OK and "PARENT" not in out  # one master: nothing to tell apart
    old.stats_overrides = {"ppid": 4100}
    new.stats_overrides = newer.stats_overrides = {"ppid": 5200}
    make_stale_socket(socket_dir / "app-5.sock")
    status, out, _ = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_OK
    header, *lines = out.splitlines()
    assert header.split() == ["SOCKET", "PID", "PARENT", "UPTIME", "REQUESTS", "IN-FLT", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert {name: row[1:3] for name, row in rows.items() if name != "app-5.sock"} == {
        old.path.name: [str(old.pid), "4100"],
        new.path.name: [str(new.pid), "5200"],
        newer.path.name: [str(newer.pid), "5200"],
    }
    assert rows["app-5.sock"][1:7] == ["-"] * 5 + ["STALE:"]  # the columns stay in line
    status, out, _ = run(capsys, "ls", str(socket_dir), "--json")
    assert {w["pid"]: w["ppid"] for w in json.loads(out)["workers"]} == {
        old.pid: 4100,
        new.pid: 5200,
        newer.pid: 5200,
    }
    old.stats_overrides = {"ppid": True}  # not a pid: shown as unknown, not as 1
    status, out, _ = run(capsys, "ls", str(socket_dir), "--json")
    assert {w["pid"]: w["ppid"] for w in json.loads(out)["workers"]}[old.pid] is None


def test_ls_of_only_stale_sockets_exits_2_after_listing_them(
    socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_stale_socket(socket_dir / "app-8.sock")
    status, out, err = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_USAGE
    assert "app-8.sock" in out and "STALE" in out
    assert "no live worker" in one_line(err)


# --------------------------------------------------------------------------- metrics


def test_every_view_of_the_fleet_shows_what_an_operator_left_on(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A health_fail or maintenance_on forgotten after a deploy was seen only by asking 'health'.
    failing, calm, in_maintenance = fleet.start(3)
    failing.health_failing = True
    in_maintenance.maintenance = True
    flagged = f"set by an operator: health failing: {failing.pid}; maintenance: {in_maintenance.pid}"

    status, out, _ = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_OK
    states = {line.split()[1]: line.split("  ")[-1].strip() for line in out.splitlines()[1:]}
    assert states == {
        str(failing.pid): "live, health failing",
        str(calm.pid): "live",
        str(in_maintenance.pid): "live, maintenance",
    }
    status, out, _ = run(capsys, "ls", str(socket_dir), "--json")
    flags = {w["pid"]: (w["health_failing"], w["maintenance"]) for w in json.loads(out)["workers"]}
    assert flags == {failing.pid: (True, False), calm.pid: (False, False), in_maintenance.pid: (False, True)}

    status, out, _ = run(capsys, "send", str(socket_dir), "stats")
    assert status == EXIT_OK and flagged in out.splitlines()
    status, out, _ = run(capsys, "send", str(socket_dir), "stats", "--json")
    assert json.loads(out)["total"]["control"] == {"health_failing": 1, "maintenance": 1}
    status, out, _ = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1")
    assert status == EXIT_OK and out.splitlines()[2] == flagged

    status, out, _ = run(capsys, "metrics", str(socket_dir))
    samples = {
        (s.name, s.labels.get("pid")): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
        if s.name in ("asgi_worker_health_failing", "asgi_worker_maintenance")
    }
    assert samples == {
        ("asgi_worker_health_failing", str(failing.pid)): 1,
        ("asgi_worker_health_failing", str(calm.pid)): 0,
        ("asgi_worker_health_failing", str(in_maintenance.pid)): 0,
        ("asgi_worker_maintenance", str(failing.pid)): 0,
        ("asgi_worker_maintenance", str(calm.pid)): 0,
        ("asgi_worker_maintenance", str(in_maintenance.pid)): 1,
    }
    failing.health_failing = in_maintenance.maintenance = False
    status, out, _ = run(capsys, "send", str(socket_dir), "stats")
    assert "set by an operator" not in out


def test_metrics_prints_prometheus_text_and_can_write_a_file_atomically(
    fleet: Fleet, socket_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    three_busy_workers(fleet)
    status, out, _ = run(capsys, "metrics", str(socket_dir), "--prefix", "shop")
    assert status == EXIT_OK
    families = {f.name: f for f in text_string_to_metric_families(out)}
    requests = [s for s in families["shop_requests"].samples if s.labels["route"] == "/items/{item_id}"]
    two_xx = {s.labels["pid"]: s.value for s in requests if s.labels["status"] == "2xx"}
    assert len(two_xx) == 3 and sum(two_xx.values()) == 60  # a series per worker

    target = tmp_path / "app.prom"
    status, out, _ = run(capsys, "metrics", str(socket_dir), "--output", str(target))
    assert status == EXIT_OK and out == ""
    assert "asgi_workers 3" in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".metrics")) == []


def test_metrics_of_a_fleet_that_is_down_still_says_so(
    socket_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "app.prom"
    target.write_text("asgi_workers 2\n")  # what the last run saw
    make_stale_socket(socket_dir / "app-1.sock")
    status, out, err = run(capsys, "metrics", str(socket_dir), "--output", str(target))
    assert status == EXIT_USAGE and out == ""
    assert "no live worker" in one_line(err)
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(target.read_text())
        for s in f.samples
        if not s.labels
    }
    assert samples["asgi_workers"] == 0
    assert samples["asgi_stale_sockets"] == 1

    # systemd removes a stopped service's RuntimeDirectory=: the directory is gone too.
    status, _, err = run(capsys, "metrics", str(socket_dir / "gone"), "--output", str(target))
    assert status == EXIT_USAGE
    assert "no such socket or directory" in one_line(err)
    assert "asgi_workers 0" in target.read_text()


# --------------------------------------------------------------------------- top --once


def test_top_once_prints_one_frame_with_rates(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = fleet.start(2, requests_per_stats_call=5)
    status, out, _ = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.2")
    assert status == EXIT_OK
    lines = out.splitlines()
    assert "\x1b" not in out
    assert lines[0].startswith("unixsock-asgi top")
    assert lines[0].endswith(
        "every 0.2s"
    )  # one frame: no "(q quits)"; into a pipe or a file no line is cut...
    assert all(len(line) < 80 for line in lines[1:]) and len(lines) <= 24  # ...and the table fits 80
    rows = {line.split()[0]: line.split() for line in lines if line.strip()[:1].isdigit() or "TOTAL" in line}
    assert set(rows) == {str(w.pid) for w in workers} | {"TOTAL"}
    assert float(rows["TOTAL"][1]) > 0  # requests/s from the two samples
    assert rows["TOTAL"][2] == "20"  # 2 workers x 2 samples x 5 requests


def test_top_once_with_routes_prints_the_routes_over_the_fleet(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(2, requests_per_stats_call=5)
    status, out, _ = run(capsys, "top", str(socket_dir), "--once", "--routes", "--interval", "0.2")
    assert status == EXIT_OK
    lines = out.splitlines()
    assert lines[0].endswith("every 0.2s") and lines[3].split()[0] == "ROUTE"
    (row,) = [line.split() for line in lines if line.startswith("/items/{item_id}")]
    assert float(row[1]) > 0 and row[-1] == "20"  # 2 workers x 2 samples x 5 requests


def test_a_worker_that_exits_while_asked_is_named_as_such(
    exiting_server: Callable[[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = exiting_server(str(tmp_path / "app-1.sock"))
    status, out, err = run(capsys, "send", path, "restock", "--timeout", "5")
    # Not 2 (nothing to talk to, which a script may take as "try again"): it may have run.
    assert status == EXIT_FAILED and out == ""
    assert one_line(err) == (
        "unixsock-asgi: 1 worker(s) exited while asked"
        " (the command may have run there): app-1.sock; no live worker answered"
    )
    second = exiting_server(str(tmp_path / "app-2.sock"))
    result = _cli("shell", second, stdin="restock\n")
    assert result.returncode == EXIT_FAILED
    assert (
        "error: 1 worker(s) exited while asked (the command may have run there): app-2.sock" in result.stderr
    )
    # ls and top --once say the same, with the same status (they said "nothing to talk to", 2).
    for i, argv in enumerate((["ls"], ["top", "--once", "--interval", "0.1"]), 3):
        directory = tmp_path / f"d{i}"
        directory.mkdir(mode=0o700)
        exiting_server(str(directory / f"app-{i}.sock"))
        status, _, err = run(capsys, *argv[:1], str(directory), *argv[1:], "--timeout", "5")
        assert status == EXIT_FAILED, err
        assert f"1 worker(s) exited while asked (the command may have run there): app-{i}.sock" in err
    directory = tmp_path / "d5"
    directory.mkdir(mode=0o700)
    exiting_server(str(directory / "app-5.sock"))
    status, out, err = run(capsys, "metrics", str(directory), "--timeout", "5")
    assert status == EXIT_FAILED and "exited while asked" in err
    samples = {s.name: s.value for f in text_string_to_metric_families(out) for s in f.samples}
    assert (samples["asgi_workers"], samples["asgi_workers_gone"], samples["asgi_stale_sockets"]) == (0, 1, 0)
    # The socket's name is the workers' user's to choose: shown as text, never as terminal controls.
    third = exiting_server(str(tmp_path / "app\x1b]0;PWNED\x07-3.sock"))
    result = _cli("shell", third, stdin="restock\n")
    assert "app\\x1b]0;PWNED\\x07-3.sock" in result.stderr and "\x1b" not in result.stderr


def test_a_worker_with_a_full_backlog_is_a_timeout_that_says_so(
    socket_dir: Path, full_backlog: Callable[[str], socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    full_backlog(str(socket_dir / "app-7.sock"))
    status, out, err = run(capsys, "send", str(socket_dir), "ping", "--timeout", "0.5")
    why = "no connection within 0.5s: the server's backlog is full (it accepts no connections: stopped, hung or flooded)"
    assert status == EXIT_FAILED and out == f"[worker 7] timeout: {why}\n"
    assert why in one_line(err)


def test_top_once_waits_for_a_hung_worker_once(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (quick,) = fleet.start(1, requests_per_stats_call=5)
    (hung,) = fleet.start(1, reply_delay_s=10.0)
    started = time.monotonic()
    status, out, err = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1", "--timeout", "2")
    assert time.monotonic() - started < 3.5  # its two samples waited 4 s for it
    assert status == EXIT_FAILED
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert rows[str(hung.pid)][1] == "TIMEOUT" and str(quick.pid) in rows
    # 5 requests between its two answers, 2.1 s apart (the first fan-out waited for the hung
    # worker): about 2.4/s, not 5 over the 0.1 s between the two fan-outs' ends (50/s).
    assert 1.0 < float(rows[str(quick.pid)][1]) < 4.0
    assert "timeout: no reply within 2s" in one_line(err)


def test_ls_waits_3s_for_a_hung_worker_and_says_what_its_silence_means(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stats is answered from the control thread even while the app's loop is blocked: a
    # silent worker is stopped or hung (and nothing was run that could run twice).
    (quick,) = fleet.start(1)
    hung = ScriptedWorker(socket_dir, reply_delay_s=10.0)
    hung.path = socket_dir / "shop.sock"  # no pid in its name: the kernel names the listener
    hung.server = UnixSockServer(str(hung.path), hung.handle)
    fleet.workers.append(hung.start())
    started = time.monotonic()
    status, out, err = run(capsys, "ls", str(socket_dir))
    assert 2.9 < time.monotonic() - started < 6.0  # its own 3 s, not the 10 s of send
    assert status == EXIT_FAILED
    row = next(line for line in out.splitlines() if line.startswith("shop.sock"))
    assert row.split()[1] == str(os.getpid())  # silent, and still named by pid
    assert (
        "TIMEOUT: no reply within 3s: stopped, hung or starved of CPU ('stats' is answered even while" in row
    )
    assert "may still run" not in row and "may still run" not in err
    assert "live" in next(line for line in out.splitlines() if str(quick.pid) in line)
    # A command sent by name may be the app's own, of a built-in's name, on its app loop:
    # whatever it is, it may still run there.
    for argv in (["set", "name=greeting", "value=hi"], ["get", "name=greeting"]):
        status, _, err = run(capsys, "send", str(socket_dir), *argv, "--timeout", "0.5")
        assert status == EXIT_FAILED and "it may still run there" in one_line(err)


def test_top_names_a_socket_without_a_pid_in_full(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start(1)
    with socket.socket(socket.AF_UNIX) as silent:  # listens, never answers
        silent.bind(str(socket_dir / "nginx-http.sock"))
        silent.listen()
        status, out, err = run(
            capsys, "top", str(socket_dir), "--once", "--interval", "0.1", "--timeout", "0.5"
        )
    assert status == EXIT_FAILED, (out, err)
    # Named by the kernel's pid of its listener (here, this process), and by its socket.
    assert f"{os.getpid():>7} TIMEOUT  nginx-http.sock" in out


def test_top_says_on_the_row_why_a_worker_did_not_answer(
    start_server: Any, fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In the live view stderr is the screen's: the row is where an operator reads why.
    from unixsock_asgi import Response

    (quick,) = fleet.start(1)
    (hung,) = fleet.start(1, reply_delay_s=10.0)

    def refusing(cmd: str, args: dict[str, Any]) -> Any:
        return Response.failure("uid 65534 may not use this socket\x1b[2J")

    start_server(refusing, path=str(socket_dir / "app-7.sock"))
    status, out, _ = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1", "--timeout", "0.5")
    assert status == EXIT_FAILED
    rows = {
        line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines() if line.strip()[:1].isdigit()
    }
    # (named by its socket's pid)
    assert rows["7"] == ["FAILURE", "uid 65534 may not use this socket\\x1b[2J"]  # as text, never a control
    assert rows[str(hung.pid)][0] == "TIMEOUT"
    assert rows[str(hung.pid)][1].startswith("no reply within 0.5s: stopped, hung or starved of CPU ('stats'")
    assert rows[str(quick.pid)][0] == "0.0"


def test_top_keeps_a_worker_that_went_away_on_view_for_a_minute(fleet: Fleet, socket_dir: Path) -> None:
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import GONE_SHOWN_S, TopView, _sample

    exits, killed, stays = fleet.start(3, requests_per_stats_call=5)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float, timeout: float = 2.0) -> tuple[dict[str, list[str]], str]:
        outcome = asyncio.run(_sample(target, timeout=timeout))
        rows = view.update(outcome, now=now)
        lines = view.frame(outcome, rows, width=80, height=24, interval=2.0)
        table = {line.split()[0]: line.split() for line in lines if line.strip()[:1].isdigit()}
        return table, lines[1]

    table, header = refresh(100.0)
    assert set(table) == {str(exits.pid), str(killed.pid), str(stays.pid)} and header == "workers 3 live"
    exits.stop()  # exits cleanly: its socket is removed
    killed.stop()
    make_stale_socket(killed.path)  # killed: its socket is left behind
    table, header = refresh(102.0)
    assert header == "workers 1 live, 2 gone (2 just now: TOTAL undercounts), 1 stale socket(s)"
    for worker in (exits, killed):
        _, status, requests, *rest = table[str(worker.pid)]
        assert (status, requests) == ("GONE", "5")  # what it had counted when it last answered
        assert rest[:2] == ["last", "answered"] and rest[2].count(":") == 2
    assert table[str(stays.pid)][2] == "10"
    table, header = refresh(102.0 + GONE_SHOWN_S - 1)
    assert str(exits.pid) in table and table[str(exits.pid)][1] == "GONE"
    assert header == "workers 1 live, 2 gone, 1 stale socket(s)"  # their last interval is past
    table, header = refresh(102.0 + GONE_SHOWN_S)
    assert set(table) == {str(stays.pid)} and header == "workers 1 live, 1 stale socket(s)"

    # A socket whose name has no pid (path="/run/shop/{pid}.sock" has none to read either):
    # not answering is not gone, and the row keeps the pid it answered with...
    os.unlink(killed.path)
    fixed = ScriptedWorker(socket_dir)
    fixed.path = socket_dir / "fixed.sock"
    fixed.server = UnixSockServer(str(fixed.path), fixed.handle)
    fleet.workers.append(fixed.start())
    table, header = refresh(200.0)
    assert str(fixed.pid) in table and header == "workers 2 live"
    fixed.reply_delay_s = 5.0  # hung
    table, header = refresh(202.0, timeout=0.3)
    assert table[str(fixed.pid)][1] == "TIMEOUT" and header == "workers 1 live, 1 not answering"
    # ...while another process answering at the same path means this one is gone.
    fixed.stop()
    other = ScriptedWorker(socket_dir)
    other.path = fixed.path
    other.server = UnixSockServer(str(other.path), other.handle)
    fleet.workers.append(other.start())
    table, header = refresh(204.0)
    assert table[str(fixed.pid)][1] == "GONE" and table[str(other.pid)][1] != "GONE"
    assert header == "workers 2 live, 1 gone (1 just now: TOTAL undercounts)"


def test_top_says_when_the_socket_directory_itself_is_gone(socket_dir: Path) -> None:
    # The service stopped and its RuntimeDirectory removed: "0 live, 1 gone" alone did not say it.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    directory = socket_dir / "shop"
    directory.mkdir()
    worker = ScriptedWorker(directory).start()
    target = Target(str(directory), is_directory=True)
    view = TopView(str(directory))

    def header(now: float) -> str:
        outcome = asyncio.run(_sample(target, timeout=2.0))
        return view.frame(outcome, view.update(outcome, now=now), width=100, height=24, interval=2.0)[1]

    try:
        assert header(100.0) == "workers 1 live"
    finally:
        worker.stop()
    directory.rmdir()
    assert header(102.0) == (
        "workers 0 live, 1 gone (1 just now: TOTAL undercounts); the socket directory is gone"
    )
    directory.mkdir()  # back, empty: watched again
    assert header(104.0) == "workers 0 live, 1 gone"


def test_top_lists_the_latest_exits_first(fleet: Fleet, socket_dir: Path) -> None:
    # While workers recycle, the list outgrows the screen: the oldest exits are the ones to give way.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    first, second, stays = fleet.start(3)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))
    view.update(asyncio.run(_sample(target, timeout=2.0)), now=100.0)
    first.stop()
    view.update(asyncio.run(_sample(target, timeout=2.0)), now=101.0)
    second.stop()
    rows = view.update(asyncio.run(_sample(target, timeout=2.0)), now=102.0)
    assert [(r.pid, r.status) for r in rows] == [
        (stays.pid, "success"),
        (second.pid, "gone"),
        (first.pid, "gone"),
    ]


def test_top_takes_no_difference_across_a_restart_or_a_stats_reset(fleet: Fleet, socket_dir: Path) -> None:
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    (worker,) = fleet.start(1, requests_per_stats_call=5)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float) -> tuple[Any, Any]:
        (row,) = view.update(asyncio.run(_sample(target, timeout=2.0)), now=now)
        return row.requests, row.requests_per_s

    assert refresh(100.0) == (5, None)  # one sample: nothing to take a rate from
    # A process that restarted under the same pid (PID 1 in a container), and served more
    # requests since than had been counted before: not (25 - 5) / 2 s, but all 25 of them,
    # since its counters started within these 2 s.
    worker.stats = Stats()
    worker.record(*[("/", 200, 0.01)] * 20)
    assert refresh(102.0) == (25, 12.5)
    assert refresh(104.0) == (30, 2.5)
    worker.stats.reset()  # stats_reset, the same way
    worker.record(*[("/", 200, 0.01)] * 40)
    assert refresh(106.0) == (45, 22.5)
    assert refresh(108.0) == (50, 2.5)
    # Counters that started before the last refresh and were reset (or restarted) without
    # being seen at zero: how many of their requests fall in the interval is not known.
    worker.stats.reset()
    worker.stats.reset_at -= 60.0
    assert refresh(110.0) == (5, None)


def test_top_shows_5xx_per_second_over_the_interval(fleet: Fleet, socket_dir: Path) -> None:
    # An error spike shows as a rate, like REQ/S: a count since start did not tell now from then.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    erring, calm = fleet.start(2)
    erring.record(*[("/fail", 500, 0.01)] * 40)  # before top started: not in any interval
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float) -> tuple[dict[str, list[str]], list[str]]:
        outcome = asyncio.run(_sample(target, timeout=2.0))
        lines = view.frame(outcome, view.update(outcome, now=now), width=80, height=24, interval=2.0)
        rows = {line.split()[0]: line.split() for line in lines if line.strip()[:1].isdigit()}
        return rows, lines[-1].split()

    rows, total = refresh(100.0)
    assert rows[str(erring.pid)][4] == "-" and total[4] == "-"  # no interval yet
    erring.record(*[("/fail", 500, 0.01)] * 6, *[("/", 200, 0.01)] * 4)
    calm.record(*[("/", 200, 0.01)] * 10, ("/", 503, 0.01))
    rows, total = refresh(102.0)
    assert (rows[str(erring.pid)][4], rows[str(calm.pid)][4], total[4]) == ("3.0", "0.5", "3.5")
    rows, total = refresh(104.0)
    assert (rows[str(erring.pid)][4], total[4]) == ("0.0", "0.0")


def test_top_routes_view_shows_each_routes_rates_over_the_fleet_busiest_first(
    fleet: Fleet, socket_dir: Path
) -> None:
    # Which route is hot, or slow, right now: its requests/s, 5xx/s and percentiles over the
    # last interval, the workers' counts added up and their latency buckets merged.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    one, two = fleet.start(2)
    one.record(*[("/", 200, 0.001)] * 50)  # before the view: in the totals, in no rate
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float, *, routes: bool = True) -> dict[str, list[str]]:
        view.show_routes = routes
        outcome = asyncio.run(_sample(target, timeout=2.0, routes=routes))
        lines = view.frame(outcome, view.update(outcome, now=now), width=80, height=24, interval=2.0)
        assert all(len(line) < 80 for line in lines)
        if not routes:
            assert lines[3].split()[0] == "PID"
            return {}
        assert lines[0].endswith("(q quits, r workers)") and lines[3].split() == [
            "ROUTE", "REQ/S", "4XX/S", "5XX/S", "P50", "P99", "REQS"
        ]  # fmt: skip
        return {line.split()[0]: line.split()[1:] for line in lines[4:]}

    refresh(100.0, routes=False)
    assert refresh(102.0) == {"/": ["-", "-", "-", "-", "-", "50"]}  # no route figures to compare yet
    one.record(*[("/items/{item_id}", 200, 0.010)] * 6, *[("/", 200, 0.001)] * 2)
    two.record(*[("/items/{item_id}", 200, 0.010)] * 8, *[("/items/{item_id}", 404, 0.010)] * 2)
    two.record(*[("/fail", 500, 0.100)] * 4)
    rows = refresh(104.0)
    assert list(rows) == ["/items/{item_id}", "/fail", "/"]  # busiest first
    assert rows["/items/{item_id}"][:3] == ["8.0", "1.0", "0.0"] and rows["/items/{item_id}"][5] == "16"
    assert rows["/items/{item_id}"][3].endswith("ms") and rows["/items/{item_id}"][3].startswith(("9.", "10"))
    assert rows["/fail"][:3] == ["2.0", "0.0", "2.0"] and rows["/"][:3] == ["1.0", "0.0", "0.0"]
    assert rows["/"][5] == "52"
    rows = refresh(106.0)
    assert rows["/fail"][:3] == ["0.0", "0.0", "0.0"] and rows["/fail"][3] == "-"  # a quiet interval
    # A stats_reset between two refreshes: no difference taken across it.
    two.stats.reset()
    two.record(("/fail", 500, 0.1))
    rows = refresh(108.0)
    assert rows["/fail"][5] == "1"


def test_top_percentiles_stay_within_what_the_workers_saw(fleet: Fleet, socket_dir: Path) -> None:
    # A route that never answers in under 200 ms read p50 194 ms (its bucket's value); kept
    # within the workers' smallest and largest latency, it reads 200 ms wherever top shows it.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    one, two = fleet.start(2)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float, *, routes: bool) -> list[dict[str, str]]:
        view.show_routes = routes
        outcome = asyncio.run(_sample(target, timeout=2.0, routes=routes))
        lines = view.frame(outcome, view.update(outcome, now=now), width=120, height=24, interval=2.0)
        header = lines[3].split()
        return [dict(zip(header, line.split(), strict=False)) for line in lines[4:]]

    for at, routes in ((100.0, False), (110.0, True)):
        refresh(at, routes=routes)
        one.record(*[("/slow", 200, 0.2001), ("/slow", 200, 0.2004)] * 3)
        two.record(*[("/slow", 200, 0.2003)] * 4)
        rows = refresh(at + 2.0, routes=routes)
        shown = [row for row in rows if row.get("ROUTE", row.get("PID")) in ("/slow", "TOTAL", str(one.pid))]
        assert len(shown) == (1 if routes else 2)
        for row in shown:
            assert (row["P50"], row["P99"]) == ("200ms", "200ms"), rows


def test_top_routes_view_keeps_its_columns_whatever_the_routes_are_called(
    fleet: Fleet, socket_dir: Path, start_server: Any
) -> None:
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _cells, _sample

    (worker,) = fleet.start(1)
    worker.record(("/esc\x1b[31mred", 200, 0.001), ("/商品/{item_id}", 200, 0.001), ("/", 200, 0.001))
    worker.record(("/" + "商" * 60, 200, 0.001), ("/cafe\u0301" + "z" * 20, 200, 0.001))
    # A worker of an older version, say, whose stats have no routes: the view says so.
    older = Stats()
    start_server(
        lambda cmd, args: {**older.snapshot(routes=False), "pid": 41999},
        path=str(socket_dir / "app-41999.sock"),
    )
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))
    view.show_routes = True
    for now in (100.0, 102.0):
        outcome = asyncio.run(_sample(target, timeout=2.0, routes=True))
        lines = view.frame(outcome, view.update(outcome, now=now), width=60, height=24, interval=2.0)
    assert lines[1] == "workers 2 live; routes from 1 of them"
    rows = lines[4:]
    # Aligned as shown, and cut by columns: a combining accent is a character in no column.
    assert len(rows) == 5 and {_cells(row) for row in rows} == {_cells(lines[3])} == {59}
    assert any(row.startswith("/esc\\x1b[31...") for row in rows)  # shown as text, cut at 14 columns
    assert all(row.split()[-1] == "1" for row in rows) and all(_cells(row) < 60 for row in rows)
    narrow = view.frame(outcome, view.update(outcome, now=104.0), width=40, height=12, interval=2.0)
    assert all(_cells(line) <= 39 for line in narrow)  # a wide character takes two: no line wraps


def test_top_shows_4xx_per_second_where_the_terminal_has_room(fleet: Fleet, socket_dir: Path) -> None:
    # A bad deploy's broken links or a client hammering a wrong token: 4xx, not 5xx.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import WIDE_COLUMNS, TopView, _sample

    probing, calm = fleet.start(2)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float, width: int) -> list[str]:
        outcome = asyncio.run(_sample(target, timeout=2.0))
        return view.frame(outcome, view.update(outcome, now=now), width=width, height=24, interval=2.0)

    refresh(100.0, 80)
    probing.record(*[("/items/{item_id}", 404, 0.01)] * 8, *[("/login", 401, 0.01)] * 2, ("/", 500, 0.01))
    calm.record(*[("/", 200, 0.01)] * 3)
    lines = refresh(102.0, WIDE_COLUMNS + 1)
    assert lines[3].split()[4:6] == ["4XX/S", "5XX/S"]
    assert all(len(line) <= WIDE_COLUMNS for line in lines)
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert rows[str(probing.pid)][4:6] == ["5.0", "0.5"] and rows[str(calm.pid)][4:6] == ["0.0", "0.0"]
    assert rows["TOTAL"][4:6] == ["5.0", "0.5"]
    # One column less and it is the 80-column table.
    lines = refresh(104.0, WIDE_COLUMNS)
    assert "4XX/S" not in lines[3] and lines[3].split()[4] == "5XX/S"
    assert all(len(line) < 80 for line in lines[3:])  # (the title line fits the width it is given)
    assert len(lines[0]) < WIDE_COLUMNS


def test_absurd_figures_from_workers_never_crash_or_flood_the_views(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A broken or hostile worker the operator trusts: 1e308 overflowed the duration's rounding
    # (a traceback from send, top and live top), counts beyond a double's integers were summed
    # (past what JSON may print, at 4,300 digits), a huge uptime was printed whole. One
    # worker's figures must not take the fleet's view down.
    workers = fleet.start(2)
    for worker in workers:
        worker.record(("/", 200, 0.01))
        worker.stats_overrides = {
            "uptime_s": 10**300,
            "by_status": {"2xx": 10**300, "4xx": 10**300, "5xx": 2**62, "3xx": "many"},
            "process": {"loop_lag_s": 1e308, "rss_bytes": 1e308, "loop_lag_total_s": 1e308},
        }
    for argv in (
        ["send", str(socket_dir), "stats"],
        ["send", "--json", str(socket_dir), "stats"],
        ["top", str(socket_dir), "--once", "--interval", "0.1"],  # 4xx: 10**300 overflowed a float there
        ["ls", str(socket_dir)],
        ["metrics", str(socket_dir)],
    ):
        status, out, err = run(capsys, *argv)
        assert status == 0 and "Traceback" not in err, (argv, err)
        if "--json" not in argv:  # which gives each worker's payload as it came
            longest = max(map(len, out.splitlines()))
            assert longest < 200, (argv, longest)
    status, out, _ = run(capsys, "send", "--json", str(socket_dir), "stats")
    total = json.loads(out)["total"]
    assert total["by_status"] == {} and total["process"]["loop_lag_s"] is None


def test_top_takes_counts_beyond_a_float_from_a_foreign_worker_without_a_crash() -> None:
    # Another server's JSON may carry integers no double holds (ours refuses to send them):
    # 4xx of 10**400 overflowed the rate's division, a count of 2**62 made a 19-column cell.
    from unixsock_asgi._fleet import FanOutResult, WorkerResult
    from unixsock_asgi._stats import Stats
    from unixsock_asgi._top import TopView

    view = TopView("/run/shop")
    for now, four, five, requests in ((100.0, 0, 0, 0), (102.0, 10**400, 2**52, 2**52)):
        snapshot = Stats().snapshot(routes=False)
        snapshot.update(requests_total=requests, by_status={"4xx": four, "5xx": five})
        outcome = FanOutResult([WorkerResult("/run/shop/app-7.sock", 7, "success", payload=snapshot)])
        lines = view.frame(outcome, view.update(outcome, now=now), width=90, height=24, interval=2.0)
    row = lines[4].split()
    assert row[:6] == ["7", "2e+15", "4.5e+15", "0", "0.0", "2e+15"], row  # 4XX/S: no rate from it
    assert len(lines[4]) <= 90


def test_top_counts_workers_that_started_since_the_last_refresh(fleet: Fleet, socket_dir: Path) -> None:
    # gunicorn recycling: the new worker's requests belong to the interval, and to TOTAL.
    import asyncio

    from unixsock_asgi._fleet import Target
    from unixsock_asgi._top import TopView, _sample

    (old,) = fleet.start(1, requests_per_stats_call=10)
    target = Target(str(socket_dir), is_directory=True)
    view = TopView(str(socket_dir))

    def refresh(now: float) -> tuple[dict[int | None, Any], list[str]]:
        outcome = asyncio.run(_sample(target, timeout=2.0))
        rows = view.update(outcome, now=now)
        total = view.frame(outcome, rows, width=80, height=24, interval=2.0)[-1].split()
        return {r.pid: r for r in rows}, total

    refresh(100.0)
    old.stop()
    new, seen_late = fleet.start(2, requests_per_stats_call=10)
    new.record(*[("/", 200, 0.004)] * 30)
    seen_late.stats.reset_at -= 300.0  # up for five minutes, and first seen now (say, it was hung)
    rows, total = refresh(102.0)
    assert rows[old.pid].status == "gone"
    # Counted since it started, within the last interval: 40 requests over 2 s.
    assert (rows[new.pid].requests, rows[new.pid].requests_per_s) == (40, 20.0)
    assert rows[new.pid].p50_s is not None and rows[new.pid].interval_buckets
    assert (rows[seen_late.pid].requests, rows[seen_late.pid].requests_per_s) == (10, None)
    assert total[:3] == ["TOTAL", "20.0", "50"]
    rows, total = refresh(104.0)
    assert rows[new.pid].requests_per_s == rows[seen_late.pid].requests_per_s == 5.0
    assert total[:3] == ["TOTAL", "10.0", "70"]


def test_top_once_into_a_file_lists_every_worker(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = fleet.start(30)  # more than a 24-line screen holds
    status, out, _ = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1")
    assert status == EXIT_OK
    assert "not shown" not in out
    shown = {line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert shown == {str(w.pid) for w in workers}


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.00085, "850us"),
        (0.0009994, "999us"),
        (0.0009996, "1ms"),  # the unit after rounding: not 1000us...
        (0.0123, "12.3ms"),
        (0.9997, "1s"),  # ...nor 1e+03ms
        (1.25, "1.25s"),
        (999.7, "1000s"),  # nor 1e+03s
        (12345.6, "12346s"),
        (float("nan"), "-"),
        (None, "-"),
    ],
)
def test_durations_are_shown_in_the_unit_they_round_to(seconds: Any, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_help_lists_each_command_with_the_first_sentence_of_its_doc() -> None:
    from unixsock_asgi.cli import render_help

    doc = "Set ``logger``'s level (root by default). With ``ttl``\nseconds, the level comes back.\n\nMore."
    level = {"name": "level", "type": "str", "required": True}
    listed = [{"name": "set_log_level", "doc": doc, "args": [level]}, {"name": "ping", "doc": "Pong."}]
    assert render_help({"commands": listed}) == [
        "set_log_level level=<str>  Set `logger`'s level (root by default).",
        "ping                       Pong.",
    ]
    # Another program's help, in another shape: shown as far as it goes.
    odd = [{"name": "a", "args": ["n", 3]}, {"name": "b", "args": "n"}, "c"]
    assert render_help({"commands": odd}) == ["a", "b"]
    assert CommandCatalog.from_help([{"commands": odd}]).commands == {"a": [], "b": []}
    # Names that would drive the terminal as readline lists them are not offered to complete.
    nasty = [
        {"name": "zz\u009b31mb"},
        {"name": "ok", "args": [{"name": "x\x1b[2J"}, {"name": "\u202eevil"}, {"name": "fine"}]},
    ]
    assert CommandCatalog.from_help([{"commands": nasty}]).commands == {"ok": ["fine"]}
    # Where each runs, as a worker says (a version that does not say: nothing shown, as above).
    where: list[dict[str, Any]] = [
        {"name": "set_log_level", "doc": doc, "args": [level], "diagnostic": True},
        {"name": "restock", "doc": "More.", "diagnostic": False},
    ]
    assert render_help({"commands": where})[-2:] == [
        "",
        "On the app's event loop, waiting while it is blocked: restock (the others answer even then).",
    ]
    assert render_help({"commands": where[1:]})[-2:] == [
        "",
        "  Runs on the app's event loop: waits while it is blocked.",
    ]
    assert render_help({"commands": where[:1]})[-1] == (
        "  Diagnostic: answers even while the app's event loop is blocked."
    )
    odd_flags: list[Any] = [[], {}, 1, "yes"]
    for odd_flag in odd_flags:  # another program's help: not ours to read as a flag
        assert render_help({"commands": [{"name": "x", "diagnostic": odd_flag}]}) == ["x"]
    # help command=set_log_level: the one command, with its whole doc.
    assert render_help({"commands": listed[:1]}) == [
        "set_log_level level=<str>",
        "  Set `logger`'s level (root by default). With `ttl`",
        "  seconds, the level comes back.",
        "",
        "  More.",
    ]


# --------------------------------------------------------------------------- shell, not on a tty


def test_shell_completion_candidates() -> None:
    catalog = CommandCatalog.from_help([HELP])
    assert completions(catalog, "", "pi") == ["ping "]
    assert completions(catalog, "", "") == [f"{c} " for c in sorted([*catalog.commands, "quit", "exit"])]
    assert completions(catalog, "set_log_level ", "le") == ["level="]
    assert completions(catalog, "set_log_level level=DEBUG ", "") == ["logger=", "ttl="]
    assert completions(catalog, "nosuch ", "") == []


def _cli(*argv: str, stdin: str = "", timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unixsock_asgi", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def test_shell_reads_commands_from_a_pipe(fleet: Fleet, socket_dir: Path) -> None:
    workers = fleet.start(2)
    result = _cli("shell", str(socket_dir), stdin='ping\nset name=motd value="hello world"\n\nquit\nping\n')
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.count("pong") == 1  # nothing after quit
    assert all(w.settings["motd"] == "hello world" for w in workers)


def test_shell_from_a_pipe_does_not_wait_for_a_stopped_workers_help_first(
    fleet: Fleet, socket_dir: Path
) -> None:
    # The help it asked every worker for is for tab completion, which piped commands do not use.
    fleet.start(1)
    fleet.start(1, reply_delay_s=10.0)
    started = time.monotonic()
    result = _cli("shell", str(socket_dir), "--timeout", "1.5", stdin="ping\n")
    assert time.monotonic() - started < 2.9  # the ping's 1.5 s, not another 1.5 s for help before it
    assert result.returncode == EXIT_FAILED and "pong" in result.stdout


def test_shell_from_a_pipe_exits_1_when_a_command_failed(fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(1)
    result = _cli("shell", str(socket_dir), stdin="set_log_level level=LOUD\nping\n")
    assert result.returncode == EXIT_FAILED
    assert "pong" in result.stdout and "unknown level" in result.stdout


def test_shell_from_a_pipe_with_only_stale_sockets_has_nothing_to_talk_to(socket_dir: Path) -> None:
    # As send says of the same target: exit 2 at the first command, not a failure among others.
    stale = socket_dir / "app-8.sock"
    make_stale_socket(stale)
    result = _cli("shell", str(socket_dir), stdin="ping\n")
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        f"unixsock-asgi: error: nothing to talk to: 1 socket(s) in {socket_dir}, no live worker"
    ]
    assert result.stdout == ""
    result = _cli("shell", str(stale), stdin="ping\n")
    assert result.returncode == EXIT_USAGE
    assert "nothing listens on" in result.stderr and result.stdout == ""


def test_shell_on_one_socket_says_a_failure_once_on_stderr(fleet: Fleet) -> None:
    (worker,) = fleet.start(1)
    result = _cli("shell", str(worker.path), stdin="set_log_level level=LOUD\nping\n")
    assert result.returncode == EXIT_FAILED
    assert result.stdout.splitlines() == ["pong"]
    assert result.stderr.splitlines() == ["failure: unknown level 'LOUD'"]


def test_shell_and_send_help_take_a_command_name(
    start_server: Callable[..., UnixSockServer], tmp_path: Path
) -> None:
    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "help":  # like the built-in: every command, or just args["command"]
            return {"commands": [c for c in HELP["commands"] if args.get("command", c["name"]) == c["name"]]}
        return "pong"

    path = start_server(handler, path=str(tmp_path / "app-1.sock")).path
    result = _cli("shell", path, stdin="help stats\n")  # was: argument 'stats' is not key=value
    assert result.returncode == EXIT_OK, result.stderr
    stats_help = [
        "stats [routes=<boolean, default true>]",
        "  Request counts.",
        "",
        "  Diagnostic: answers even while the app's event loop is blocked.",
    ]
    assert result.stdout.splitlines() == stats_help
    # ... and so does send's: help NAME is help command=NAME.
    for argv in (("help", "stats"), ("help", "command=stats")):
        result = _cli("send", path, *argv)
        assert result.returncode == EXIT_OK, result.stderr
        assert result.stdout.splitlines() == stats_help
    result = _cli("send", path, "ping", "stats")  # only help takes a bare word
    assert result.returncode == EXIT_USAGE and "argument 'stats' is not key=value" in result.stderr


# --------------------------------------------------------------------------- entry points


def test_python_dash_m_and_the_console_script_agree(fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(1)
    via_module = _cli("send", str(socket_dir), "ping", "--json")
    script = Path(sys.executable).with_name("unixsock-asgi")
    via_script = subprocess.run(
        [str(script), "send", str(socket_dir), "ping", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert via_module.returncode == via_script.returncode == EXIT_OK
    payloads: list[Any] = [json.loads(r.stdout)["results"][0]["payload"] for r in (via_module, via_script)]
    assert payloads == ["pong", "pong"]


def test_unreachable_target_from_the_real_command_exits_nonzero_with_a_message(tmp_path: Path) -> None:
    result = _cli("send", str(tmp_path / "app.sock"), "stats")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert one_line(result.stderr).startswith("unixsock-asgi: error: nothing to talk to")


def test_persisted_overrides_survive_a_show_of_the_file_written_by_another_tool(socket_dir: Path) -> None:
    persist_override(str(socket_dir), "maintenance_on", {"retry_after": 30})
    result = _cli("overrides", "show", str(socket_dir))
    assert result.returncode == EXIT_OK
    assert "1. maintenance_on retry_after=30" in result.stdout


def test_help_shows_defaults_and_the_go_style_handler() -> None:
    from unixsock_asgi.cli import render_help

    payload = {
        "commands": [
            {
                "name": "drain",
                "doc": "Wait.",
                "args": [
                    {"name": "timeout", "type": "number", "required": False, "default": 30},
                    {"name": "logger", "type": "string", "required": False, "default": ""},
                ],
            }
        ],
        "handler": {"name": "legacy", "doc": "Answers echo. And more."},
    }
    assert render_help(payload) == [
        "drain [timeout=<number, default 30>] [logger=<string>]",
        f"{'':36}  Wait.",
        "",
        "Any other command goes to the app's handler, legacy: Answers echo.",
    ]


def test_what_workers_send_is_shown_as_text_never_as_terminal_controls(
    start_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from unixsock_asgi import Response

    nasty = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\r\x9b31m\u202eevil\x85\u2028end"

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "fail":
            return Response.failure(nasty)
        return {"text": nasty} if cmd == "obj" else nasty

    server = start_server(handler)
    for cmd in ("text", "obj", "fail"):
        status, out, err = run(capsys, "send", server.path, cmd)
        assert status == (EXIT_FAILED if cmd == "fail" else EXIT_OK)
        shown = out + err
        assert "PWNED" in shown and "\\x9b" in shown and "\\u202e" in shown, shown
        if cmd != "obj":  # (an object is shown as JSON, which escapes C0 controls its own way)
            assert "\\x1b]0;PWNED\\x07" in shown and "red\\x0d" in shown, shown
        assert not {"\x1b", "\x07", "\r", "\x9b", "\u202e", "\x85", "\u2028"} & set(shown), (cmd, shown)


def test_what_a_worker_sends_into_a_line_of_ours_cannot_start_another(
    start_server: Any, fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unixsock_asgi import Response

    forged = "bad\n[worker 1] success"
    named = {
        "commands": [{"name": "ping\n[worker 2] failure: disk full", "doc": "Pong.\nforged", "args": []}]
    }

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "help":
            return named
        return Response.failure(forged) if cmd == "fail" else "first\nsecond"

    start_server(handler, path=str(socket_dir / "app-1.sock"))
    start_server(handler, path=str(socket_dir / "app-2.sock"))
    status, out, err = run(capsys, "send", str(socket_dir), "fail")
    assert status == EXIT_FAILED
    assert out.splitlines() == ["[2 workers 1 2] failure: bad\\n[worker 1] success"]
    assert one_line(err).endswith("app-1.sock, app-2.sock: failure: bad\\n[worker 1] success")
    status, out, _ = run(capsys, "send", str(socket_dir / "app-1.sock"), "text")
    assert out == "first\nsecond\n"  # a payload's text keeps its lines
    status, out, _ = run(capsys, "send", str(socket_dir), "help")
    assert status == EXIT_OK
    # (One command: its whole doc, indented under it.)
    assert out.splitlines()[1:] == ["ping\\n[worker 2] failure: disk full", "  Pong.", "  forged"]
    persist_override(str(socket_dir), "set", {"name": "a\n  2. maintenance_off", "value": 1})
    status, out, _ = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_OK and len(out.splitlines()) == 2 and "a\\n  2. maintenance_off" in out
    for path in socket_dir.glob("app-*.sock"):
        path.unlink()  # (their servers stop with the test)

    (worker,) = fleet.start(1)
    worker.record(("/x\n/forged\t1", 200, 0.001))
    status, out, _ = run(capsys, "send", str(socket_dir), "stats")
    assert status == EXIT_OK
    (row,) = [line for line in out.splitlines() if line.startswith("/x")]
    assert row.startswith("/x\\n/forged\\t1  ") and not any(
        line.startswith("/forged") for line in out.splitlines()
    )


def test_lone_surrogates_from_workers_are_shown_as_escapes_and_refused_as_arguments(
    start_server: Any, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A JSON reply can escape a lone surrogate (a file name's undecodable byte, say); writing one to
    # a UTF-8 terminal raised UnicodeEncodeError and the CLI died with a traceback.
    from unixsock_asgi import Response

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "fail":
            return Response.failure("bad \udcff")
        return {"name": "f\udcff"} if cmd == "obj" else "f\udcff"

    server = start_server(handler)
    for cmd, flags in (("text", ()), ("obj", ()), ("fail", ()), ("obj", ("--json",))):
        status, out, err = run(capsys, "send", server.path, cmd, *flags)
        assert status == (EXIT_FAILED if cmd == "fail" else EXIT_OK), err
        assert "\\udcff" in out + err and "\udcff" not in out + err, (cmd, out, err)
    # Typed as an argument, one is refused before anything is sent.
    status, out, err = run(capsys, "send", server.path, "set", "name=greeting", 'value="\\ud800"')
    assert status == EXIT_USAGE and out == ""
    assert "argument 'value': a string holds a lone surrogate (\\ud800)" in err
    # So is a byte of the command line that is not UTF-8 (Python reads it as a lone surrogate).
    for word in ("k=\udcff", "\udcff=1"):
        status, out, err = run(capsys, "send", server.path, "set", word)
        assert status == EXIT_USAGE and out == "" and "lone surrogate (\\udcff)" in err, err
    # In a hand-edited overrides file: shown escaped, and skipped by workers.
    Path(overrides_path(str(socket_dir))).write_text(
        '{"version": 1, "overrides": [{"cmd": "set", "args": {"name": "greeting", "value": "\\ud800"}}]}'
    )
    status, out, err = run(capsys, "overrides", "show", str(socket_dir))
    assert "(malformed, workers skip it)" in out and "\\ud800" in out, (out, err)
    assert load_overrides(str(socket_dir)) == []


def test_what_the_workers_user_leaves_in_the_directory_is_shown_as_text_never_as_terminal_controls(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nasty = "\x1b]0;PWNED\x07"
    (worker,) = fleet.start(1)
    worker.record((f"/a{nasty}\u202e\u2028", 200, 0.01))  # a route's name, as the app declared it
    make_stale_socket(socket_dir / f"app{nasty}-2.sock")  # a file name
    Path(overrides_path(str(socket_dir))).write_text(  # the overrides file (theirs to write)
        json.dumps(
            {"version": 1, "overrides": [{"cmd": f"set{nasty}", "args": {"name": nasty, "value": "v"}}]}
        )
    )
    for argv in (
        ("send", str(socket_dir), "ping"),  # the note on the stale socket
        ("overrides", "show", str(socket_dir)),
        ("metrics", str(socket_dir)),
        ("ls", str(socket_dir)),
    ):
        _, out, err = run(capsys, *argv)
        assert "PWNED" in out + err, argv  # shown, as text
        assert not {"\x1b", "\x07", "\u202e", "\u2028"} & set(out + err), (argv, out + err)


def test_persist_reaches_a_worker_that_started_while_the_command_went_out(
    fleet: Fleet, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    fleet.start(1)
    fleet.start(1, reply_delay_s=1.0)  # a slow one keeps the fan-out waiting
    late: list[ScriptedWorker] = []
    with meanwhile(0.3, lambda: late.extend(fleet.start(1))):
        status, out, err = run(capsys, "send", str(socket_dir), "health_fail", "--persist")
    assert status == EXIT_OK, err
    assert late and late[0].health_failing, "the worker that started meanwhile missed the command"
    assert out.startswith("[3 workers "), out
    assert load_overrides(str(socket_dir)) == [{"cmd": "health_fail", "args": {}}]


def test_overrides_show_says_when_workers_ignore_the_file(
    socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    persist_override(str(socket_dir), "maintenance_on", {})
    path = Path(overrides_path(str(socket_dir)))
    os.chmod(path, 0o666)  # anyone may write it: workers do not apply it
    status, out, err = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_FAILED
    assert "which workers IGNORE" in out and "  1. maintenance_on\n" in out  # listed as always
    assert "no one else may write" in err
    status, out, err = run(capsys, "overrides", "show", str(socket_dir), "--json")
    assert status == EXIT_FAILED and "no one else may write" in json.loads(out)["ignored_by_workers"]
    os.chmod(path, 0o600)
    status, out, _ = run(capsys, "overrides", "show", str(socket_dir))
    assert status == EXIT_OK and "applied in this order at startup" in out


def test_the_wait_for_a_reply_adds_the_commands_own_timeout_or_quiet() -> None:
    assert reply_timeout({}, 10.0) == 10.0
    assert reply_timeout({"timeout": 30}, 10.0) == 40.0
    assert reply_timeout({"quiet": 12}, 10.0) == 22.0  # drain quiet=12 answers after 12 s at least
    assert reply_timeout({"timeout": 5, "quiet": 12.5}, 10.0) == 22.5
    assert reply_timeout({"timeout": True, "quiet": "x"}, 10.0) == 10.0
    # drain waits up to 30 s when not told otherwise: so does the command line, beyond --timeout.
    assert reply_timeout({}, 10.0, "drain") == 40.0
    assert reply_timeout({"timeout": 2}, 10.0, "drain") == 12.0
    assert reply_timeout({"quiet": 5}, 10.0, "drain") == 40.0
    assert reply_timeout({}, 10.0, "an_apps_own") == 10.0


# --------------------------------------------------------------------------- other servers of the protocol


@pytest.fixture
def foreign_worker(socket_dir: Path) -> Iterator[Path]:
    """A server of the wire protocol that is not a unixsock-asgi worker: its ``stats`` is its own."""

    def handler(cmd: str, args: dict[str, Any]) -> Any:
        return json.dumps({"cmd": cmd, "args": args}) if cmd == "stats" else "pong"

    path = socket_dir / "svc-51000.sock"
    server = UnixSockServer(str(path), handler)
    server.start()
    try:
        yield path
    finally:
        server.stop()


def test_send_stats_to_another_kind_of_server_prints_its_answer(
    foreign_worker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "send", str(foreign_worker), "stats", "verbose=true")
    assert (status, err) == (EXIT_OK, "")
    assert out == '{"cmd": "stats", "args": {"verbose": true}}\n'  # not an empty table


def test_views_built_on_stats_name_a_server_whose_stats_is_not_ours(
    fleet: Fleet, foreign_worker: Path, socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (worker,) = fleet.start(1)
    worker.record(("/", 200, 0.01))
    expected = "svc-51000.sock: error: its answer to 'stats' is not a unixsock-asgi stats snapshot"

    status, out, err = run(capsys, "ls", str(socket_dir))
    assert status == EXIT_FAILED
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows[worker.path.name].split()[1:6] == [str(worker.pid), "0s", "1", "0", "live"]
    assert "ERROR: its answer to 'stats' is not" in rows["svc-51000.sock"]
    assert expected in one_line(err)

    status, out, err = run(capsys, "metrics", str(socket_dir))
    assert status == EXIT_FAILED and expected in one_line(err)
    samples = {
        s.name: s.value for f in text_string_to_metric_families(out) for s in f.samples if not s.labels
    }
    # Neither a worker with no requests nor silently left out of both counts.
    assert (samples["asgi_workers"], samples["asgi_workers_unreachable"]) == (1, 1)
    up = {
        (s.labels["pid"], s.labels["socket"]): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
        if s.name == "asgi_worker_up"
    }  # which one, not just how many
    assert up == {(str(worker.pid), worker.path.name): 1, ("51000", "svc-51000.sock"): 0}

    status, out, err = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1")
    assert status == EXIT_FAILED and expected in one_line(err)
    assert "  51000   ERROR  its answer to 'stats' is not a unixsock-asgi stats snapshot" in out
    assert "workers 1 live, 1 not answering" in out

    status, out, err = run(capsys, "send", str(socket_dir), "stats", "--json")
    assert status == EXIT_OK, err
    document = json.loads(out)
    assert document["total"]["workers"] == 1 and document["total"]["requests_total"] == 1

    # The table counts our worker; the other server's row says so, and its answer follows.
    status, out, err = run(capsys, "send", str(socket_dir), "stats")
    assert (status, err) == (EXIT_OK, "")
    cells = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert cells["51000"] == ["51000", "OTHER"]
    assert cells["TOTAL(1)"][2] == "1"
    assert f"svc-51000.sock: {FOREIGN_STATS}; it answered:" in out
    assert out.rstrip().endswith('{"cmd": "stats", "args": {}}')


def _odd_snapshots() -> list[tuple[dict[str, Any], str]]:
    good = Stats()
    good.record("/", "GET", 200, 0.01, False)
    base = good.snapshot()
    base["pid"] = 52000
    other_version = json.loads(json.dumps(base))
    other_version["latency"]["gamma"] = 1.05  # a worker of another version, mid-upgrade
    no_count = json.loads(json.dumps(base))
    no_count["routes"]["/"]["requests"] = None
    bad_bucket = json.loads(json.dumps(base))
    bad_bucket["latency"]["buckets"] = [[1, "a"]]
    far_bucket = json.loads(json.dumps(base))
    far_bucket["latency"]["buckets"] = [[100000, 1]]  # its value overflowed a float when merged
    huge_count = json.loads(json.dumps(base))
    huge_count["routes"]["/"]["latency"]["buckets"] = [[0, 10**400]]  # a Go server's JSON may carry it
    huge_total = json.loads(json.dumps(base))
    huge_total["requests_total"] = 10**400
    return [
        (huge_count, "a latency histogram cannot be merged: bucket 0 counts 1000000000"),
        (huge_total, "its requests_total is 1000000000"),
        (far_bucket, "a latency histogram cannot be merged: bucket index 100000 is out of range"),
        (other_version, "a latency histogram cannot be merged: histogram uses gamma 1.05"),
        (no_count, "route '/': requests is None, not a count"),
        (bad_bucket, "a latency histogram cannot be merged: bucket [1, 'a'] is not a pair of integers"),
    ]


@pytest.mark.parametrize(
    ("snapshot", "problem"),
    _odd_snapshots(),
    ids=["huge-bucket", "huge-total", "index", "gamma", "count", "bucket"],
)
def test_a_stats_answer_that_cannot_be_merged_is_one_workers_error_not_a_crash(
    fleet: Fleet,
    socket_dir: Path,
    capsys: pytest.CaptureFixture[str],
    snapshot: dict[str, Any],
    problem: str,
) -> None:
    (worker,) = fleet.start(1)
    worker.record(("/", 200, 0.01), ("/", 200, 0.02))
    # Not our server, which refuses to send integers beyond a double: another one's (Go's) may.
    reply = json.dumps({"status": "success", "error": "", "payload": snapshot}).encode()
    with _answering(socket_dir / "app-52000.sock", len(reply).to_bytes(4, "big") + b":" + reply):
        expected = f"app-52000.sock: error: its stats cannot be used: {problem}"
        status, out, err = run(capsys, "send", str(socket_dir), "stats", "--json")
        assert status == EXIT_FAILED and expected in one_line(err)
        assert json.loads(out)["total"]["requests_total"] == 2  # the other worker's, counted
        status, out, err = run(capsys, "send", str(socket_dir), "stats")
        assert status == EXIT_FAILED and expected in one_line(err)
        assert "TOTAL(1)" in out and "52000" in out
        status, out, err = run(capsys, "ls", str(socket_dir))
        assert status == EXIT_FAILED and expected in one_line(err)
        status, out, err = run(capsys, "top", str(socket_dir), "--once", "--interval", "0.1")
        assert status == EXIT_FAILED and expected in one_line(err)
        target = socket_dir / "fleet.prom"
        status, _, err = run(capsys, "metrics", str(socket_dir), "--output", str(target))
        assert status == EXIT_FAILED and expected in one_line(err)
        samples = {
            s.name: s.value
            for f in text_string_to_metric_families(target.read_text())
            for s in f.samples
            if not s.labels
        }
        assert (samples["asgi_workers"], samples["asgi_workers_unreachable"]) == (1, 1)


@contextlib.contextmanager
def _answering(path: Path, frame: bytes) -> Iterator[None]:
    """A server of the wire protocol that answers every request with ``frame``, in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                header = conn.recv(5, socket.MSG_WAITALL)
                if len(header) == 5:
                    conn.recv(int.from_bytes(header[:4], "big"), socket.MSG_WAITALL)
                    conn.sendall(frame)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        listener.close()


# --------------------------------------------------------------------------- whom the CLI talks to

_NOBODY = 65534


def _listen_as_nobody(path: Path) -> tuple[int, int]:
    """Fork a listener on ``path`` running as nobody; it writes to a pipe how many bytes each
    connection sent it. Returns (pid, read end of that pipe)."""
    counts_r, counts_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: another local user's server
        try:
            os.close(counts_r)
            os.close(ready_r)
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(str(path))
                server.listen()
                os.write(ready_w, b"r")
                server.settimeout(20)
                for _ in range(10):
                    conn, _ = server.accept()
                    got = 0
                    with conn:
                        conn.settimeout(3)
                        with contextlib.suppress(OSError):
                            while chunk := conn.recv(65536):
                                got += len(chunk)
                    os.write(counts_w, f"{got}\n".encode())
        except BaseException as exc:  # said on stderr, where pytest shows it
            os.write(2, f"listener as nobody: {exc!r}\n".encode())
        finally:
            os._exit(0)
    os.close(counts_w)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert ready.read(1) == b"r"
    return pid, counts_r


def _as_nobody(work: Callable[[], str]) -> str:
    """Run ``work`` in a child that is nobody; what it returns (or the exception it raised)."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(out_r)
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            try:
                text = work()
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
            os.write(out_w, text.encode())
        finally:
            os._exit(0)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as out:
        text = out.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_directory_the_user_may_not_use_is_named_with_its_owner_and_mode() -> None:
    # The middleware said "Permission denied: '/proc/self/fd/12'", the CLI only "Permission denied".
    from unixsock_asgi._fleet import open_checked_directory, resolve_target

    base = Path(tempfile.mkdtemp(prefix="usa-perm-"))  # in /tmp, which nobody may traverse
    try:
        os.chmod(base, 0o755)
        private = base / "sock"
        private.mkdir(mode=0o700)
        expected = f"Permission denied (owner uid 0, group 0, mode 0700; this is uid {_NOBODY})"
        assert _as_nobody(lambda: str(resolve_target(str(private)))) == (
            f"TargetError: {private}: cannot list the directory: {expected}"
        )
        assert _as_nobody(lambda: str(open_checked_directory(str(private)))) == (
            f"PermissionError: [Errno 13] {expected}: '{private}'"
        )
    finally:
        shutil.rmtree(base)


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _bytes_sent_to_nobody(
    capsys: pytest.CaptureFixture[str], listen_at: Path, target: Path
) -> tuple[int, str, int]:
    """Run ``send TARGET set ...`` against a listener of nobody's; (status, stderr, bytes it received)."""
    pid, counts = _listen_as_nobody(listen_at)
    try:
        status, out, err = run(
            capsys, "send", str(target), "set", "name=token", "value=s3cr3t", "--timeout", "1"
        )
        assert out == ""  # one socket asked: its failure is said on stderr
        with os.fdopen(counts, "rb") as sent:
            return status, one_line(err), int(sent.readline())
    finally:
        _stop(pid)
        listen_at.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="a server of another user needs root")
def test_the_cli_sends_nothing_to_another_users_socket_it_could_have_squatted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = Path(tempfile.mkdtemp(prefix="usa-squat-", dir="/tmp"))  # in /tmp: anyone could have made it
    base = Path(tempfile.mkdtemp(prefix="usa-run-", dir="/tmp"))  # root's, like /run
    link = Path(tempfile.mkdtemp(prefix="usa-link-", dir="/tmp")) / "app"
    private, home = base / "app", base / "home"
    try:
        os.chmod(base, 0o755)
        private.mkdir(mode=0o700)
        home.mkdir(mode=0o755)
        (home / "run").mkdir(mode=0o700)
        for directory in (shared, private, home, home / "run"):
            os.chown(directory, _NOBODY, _NOBODY)
        os.chmod(link.parent, 0o1777)  # a /tmp of its own
        link.symlink_to(private)
        os.lchown(link, _NOBODY, _NOBODY)  # nobody's link, in a directory anyone may write

        status, err, sent = _bytes_sent_to_nobody(capsys, shared / "app-1.sock", shared / "app-1.sock")
        assert status == EXIT_FAILED and sent == 0  # connected, checked, nothing sent
        assert f"not asked: uid 65534 serves this socket, and {shared} belongs to uid 65534, in /tmp," in err

        # The same through nobody's symlink to nobody's own directory in root's.
        status, err, sent = _bytes_sent_to_nobody(capsys, private / "app-1.sock", link / "app-1.sock")
        assert status == EXIT_FAILED and sent == 0
        assert f"{link} belongs to uid 65534, in {link.parent}, where any user may make names" in err

        # A '..' on the way changes nothing: nobody's link is still met.
        (private / "x").mkdir()
        status, err, sent = _bytes_sent_to_nobody(
            capsys, private / "app-1.sock", link / "x" / ".." / "app-1.sock"
        )
        assert status == EXIT_FAILED and sent == 0
        assert f"{link} belongs to uid 65534, in {link.parent}, where any user may make names" in err

        # The workers' own directory in root's, or in their user's (/run/user/N): talked to.
        for directory in (private, home / "run"):
            status, err, sent = _bytes_sent_to_nobody(
                capsys, directory / "app-1.sock", directory / "app-1.sock"
            )
            assert status == EXIT_FAILED and "timeout: no reply within 1s" in err  # it never answers
            assert sent > 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(link.parent, ignore_errors=True)
