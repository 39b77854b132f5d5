"""bench/gpu_check.py: the parts a GPU run depends on and a CPU can check (step records, JUnit counts,
targets, the generated-code hash, which carried wheels count)."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


def test_steps_junit_and_summary_round_trip(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (work / "steps.tsv").write_text("tests\tok\t0\t12.5\t150\tpytest\nindex\ttimeout\t124\t180\t180\tbench\n")
    (work / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>'
    )
    index = {"config": {"n": 10_000_000, "dim": 64, "k": 1000, "device": "cuda", "gpu": "H200"},
             "rows": [{"method": "topk bf16", "batch": 1, "ms_median": 0.8, "ms_min": 0.7, "qps": 1250.0,
                       "recall": 0.995},
                      {"method": "topk bf16", "batch": 32, "ms_median": 3.5, "ms_min": 3.0, "qps": 9142.0,
                       "recall": 0.995}]}  # fmt: skip
    (out / "index_bench_cuda.json").write_text(json.dumps(index))
    args = gpu_check.main(["summary", "--out", str(out), "--work", str(work), "--device", "cuda"])
    assert args == 1  # a step timed out
    result = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in result["steps"]] == ["ok", "timeout"]
    assert result["tests"]["passed"] == 1 and result["tests"]["failed_names"] == ["t::b"]
    targets = result["index"]["targets"]
    assert targets["topk_bf16_b1_ms"]["met"] is True and targets["topk_bf16_b32_ms"]["met"] is False
    assert targets["recall_bf16_vs_fp32"]["met"] is True
    assert result["e2e"] is None  # missing JSON: reported as absent, no crash
    printed = capsys.readouterr().out
    assert "topk_bf16_b32_ms: 3.5 (want <= 3.0) NO" in printed
    assert "| topk bf16 | 32 | 3.500 |" in (out / "report.md").read_text()


def test_rehearsal_sizes_do_not_claim_targets(tmp_path):
    rows = {"rows": [{"method": "topk bf16", "batch": 1, "ms_median": 50.0, "ms_min": 40.0, "qps": 20.0,
                      "recall": 0.98}]}  # fmt: skip
    targets = gpu_check.index_summary(rows, full_scale=False)["targets"]
    assert targets["topk_bf16_b1_ms"]["met"] is None
    assert targets["recall_bf16_vs_fp32"]["met"] is False  # recall does not depend on the size


def test_protos_hash_follows_the_proto_files(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "PROTOS", tmp_path)
    (tmp_path / "a.proto").write_text('syntax = "proto3";')
    first = gpu_check.protos_hash()
    assert first == gpu_check.protos_hash()
    (tmp_path / "a.proto").write_text('syntax = "proto3"; message M {}')
    assert gpu_check.protos_hash() != first


@pytest.mark.parametrize(
    ("name", "counted"),
    [
        ("grpcio-1.85.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
        ("protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl", True),
        ("grpcio_reflection-1.85.1-py3-none-any.whl", True),
        ("grpcio-1.85.1-cp313-cp313-manylinux2014_x86_64.whl", False),  # another Python
        ("grpcio-1.85.1-cp312-cp312-manylinux2014_aarch64.whl", False),  # another processor
    ],
)
def test_wheels_present_counts_what_python_312_on_x86_64_installs(tmp_path, monkeypatch, name, counted):
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path)
    (tmp_path / name).touch()
    assert bool(gpu_check.wheels_present()) is counted
