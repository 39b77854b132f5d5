"""`python -m shared.server.flag_table [--write]`: the README's flag tables, one per service, generated from
the same declarations as each service's parser and `--help` (shared/server/settings.py).

Without `--write` it prints them; with it, it replaces the text between each service's markers in
README.md (`<!-- flags: NAME -->` ... `<!-- /flags: NAME -->`). tests/unit/test_flags.py fails, with a
diff, when the README and the parsers disagree.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.server.settings import flag_table, flags_of

SERVICES = ("user_service", "candidate_service", "retrieval_gateway")
README = Path(__file__).resolve().parents[2] / "README.md"


def service_parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"{name}.__main__").build_parser()


def service_section(name: str) -> str:
    """The synopsis (required flags) and the table of one service."""
    parser = service_parser(name)
    words = ["python", "-m", name]
    words += [f"{f.option} {f.metavar or f.dest.upper()}" for f in flags_of(parser) if f.required]
    return f"`{' '.join([*words, '[flags]'])}`\n\n{flag_table(parser)}"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- flags: {name} -->", f"<!-- /flags: {name} -->"


def _pattern(name: str) -> str:
    begin, end = _markers(name)
    return re.escape(begin) + r"\n(?:(.*?)\n)?" + re.escape(end)


def readme_section(text: str, name: str) -> str | None:
    """The text between `name`'s markers in `text` (None when they are missing)."""
    match = re.search(_pattern(name), text, flags=re.DOTALL)
    return (match.group(1) or "") if match else None


def with_sections(text: str, sections: dict[str, str]) -> str:
    """`text` with each service's marked section replaced by its generated one."""
    for name, section in sections.items():
        match = re.search(_pattern(name), text, flags=re.DOTALL)
        if match is None:
            raise ValueError(f"README has no {' ... '.join(_markers(name))}")
        begin, end = _markers(name)
        text = f"{text[: match.start()]}{begin}\n{section}\n{end}{text[match.end() :]}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.server.flag_table", description=__doc__)
    p.add_argument("--write", action="store_true", help=f"replace the sections in {README.name}")
    args = p.parse_args(argv)
    sections = {name: service_section(name) for name in SERVICES}
    if not args.write:
        for name, section in sections.items():
            print("\n".join([_markers(name)[0], section, _markers(name)[1]]), end="\n\n")
        return 0
    text = README.read_text()
    updated = with_sections(text, sections)
    if updated != text:
        README.write_text(updated)
    print(f"{README.name}: {'updated' if updated != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
