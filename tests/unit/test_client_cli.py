import json
import socket

import grpc
import pytest

from shared.client.library import RetrievedItem, RetrieveResult
from twotower_cli import cli
from twotower_cli.stack import main as stack_main


def test_parse_history():
    events = cli.parse_history(["50:favorite,click", "7@3", "9:4"])
    assert [(e.post_id, e.author_id, e.actions) for e in events] == [
        (50, 0, ("favorite", "click")),
        (7, 3, ()),
        (9, 0, (4,)),
    ]
    with pytest.raises(cli.UsageError, match="bad --history event 'x:1'"):
        cli.parse_history(["x:1"])


def test_format_result_is_a_readable_table():
    result = RetrieveResult(
        [RetrievedItem(50, 0, 0.91234, {"title": "Star Wars (1977)", "year": "1977"})], 12, "abcd1234abcd1234"
    )
    text = cli.format_result(result)
    assert "   1   0.9123        50  1977  Star Wars (1977)" in text
    assert "corpus version 12" in text and "abcd1234abcd1234" in text


def test_movielens_history_from_artifacts(tmp_path):
    record = {
        "user_id": 42,
        "user_features": [11, 22, 33],
        "history": [{"post_id": 5, "actions": ["click"], "timestamp_ms": 1000}],
    }
    (tmp_path / "histories.jsonl").write_text(json.dumps(record) + "\n")
    events, features = cli.movielens_user(tmp_path, 42)
    assert events[0].post_id == 5 and events[0].actions == ("click",) and features == [11, 22, 33]
    with pytest.raises(cli.UsageError, match="user 43 not found"):
        cli.movielens_user(tmp_path, 43)
    with pytest.raises(cli.UsageError, match="make train"):
        cli.movielens_user(tmp_path / "missing", 42)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed when the block exits: nothing listens


def test_unreachable_gateway_is_one_line(capsys):
    code = cli.main(["--gateway", _dead_address(), "--timeout", "1", "retrieve", "--user-id", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: UNAVAILABLE") and "\n" not in err


def test_bad_usage_is_one_line(capsys):
    assert cli.main(["--candidate", _dead_address(), "upsert"]) == 1
    assert capsys.readouterr().err.strip() == "error: upsert needs --post-id or --file"


def test_health_command_of_nothing_fails(capsys):
    assert cli.main(["--timeout", "0.5", "health", _dead_address()]) == 1
    assert capsys.readouterr().out.strip() == "UNREACHABLE"


def test_stack_refuses_a_taken_port(tmp_path, capsys):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "items.jsonl").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = stack_main(
            ["--artifacts", str(tmp_path), "--gateway-port", str(port), "--log-dir", str(tmp_path)]
        )
    assert code == 1
    assert f"port already in use: retrieval_gateway port {port}" in capsys.readouterr().err


def test_stack_without_artifacts_says_what_to_do(tmp_path, capsys):
    assert stack_main(["--artifacts", str(tmp_path / "none")]) == 1
    assert "run `make train` first" in capsys.readouterr().err


class _FakeClient:
    """Accepts at most `limit` items per call, like candidate_service's --max-batch-items."""

    def __init__(self, limit: int, fail_at_call: int | None = None) -> None:
        self.limit, self.fail_at_call, self.calls = limit, fail_at_call, []

    def upsert(self, items):
        if len(items) > self.limit:
            raise AssertionError(f"{len(items)} items in one call")
        if self.fail_at_call == len(self.calls):

            class Unavailable(grpc.RpcError):
                def code(self):
                    return grpc.StatusCode.UNAVAILABLE

                def details(self):
                    return "disk full"

            raise Unavailable()
        self.calls.append(len(items))

        class Reply:
            inserted, updated, version = len(items), 0, len(self.calls)

        return Reply()


def test_upsert_of_a_large_file_is_sent_in_batches_with_progress(capsys):
    items = [{"post_id": i} for i in range(1, 10_001)]
    client = _FakeClient(limit=4096)
    assert cli._upsert(client, items, 4096) == "corpus version 3: 10000 inserted, 0 updated"
    assert client.calls == [4096, 4096, 1808]
    progress = capsys.readouterr().err  # not a terminal: a line every few seconds and at the end
    assert progress.startswith("upserted: 10000/10000 (100%) in ")
    assert progress.endswith(", corpus version 3\n")
    failing = _FakeClient(limit=4096, fail_at_call=1)
    expected = r"items 4096\.\.8191 failed \(UNAVAILABLE: disk full\); 4096 of 10000"
    with pytest.raises(cli.UsageError, match=expected):
        cli._upsert(failing, items, 4096)


def test_status_fields_print_a_list_of_messages_on_one_line():
    from twotower.v1 import retrieval_gateway_pb2

    status = retrieval_gateway_pb2.GatewayStatus(ready=True, corpus_size=3)
    status.background_tasks.add(name="corpus-follower", running=True)
    status.background_tasks.add(name="readiness", failures=2, last_error="MemoryError: x")
    line = " ".join(f"{k}={v}" for k, v in cli._fields(status))
    assert line == (
        "ready=True corpus_size=3 background_tasks=[(name=corpus-follower running=True), "
        "(name=readiness failures=2 last_error=MemoryError: x)]"
    )


def test_status_fields_name_enums_and_keep_lists_on_one_line():
    from twotower.v1 import common_pb2, retrieval_gateway_pb2
    from twotower_cli.cli import _fields

    status = retrieval_gateway_pb2.GatewayStatus(ready=True, dtype=common_pb2.DTYPE_BFLOAT16, role="router")
    status.background_tasks.add(name="shard-status", running=True)
    assert dict(_fields(status)) == {
        "ready": True,
        "dtype": "DTYPE_BFLOAT16",
        "background_tasks": "[(name=shard-status running=True)]",
        "role": "router",
    }


def test_a_closed_pipe_ends_the_cli_quietly():
    """`twotower ... | head -1`: the reader is gone before the CLI prints; no traceback, exit 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read what the CLI writes
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from twotower_cli.cli import main; sys.exit(main())",
             "--timeout", "0.5", "health", _dead_address()],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60, text=True,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 0
