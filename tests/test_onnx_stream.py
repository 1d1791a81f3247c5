"""The ONNX writer's streamed initializers: float tensors written chunk by chunk (widened, and transposed for the
lm_head, in a small reused buffer) and UINT4 codes packed outside protobuf.  Expected bytes come from numpy on the
whole array, ml_dtypes, and onnx's own from_array / external-data loader -- never from the code under test."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from l4q_export.formats.onnx.graph import ALIGN, INLINE_BYTES, ExternalData, pack_uint4
from l4q_export.formats.onnx.linear import float_chunks


def _read_back(t: onnx.TensorProto, directory: Path) -> np.ndarray:
    """The tensor as onnx itself loads it (from the external data file when it went there)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        onnx.external_data_helper.load_external_data_for_tensor(t, str(directory))
    return numpy_helper.to_array(t)


def _stored_bytes(t: onnx.TensorProto, directory: Path, filename: str) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    data = (directory / filename).read_bytes()
    return data[int(info["offset"]) : int(info["offset"]) + int(info["length"])]


# (rows, cols) of the source; chunk_bytes chosen so no chunk count divides the rows evenly
@pytest.mark.parametrize(("shape", "chunk_bytes"), [((37, 13), 4 * 13 * 5), ((129, 7), 4 * 129 * 3 + 4), ((5, 300), 1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_streamed_float_matches_numpy_whole_array(tmp_path, shape, chunk_bytes, transpose):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(np.float16)
    expected = np.ascontiguousarray(a.astype(np.float32).T if transpose else a.astype(np.float32)).tobytes()
    src = torch.from_numpy(a)
    view = src.T if transpose else src
    data = ExternalData(tmp_path, "w.data")
    data.tensor("lead", np.arange(300, dtype=np.float32))  # 1200 bytes: the next tensor starts after padding
    t = data.stream("w", tuple(view.shape), np.float32, float_chunks(view, np.float32, chunk_bytes))
    data.close()
    assert list(t.dims) == list(view.shape) and t.data_type == onnx.TensorProto.FLOAT
    assert int({e.key: e.value for e in t.external_data}["offset"]) % ALIGN == 0
    assert _stored_bytes(t, tmp_path, "w.data") == expected
    np.testing.assert_array_equal(_read_back(t, tmp_path).view(np.int32), np.frombuffer(expected, np.int32).reshape(view.shape))


def test_streamed_bf16_and_fp16_graph(tmp_path):
    """bf16 sources widen exactly (ml_dtypes' bf16 -> fp32); an fp16 graph stores fp16 bytes."""
    rng = np.random.default_rng(1)
    bf = rng.standard_normal((33, 17)).astype(ml_dtypes.bfloat16)
    src = torch.from_numpy(bf.view(np.int16)).view(torch.bfloat16)
    data = ExternalData(tmp_path, "w.data")
    t32 = data.stream("bf", (17, 33), np.float32, float_chunks(src.T, np.float32, 200))
    h = rng.standard_normal((41, 19)).astype(np.float16)  # 1558 bytes: external
    t16 = data.stream("h", (19, 41), np.float16, float_chunks(torch.from_numpy(h).T, np.float16, 100))
    data.close()
    assert _stored_bytes(t32, tmp_path, "w.data") == np.ascontiguousarray(bf.astype(np.float32).T).tobytes()
    assert _stored_bytes(t16, tmp_path, "w.data") == np.ascontiguousarray(h.T).tobytes()
    assert t16.data_type == onnx.TensorProto.FLOAT16


def test_small_stream_stays_inline_as_from_array(tmp_path):
    """Under the inline threshold the chunks (several, sharing one buffer) become from_array's inline proto."""
    a = np.arange(15, dtype=np.float16).reshape(3, 5)
    data = ExternalData(tmp_path, "w.data")
    t = data.stream("n", (5, 3), np.float32, float_chunks(torch.from_numpy(a).T, np.float32, 4))
    data.close()
    assert t.SerializeToString() == numpy_helper.from_array(np.ascontiguousarray(a.astype(np.float32).T), "n").SerializeToString()
    assert (tmp_path / "w.data").stat().st_size == 0


def test_stream_refuses_a_short_write(tmp_path):
    data = ExternalData(tmp_path, "w.data")
    with pytest.raises(AssertionError, match="expected"):
        data.stream("w", (64, 64), np.float32, [np.zeros((63, 64), np.float32)])
    data.close()


@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (1, 1), (2049, 3)])
def test_uint4_packing_is_onnx_from_array(tmp_path, shape):
    codes = np.random.default_rng(2).integers(0, 16, size=shape).astype(ml_dtypes.uint4)
    assert pack_uint4(codes).tobytes() == numpy_helper.from_array(codes, "q").raw_data
    data = ExternalData(tmp_path, "w.data")
    t = data.tensor("q", codes)
    data.close()
    if codes.size >= 2 * INLINE_BYTES:  # packed payloads of INLINE_BYTES and more go to the file
        assert t.data_location == onnx.TensorProto.EXTERNAL
        assert _stored_bytes(t, tmp_path, "w.data") == numpy_helper.from_array(codes, "q").raw_data
    else:
        assert t.SerializeToString() == numpy_helper.from_array(codes, "q").SerializeToString()
    np.testing.assert_array_equal(_read_back(t, tmp_path).astype(np.uint8), codes.astype(np.uint8))
