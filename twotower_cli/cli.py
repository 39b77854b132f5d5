"""`twotower`: command-line client of the stack.

    twotower retrieve --user-id 42 --history 50:favorite,click 172:click -k 10 --exclude-history
    twotower retrieve --movielens-user 42 -k 10          # history taken from the MovieLens artifacts
    twotower upsert --post-id 5000 --attr title="New movie" --attr year=2026
    twotower upsert --file more_items.jsonl
    twotower delete 5000 5001
    twotower status
    twotower health 127.0.0.1:50051                      # exit 0 iff SERVING
    twotower rollout --checkpoint artifacts/new/checkpoint   # move the stack to another model

Addresses default to the stack's ports and can be set by flags or TWOTOWER_GATEWAY,
TWOTOWER_CANDIDATE, TWOTOWER_USER_SERVICE. Errors print one line (no traceback) and exit 1.
TLS: `--tls-ca CA.pem` verifies the servers; add `--tls-cert --tls-key` for mutual TLS (env
TWOTOWER_TLS_CA, TWOTOWER_TLS_CERT, TWOTOWER_TLS_KEY); the same settings apply to every address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import Message

from shared.client.library import HistoryEvent, RetrieveResult, TwoTowerClient
from shared.client.rollout import RolloutFailed, RolloutTargets, run_rollout
from shared.health import serving_status
from shared.progress import progress_bar
from shared.tls import ClientTLS, TLSConfigError, add_client_tls_flags, client_tls_from_args

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_USER_SERVICE = "127.0.0.1:50052"
DEFAULT_CANDIDATE = "127.0.0.1:50053"
DEFAULT_ARTIFACTS = "artifacts/movielens"


class UsageError(Exception):
    """Bad command-line input: printed as one line."""


def parse_history(specs: Sequence[str]) -> list[HistoryEvent]:
    """`POST[:action,action][@AUTHOR]` per event, oldest first; actions by name or id."""
    events = []
    for spec in specs:
        head, _, author = spec.partition("@")
        post, _, actions = head.partition(":")
        try:
            parsed = [int(a) if a.isdigit() else a for a in actions.split(",") if a]
            events.append(HistoryEvent(post_id=int(post), author_id=int(author or 0), actions=tuple(parsed)))
        except ValueError:
            raise UsageError(f"bad --history event {spec!r}: expected POST[:action,...][@AUTHOR]") from None
    return events


def movielens_user(artifacts: Path, user_id: int) -> tuple[list[HistoryEvent], list[int]]:
    """A MovieLens user's history (oldest first, up to their held-out test movie) and user-feature ids
    (gender, age bucket, occupation: the trained model expects them) from the training artifacts."""
    path = artifacts / "histories.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `make train` (or `make run-stack`) first")
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            if record["user_id"] == user_id:
                history = [
                    HistoryEvent(
                        post_id=e["post_id"],
                        actions=tuple(e.get("actions", ())),
                        timestamp_ms=e.get("timestamp_ms", 0),
                    )
                    for e in record["history"]
                ]
                return history, [int(v) for v in record.get("user_features", [])]
    raise UsageError(f"MovieLens user {user_id} not found in {path}")


def format_result(result: RetrieveResult) -> str:
    lines = [f"{'rank':>4}  {'score':>7}  {'post id':>8}  {'year':>4}  title"]
    for rank, item in enumerate(result.items, start=1):
        title = item.attributes.get("title", "")
        year = item.attributes.get("year", "")
        lines.append(f"{rank:>4}  {item.score:>7.4f}  {item.post_id:>8}  {year:>4}  {title}")
    lines.append(f"corpus version {result.corpus_version} · model {result.model_fingerprint}")
    return "\n".join(lines)


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description="Client of the two-tower serving stack.")
    parser.add_argument("--gateway", default=os.environ.get("TWOTOWER_GATEWAY", DEFAULT_GATEWAY))
    parser.add_argument("--candidate", default=os.environ.get("TWOTOWER_CANDIDATE", DEFAULT_CANDIDATE))
    parser.add_argument(
        "--user-service", default=os.environ.get("TWOTOWER_USER_SERVICE", DEFAULT_USER_SERVICE)
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    add_client_tls_flags(parser, "", "TWOTOWER", "the services")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("retrieve", help="top-k items for a user")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", type=int, help="user id; give the history with --history")
    who.add_argument("--movielens-user", type=int, help="a MovieLens user id: history from the artifacts")
    r.add_argument("--history", nargs="*", default=[], metavar="POST[:ACTIONS][@AUTHOR]")
    r.add_argument("--artifacts", default=os.environ.get("TWOTOWER_ARTIFACTS", DEFAULT_ARTIFACTS))
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--exclude", type=_ids, default=[], metavar="ID,ID", help="post ids never to return")
    r.add_argument("--exclude-authors", type=_ids, default=[], metavar="ID,ID")
    r.add_argument("--exclude-history", action="store_true", help="do not return posts from the history")

    u = sub.add_parser("upsert", help="add or replace items in the corpus")
    u.add_argument("--post-id", type=int)
    u.add_argument("--author-id", type=int, default=0)
    u.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE")
    u.add_argument("--file", type=Path, help="JSONL items file (one item per line), sent in batches")
    u.add_argument("--batch-size", type=int, default=4096,
                   help="items per UpsertItems call (candidate_service's --max-batch-items)")  # fmt: skip

    d = sub.add_parser("delete", help="remove items from the corpus")
    d.add_argument("post_ids", type=int, nargs="+")

    sub.add_parser("status", help="health and corpus info of all three services")

    h = sub.add_parser("health", help="exit 0 if the server at ADDRESS is SERVING (for health checks)")
    h.add_argument("address")

    ro = sub.add_parser(
        "rollout",
        help="move the running stack to another model with no failed request (rollback: the same "
        "command with the old checkpoint)",
    )
    ro.add_argument("--checkpoint", required=True, help="checkpoint directory, as the services see it")
    ro.add_argument("--user-services", nargs="+", metavar="HOST:PORT",
                    help="every user_service replica (default: --user-service)")  # fmt: skip
    ro.add_argument("--gateways", nargs="+", metavar="HOST:PORT",
                    help="every gateway that must switch (default: --gateway)")  # fmt: skip
    ro.add_argument("--encode-timeout", type=float, default=3600.0, help="seconds for the corpus encode")
    ro.add_argument("--switch-timeout", type=float, default=300.0, help="seconds for the gateways to switch")
    return parser


def _items_from_args(args: argparse.Namespace) -> list[dict]:
    if args.file:
        try:
            return [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read items from {args.file}: {exc}") from None
    if args.post_id is None:
        raise UsageError("upsert needs --post-id or --file")
    attrs = {}
    for pair in args.attr:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"bad --attr {pair!r}: expected KEY=VALUE")
        attrs[key] = value
    return [{"post_id": args.post_id, "author_id": args.author_id, "attributes": attrs}]


def run(args: argparse.Namespace) -> str:
    tls = client_tls_from_args(args)
    with TwoTowerClient(args.gateway, args.candidate, args.timeout, tls=tls) as client:
        if args.command == "retrieve":
            features: list[int] = []
            if args.movielens_user is not None:
                user_id = args.movielens_user
                history, features = movielens_user(Path(args.artifacts), user_id)
            else:
                user_id, history = args.user_id, parse_history(args.history)
            result = client.retrieve(
                user_id, history, k=args.k, exclude_post_ids=args.exclude,
                exclude_history=args.exclude_history, exclude_author_ids=args.exclude_authors,
                user_features=features,
            )  # fmt: skip
            return f"user {user_id}, {len(history)} history events\n" + format_result(result)
        if args.command == "upsert":
            return _upsert(client, _items_from_args(args), args.batch_size)
        if args.command == "delete":
            r = client.delete(args.post_ids)
            unknown = f", unknown ids: {list(r.unknown_post_ids)}" if r.unknown_post_ids else ""
            return f"corpus version {r.version}: {r.deleted} deleted{unknown}"
        return _status(client, args, tls)


def _upsert(client: TwoTowerClient, items: list[dict], batch_size: int) -> str:
    """Send the items in batches the server accepts; each batch is one acknowledged version. A failure
    stops at the first batch not acknowledged and says how far it got (rerunning is safe: upserts of
    the same items are idempotent)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    inserted = updated = done = 0
    version = 0
    # More than one batch: progress on stderr (a live bar on a terminal, a line every few seconds else).
    with progress_bar(len(items), "upserted", unit="item", disable=len(items) <= batch_size) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            try:
                r = client.upsert(batch)
            except grpc.RpcError as exc:
                bar.leave = False  # the error line says how far it got
                why = f"{exc.code().name}: {exc.details()}"
                raise UsageError(
                    f"batch of items {start}..{start + len(batch) - 1} failed ({why}); "
                    f"{done} of {len(items)} items were acknowledged before it"
                ) from None
            inserted, updated, done, version = (
                inserted + r.inserted,
                updated + r.updated,
                done + len(batch),
                r.version,
            )
            bar.set_postfix_str(f"corpus version {version}", refresh=False)
            bar.update(len(batch))
    return f"corpus version {version}: {inserted} inserted, {updated} updated"


