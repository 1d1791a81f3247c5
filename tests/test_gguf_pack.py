"""Each GGUF block type's packer against gguf-py's reference decoder (`gguf.quants.dequantize`).

Golden values come from the fold's own dequantization (`QuantizedTensor.dequantize`) with the scales on the fp16
grid -- an independent computation from our byte layouts -- and from gguf-py decoding our bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from l4q_export.formats.gguf import pack as P
from l4q_export.quant import QuantizedTensor, QuantSpec


def make_qt(bits: int, group: int, zp: str, out: int = 6, n: int = 512, fp16: bool = True, seed: int = 0,
            spread: float = 0.3) -> QuantizedTensor:
    spec = QuantSpec(bits, group, zp)
    g = torch.Generator().manual_seed(seed)
    G = spec.n_groups(n)
    codes = torch.randint(0, spec.umax + 1, (out, n), generator=g).to(torch.uint8)
    d = 0.01 * (1 + spread * torch.rand(out, G, generator=g))
    if fp16:
        d = d.half().float()
    if zp == "float":
        m = -(d * spec.half) + 0.002 * torch.randn(out, G, generator=g)
        if fp16:
            m = m.half().float()
        return QuantizedTensor("t", spec, codes, d, m, None)
    if zp == "integer":
        z = torch.randint(0, spec.umax + 1, (out, G), generator=g).float()
    else:
        z = torch.full((out, G), float(spec.half))
    return QuantizedTensor("t", spec, codes, d, -(d * z), z)


EXACT_CASES = [  # (type, bits, zero point): types that hold these codes with fp16 scales bit-exactly
    ("q4_1", 4, "float"), ("q4_1", 3, "float"), ("q4_1", 2, "float"), ("q5_1", 5, "float"), ("q5_1", 4, "float"),
    ("q4_0", 3, "integer"), ("q4_0", 2, "integer"), ("q4_0", 4, "symmetric"), ("q5_0", 4, "integer"),
    ("q5_0", 5, "symmetric"), ("q8_0", 5, "integer"), ("q8_0", 4, "integer"), ("q8_0", 8, "symmetric"),
]


@pytest.mark.parametrize("name,bits,zp", EXACT_CASES)
@pytest.mark.parametrize("group", [32, 64, -1])
def test_legacy_types_decode_bit_exactly(name, bits, zp, group):
    qt = make_qt(bits, group, zp)
    raw = P.pack(qt, name)
    block, size = P.GGML_QUANT_SIZES[P.QTYPES[name]]
    assert raw.shape == (qt.shape[0], qt.shape[1] // block * size)
    decoded = dequantize(raw, P.QTYPES[name])
    ref = qt.dequantize().numpy()
    assert decoded.shape == ref.shape
    assert np.array_equal(decoded, ref), f"max err {np.abs(decoded - ref).max()}"
    weight, codes = P.decode_with_codes(raw, name)
    assert np.array_equal(weight, decoded)  # the one-pass decode is gguf-py's own
    assert np.array_equal(codes, P.expected_stored_codes(qt, name))


def test_q4_0_mirrors_blocks_that_only_fit_negated():
    """4-bit integer zero points: a block with u - z in [-7, 8] is stored with d = -s and still decodes exactly."""
    qt = make_qt(4, 32, "integer", out=2, n=64)
    qt.codes[:] = torch.tensor([0, 8] * 32, dtype=torch.uint8).repeat(2, 1)[:, :64]
    qt.zero[:] = 0.0
    qt.minimum[:] = 0.0  # u - z in [0, 8]: needs the mirrored encoding
    raw = P.pack(qt, "q4_0")
    assert np.array_equal(dequantize(raw, P.QTYPES["q4_0"]), qt.dequantize().numpy())
    qt.codes[0, 0] = 15  # now [0, 15]: fits neither way
    with pytest.raises(P.NotRepresentable):
        P.pack(qt, "q4_0")


def test_float_offsets_refused_by_types_without_minimum():
    with pytest.raises(P.NotRepresentable) as e:
        P.pack(make_qt(3, 32, "float"), "q4_0")
    assert not e.value.layout


def test_shape_not_multiple_of_block_is_a_layout_problem():
    with pytest.raises(P.NotRepresentable) as e:
        P.pack(make_qt(4, 32, "float", n=172), "q4_1")
    assert e.value.layout


def test_fp32_scales_decode_within_fp16_rounding():
    """Without the fp16 grid the codes still survive; the weight error is the fp16 rounding of d and m."""
    qt = make_qt(4, 32, "float", fp16=False)
    raw = P.pack(qt, "q4_1")
    err = np.abs(dequantize(raw, P.QTYPES["q4_1"]) - qt.dequantize().numpy()).max()
    bound = float((qt.scale * 15 + qt.minimum.abs()).max()) * 2.0**-11 * 1.01
    assert 0 < err <= bound
    assert np.array_equal(P.decode_with_codes(raw, "q4_1")[1], P.expected_stored_codes(qt, "q4_1"))


KQ_CASES = [("q4_k", 4, "float"), ("q4_k", 3, "integer"), ("q2_k", 2, "float"), ("q3_k", 3, "symmetric"),
            ("q3_k", 2, "integer"), ("q6_k", 5, "integer"), ("q6_k", 4, "symmetric")]


@pytest.mark.parametrize("name,bits,zp", KQ_CASES)
def test_kquants_keep_codes_with_small_scale_error(name, bits, zp):
    qt = make_qt(bits, 32, zp, n=512)
    raw = P.pack(qt, name)
    decoded = dequantize(raw, P.QTYPES[name])
    weight, codes = P.decode_with_codes(raw, name)
    assert np.array_equal(weight, decoded)
    assert np.array_equal(codes, P.expected_stored_codes(qt, name))
    step = float(qt.scale.max())
    err = np.abs(decoded - qt.dequantize().numpy()).max()
    assert err < 0.2 * step * qt.spec.umax  # re-encoded sub-scales: small relative to the weight range
    if name != "q2_k":
        assert err < 0.1 * step * qt.spec.umax


def test_kquants_need_256_wide_rows():
    with pytest.raises(P.NotRepresentable) as e:
        P.pack(make_qt(4, 32, "float", n=192), "q4_k")
    assert e.value.layout


@pytest.mark.parametrize("name,bits,zp", EXACT_CASES)
@pytest.mark.parametrize("fp16", [True, False])
def test_measured_error_equals_gguf_py_decode(name, bits, zp, fp16):
    """The exporter's error bound, computed from the fields (no decode of the packed bytes), is exactly what gguf-py's
    decoder of those bytes gives: on the fp16 grid (0) and off it (the fp16 rounding of d and m), mirrored blocks too."""
    for group in (32, 64, -1):
        qt = make_qt(bits, group, zp, fp16=fp16, out=8, n=256, seed=group % 7)
        if zp == "integer" and name == "q4_0" and bits == 4:  # row 0 only fits mirrored (u - z in [0, 8])
            qt.codes[0] = torch.tensor([0, 8], dtype=torch.uint8).repeat(qt.shape[1] // 2)
            qt.zero[0] = 0.0
            qt.minimum[0] = -(qt.scale[0] * qt.zero[0])
        raw, err = P.pack_measured(qt, name)
        assert np.array_equal(raw, P.pack(qt, name))
        ref = float(np.abs(dequantize(raw, P.QTYPES[name]).reshape(qt.shape) - qt.dequantize().numpy()).max())
        assert err == ref
        assert err == 0.0 if fp16 else err > 0.0


@pytest.mark.parametrize("dtype,big", [(torch.float16, 65504.0), (torch.bfloat16, 3.3895e38), (torch.float32, 3.4e38),
                                       (torch.float64, 1.7e308)])
def test_finiteness_check_sees_every_nan_and_inf(dtype, big):
    from l4q_export.quant.finite import all_finite

    x = torch.randn(3000, 700).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2999, 699] = bad  # in the last slice
        assert not all_finite(y) and not bool(torch.isfinite(y).all())
    assert all_finite(torch.full((3000, 700), big, dtype=dtype))  # the largest finite values are not flagged
    assert all_finite(x.t())  # a non-contiguous view


@pytest.mark.parametrize("name,bits,zp", [("q4_1", 4, "float"), ("q5_0", 4, "integer"), ("q6_k", 5, "integer")])
def test_codes_read_back_in_row_slices_and_a_zero_scale_block_has_none(monkeypatch, name, bits, zp):
    """Slices of one row give gguf-py's whole-tensor decode and the fold's codes; a block whose fp16 scale is zeroed
    in the bytes cannot say its codes (NO_CODE, never a plausible integer), and no other element changes."""
    qt = make_qt(bits, 32, zp, out=5, n=512)
    raw = P.pack(qt, name)
    monkeypatch.setattr(P, "_DECODE_CHUNK_BYTES", 1)  # one row per slice
    weight, codes = P.decode_with_codes(raw, name)
    assert np.array_equal(weight, dequantize(raw, P.QTYPES[name]))
    want = P.expected_stored_codes(qt, name)
    assert np.array_equal(codes, want)
    block, size = P.GGML_QUANT_SIZES[P.QTYPES[name]]
    d_at = size - 2 if name == "q6_k" else 0  # the block's fp16 d: last field of Q6_K, first of the legacy types
    broken = raw.copy()
    broken[2, size + d_at : size + d_at + 2] = 0  # row 2, second block: d = 0
    _, codes = P.decode_with_codes(broken, name)
    lost = np.zeros_like(want, dtype=bool)
    lost[2, block : 2 * block] = True
    assert (codes[lost] == P.NO_CODE).all()
    assert np.array_equal(codes[~lost], want[~lost])


def test_codes_read_back_exactly_far_from_zero():
    """Groups whose minimum lies 4096 steps from zero (a shifted weight distribution): the decode's fp32 rounding of
    d*q + m is then ~2^-12 of a step, and every code still reads back exactly."""
    qt = make_qt(4, 32, "float", out=8, n=512)
    sign = torch.where(torch.rand(qt.scale.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    qt.minimum[:] = (qt.scale * 4096 * sign).half().float()
    raw = P.pack(qt, "q4_1")
    weight, codes = P.decode_with_codes(raw, "q4_1")
    assert np.array_equal(weight, qt.dequantize().numpy())
    assert np.array_equal(codes, P.expected_stored_codes(qt, "q4_1"))
