import numpy as np
import pytest
import torch

from shared import codec
from shared.errors import InvalidInput
from twotower.v1 import common_pb2

F32, BF16, I64 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_INT64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_round_trip(dtype):
    t = torch.randn(3, 5).to(dtype)
    msg = codec.encode(t)
    assert list(msg.shape) == [3, 5] and len(msg.data) == 15 * t.element_size()
    back = codec.decode_torch(msg, "x")
    assert back.dtype == dtype and torch.equal(back, t)


def test_numpy_round_trip_and_little_endian():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    msg = codec.encode(a)
    assert (
        msg.dtype == I64
        and msg.data[:8] == (0).to_bytes(8, "little")
        and msg.data[8:16] == b"\x01" + b"\0" * 7
    )
    assert np.array_equal(codec.decode_numpy(msg), a)
    big = np.arange(4, dtype=">f4")
    assert np.array_equal(codec.decode_numpy(codec.encode(big)), big.astype(np.float32))


def test_bf16_decodes_to_float32_numpy():
    t = torch.tensor([1.5, -2.0]).to(torch.bfloat16)
    assert codec.decode_numpy(codec.encode(t)).tolist() == [1.5, -2.0]


def test_empty_and_writable():
    msg = codec.encode(np.zeros((0, 4), dtype=np.float32))
    out = codec.decode_torch(msg)
    assert out.shape == (0, 4)
    full = codec.decode_torch(codec.encode(np.ones(3, dtype=np.float32)))
    full[0] = 2.0  # decoded tensors own their memory
    array = codec.decode_numpy(codec.encode(np.arange(6, dtype=np.int64).reshape(2, 3)))
    array[0, 0] = 7  # and so do decoded arrays
    assert array.shape == (2, 3) and array.dtype == np.int64 and array.flags.writeable


@pytest.mark.parametrize(
    ("msg", "kwargs", "message"),
    [
        (common_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4), {}, "unsupported dtype DTYPE_UNSPECIFIED"),
        (common_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), {}, "unsupported dtype 99"),
        (
            common_pb2.Tensor(dtype=I64, shape=[2], data=b"\0" * 16),
            {"dtypes": [F32]},
            "expected DTYPE_FLOAT32",
        ),
        (
            common_pb2.Tensor(dtype=F32, shape=[2, 3], data=b"\0" * 24),
            {"shape": (None, 4)},
            "expected [*, 4]",
        ),
        (common_pb2.Tensor(dtype=F32, shape=[2, 3], data=b"\0" * 24), {"shape": (6,)}, "expected [6]"),
        (common_pb2.Tensor(dtype=F32, shape=[2, 3], data=b"\0" * 20), {}, "20 bytes, but shape [2, 3]"),
        (common_pb2.Tensor(dtype=BF16, shape=[-1], data=b""), {}, "negative dimension"),
    ],
)
@pytest.mark.parametrize("decode", [codec.decode_torch, codec.decode_numpy])
def test_rejections_say_which(msg, kwargs, message, decode):
    with pytest.raises(
        InvalidInput, match=r"tensor 'emb'.*" + message.replace("[", r"\[").replace("*", r"\*")
    ):
        decode(msg, "emb", **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode", [codec.decode_torch, codec.decode_numpy])
def test_non_finite_rejected(bad, dtype, decode):
    msg = codec.encode(torch.tensor([1.0, bad, 2.0]).to(dtype))
    with pytest.raises(InvalidInput, match="tensor 'emb': 1 non-finite"):
        decode(msg, "emb")


def test_encode_refuses_unsupported_dtype():
    with pytest.raises(TypeError):
        codec.encode(np.zeros(2, dtype=np.int8))


def test_a_shape_whose_int64_product_wraps_around_is_refused():
    # 3 * 6148914691236517205 == 2**64 + 1: wrapped to int64 it is 1, so 4 bytes would "fit" float32
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[3, 6148914691236517205], data=b"\x00" * 4)
    with pytest.raises(InvalidInput, match="bytes"):
        codec.decode_torch(msg, "embeddings")
    with pytest.raises(InvalidInput, match="bytes"):
        codec.decode_numpy(msg, "embeddings", shape=(3, None))
