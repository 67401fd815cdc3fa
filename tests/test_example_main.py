"""``python -m example_app``: what it refuses before anything starts (no server is started here)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from example_app.__main__ import main

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "argument --workers: must be 1 or more, got 0"),
        (["--port", "70000"], "argument --port: must be from 1 to 65535, got 70000"),
        (["--port", "0"], "argument --port: must be from 1 to 65535, got 0"),  # the banner could not say it
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--limit-max-requests", "-3"], "argument --limit-max-requests: must be 1 or more"),
    ],
)
def test_bad_options_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unusable_socket_dir_or_a_taken_port_is_refused_before_the_banner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, message in [
            (["--socket-dir", str(afile)], f"--socket-dir {afile}: {afile} is not a directory"),
            (["--socket-dir", str(afile / "sub")], f"{afile} is not a directory"),
            (["--socket-dir", str(shared)], "other users may write it"),
            (["--socket-dir", str(tmp_path / "ctl"), "--port", port], f"port {port} on 127.0.0.1 is in use"),
        ]:
            with pytest.raises(SystemExit) as exited:
                main(argv)
            out, err = capsys.readouterr()
            assert exited.value.code == 2 and message in err, err
            assert out == ""  # no banner with commands that could not work
    assert not (tmp_path / "ctl").exists()  # left for the middleware to make (0700, parents too)


def test_live_sockets_of_another_run_are_pointed_out(tmp_path: Path) -> None:
    from example_app.__main__ import _live_sockets

    with socket.socket(socket.AF_UNIX) as other_run:
        other_run.bind(str(tmp_path / "example_app-1.sock"))
        other_run.listen()
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(tmp_path / "example_app-2.sock"))  # bound, never listening: refused
        (tmp_path / "notes.sock").write_text("")  # not a socket
        assert _live_sockets(str(tmp_path)) == ["example_app-1.sock"]
