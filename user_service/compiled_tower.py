"""The user tower compiled with torch.compile (inductor: C++ on cpu), for small batches on a CPU.

Eager, a forward pass of the small user tower is a few hundred tiny ops, each paying Python and
dispatch overhead; inductor fuses them into a handful of C++ loops. Measured on this project's 2-core
CPU (MovieLens model, D=64, S=16, one user): 2.1-3.2 ms eager, 0.4-0.9 ms compiled, identical to 1e-7.
The price is compile time, at start and for every model loaded (about 30 s per shape here: a first
batch size, then once more for the batch dimension made dynamic), so it is opt-in
(`--cpu-tower compile`; the default, ONNX Runtime, is as fast here and exports in seconds). Needs a
C++ compiler at run time; any failure leaves the eager tower serving.
No grpc import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from shared.model.features import UserFeatures
from shared.model.towers import TwoTowerModel

logger = logging.getLogger(__name__)


class CompiledUserTower:
    """`encode_users` through torch.compile with a dynamic batch dimension."""

    def __init__(self, model: TwoTowerModel) -> None:
        self._fn: Callable[[UserFeatures], torch.Tensor] = torch.compile(model.encode_users, dynamic=True)

    def encode_users(self, features: UserFeatures, threads: int = 1) -> torch.Tensor:
        """threads: unused (the caller has set torch's intra-op threads for this batch)."""
        return self._fn(features)
