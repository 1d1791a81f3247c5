"""GGUF K-quant grids: decode and block layout against gguf-py and ggml itself, and QAT through them.

Independent references: gguf.quants.dequantize (gguf-py's numpy decoder), and ggml's own C functions
(dequantize_row_q4_K, quantize_row_q4_K_ref, ...) from the libggml-base shared library that llama-cpp-python ships,
called through ctypes.  Gradients are checked against a plain-autograd oracle (tools/naive_kquant.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from naive_kquant import reference_kquant_wq  # tools/, on sys.path via conftest

from l4q_export.quant import combined_weight
from l4q_export.quant.kquant import KQUANT_SPECS, KQuantized, kquant_spec, rtn_kquant, unpack_blocks
from l4q_export.training.kquant_layer import KQuantLinear

TYPES = sorted(KQUANT_SPECS)


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def _ggml() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python not installed: no libggml-base to compare against")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base shared library here")
    return ctypes.CDLL(str(libs[0]))


def _ggml_row(fn: str, src: np.ndarray, dst: np.ndarray, n: int) -> None:
    """Call ggml's `void fn(const void * src, void * dst, int64_t n)` (quantize_row_*_ref / dequantize_row_*)."""
    getattr(_ggml(), fn)(src.ctypes.data_as(ctypes.c_void_p), dst.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n))


def _random_kquant(name: str, out_f: int, in_f: int, seed: int) -> KQuantized:
    """Random integers over each field's full range and random fp16 super-scales (negative too)."""
    spec = kquant_spec(name)
    g = torch.Generator().manual_seed(seed)
    nb = in_f // 256

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g)

    def f16(*shape):
        return (torch.randn(*shape, generator=g) * 1e-3).half().float()

    mins = spec.has_min
    return KQuantized(
        spec=spec,
        codes=ints(spec.qmin, spec.qmax, out_f, in_f).to(torch.int8),
        d=f16(out_f, nb),
        sc=ints(spec.sc_min, spec.sc_max, out_f, nb, spec.n_sub).to(torch.int16),
        dmin=f16(out_f, nb) if mins else None,
        mn=ints(0, spec.mn_max, out_f, nb, spec.n_sub).to(torch.int16) if mins else None,
    )


@pytest.mark.parametrize("name", TYPES)
def test_pack_then_gguf_dequantize_equals_decode_bit_for_bit(name):
    t = _random_kquant(name, 6, 768, seed=len(name))
    raw = t.pack()
    assert raw.shape == (6, 3 * t.spec.block_bytes)
    ref = gguf_dequantize(raw, t.spec.ggml_type).reshape(6, 768)
    assert np.array_equal(_bits(ref), _bits(t.dequantize()))


@pytest.mark.parametrize("name", TYPES)
def test_decode_equals_ggml_dequantize_row_bit_for_bit(name):
    t = _random_kquant(name, 4, 512, seed=7)
    raw = np.ascontiguousarray(t.pack())
    y = np.zeros(4 * 512, dtype=np.float32)
    _ggml_row(f"dequantize_row_{name[:2]}_K", raw, y, y.size)
    assert np.array_equal(y.view(np.uint32), _bits(t.dequantize()).reshape(-1))


@pytest.mark.parametrize("name", TYPES)
def test_layout_round_trips_ggml_quantizer_bytes(name):
    """Bytes written by ggml's own reference quantizer unpack to integers that pack back to the same bytes."""
    spec = kquant_spec(name)
    x = np.ascontiguousarray((torch.randn(5, 512, generator=torch.Generator().manual_seed(3)) * 0.02).numpy())
    raw = np.zeros(5 * 2 * spec.block_bytes, dtype=np.uint8)
    _ggml_row(f"quantize_row_{name[:2]}_K_ref", x, raw, x.size)
    t = unpack_blocks(spec, raw, (5, 512))
    assert np.array_equal(t.pack().reshape(-1), raw)
    assert np.array_equal(_bits(t.dequantize()).reshape(-1), _bits(gguf_dequantize(raw, spec.ggml_type)).reshape(-1))


@pytest.mark.parametrize("name", TYPES)
def test_rtn_init_is_close_to_ggml_reference_quantizer(name):
    """Our closed-form init is a sane start: RMSE within 1.6x of ggml's searched reference quantizer."""
    spec = kquant_spec(name)
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(11)) * 0.02
    x = np.ascontiguousarray(w.numpy())
    raw = np.zeros(16 * 2 * spec.block_bytes, dtype=np.uint8)
    _ggml_row(f"quantize_row_{name[:2]}_K_ref", x, raw, x.size)
    ggml_rmse = float(np.sqrt(np.mean((gguf_dequantize(raw, spec.ggml_type).reshape(16, 512) - x) ** 2)))
    ours = float((rtn_kquant(spec, w).dequantize() - w).square().mean().sqrt())
    assert ours < 1.6 * ggml_rmse


def test_refuses_rows_not_a_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        rtn_kquant(kquant_spec("q4_k"), torch.randn(4, 576))
    with pytest.raises(ValueError, match="multiple of 256"):
        KQuantLinear(torch.nn.Linear(576, 8, bias=False), kquant_spec("q4_k"), rank=2, lora_alpha=4)
    with pytest.raises(ValueError, match="unknown K-quant init"):
        KQuantLinear(torch.nn.Linear(256, 8, bias=False), kquant_spec("q4_k"), rank=2, lora_alpha=4, init="gptq")


