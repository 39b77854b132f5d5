"""`--port-file`: a service started on port 0 writes the bound port here (atomically) once it listens,
so that supervisors and tests can find it without racing for a free port."""

from __future__ import annotations

import os
from pathlib import Path


def write_port_file(path: str | Path | None, port: int) -> None:
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)