def _status(client: TwoTowerClient, args: argparse.Namespace, tls: ClientTLS | None) -> str:
    lines = [
        f"{'service':<18} {'address':<22} health",
        f"{'retrieval_gateway':<18} {args.gateway:<22} {serving_status(args.gateway, tls=tls)}",
        f"{'user_service':<18} {args.user_service:<22} {serving_status(args.user_service, tls=tls)}",
        f"{'candidate_service':<18} {args.candidate:<22} {serving_status(args.candidate, tls=tls)}",
    ]
    for name, call in (("gateway", client.gateway_status), ("corpus", client.corpus_info)):
        try:
            info = call()
            fields = " ".join(f"{k}={v}" for k, v in _fields(info))
            lines.append(f"{name}: {fields}")
        except grpc.RpcError as exc:
            lines.append(f"{name}: unavailable ({exc.code().name})")
    return "\n".join(lines)


def _fields(message) -> list[tuple[str, object]]:
    """Set fields as (name, value); a list of messages (e.g. background tasks) on one line each."""
    return [(f.name, _enum_name(f, value)) for f, value in message.ListFields()]


def _enum_name(field, value: object) -> object:
    """An enum's name (dtype=DTYPE_BFLOAT16), not its number; anything else compacted."""
    if field.enum_type is not None and isinstance(value, int):
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    return _compact(value)


