"""The memory-optimised L4Q Function against a plain-autograd STE oracle (tools/naive_qat.py)."""

from __future__ import annotations

import pytest
import torch
from naive_qat import reference_wq  # tools/naive_qat.py, on sys.path via conftest

from l4q_export.quant import QuantSpec
from l4q_export.training import layer as layer_mod
from l4q_export.training.layer import L4QLinear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


CASES = [
    # bits, group, zero point, in, out, x shape prefix
    (4, 16, "float", 48, 24, (3, 5)),
    (3, 32, "float", 64, 40, (2, 7)),
    (2, -1, "float", 40, 16, (11,)),
    (8, 16, "integer", 48, 20, (2, 3, 4)),
    (4, 24, "integer", 52, 12, (4, 6)),  # partial last group
    (3, -1, "symmetric", 36, 28, (1, 9)),
    (5, 32, "symmetric", 64, 8, (5,)),
    (4, 32, "float", 70, 33, (2, 2)),  # partial last group, odd out
]


@pytest.mark.parametrize("bits,group,zp,fin,fout,prefix", CASES)
@pytest.mark.parametrize("lsq", [True, False])
def test_grads_match_plain_autograd(bits, group, zp, fin, fout, prefix, lsq):
    torch.manual_seed(bits * 1000 + fin + fout)
    spec = QuantSpec(bits, group, zp)
    m = L4QLinear(torch.nn.Linear(fin, fout, bias=False), spec, rank=4, lora_alpha=8, init="minmax", lsq_grad_scale=lsq)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
        if m.offset is not None and zp == "float":
            m.offset.add_(0.2 * m.scale * torch.randn_like(m.offset))
    x = torch.randn(*prefix, fin, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    leaves = [t.detach().clone().requires_grad_(True) for t in (m.lora_A, m.lora_B, m.scale)]
    off = None if m.offset is None else m.offset.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    gs = spec.lsq_grad_scale(fin) if lsq else 1.0
    wq = reference_wq(m.weight, *leaves, off, bits=bits, group=group, zero_point=zp, alpha=2.0, gscale=gs)
    y2 = x2 @ wq.T
    y2.backward(gy)

    assert _rel(y, y2) < 1e-5
    assert _rel(x.grad, x2.grad) < 1e-5
    for got, ref in zip((m.lora_A.grad, m.lora_B.grad, m.scale.grad), leaves, strict=False):
        assert _rel(got, ref.grad) < 1e-5
    if off is not None:
        assert _rel(m.offset.grad, off.grad) < 1e-5


def test_chunked_backward_equals_unchunked(monkeypatch):
    """Row chunking bounds memory; it may only change fp32 summation order."""
    torch.manual_seed(0)
    spec = QuantSpec(4, 16, "float")
    m = L4QLinear(torch.nn.Linear(32, 64, bias=False), spec, rank=2, lora_alpha=4, init="minmax")
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
    x = torch.randn(3, 32)
    grads = []
    for chunk in (1 << 22, 32 * 5):  # one chunk vs 5-row chunks, two per input-gradient GEMM
        monkeypatch.setattr(layer_mod, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(layer_mod, "GRAD_X_ELEMENTS", 32 * 10)
        for p in m.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(True)
        m(xx).square().sum().backward()
        grads.append([xx.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone(), m.scale.grad.clone(), m.offset.grad.clone()])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_gradient_in_one_or_many_chunks_and_gemms(monkeypatch, dtype):
    """One chunk, six chunks gathered into one input-gradient GEMM, and six chunks in three GEMMs of two (the
    products added in fp32; in place by addmm for fp32): the input gradient in the activation dtype, within its
    rounding of the fp32 product of the same operands."""
    torch.manual_seed(1)
    m = L4QLinear(torch.nn.Linear(64, 48, bias=False).to(dtype), QuantSpec(4, 16, "float"), rank=2,
                  lora_alpha=4, init="minmax")
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
    x = torch.randn(6, 64).to(dtype)
    gy = torch.randn(6, 48).to(dtype)
    ref = gy.float() @ m.quantized().dequantize().to(dtype).float()
    tol = 2.0 ** -6 if dtype == torch.bfloat16 else 1e-5
    for chunk, gemm in ((1 << 22, 1 << 23), (64 * 8, 1 << 23), (64 * 8, 64 * 16)):  # 8-row chunks, 16-row GEMMs
        monkeypatch.setattr(layer_mod, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(layer_mod, "GRAD_X_ELEMENTS", gemm)
        xx = x.clone().requires_grad_(True)
        m(xx).backward(gy)
        assert xx.grad.dtype == dtype
        assert float((xx.grad.float() - ref).abs().max()) <= tol * float(ref.abs().max())


@pytest.mark.parametrize("zp,fin,group", [("float", 70, 32), ("integer", 52, 24), ("symmetric", 64, 16)])
def test_cache_blocks_change_no_bit_of_the_output(monkeypatch, zp, fin, group):
    """The eager kernel's cache-sized row blocks (training/blocked.py): 3-row blocks vs one block per chunk give the
    same output bits and the same gradients up to fp32 summation order (the group sums run per block)."""
    from l4q_export.quant import inplace

    torch.manual_seed(fin)
    m = L4QLinear(torch.nn.Linear(fin, 33, bias=False), QuantSpec(4, group, zp), rank=3, lora_alpha=6, init="minmax")
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
    x = torch.randn(4, fin)
    runs = []
    for elements in (1 << 22, 3 * fin):
        monkeypatch.setattr(inplace, "BLOCK_ELEMENTS", elements)
        for p in m.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.square().sum().backward()
        runs.append([y.detach(), xx.grad, *[p.grad.clone() for p in m.parameters() if p.grad is not None]])
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_saves_only_x_and_parameter_references():
    m = L4QLinear(torch.nn.Linear(64, 48, bias=False), QuantSpec(4, 32), rank=4, lora_alpha=8)
    params = {p.data_ptr() for p in m.parameters()}
    saved: list[torch.Tensor] = []
    x = torch.randn(5, 64, requires_grad=True)

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    new = [t for t in saved if t.data_ptr() not in params]
    assert len(new) == 1 and new[0].data_ptr() == x.data_ptr()


def test_bias_and_batch_shapes():
    lin = torch.nn.Linear(32, 16, bias=True)
    m = L4QLinear(lin, QuantSpec(4, 32, "symmetric"), rank=2, lora_alpha=2)
    x = torch.randn(2, 3, 4, 32)
    y = m(x)
    assert y.shape == (2, 3, 4, 16)
    wq = m.quantized().dequantize()
    torch.testing.assert_close(y, x @ wq.T + lin.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zp,fin,group", [("float", 52, 24), ("integer", 70, 32), ("symmetric", 64, 16)])
def test_rebuilt_layer_without_init_takes_the_trained_grid(zp, fin, group):
    """A layer rebuilt from a checkpoint (init=None: placeholders, no init from W0) holds, once the adapter is loaded,
    the trained layer's W_q bit for bit -- partial last groups included (the placeholders must have its shape)."""
    torch.manual_seed(fin)
    base = torch.nn.Linear(fin, 20, bias=False)
    spec = QuantSpec(4, group, zp)
    trained = L4QLinear(base, spec, rank=3, lora_alpha=6, init="minmax")
    with torch.no_grad():
        trained.lora_B.normal_(0, 0.05)
        trained.scale.mul_(1.1)
        if trained.offset is not None:
            trained.offset.add_(0.3)
    rebuilt = L4QLinear(base, spec, rank=3, lora_alpha=6, init=None)
    rebuilt.load_tensors(trained.adapter_tensors())
    want, got = trained.quantized(), rebuilt.quantized()
    assert torch.equal(got.codes, want.codes) and torch.equal(got.dequantize(), want.dequantize())
