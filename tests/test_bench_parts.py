"""bench/bench_parts.py's variants do what its docstring says they do, in-process."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from starlette.testclient import TestClient

pytestmark = pytest.mark.timeout(60)

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def parts() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))  # it imports bench_middleware from its own directory
    try:
        yield importlib.import_module("bench_parts")
    finally:
        sys.path.remove(str(BENCH))
        for name in ("bench_parts", "bench_middleware"):
            sys.modules.pop(name, None)


def _get(http: TestClient, parts: ModuleType) -> list[str]:
    paths = parts.bm.request_paths(parts.N_ROUTES)
    for path in [*paths, paths[0]]:
        assert http.get(path).text == "ok"
    return list(paths)


def test_the_counters_count_by_route_with_or_without_a_control_plane(
    parts: ModuleType, short_dir: Path
) -> None:
    for variant in ("counter", "counter-in-ours"):
        app = parts.build_app(variant, str(short_dir))
        with TestClient(app) as http:
            paths = _get(http, parts)
            sockets = list(short_dir.glob("*.sock"))
            assert bool(sockets) == (variant in parts.WITH_SOCKET), variant
        counter = app.middleware_stack.app  # inside ServerErrorMiddleware
        counted = {(group[0].path_format, group[1]) for group in counter.counts.values()}
        assert counted == {
            (parts.bm.route_template(int(p.split("/")[1][3:])), 2 if p == paths[0] else 1) for p in paths
        }
        assert all(key[1:] == ("GET", 200) for key in counter.counts)


def test_ours_idle_counts_without_a_control_plane_and_ours_stopped_stops_it(
    parts: ModuleType, short_dir: Path
) -> None:
    for variant in ("ours-idle", "ours-stopped"):
        app = parts.build_app(variant, str(short_dir))
        with TestClient(app) as http:
            _get(http, parts)
            ours = app.middleware_stack.app
            assert list(short_dir.glob("*.sock")) == []
            if variant == "ours-idle":
                assert ours.control.server is None
                assert not ours.control.gate  # its lifespan began: no "no control socket" check per request
            else:
                assert ours.control.server is not None and ours.control.monitor.task.cancelled()
        assert ours.stats.snapshot()["requests_total"] == parts.N_ROUTES + 1


def test_pairs_name_two_known_variants(parts: ModuleType) -> None:
    assert parts.parse_pairs(["bare/ours", "ours/ours-idle"]) == [("bare", "ours"), ("ours", "ours-idle")]
    for wrong in ("bare/nope", "ours/ours", "ours"):
        with pytest.raises(SystemExit):
            parts.parse_pairs([wrong])
    assert parts.reading(1.001, 1.01) == "B costs less"
    assert parts.reading(0.97, 0.99) == "B costs more"
    assert parts.reading(0.99, 1.01) == "no difference shown"


class _FakeServer:
    def __init__(self, variant: str, socket_dir: Path) -> None:
        self.variant = variant
        self.socket_dir = str(socket_dir)
        self.stopped = False

    def log(self) -> str:
        return ""

    def stop(self) -> None:
        self.stopped = True


def test_a_pair_reads_b_over_a_whichever_starts_first_and_checks_the_sockets(
    parts: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No processes: what is checked is the arithmetic and the checks around the real load.
    speed = {"bare": 100.0, "ours": 96.0, "ours-idle": 97.0}
    started: list[_FakeServer] = []
    binds = set(parts.WITH_SOCKET)  # what the fake servers do, whatever the bench expects

    def start_server(variant: str, *args: object, **kwargs: object) -> _FakeServer:
        socket_dir = tmp_path / f"{variant}-{len(started)}"
        socket_dir.mkdir()
        if variant in binds:
            (socket_dir / f"{variant}.sock").touch()
        started.append(_FakeServer(variant, socket_dir))
        return started[-1]

    def load_side_by_side(loadgen: object, first: _FakeServer, second: _FakeServer, *args: object) -> float:
        return speed[second.variant] / speed[first.variant]

    monkeypatch.setattr(parts.bm, "start_server", start_server)
    monkeypatch.setattr(parts.bm, "wait_until_ready", lambda server, path: None)
    monkeypatch.setattr(parts.bm, "load_side_by_side", load_side_by_side)
    for draw in (0.1, 0.9):  # a starts first, then b does
        monkeypatch.setattr(parts.random, "random", lambda draw=draw: draw)
        for a, b in (("bare", "ours"), ("ours", "ours-idle")):
            ratio = parts.pair_ratio(a, b, ["/"], 1.0, None, tmp_path)
            assert ratio == pytest.approx(speed[b] / speed[a]), (draw, a, b)
    assert [s.variant for s in started[:2]] == ["bare", "ours"] and [s.variant for s in started[4:6]] == [
        "ours",
        "bare",
    ]
    assert all(s.stopped and not Path(s.socket_dir).exists() for s in started)

    # A variant that should have a socket and has none.
    monkeypatch.setattr(parts, "WITH_SOCKET", parts.WITH_SOCKET | {"ours-idle"})
    with pytest.raises(RuntimeError, match="ours-idle: control socket False"):
        parts.pair_ratio("ours", "ours-idle", ["/"], 1.0, None, tmp_path)
