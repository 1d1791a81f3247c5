"""The fold's buffer-saving (in-place) paths in quant.core give the same bits as the plain formulas.

Expected values are the out-of-place expressions written out here (W0.float() + alpha*B@A as the fixed-order sum,
(w - m)/d or w/d + z, clamp, round; d*u + m or (u - z)*d), compared bit for bit on even and partial groups, every
zero-point mode and fp16/bf16/fp32 base weights."""

from __future__ import annotations

import pytest
import torch

from l4q_export.quant import QuantSpec, inplace
from l4q_export.quant.core import (
    combined_weight,
    dequantize_codes,
    effective_params,
    expand_groups,
    init_params,
    quantize,
    quantize_merged,
)


def _plain_delta(A, B, alpha):
    acc = B[:, 0:1].float() * A[0:1, :].float()
    for k in range(1, A.shape[0]):
        acc = acc + B[:, k : k + 1].float() * A[k : k + 1, :].float()
    return acc * alpha


def _plain_v(w, p, spec):
    """(w - m)/d or w/d + z with the group parameters expanded to [out, in]."""
    n = w.shape[1]
    gl = spec.group_len(n)
    d = expand_groups(p.scale, gl, n)
    return (w - expand_groups(p.minimum, gl, n)) / d if p.minimum is not None else w / d + expand_groups(p.zero, gl, n)


def _plain_codes(w, p, spec):
    """round(clamp((w - m)/d or w/d + z))."""
    return _plain_v(w, p, spec).clamp(0, spec.umax).round()


def _plain_wq(u, p, spec):
    """d*u + m or (u - z)*d with the group parameters expanded to [out, in]."""
    n = u.shape[1]
    gl = spec.group_len(n)
    d = expand_groups(p.scale, gl, n)
    return u * d + expand_groups(p.minimum, gl, n) if p.minimum is not None else (u - expand_groups(p.zero, gl, n)) * d


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("zp", ["float", "integer", "symmetric"])
@pytest.mark.parametrize("n,group", [(256, 32), (200, 64), (96, -1)])
def test_fold_paths_are_bit_identical(dtype, zp, n, group):
    g = torch.Generator().manual_seed(n + group)
    spec = QuantSpec(4, group, zp)
    W0 = (torch.randn(40, n, generator=g) * 0.02).to(dtype)
    A, B = torch.randn(8, n, generator=g) / n**0.5, torch.randn(40, 8, generator=g) * 2e-3
    with torch.no_grad():
        w = combined_weight(W0, A, B, 2.0)
        want_w = W0.float() + _plain_delta(A, B, 2.0)
        assert torch.equal(_bits(w), _bits(want_w))
        s, off = init_params(want_w, spec, "minmax")
        p = effective_params(spec, s * (1 + 0.05 * torch.rand(s.shape, generator=g)), off, fp16_grid=False)
        qt = quantize("t", w, p, spec)
        u = _plain_codes(want_w, p, spec)
        assert torch.equal(qt.codes, u.to(torch.uint8))
        want_wq = _plain_wq(u, p, spec)
        assert torch.equal(_bits(qt.dequantize()), _bits(want_wq))
        u32 = u.clone()
        assert torch.equal(_bits(dequantize_codes(u32, qt.params, spec)), _bits(want_wq))
        assert torch.equal(u32, u)  # an fp32 codes tensor is not written into


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("zp", ["float", "integer", "symmetric"])
@pytest.mark.parametrize("n,group", [(256, 32), (200, 64), (96, -1)])
@pytest.mark.parametrize("lora", [True, False])
def test_blocked_fold_is_bit_identical(monkeypatch, dtype, zp, n, group, lora):
    """quantize_merged's and dequantize's row blocks (3 rows each here, the last one partial) give the plain
    formulas' codes and W_q."""
    monkeypatch.setattr(inplace, "BLOCK_ELEMENTS", 3 * n)
    g = torch.Generator().manual_seed(7 * n + group)
    spec = QuantSpec(4, group, zp)
    W0 = (torch.randn(41, n, generator=g) * 0.02).to(dtype)
    A, B = (torch.randn(8, n, generator=g) / n**0.5, torch.randn(41, 8, generator=g) * 2e-3) if lora else (None, None)
    with torch.no_grad():
        want_w = W0.float() + _plain_delta(A, B, 2.0) if lora else W0.float()
        s, off = init_params(want_w, spec, "minmax")
        p = effective_params(spec, s * (1 + 0.05 * torch.rand(s.shape, generator=g)), off, fp16_grid=False)
        qt = quantize_merged("t", W0, A, B, 2.0, p, spec)
        u = _plain_codes(want_w, p, spec)
        assert torch.equal(qt.codes, u.to(torch.uint8))
        assert torch.equal(_bits(qt.dequantize()), _bits(_plain_wq(u, p, spec)))  # W_q in the same row blocks
        assert torch.equal(_bits(qt.rows(5, 17).dequantize()), _bits(_plain_wq(u, p, spec)[5:17]))  # and a row slice
        assert torch.equal(_bits(qt.minimum), _bits(p.minimum if p.minimum is not None else -(p.scale * p.zero)))


