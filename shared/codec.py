"""Tensor codec between numpy / torch and the proto `Tensor` (raw little-endian bytes + dtype + shape).

Decoding rejects, with a message naming the tensor: an unknown dtype, a dtype or shape other than the
expected one, a byte count that does not match the shape, and non-finite floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shared.errors import InvalidInput
from twotower.v1 import common_pb2

DType = common_pb2.DType

# proto dtype -> (numpy dtype of the raw bytes, torch dtype); bf16 travels as its raw uint16 bits.
_FORMATS: dict[int, tuple[np.dtype, torch.dtype]] = {
    DType.DTYPE_FLOAT32: (np.dtype("<f4"), torch.float32),
    DType.DTYPE_BFLOAT16: (np.dtype("<u2"), torch.bfloat16),
    DType.DTYPE_FLOAT16: (np.dtype("<f2"), torch.float16),
    DType.DTYPE_INT64: (np.dtype("<i8"), torch.int64),
}
_BY_TORCH = {torch_dtype: code for code, (_, torch_dtype) in _FORMATS.items()}
_BY_NUMPY = {np.dtype(np.float32): DType.DTYPE_FLOAT32, np.dtype(np.float16): DType.DTYPE_FLOAT16,
             np.dtype(np.int64): DType.DTYPE_INT64}  # fmt: skip
_FLOATS = {DType.DTYPE_FLOAT32, DType.DTYPE_BFLOAT16, DType.DTYPE_FLOAT16}
_BF16 = DType.DTYPE_BFLOAT16

Shape = Sequence[int | None]  # None = any size in that dimension


def dtype_name(code: int) -> str:
    return DType.Name(code) if code in DType.values() else str(code)


def encode(value: np.ndarray | torch.Tensor) -> common_pb2.Tensor:
    """numpy array or torch tensor (float32, bfloat16, float16, int64) -> proto Tensor."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype not in _BY_TORCH:
            raise TypeError(f"cannot encode torch dtype {tensor.dtype}")
        code = _BY_TORCH[tensor.dtype]
        raw = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    else:
        raw = np.asarray(value)
        if raw.dtype.newbyteorder("=") not in _BY_NUMPY:
            raise TypeError(f"cannot encode numpy dtype {raw.dtype}")
        code = _BY_NUMPY[raw.dtype.newbyteorder("=")]
    data = np.ascontiguousarray(raw, dtype=_FORMATS[code][0]).tobytes()
    return common_pb2.Tensor(dtype=code, shape=list(raw.shape), data=data)


def _check(msg: common_pb2.Tensor, name: str, dtypes: Sequence[int] | None, shape: Shape | None) -> np.dtype:
    if msg.dtype not in _FORMATS:
        raise InvalidInput(f"tensor '{name}': unsupported dtype {dtype_name(msg.dtype)}")
    if dtypes is not None and msg.dtype not in dtypes:
        wanted = " or ".join(dtype_name(d) for d in dtypes)
        raise InvalidInput(f"tensor '{name}': dtype {dtype_name(msg.dtype)}, expected {wanted}")
    dims = list(msg.shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"tensor '{name}': negative dimension in shape {dims}")
    if shape is not None and (
        len(dims) != len(shape) or any(w is not None and w != d for w, d in zip(shape, dims, strict=True))
    ):
        wanted = ", ".join("*" if d is None else str(d) for d in shape)
        raise InvalidInput(f"tensor '{name}': shape {dims}, expected [{wanted}]")
    np_dtype = _FORMATS[msg.dtype][0]
    # Python ints: an int64 product of hostile dims can wrap around to the real byte count and pass.
    expected_bytes = math.prod(dims) * np_dtype.itemsize
    if len(msg.data) != expected_bytes:
        raise InvalidInput(
            f"tensor '{name}': {len(msg.data)} bytes, but shape {dims} of {dtype_name(msg.dtype)} "
            f"needs {expected_bytes}"
        )
    return np_dtype


def _check_finite(values: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise InvalidInput(f"tensor '{name}': {bad} non-finite values (NaN or infinity)")


def decode_torch(
    msg: common_pb2.Tensor,
    name: str = "tensor",
    dtypes: Sequence[int] | None = None,
    shape: Shape | None = None,
) -> torch.Tensor:
    """proto Tensor -> torch tensor (a copy, writable), validated; bf16 comes back as torch.bfloat16."""
    np_dtype = _check(msg, name, dtypes, shape)
    raw = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype.newbyteorder("="), copy=True)
    tensor = torch.from_numpy(raw.reshape(list(msg.shape)))
    if msg.dtype == DType.DTYPE_BFLOAT16:
        tensor = tensor.view(torch.bfloat16)
    if msg.dtype in _FLOATS:
        _check_finite(tensor, name)
    return tensor


def decode_numpy(
    msg: common_pb2.Tensor,
    name: str = "tensor",
    dtypes: Sequence[int] | None = None,
    shape: Shape | None = None,
) -> np.ndarray:
    """proto Tensor -> numpy array (a copy, writable), validated; bf16 is widened to float32 (numpy
    has no bfloat16)."""
    if msg.dtype == _BF16:
        return decode_torch(msg, name, dtypes, shape).float().numpy()
    np_dtype = _check(msg, name, dtypes, shape)  # numpy only: 8 int64 columns of a UserBatch per call
    values = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype.newbyteorder("="), copy=True)
    if msg.dtype in _FLOATS and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InvalidInput(f"tensor '{name}': {bad} non-finite values (NaN or infinity)")
    return values.reshape(list(msg.shape))