def _compact(value: object) -> object:
    if isinstance(value, Message):
        return "(" + " ".join(f"{k}={_compact(v)}" for k, v in _fields(value)) + ")"
    if isinstance(value, Sequence | RepeatedCompositeFieldContainer) and not isinstance(value, str | bytes):
        return "[" + ", ".join(str(_compact(v)) for v in value) + "]"
    return value


def _rollout(args: argparse.Namespace, tls: ClientTLS | None) -> int:
    targets = RolloutTargets(
        user_services=args.user_services or [args.user_service],
        candidate=args.candidate,
        gateways=args.gateways or [args.gateway],
    )
    try:
        fingerprint = run_rollout(
            args.checkpoint, targets, tls=tls, call_timeout_s=max(args.timeout, 60.0),
            encode_timeout_s=args.encode_timeout, switch_timeout_s=args.switch_timeout,
            report=lambda line: print(line, flush=True),
        )  # fmt: skip
    except RolloutFailed as exc:
        print(f"error: rollout failed: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: rollout failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"rollout done: the stack serves model {fingerprint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`twotower status | head -3`): not an error of ours. Point stdout at
        # /dev/null so that Python's flush at exit does not raise again (the Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls = client_tls_from_args(args)  # reads the files: a bad one is a one-line error
    except TLSConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "health":  # no client needed; used by container health checks
        status = serving_status(args.address, timeout=args.timeout, tls=tls)
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "rollout":
        return _rollout(args, tls)
    try:
        print(run(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error: {exc.code().name}: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
