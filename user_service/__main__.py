"""`python -m user_service --checkpoint DIR [...]`: flags (with env-var fallbacks) -> config -> serve."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.errors import CheckpointError
from shared.server.flags import add_server_flags, run_service, server_options_from_args
from shared.server.settings import add_settings, parse_flags, settings_from_args
from user_service.config import UserServiceConfig
from user_service.server import serve

ENV_PREFIX = "USER_SERVICE"


def build_parser() -> argparse.ArgumentParser:
    """The flags, declared by UserServiceConfig's fields and the flags every service shares."""
    p = argparse.ArgumentParser(prog="python -m user_service", description=__doc__)
    add_settings(p, UserServiceConfig, ENV_PREFIX)
    add_server_flags(p, ENV_PREFIX, default_port=50052)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_flags(build_parser(), argv)


def config_from_args(args: argparse.Namespace) -> UserServiceConfig:
    return UserServiceConfig(
        **settings_from_args(UserServiceConfig, args),
        port_file=args.port_file,
        server=server_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("user_service", parse_args(argv), config_from_args, serve, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
