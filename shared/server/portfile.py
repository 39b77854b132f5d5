"""`--port-file`: a service started on port 0 writes the bound port here (atomically) once it listens,
so that supervisors and tests can find it without racing for a free port."""

from __future__ import annotations

from pathlib import Path

from shared.atomic_file import atomic_write_text


def write_port_file(path: str | Path | None, port: int) -> None:
    if path is not None:
        atomic_write_text(path, f"{port}\n")
