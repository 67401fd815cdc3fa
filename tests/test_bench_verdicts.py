"""The benchmark's verdicts: a target is met or missed only beyond the noise of the rounds."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_middleware.py"
    spec = importlib.util.spec_from_file_location("bench_middleware_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize(
    ("n", "ranks"),
    # The order statistics of the textbook 95% interval for a median.
    [(5, (1, 5)), (8, (1, 8)), (9, (2, 8)), (15, (4, 12)), (21, (6, 16)), (31, (10, 22))],
)
def test_median_interval_takes_the_textbook_order_statistics(
    bench: ModuleType, n: int, ranks: tuple[int, int]
) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    low, high, coverage = bench.median_interval(values)
    assert (low, high) == ranks
    # Exact: 1 - 2 P(Binomial(n, 1/2) < k); below 95% only where even the range is.
    k = ranks[0]
    assert coverage == pytest.approx(1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n)
    assert (coverage >= 0.95) == (n >= 6)


def test_median_interval_covers_the_median_about_95_percent_of_the_time(bench: ModuleType) -> None:
    rnd = random.Random(7)
    trials = 4000
    covered = 0
    for _ in range(trials):
        low, high, _ = bench.median_interval([rnd.gauss(0.0, 1.0) for _ in range(21)])
        covered += low <= 0.0 <= high
    assert 0.94 <= covered / trials <= 0.985


def test_a_target_inside_the_interval_is_not_decided(bench: ModuleType) -> None:
    verdict = bench.bounded_verdict
    assert verdict(2500.0, 2990.0, at_most=3000.0) == "MET"
    assert verdict(3010.0, 3500.0, at_most=3000.0) == "MISSED"
    assert verdict(2900.0, 3100.0, at_most=3000.0).startswith("NOT DECIDED")
    # A ratio that must stay above 0.97 is checked as its negation.
    assert verdict(-0.99, -0.975, at_most=-0.97) == "MET"
    assert verdict(-0.965, -0.95, at_most=-0.97) == "MISSED"
    # Two rounds' range covers the median half of the time: nothing is decided on it.
    assert verdict(2500.0, 2600.0, at_most=3000.0, coverage=0.5).startswith("NOT DECIDED (too few rounds")
    with pytest.raises(ValueError):
        bench.median_interval([])


def test_callgrind_totals_are_read_by_event_name_and_weighed_into_cycles(
    bench: ModuleType, tmp_path: Path
) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(
        "version: 1\ncreator: callgrind-3.19.0\n"
        "events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim\n"
        "fn=(1) main\n0 5 1 1 0 0 0 0 0 0 0 0 0 0\n"
        "totals: 1000 300 200 10 20 30 1 2 3 400 40 50 5\n"
    )
    events = bench.callgrind_events(dump)
    assert events["Ir"] == 1000 and events["Bim"] == 5 and events["DLmw"] == 3
    per_request = {name: events[name] / 10 for name in bench._CG_EVENTS}
    # Ir + 10 x (L1 misses + mispredicts) + 100 x LL misses, per request
    assert bench.estimated_cycles(per_request) == pytest.approx((1000 + 10 * (60 + 45) + 100 * 6) / 10)


def test_a_callgrind_dump_without_totals_is_an_error(bench: ModuleType, tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("events: Ir\nfn=(1) main\n0 5\n")
    with pytest.raises(RuntimeError, match="no totals"):
        bench.callgrind_events(dump)
