"""`python -m candidate_service --checkpoint DIR --cache-dir DIR [--items FILE] [...]`:
flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from candidate_service.config import CandidateConfig
from candidate_service.encoder import EncodingStopped
from candidate_service.item_store import ItemStoreError
from candidate_service.items_file import ItemsFileError
from candidate_service.server import serve
from shared.errors import CheckpointError
from shared.server.flags import add_server_flags, run_service, server_options_from_args
from shared.server.settings import add_settings, parse_flags, settings_from_args

logger = logging.getLogger("candidate_service")

ENV_PREFIX = "CANDIDATE"


def build_parser() -> argparse.ArgumentParser:
    """The flags, declared by CandidateConfig's fields and the flags every service shares."""
    p = argparse.ArgumentParser(prog="python -m candidate_service", description=__doc__)
    add_settings(p, CandidateConfig, ENV_PREFIX)
    add_server_flags(p, ENV_PREFIX, default_port=50053)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_flags(build_parser(), argv)


def config_from_args(args: argparse.Namespace) -> CandidateConfig:
    return CandidateConfig(
        **settings_from_args(CandidateConfig, args),
        port_file=args.port_file,
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        startup_errors = (CheckpointError, ItemsFileError, ItemStoreError)
        return run_service("candidate_service", parse_args(argv), config_from_args, serve, startup_errors)
    except EncodingStopped:
        logger.info("stopped while encoding the corpus")
        return 0


if __name__ == "__main__":
    sys.exit(main())
