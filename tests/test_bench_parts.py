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
