"""``top`` and ``shell`` in a real pseudo-terminal (pexpect): they draw, refresh, complete and quit."""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from .fleet_workers import Fleet, fleet, socket_dir

__all__ = ["fleet", "socket_dir"]  # fixtures

pytestmark = pytest.mark.timeout(40)

REPO = Path(__file__).resolve().parent.parent
# The TOTAL row of a top frame: label, requests/s, requests.
_TOTAL_ROW = re.compile(rb"TOTAL +(\S+) +(\d+)")
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")

Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``python -m unixsock_asgi ...`` in an 80x24 pty; it is closed (killed if need be) afterwards."""
    children: list[pexpect.spawn] = []

    def start(*argv: str, term: str = "xterm", no_color: bool = False) -> pexpect.spawn:
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        env.update(TERM=term, HOME=str(tmp_path), PYTHONUNBUFFERED="1")
        if no_color:
            env["NO_COLOR"] = "1"
        child = pexpect.spawn(
            sys.executable,
            ["-m", "unixsock_asgi", *argv],
            cwd=str(REPO),
            env=env,
            dimensions=(24, 80),
            timeout=10,
            # As an operator's terminal has it: a pytest started in the background by a shell
            # without job control ignores SIGINT, and its children would inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.isalive():
                child.close(force=True)


def _wait_exit(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF, timeout=10)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return int(child.exitstatus)


def _two_frames(child: pexpect.spawn) -> tuple[int, int]:
    """The request totals of two successive frames."""
    child.expect(_TOTAL_ROW)
    first = int(child.match.group(2))
    child.expect(_TOTAL_ROW)
    second = int(child.match.group(2))
    return first, second


def test_top_draws_refreshes_and_quits_on_q(spawn: Spawn, fleet: Fleet, socket_dir: Path) -> None:
    workers = fleet.start(3, requests_per_stats_call=4)
    child = spawn("top", str(socket_dir), "--interval", "0.3")
    child.expect(r"unixsock-asgi top")
    assert b"\x1b[?1049h" in child.before  # drawn in place, on the alternate screen
    child.expect(r"workers 3 live")
    for w in workers:
        child.expect(str(w.pid))
    first, second = _two_frames(child)
    assert second > first  # a new frame with new figures: it refreshed
    child.send("q")
    assert _wait_exit(child) == 0


def test_top_switches_to_the_routes_and_back_on_r(spawn: Spawn, fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(2, requests_per_stats_call=3)  # each answer counts 3 more /items/{item_id}
    child = spawn("top", str(socket_dir), "--interval", "0.3")
    child.expect(_TOTAL_ROW)
    child.send("r")
    child.expect(r"\(q quits, r workers\)")
    child.expect(r"ROUTE +REQ/S +4XX/S +5XX/S +P50 +P99 +REQS")
    # Its rate once two refreshes asked for routes: 3 requests per worker per answer.
    child.expect(rb"/items/\{item_id\} +([0-9.]+) +0\.0 +0\.0 ")
    child.expect(rb"/items/\{item_id\} +([0-9.]+) +0\.0 +0\.0 ")
    assert float(child.match.group(1)) > 0
    child.send("r")
    child.expect(r"\(q quits, r routes\)")
    child.expect(_TOTAL_ROW)
    child.send("q")
    assert _wait_exit(child) == 0


def test_top_frames_fit_80x24_and_show_rates(spawn: Spawn, fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(30, requests_per_stats_call=2)  # more workers than rows
    child = spawn("top", str(socket_dir), "--interval", "0.3", "--timeout", "2")
    child.expect(_TOTAL_ROW)
    child.expect(_TOTAL_ROW)
    frame = child.before + child.after
    rate = child.match.group(1)
    assert float(rate) > 0
    # Each frame starts at the cursor's home position; its lines end in (pty-translated) CRLF.
    lines = [_ANSI.sub(b"", line) for part in frame.split(b"\x1b[H") for line in part.split(b"\r\n")]
    assert all(len(line) < 80 for line in lines)
    assert b"more worker(s) not shown" in frame
    child.send("q")
    assert _wait_exit(child) == 0


def test_top_without_colours_on_a_dumb_terminal(spawn: Spawn, fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(2, requests_per_stats_call=1)
    child = spawn("top", str(socket_dir), "--interval", "0.3", term="dumb", no_color=True)
    first, second = _two_frames(child)
    assert second > first
    child.send("q")
    assert _wait_exit(child) == 0
    assert b"\x1b" not in child.before


def test_shell_completes_runs_and_quits(spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path) -> None:
    workers = fleet.start(2)
    history = tmp_path / "history"
    child = spawn("shell", str(socket_dir), "--history-file", str(history))
    child.expect(r"2 worker\(s\)")
    child.expect(r"> ")
    child.send("pi\t")
    child.expect("ping ")  # completed, with a space to go on typing
    child.send("\r")
    child.expect("pong")
    child.expect(r"> ")
    child.send("set_log_level le\t")
    child.expect("level=")
    child.send("DEBUG lo\t")
    child.expect("logger=")
    child.send("app\r")
    child.expect("success")
    child.expect(r"> ")
    assert all(w.levels["app"] == "DEBUG" for w in workers)
    child.send("quit\r")
    assert _wait_exit(child) == 0
    assert "set_log_level level=DEBUG logger=app" in history.read_text()


def test_shell_keeps_history_and_leaves_on_eof(
    spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    fleet.start(1)
    history = tmp_path / "history"
    history.write_text("get_log_level logger=uvicorn\n")
    child = spawn("shell", str(socket_dir), "--history-file", str(history))
    child.expect(r"> ")
    child.send("\x1b[A")  # up arrow: the previous session's command
    child.expect("get_log_level logger=uvicorn")
    child.send("\r")
    child.expect('"level": "NOTSET"')
    child.expect(r"> ")
    child.sendeof()
    assert _wait_exit(child) == 0


def test_shell_says_when_it_cannot_save_its_history(
    spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    fleet.start(1)
    nowhere = tmp_path / "no-such-dir" / "history"
    child = spawn("shell", str(socket_dir), "--history-file", str(nowhere))
    child.expect(r"> ")
    child.send("ping\r")
    child.expect("pong")
    child.expect(r"> ")
    child.sendeof()
    child.expect(f"note: history not saved to {nowhere}: No such file or directory")
    assert _wait_exit(child) == 0  # every command succeeded


def test_shell_history_in_a_device_leaves_the_device_as_it_was(
    spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    # --history-file /dev/null, to keep none: as root, the shell made /dev/null 0600 on leaving.
    fleet.start(1)
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of the test's own
        os.chmod(device, 0o666)  # whatever the umask
    except PermissionError:  # not root: /dev/null itself, which the shell cannot chmod then
        device = Path("/dev/null")
    before = os.stat(device).st_mode
    child = spawn("shell", str(socket_dir), "--history-file", str(device))
    child.expect(r"> ")
    child.send("ping\r")
    child.expect("pong")
    child.expect(r"> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert b"note:" not in child.before  # written, and nothing to say
    assert _wait_exit(child) == 0
    assert os.stat(device).st_mode == before


def test_shell_history_file_is_private_from_the_start(
    spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    fleet.start(1)
    history = tmp_path / "history"
    child = spawn("shell", str(socket_dir), "--history-file", str(history))
    child.expect(r"> ")
    child.send("ping\r")
    child.expect(r"> ")
    child.sendeof()
    assert _wait_exit(child) == 0
    assert stat.S_IMODE(history.stat().st_mode) == 0o600 and "ping" in history.read_text()
    history.chmod(0o644)  # an older file, or one another tool made
    child = spawn("shell", str(socket_dir), "--history-file", str(history))
    child.expect(r"> ")
    child.sendeof()
    assert _wait_exit(child) == 0
    assert stat.S_IMODE(history.stat().st_mode) == 0o600


def test_top_gives_the_terminal_back_when_it_is_terminated(
    spawn: Spawn, fleet: Fleet, socket_dir: Path
) -> None:
    fleet.start(1, requests_per_stats_call=1)
    child = spawn("top", str(socket_dir), "--interval", "0.3")
    child.expect(_TOTAL_ROW)
    child.kill(signal.SIGTERM)  # what ``timeout 60 unixsock-asgi top`` sends
    child.expect(pexpect.EOF, timeout=10)
    assert b"\x1b[?25h\x1b[?1049l" in child.before  # cursor shown, alternate screen left
    child.close()
    assert child.exitstatus == 128 + signal.SIGTERM


def test_top_draws_from_a_background_process_group(fleet: Fleet, socket_dir: Path, tmp_path: Path) -> None:
    # timeout(1) runs top in a process group of its own, not the terminal's foreground:
    # there, setting cbreak mode stopped top (SIGTTOU) before its first frame.
    fleet.start(1, requests_per_stats_call=1)
    top = f"{sys.executable} -m unixsock_asgi top {socket_dir} --interval 0.3"
    env = {**os.environ, "TERM": "xterm", "HOME": str(tmp_path)}
    child = pexpect.spawn(
        "bash",
        ["-c", f"timeout --preserve-status 3 {top}; echo EXIT=$?"],
        cwd=str(REPO),
        env=env,
        dimensions=(24, 80),
        timeout=10,
    )
    try:
        assert _two_frames(child)[1] > 0
        child.expect(rb"EXIT=(\d+)")
        assert int(child.match.group(1)) == 128 + signal.SIGTERM
        assert b"\x1b[?25h\x1b[?1049l" in child.before  # the terminal given back
    finally:
        child.close(force=True)


def test_ctrl_c_in_the_shell_stops_waiting_for_a_command_and_keeps_the_shell(
    spawn: Spawn, fleet: Fleet, socket_dir: Path, tmp_path: Path
) -> None:
    (worker,) = fleet.start(1)
    child = spawn("shell", str(socket_dir), "--history-file", "")
    child.expect(r"> ")
    child.send("drain timeout=30\r")  # the worker takes 30 s to answer
    child.expect("drain timeout=30")
    # Ctrl-C once the shell waits for the answer (on a busy machine, not while it still reads the line).
    deadline = time.monotonic() + 10
    while not any(cmd == "drain" for cmd, _ in worker.commands_seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.sendintr()
    child.expect("stopped waiting")
    child.expect(r"> ")
    child.send("ping\r")
    child.expect("pong")
    child.expect(r"> ")
    child.send("quit\r")
    assert _wait_exit(child) == 0


def test_ctrl_c_while_the_shell_prints_a_long_answer_keeps_the_shell(spawn: Spawn, tmp_path: Path) -> None:
    from unixsock_asgi import UnixSockServer

    # tasks limit=10000 prints megabytes: Ctrl-C stops the printing, not the shell.
    answer = "\n".join(f"line {i:06d} " + "x" * 40 for i in range(18000))
    with UnixSockServer(str(tmp_path / "app-1.sock"), lambda cmd, args: answer):
        child = spawn("shell", str(tmp_path / "app-1.sock"), "--history-file", "")
        child.expect(r"> ")
        child.send("big\r")
        child.expect("line 000100")  # then nothing more is read: the shell waits to write more
        child.sendintr()
        child.expect("the rest of the answer is not shown")
        child.expect(r"> ")
        child.send("quit\r")
        assert _wait_exit(child) == 0


def test_the_shell_says_which_workers_do_not_answer(spawn: Spawn, fleet: Fleet, socket_dir: Path) -> None:
    fleet.start(2)
    fleet.start(1, reply_delay_s=10.0)  # hung
    child = spawn("shell", str(socket_dir), "--history-file", "", "--timeout", "0.5")
    child.expect(r"3 worker\(s\), 1 not answering, at ")
    child.expect(r"> ")
    child.send("quit\r")
    assert _wait_exit(child) == 0


def test_the_shell_prompts_soon_whatever_a_hung_worker_does(
    spawn: Spawn, fleet: Fleet, socket_dir: Path
) -> None:
    fleet.start(1)
    fleet.start(1, reply_delay_s=20.0)  # stopped, say: answers nothing
    started = time.monotonic()
    child = spawn("shell", str(socket_dir), "--history-file", "")  # the default --timeout, 10 s
    child.expect(r"2 worker\(s\), 1 not answering, at ")
    assert time.monotonic() - started < 8  # the 3 s the first help is given, and start-up
    child.expect(r"> ")
    child.send("quit\r")
    assert _wait_exit(child) == 0


def test_top_quits_at_once_while_a_hung_worker_is_being_asked(
    spawn: Spawn, fleet: Fleet, socket_dir: Path
) -> None:
    fleet.start(1, reply_delay_s=20.0)  # answers nothing within --timeout
    child = spawn("top", str(socket_dir), "--interval", "0.3", "--timeout", "15")
    child.expect(r"\x1b\[\?1049h")  # on the alternate screen, asking the workers
    started = time.monotonic()
    child.send("q")
    assert _wait_exit(child) == 0
    assert time.monotonic() - started < 5  # not after the 15 s the sample could take
