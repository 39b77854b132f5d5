from __future__ import annotations

import json
import os

import pytest

from bench.common import RssSampler, cpu_seconds, parse_metrics, rss_bytes, write_json
from bench.e2e_bench import breakdown, targets


def test_parse_metrics_keeps_labels_and_skips_comments():
    text = (
        "# HELP x help\n# TYPE x histogram\n"
        'twotower_gateway_latency_seconds_sum{stage="total"} 1.5\n'
        "twotower_user_batch_size_count 4.0\n"
        "garbage line without value\n"
    )
    m = parse_metrics(text)
    assert m == {
        'twotower_gateway_latency_seconds_sum{stage="total"}': 1.5,
        "twotower_user_batch_size_count": 4.0,
    }


def test_rss_and_cpu_of_this_process_and_of_a_missing_one():
    assert rss_bytes(os.getpid()) > 1 << 20
    assert cpu_seconds(os.getpid()) >= 0.0
    assert rss_bytes(2**22 + 12345) is None
    assert cpu_seconds(2**22 + 12345) is None


def test_rss_summary_growth():
    s = RssSampler({"a": os.getpid()})
    s.samples = [
        {"t": 0, "phase": "warmup", "a": 50 * 2**20},
        {"t": 1, "phase": "c=1", "a": 100 * 2**20},
        {"t": 2, "phase": "c=8", "a": 110 * 2**20},
    ]
    assert s.summary()["a"] == {"first_mib": 100.0, "last_mib": 110.0, "max_mib": 110.0, "growth_pct": 10.0}


def _hist(prefix: str, total: float, count: float, labels: str = "") -> dict[str, float]:
    return {f"{prefix}_sum{labels}": total, f"{prefix}_count{labels}": count}


def test_breakdown_stages_sum_to_client_mean():
    lat = "twotower_gateway_latency_seconds"
    gw_after = {
        **_hist(lat, 0.010 * 10, 10, '{stage="total"}'),
        **_hist(lat, 0.006 * 10, 10, '{stage="user_encode"}'),
        **_hist(lat, 0.003 * 10, 10, '{stage="scoring"}'),
        **_hist("twotower_gateway_batch_compute_seconds", 0.002 * 5, 5),
        **_hist("twotower_gateway_batch_size", 10, 5),
    }
    us_after = {
        **_hist("twotower_user_compute_seconds", 0.004 * 5, 5),
        **_hist("twotower_user_queue_wait_seconds", 0.001 * 5, 5),
        **_hist("twotower_user_batch_size", 10, 5),
    }
    b = breakdown(({}, gw_after), ({}, us_after), client_mean_ms=12.0)
    assert b["gateway_batch_mean"] == pytest.approx(2.0) and b["user_batch_mean"] == pytest.approx(2.0)
    st = b["stages_ms"]
    assert st["user encode (compute)"] == pytest.approx(4.0)
    assert st["gateway->user_service gRPC"] == pytest.approx(1.0)
    assert st["scoring queue + batching wait"] == pytest.approx(1.0)
    assert st["client->gateway gRPC"] == pytest.approx(2.0)
    assert sum(st.values()) == pytest.approx(12.0)


def test_breakdown_without_samples_is_none_not_a_crash():
    b = breakdown(({}, {}), ({}, {}), client_mean_ms=5.0)
    assert b["gateway_total_ms"] is None and b["stages_ms"]["client->gateway gRPC"] is None


def _level(c: int, qps: float, p50: float, p99: float, errors: dict | None = None) -> dict:
    return {"concurrency": c, "qps": qps, "p50_ms": p50, "p99_ms": p99, "errors": errors or {}}


def test_targets_met_and_missed():
    run = {
        "levels": [_level(1, 100, 10, 12), _level(32, 350, 50, 150)],
        "baseline": [{"concurrency": 1, "p50_ms": 8.5}],
        "rss": {"gateway": {"growth_pct": 2.0}, "user_service": {"growth_pct": 30.0}},
    }
    t = targets(run)
    assert t["c1_p50_overhead_ms"]["met"] and t["c32_qps_over_c1"]["met"] and t["c32_p99_over_p50"]["met"]
    assert t["errors"]["met"] and t["rss_gateway_growth_pct"]["met"]
    assert not t["rss_user_service_growth_pct"]["met"]
    run["levels"][1] = _level(32, 250, 50, 250, {"UNAVAILABLE": 1})
    t = targets(run)
    assert not t["c32_qps_over_c1"]["met"] and not t["c32_p99_over_p50"]["met"] and not t["errors"]["met"]


def test_write_json(tmp_path):
    path = write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert json.loads(path.read_text())["a"] == 1


def test_grpc_floor_measures_each_case(tmp_path):
    from bench import grpc_floor

    out = tmp_path / "floor.json"
    assert grpc_floor.main(["--calls", "20", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"] for c in cases] == [
        "client -> echo", "client -> relay -> echo", "client -> relay (+ thread hand-off) -> echo",
    ]  # fmt: skip
    assert all(c["p50_ms"] > 0 and c["server_cpu_ms_per_call"] >= 0 for c in cases)


def test_shard_bench_stages_from_two_scrapes():
    from bench.shard_bench import stages

    lat = "twotower_gateway_latency_seconds"
    rpc = 'twotower_rpc_seconds{method="/twotower.v1.ShardScorer/ScoreShard"}'
    router_before = {f'{lat}_sum{{stage="total"}}': 1.0, f'{lat}_count{{stage="total"}}': 10.0}
    batch = "twotower_gateway_batch_compute_seconds"
    router_after = {
        f'{lat}_sum{{stage="total"}}': 1.2, f'{lat}_count{{stage="total"}}': 20.0,  # 10 calls, 20 ms
        f"{batch}_sum": 0.15, f"{batch}_count": 10.0,
        "twotower_gateway_batch_size_sum": 44.0, "twotower_gateway_batch_size_count": 10.0,
    }  # fmt: skip
    shard_after = {rpc.replace("{", "_sum{", 1): 0.08, rpc.replace("{", "_count{", 1): 10.0}
    got = stages([(router_before, router_after), ({}, shard_after)])
    assert got["total"] == 20.0 and got["batch"] == 15.0 and got["shard0_ScoreShard"] == 8.0
    assert got["queries_per_batch"] == 4.4  # a mean of queries, not scaled to ms
    assert got["user_encode"] is None  # nothing observed: no figure, not a zero
    assert stages([({}, {})])["queries_per_batch"] is None
