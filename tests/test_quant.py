"""The quantizer core: bit packing, canonical mappings, group helpers and spec validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from l4q_export.errors import L4QInputError
from l4q_export.quant import (
    QuantSpec,
    effective_params,
    expand_groups,
    group_reduce,
    group_sum,
    init_params,
    lora_delta,
    pack_bits,
    pack_int32,
    quantize,
    unpack_bits,
    unpack_int32,
)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 70))
    vals = draw(arrays(np.uint8, (rows, n), elements=st.integers(0, (1 << bits) - 1)))
    return vals, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_roundtrip(case):
    vals, bits = case
    packed = pack_bits(vals, bits)
    assert packed.shape[-1] == -(-vals.shape[-1] * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, vals.shape[-1]), vals)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30))
def test_pack_is_lsb_first_bitstream(bits, n):
    """Independent oracle: build the integer sum(v_i << (i*bits)) and compare its little-endian bytes."""
    rng = np.random.default_rng(bits * 100 + n)
    vals = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
    big = sum(int(v) << (i * bits) for i, v in enumerate(vals))
    nbytes = -(-n * bits // 8)
    assert pack_bits(vals[None], bits)[0].tobytes() == big.to_bytes(nbytes, "little")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.integers(0, 3))
def test_unpack_reads_the_lsb_first_bitstream(bits, n, spare):
    """Independent oracle: value i is bits [i*bits, (i+1)*bits) of the bytes read as one little-endian integer
    (spare bytes after the stream are ignored); too few bytes for n values is an error, not a short result."""
    rng = np.random.default_rng(bits * 1000 + n * 10 + spare)
    nbytes = -(-n * bits // 8) + spare
    raw = rng.integers(0, 256, size=(2, nbytes), dtype=np.uint8)
    want = [[(int.from_bytes(row.tobytes(), "little") >> (i * bits)) & ((1 << bits) - 1) for i in range(n)] for row in raw]
    np.testing.assert_array_equal(unpack_bits(raw, bits, n), np.array(want, np.uint8))
    with pytest.raises(ValueError):
        unpack_bits(raw[:, : -(-n * bits // 8) - 1], bits, n)


def test_pack_int32_matches_gptq_nibble_order():
    # GPTQ/compressed-tensors 4-bit: value j of a word sits at bits 4j..4j+3.
    vals = np.arange(16, dtype=np.uint8).reshape(2, 8) % 16
    words = pack_int32(vals, 4)
    expect = [sum(int(v) << (4 * j) for j, v in enumerate(row)) for row in vals]
    assert [int(w) & 0xFFFFFFFF for w in words[:, 0]] == expect
    np.testing.assert_array_equal(unpack_int32(words, 4, 8), vals)
    with pytest.raises(ValueError):
        pack_int32(vals[:, :3], 4)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(np.array([[4]], dtype=np.uint8), 2)


def test_group_helpers_partial_last_group():
    x = torch.arange(2 * 10, dtype=torch.float32).view(2, 10)
    s = group_sum(x, 4)
    assert s.shape == (2, 3)
    assert torch.equal(s[:, 2], x[:, 8:].sum(1))
    assert torch.equal(group_reduce(x, 4, "amax")[:, 2], x[:, 9])
    assert torch.equal(group_reduce(-x, 4, "amin")[:, 2], -x[:, 9])
    p = torch.tensor([[1.0, 2.0, 3.0]])
    assert expand_groups(p, 4, 10).tolist() == [[1.0] * 4 + [2.0] * 4 + [3.0] * 2]


def test_lora_delta_equals_matmul():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 33, generator=g), torch.randn(17, 8, generator=g)
    torch.testing.assert_close(lora_delta(A, B, 0.5), 0.5 * (B.double() @ A.double()).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [16, -1, 24])
def test_float_mode_matches_paper_formula(bits, group):
    """Canonical (u, d, m) vs the paper's signed codes: u = q + 2^(n-1), and d*u + m == s*q + b (to rounding)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 40, generator=g)
    spec = QuantSpec(bits, group, "float")
    s, b = init_params(w, spec, "minmax")
    b = b + 0.3 * s * torch.randn(b.shape, generator=g)
    qt = quantize("w", w, effective_params(spec, s, b), spec)
    glen = spec.group_len(40)
    se, be = (t.repeat_interleave(glen, 1)[:, :40].double() for t in (s, b))
    q = torch.clamp(torch.round((w.double() - be) / se), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    agree = (qt.codes.long() - 2 ** (bits - 1) == q.long()).float().mean()
    assert agree > 0.99  # rounding-boundary ties may differ between fp64 and the fp32 training op order
    torch.testing.assert_close(qt.dequantize().double(), q * se + be, rtol=0, atol=float(s.max()) * 1e-5 + 1e-6)
    assert torch.allclose(qt.minimum, b - s * 2 ** (bits - 1))
    assert qt.zero is None and int(qt.codes.max()) <= spec.umax


@pytest.mark.parametrize("mode", ["integer", "symmetric"])
def test_integer_modes_minimum_is_minus_d_z(mode):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 64, generator=g)
    spec = QuantSpec(4, 32, mode)
    s, off = init_params(w, spec, "minmax")
    qt = quantize("w", w, effective_params(spec, s, off), spec)
    assert torch.equal(qt.minimum, -(qt.scale * qt.zero))
    assert torch.equal(qt.zero, qt.zero.round())
    if mode == "symmetric":
        assert bool((qt.zero == 8).all())
    # (u - z)*d with exact integer arithmetic in float64 as the oracle
    ref = (qt.codes.double() - qt.zero.repeat_interleave(32, 1)) * qt.scale.double().repeat_interleave(32, 1)
    assert torch.equal(qt.dequantize().double(), ref.float().double())


