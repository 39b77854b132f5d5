"""bench/spy_stack.py's reading of py-spy's raw stacks and of the e2e benchmark's output."""

from bench import spy_stack

RAW = [
    "thread (1): MainThread;<module> (retrieval_gateway/__main__.py:53);run (asyncio/runners.py:190);"
    "select (selectors.py:468) 60",
    "thread (1): MainThread;<module> (retrieval_gateway/__main__.py:53);"
    "Retrieve (retrieval_gateway/servicer.py:24);parse (shared/convert.py:40) 20",
    "thread (2): scoring_0;run (threading.py:1010);search (retrieval_gateway/index.py:211);"
    "search (retrieval_gateway/index.py:211);_product (retrieval_gateway/topk.py:210) 40",
    "",
    "not a stack line",
]


def test_aggregate_counts_threads_leaves_and_each_frame_once_per_sample():
    p = spy_stack.aggregate(RAW)
    assert p.total == 120
    assert p.threads == {"thread (1): MainThread": 80, "thread (2): scoring_0": 40}
    assert p.leaves["select (selectors.py:468)"] == 60
    assert p.inclusive["search (retrieval_gateway/index.py:211)"] == 40  # twice on a stack, once counted
    assert p.inclusive["<module> (retrieval_gateway/__main__.py:53)"] == 80


def test_summary_in_ms_per_request_with_the_project_frames_below_the_entry_points():
    text = spy_stack.summary("gateway", spy_stack.aggregate(RAW), rate=100.0, requests=10.0)
    assert "   80.000  thread (1): MainThread" in text  # 80 samples / 100 Hz / 10 requests
    ours = text.split("the project's frames")[1]
    assert "search (retrieval_gateway/index.py:211)" in ours and "parse (shared/convert.py:40)" in ours
    assert "__main__" not in ours  # an entry point holds most of its thread's samples
    assert "selectors.py" not in ours  # not the project's code


def test_level_qps_is_read_from_the_stack_line():
    log = "stack SERVING after 6.2s\n  stack     c=  1:     77.2 QPS  p50   12.66  p90   15.52 ms\n"
    assert spy_stack._level_qps(log) == 77.2
    assert spy_stack._level_qps("nothing") == 0.0
