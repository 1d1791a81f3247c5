"""`quant.ggml.dequantize` (llama.cpp's C decoder, which verify's GGUF read-back uses) against gguf-py's numpy port
of the same decoders: two implementations of each block type, from different code, on arbitrary bytes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_py_dequantize

from l4q_export.formats.gguf import pack as P

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: no libggml-base to decode with")
from l4q_export.quant import ggml  # noqa: E402


@pytest.mark.parametrize("name", sorted(P.QTYPES))
def test_ggml_decode_equals_gguf_py_on_arbitrary_blocks(name):
    qtype = P.QTYPES[name]
    block, size = P.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(len(name) * 7 + size).integers(0, 256, (3, 5 * size), dtype=np.uint8)
    got = ggml.dequantize(raw, qtype)
    want = gguf_py_dequantize(raw, qtype)
    assert got.shape == want.shape == (3, 5 * block)
    # arbitrary fp16 headers include inf and NaN: both decoders must agree on which elements are NaN
    assert np.array_equal(got, want, equal_nan=True)
    finite = np.isfinite(want)
    assert finite.mean() > 0.5  # most headers are ordinary numbers: the comparison is not all NaN
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))  # -0.0 included


def test_ggml_decode_into_out_and_its_refusals():
    qtype = P.QTYPES["q4_1"]
    raw = np.random.default_rng(0).integers(0, 256, (4, 40), dtype=np.uint8)
    out = np.full((4, 64), np.nan, np.float32)
    assert ggml.dequantize(raw, qtype, out=out) is out
    assert np.array_equal(out, gguf_py_dequantize(raw, qtype), equal_nan=True)
    with pytest.raises(ValueError, match="not whole 20-byte blocks"):
        ggml.dequantize(raw[:, :30], qtype)
    with pytest.raises(ValueError, match="out must be"):
        ggml.dequantize(raw, qtype, out=np.empty((4, 63), np.float32))