def test_fp16_grid_params_are_fp16_representable():
    w = torch.randn(4, 64)
    spec = QuantSpec(4, 32, "float")
    s, b = init_params(w, spec, "minmax")
    p = effective_params(spec, s * 1.0001, b + 1e-4, fp16_grid=True)
    assert torch.equal(p.scale, p.scale.half().float())
    assert torch.equal(p.minimum, p.minimum.half().float())


@pytest.mark.parametrize("kw", [dict(bits=6), dict(bits=4, group_size=0), dict(bits=4, zero_point="nf4")])
def test_spec_validation(kw):
    with pytest.raises(L4QInputError):
        QuantSpec(**kw)


def test_zero_groups_get_positive_scale():
    w = torch.zeros(3, 64)
    for mode in ("float", "integer", "symmetric"):
        s, _ = init_params(w, QuantSpec(4, 32, mode), "l4q")
        assert bool((s > 0).all())


def _rank1_loop(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """The original unblocked loop, written independently: one fp32 multiply and add per rank, in order."""
    A, B = A.float(), B.float()
    acc = B[:, 0:1] * A[0:1, :]
    for k in range(1, A.shape[0]):
        acc = acc + B[:, k : k + 1] * A[k : k + 1, :]
    return acc * alpha


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 2), (33, 5000, 4), (17, 65537, 3), (64, 64, 64), (0, 8, 2)])
def test_lora_delta_bit_equal_to_rank1_loop(shape):
    out_f, in_f, r = shape
    g = torch.Generator().manual_seed(out_f * 31 + r)
    A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    assert torch.equal(lora_delta(A, B, 0.5).view(torch.int32), _rank1_loop(A, B, 0.5).view(torch.int32))


def test_lora_delta_bit_equal_on_edge_values():
    A = torch.tensor([[0.0, -0.0, 1e-40, float("inf"), float("nan"), 3e38, -1e-45]] * 3)
    B = torch.tensor([[-0.0, 1.0, -1.0], [1e30, 1e30, -1e30], [1e-30, 0.0, 2.0]])
    for alpha in (0.25, float("inf")):
        assert torch.equal(lora_delta(A, B, alpha).view(torch.int32), _rank1_loop(A, B, alpha).view(torch.int32))