def _layer(name: str, fin: int, fout: int, seed: int) -> KQuantLinear:
    torch.manual_seed(seed)
    m = KQuantLinear(torch.nn.Linear(fin, fout, bias=False), kquant_spec(name), rank=4, lora_alpha=8)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.02)
        # off-integer latents (never at a .5 tie), some pushed outside their range to exercise the STE masks
        m.sc.add_(torch.empty_like(m.sc).uniform_(-0.4, 0.4))
        m.sc.view(-1)[:3] = m.spec.sc_max + 0.3
        if m.mn is not None:
            m.mn.add_(torch.empty_like(m.mn).uniform_(-0.4, 0.4))
            m.dmin.mul_(1.0 + 0.01 * torch.randn_like(m.dmin))
        m.d.mul_(1.0 + 0.01 * torch.randn_like(m.d))  # latent off the fp16 grid
    return m


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("fin,fout,prefix", [(256, 12, (3, 5)), (512, 7, (9,))])
def test_grads_match_plain_autograd(name, fin, fout, prefix):
    m = _layer(name, fin, fout, seed=fin + fout)
    x = torch.randn(*prefix, fin, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    names = [k for k in ("lora_A", "lora_B", "d", "sc", "dmin", "mn") if getattr(m, k) is not None]
    leaves = {k: getattr(m, k).detach().clone().requires_grad_(True) for k in names}
    s = m.spec
    x2 = x.detach().clone().requires_grad_(True)
    # The oracle forms W0 + alpha*B@A with the same fixed-order sum as the layer, so no code sits on a rounding tie.
    W = combined_weight(m.weight, leaves["lora_A"], leaves["lora_B"], m.cfg.alpha)
    wq = reference_kquant_wq(
        W,
        torch.zeros(1, fin),
        torch.zeros(fout, 1),
        leaves["d"],
        leaves["sc"],
        leaves.get("dmin"),
        leaves.get("mn"),
        n_sub=s.n_sub,
        qmin=s.qmin,
        qmax=s.qmax,
        sc_min=s.sc_min,
        sc_max=s.sc_max,
        mn_max=s.mn_max,
        alpha=0.0,
    )
    (x2 @ wq.T).backward(gy)

    assert torch.equal(y, x2 @ wq.detach().T)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for k in names:
        ref = leaves[k].grad
        got = getattr(m, k).grad
        assert got is not None and got.shape == ref.shape, k
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-12, k
        assert float(ref.abs().max()) > 0, k  # every parameter actually receives gradient


@pytest.mark.parametrize("name", TYPES)
def test_quantized_decodes_to_the_training_forward_bit_for_bit(name):
    m = _layer(name, 512, 9, seed=1)
    x = torch.randn(4, 512)
    q = m.quantized("blk.0.attn_q.weight")
    wq = q.dequantize()
    assert torch.equal(m(x), x @ wq.T)
    # what the writer packs decodes (in gguf-py) to the same fp32 weights
    assert np.array_equal(_bits(gguf_dequantize(q.pack(), q.spec.ggml_type).reshape(9, 512)), _bits(wq))
    assert int(q.codes.min()) >= m.spec.qmin and int(q.codes.max()) <= m.spec.qmax


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k"])  # q5_k / q6_k train alike (measured 0.03 / 0.01)
def test_a_few_steps_reduce_reconstruction_loss(name):
    """LoRA + scales learn a low-rank change of the base weight through the grid."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 32, bias=False)
    target = base.weight.detach() + 0.1 * torch.randn(32, 2) @ torch.randn(2, 256) / 16
    m = KQuantLinear(base, kquant_spec(name), rank=4, lora_alpha=4)
    opt = torch.optim.Adam(m.lr_groups(lr=1e-2, scale_rel_lr=3e-3, int_lr=0.05))
    x = torch.randn(128, 256)
    y_t = x @ target.T

    def loss() -> torch.Tensor:
        return (m(x) - y_t).square().mean()

    with torch.no_grad():
        first = float(loss())
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert float(loss()) < 0.6 * first  # measured 0.08 / 0.24 / 0.44


def test_packed_blocks_survive_a_gguf_file(tmp_path):
    """How the GGUF writer will call this: add_tensor(name, pack(), raw_dtype=type); the file decodes to the forward."""
    import gguf

    layers = {name: _layer(name, 256, 5, seed=2).quantized(f"blk.0.{name}.weight") for name in TYPES}
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for q in layers.values():
        w.add_tensor(q.name, q.pack(), raw_dtype=q.spec.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    read = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    for q in layers.values():
        t = read[q.name]
        assert t.tensor_type == q.spec.ggml_type and [int(s) for s in t.shape] == [256, 5]
        got = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(5, 256)
        assert np.array_equal(_bits(got), _bits(q.dequantize()))


@pytest.mark.parametrize("name", TYPES)
def test_ggml_init_starts_at_ggml_reference_bytes(name):
    """init='ggml' (B = 0 at step 0): the fold's bytes equal ggml's own reference quantizer's for W0."""
    spec = kquant_spec(name)
    base = torch.nn.Linear(512, 6, bias=False)
    x = np.ascontiguousarray(base.weight.detach().numpy())
    raw = np.zeros(6 * 2 * spec.block_bytes, dtype=np.uint8)
    _ggml_row(f"quantize_row_{name[:2]}_K_ref", x, raw, x.size)
    m = KQuantLinear(base, spec, rank=4, lora_alpha=8, init="ggml")
    assert np.array_equal(m.quantized().pack().reshape(-1), raw)