@pytest.mark.parametrize("base", ["bfloat16", "float16", "float32", "int8"])
@pytest.mark.parametrize("zp", ["float", "integer", "symmetric"])
@pytest.mark.parametrize("n,group", [(256, 32), (200, 64), (96, -1)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_training_recompute_is_bit_identical(monkeypatch, base, zp, n, group, out_dtype):
    """The training kernel's W_q (training/blocked.py, forward and backward, 3-row blocks inside a 17-row chunk
    starting at row 5) is the plain formulas' W_q in the activation dtype: what the fold exports is what trained."""
    from l4q_export.quant.base_int8 import int8_absmax, int8_dequant
    from l4q_export.training import blocked

    monkeypatch.setattr(inplace, "BLOCK_ELEMENTS", 3 * n)
    g = torch.Generator().manual_seed(11 * n + group)
    spec = QuantSpec(4, group, zp)
    W = torch.randn(41, n, generator=g) * 0.02
    W0, w0s = int8_absmax(W) if base == "int8" else (W.to(getattr(torch, base)), None)
    A, B = torch.randn(8, n, generator=g) / n**0.5, torch.randn(41, 8, generator=g) * 2e-3
    with torch.no_grad():
        w0 = int8_dequant(W0, w0s) if w0s is not None else W0.float()
        want_w = w0 + _plain_delta(A, B, 2.0)
        s, off = init_params(want_w, spec, "minmax")
        p = effective_params(spec, s * (1 + 0.05 * torch.rand(s.shape, generator=g)), off, fp16_grid=False)
        want = _plain_wq(_plain_codes(want_w, p, spec), p, spec)[5:22].to(out_dtype)
        got = blocked.forward_rows(W0, w0s, A, B, p, spec, 2.0, 5, 22, out_dtype)
        assert torch.equal(got.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
                           want.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32))
        G = torch.randn(17, n, generator=g)
        wq, gw, gd, gm = blocked.backward_rows(W0, w0s, A, B, p, spec, 2.0, 5, 22, G.clone(), out_dtype, True)
        assert torch.equal(wq, got)
        v = _plain_v(want_w, p, spec)
        inside = ((v >= 0) & (v <= spec.umax))[5:22]
        assert torch.equal(gw, G * inside)  # the STE mask times G, exactly


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 129])
def test_pack_bits_fast_path_is_the_bitplane_stream(bits, n):
    """pack_bits' whole-values-per-byte path equals the LSB-first bit-plane stream built here with np.packbits."""
    import numpy as np

    from l4q_export.quant import pack_bits

    v = np.random.default_rng(bits * 1000 + n).integers(0, 1 << bits, (3, 5, n), dtype=np.uint8)
    planes = (v[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    want = np.packbits(planes.reshape(3, 5, n * bits), axis=-1, bitorder="little")
    got = pack_bits(v, bits)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
