"""The torch device a service runs on, from its --device flag: auto | cpu | cuda | cuda:N (each service
says which of these it accepts). Resolved once, at start-up: a GPU asked for and absent is a clear error
then, not a failure at the first tensor moved there."""

from __future__ import annotations

import re

import torch

from shared.errors import DeviceUnavailable

_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when torch sees one, else cpu; `cuda` = the current CUDA device; `cuda:N` = GPU N.
    ValueError for another name, DeviceUnavailable for a GPU that is not there."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"--device {name} was asked for but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"--device {name} was asked for but torch sees {count} CUDA device(s)")
    return device
