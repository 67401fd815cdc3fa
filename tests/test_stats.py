"""Statistics: exact counters and mergeable histograms with bounded relative error."""

from __future__ import annotations

import random

import pytest

from unixsock_asgi import LatencyHistogram, Stats
from unixsock_asgi._stats import RELATIVE_ERROR, UNMATCHED, merge_histograms


def _true_quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[round(q * (len(ordered) - 1))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_are_within_the_relative_error(seed: int) -> None:
    rng = random.Random(seed)
    samples = [rng.lognormvariate(-6, 1.5) for _ in range(20000)]
    hist = LatencyHistogram()
    for s in samples:
        hist.record(s)
    for q in (0.5, 0.9, 0.99):
        estimate = hist.quantile(q)
        assert estimate is not None
        true = _true_quantile(samples, q)
        assert abs(estimate - true) / true <= RELATIVE_ERROR + 1e-9, (q, estimate, true)
    assert RELATIVE_ERROR <= 0.05


def test_merging_buckets_equals_the_histogram_of_all_samples() -> None:
    rng = random.Random(7)
    workers = [[rng.expovariate(1 / (0.001 * (i + 1))) for _ in range(3000)] for i in range(4)]
    merged = merge_histograms(_hist(w).to_payload() for w in workers)
    union = _hist([s for w in workers for s in w]).to_payload()
    assert merged["buckets"] == union["buckets"]
    assert merged["count"] == 12000
    for key in ("p50_s", "p90_s", "p99_s"):
        assert merged[key] == union[key]
    # Averaging the workers' p99s would be wrong; the merge is not that.
    mean_p99 = sum(_hist(w).quantile(0.99) or 0 for w in workers) / 4
    assert merged["p99_s"] != pytest.approx(mean_p99, rel=0.05)


def _hist(samples: list[float]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for s in samples:
        hist.record(s)
    return hist


def test_from_payload_refuses_another_bucket_scheme() -> None:
    payload = _hist([0.1]).to_payload()
    payload["gamma"] = 1.5
    with pytest.raises(ValueError, match="gamma"):
        LatencyHistogram.from_payload(payload)


def test_stats_snapshot_totals_derive_from_routes() -> None:
    stats = Stats()
    stats.record("/items/{id}", "GET", 200, 0.001, False)
    stats.record("/items/{id}", "POST", 201, 0.002, False)
    stats.record("/fail", "GET", 500, 0.003, True)
    stats.record(UNMATCHED, "GET", 404, 0.0, False)  # zero duration is fine
    stats.record("/weird", "GET", 999, 0.001, False)  # out-of-range statuses count as 5xx
    for i in range(100):  # client-chosen methods cannot grow the counters
        stats.record("/weird", f"X-{i}", 200, 0.001, False)
    snap = stats.snapshot()
    assert snap["requests_total"] == 105
    assert snap["by_status"] == {"2xx": 102, "4xx": 1, "5xx": 2}
    assert snap["by_method"] == {"GET": 4, "POST": 1, "OTHER": 100}
    assert snap["exceptions_total"] == 1
    assert snap["latency"]["count"] == 105
    assert snap["routes"]["/items/{id}"]["by_method"] == {"GET": 1, "POST": 1}
    assert set(snap) >= {"pid", "uptime_s", "requests_total", "in_flight", "by_status", "routes", "latency"}
    assert "routes" not in stats.snapshot(routes=False)
    stats.reset()
    assert stats.snapshot()["requests_total"] == 0
