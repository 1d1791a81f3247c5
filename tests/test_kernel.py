"""`--kernel compiled` (torch.compile of the L4Q chunk pieces) against the eager Function, on CPU.

Expected codes come from `quant.quantize` (the fold's path) and expected gradients from the plain-autograd STE
oracle of tests/test_layer_grad.py (tools/naive_qat.py), so neither kernel is checked against itself alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from naive_qat import reference_wq  # tools/naive_qat.py, on sys.path via conftest

from l4q_export.errors import L4QInputError
from l4q_export.quant import QuantSpec, effective_params
from l4q_export.training import fused, kernel
from l4q_export.training.layer import L4QLinear

GRAD_RTOL = 1e-5  # tests/test_layer_grad.py's bound


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


CASES = [  # bits, group, zero point, in, out, base dtype: the float/integer/symmetric paths, partial groups, int8
    (4, 16, "float", 48, 24, "stored"),
    (4, 16, "float", 56, 20, "stored"),  # full groups and a partial one: backward_graph's two parts of a row
    (4, 24, "integer", 52, 12, "int8"),
    (3, -1, "symmetric", 36, 28, "stored"),
]


def _layer(bits, group, zp, fin, fout, base_dtype):
    torch.manual_seed(bits * 1000 + fin + fout)
    m = L4QLinear(torch.nn.Linear(fin, fout, bias=False), QuantSpec(bits, group, zp), rank=4, lora_alpha=8, init="minmax",
                  base_dtype=base_dtype)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
        if m.offset is not None and zp == "float":
            m.offset.add_(0.2 * m.scale * torch.randn_like(m.offset))
    return m


@pytest.mark.parametrize("bits,group,zp,fin,fout,base_dtype", CASES)
def test_compiled_wq_identical_and_grads_within_tolerance(bits, group, zp, fin, fout, base_dtype):
    m = _layer(bits, group, zp, fin, fout, base_dtype)
    p = effective_params(m.spec, m.scale, m.offset, m.cfg.fp16_grid)
    W0, w0s = (m.weight_int8, m.weight_int8_scale) if base_dtype == "int8" else (m.weight, None)
    with torch.no_grad():
        wq = fused.forward_rows(W0, w0s, m.lora_A.float(), m.lora_B.float(), p, m.spec, m.cfg.lora_scale, 0, fout,
                                torch.float32)
    assert torch.equal(wq.view(torch.int32), m.quantized().dequantize().view(torch.int32))  # the fold's W_q, bit for bit

    x = torch.randn(3, 5, fin)
    gy = torch.randn(3, 5, fout)
    runs = {}
    for k in ("eager", "compiled"):
        m.cfg = dataclasses.replace(m.cfg, kernel=k)
        for t in m.parameters():
            t.grad = None
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.backward(gy)
        offset = [m.offset.grad] if m.offset is not None else []
        runs[k] = [y.detach(), xx.grad, m.lora_A.grad, m.lora_B.grad, m.scale.grad, *offset]
    assert torch.equal(runs["compiled"][0], runs["eager"][0])  # same W_q, same GEMM: the same output bits

    # the independent oracle: plain autograd through the STE formulas on the same W0
    leaves = [t.detach().clone().requires_grad_(True) for t in (m.lora_A, m.lora_B, m.scale)]
    off = None if m.offset is None else m.offset.detach().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    wq = reference_wq(m.base_weight(), *leaves, off, bits=bits, group=group, zero_point=zp, alpha=2.0,
                      gscale=m.spec.lsq_grad_scale(fin))
    (x2 @ wq.T).backward(gy)
    oracle = [x2.grad, *(t.grad for t in leaves)] + ([off.grad] if off is not None else [])
    for got, eag, ref in zip(runs["compiled"][1:], runs["eager"][1:], oracle, strict=True):
        assert _rel(got, eag) < GRAD_RTOL
        assert _rel(got, ref) < GRAD_RTOL


def _model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.a = _layer(4, 16, "float", 48, 24, "stored")
    return model


def _flip_first_wq_bit(monkeypatch, dtype: torch.dtype) -> None:
    """A compiler that gets one bit of W_q wrong, only where the forward graph outputs `dtype`."""
    real = fused.compiled

    def broken(name):
        fn = real(name)
        if name != "forward":
            return fn

        def one_bit_off(*a):
            wq = fn(*a)
            if wq.dtype == dtype:
                wq = wq.clone()
                wq.view(torch.int16 if dtype.itemsize == 2 else torch.int32).view(-1)[0] ^= 1
            return wq
        return one_bit_off

    monkeypatch.setattr(fused, "compiled", broken)


def test_failing_self_check_refuses_compiled_and_auto_falls_back(monkeypatch):
    """A compiler that changed one bit of W_q: `compiled` refuses with one line, `auto` runs eager and says why."""
    _flip_first_wq_bit(monkeypatch, torch.float32)
    model = _model()
    with pytest.raises(L4QInputError, match=r"self-check failed.*W_q \(torch.float32\) differs") as e:
        kernel.select_kernel(model, "compiled")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(kernel, "AUTO_MIN_ELEMENTS", 0)
    rec = kernel.select_kernel(model, "auto")
    assert rec["used"] == "eager" and rec["reason"].startswith("self-check failed")
    assert model.a.cfg.kernel == "eager"


def test_self_check_covers_the_half_precision_graphs(monkeypatch):
    """A bf16 model trains through the graphs that round W_q to bf16: those are checked too, so a compiler that
    changed one bf16 bit of them (and nothing in fp32) is refused."""
    model = torch.nn.Module()
    torch.manual_seed(0)
    model.a = L4QLinear(torch.nn.Linear(48, 24, bias=False).to(torch.bfloat16), QuantSpec(4, 16, "float"), rank=4,
                        lora_alpha=8)
    model.norm = torch.nn.LayerNorm(48).to(torch.bfloat16)
    assert kernel.select_kernel(model, "compiled")["used"] == "compiled"
    _flip_first_wq_bit(monkeypatch, torch.bfloat16)
    with pytest.raises(L4QInputError, match=r"W_q \(torch.bfloat16\) differs"):
        kernel.select_kernel(model, "compiled")


def test_auto_records_choice_and_small_models_stay_eager():
    model = _model()
    rec = kernel.select_kernel(model, "auto")
    assert rec["used"] == "eager" and "would not pay back" in rec["reason"]
    rec = kernel.select_kernel(model, "compiled")
    assert rec["used"] == "compiled" and model.a.cfg.kernel == "compiled" and "matched eager" in rec["self_check"]
    with pytest.raises(L4QInputError, match="--kernel must be one of"):
        kernel.select_kernel(model, "triton")


@pytest.mark.slow
def test_compiled_training_run_folds_exactly(tmp_path, tiny_base):
    """l4q-train --kernel compiled on the tiny LLaMA: the report records it, the fold reproduces the training codes
    bit for bit, and the adapter stays within the gradient tolerance's reach of an eager run."""
    import json

    from safetensors.torch import load_file

    from l4q_export.demo import instruction_records
    from l4q_export.training.trainer import TrainArgs, train
    from l4q_export.verify import verify_fold

    data = tmp_path / "d.json"
    data.write_text(json.dumps(instruction_records(32)))
    adapters = {}
    for k in ("eager", "compiled"):
        out = tmp_path / k
        rep = train(TrainArgs(model=tiny_base, data=data, out=out, bits=4, group_size=32, steps=2, batch_size=2,
                              grad_accum=1, seq_len=64, lr=3e-3, save_every=0, eval_examples=0, kernel=k))
        assert rep["kernel"]["used"] == k
        adapters[k] = load_file(str(out / "l4q_adapter.safetensors"))
        assert verify_fold(out)["passed"]
    for key, v in adapters["eager"].items():
        torch.testing.assert_close(adapters["compiled"][key], v, rtol=1e-4, atol=1e-6)


def test_auto_chooses_per_layer_shape(monkeypatch):
    """auto times each distinct layer shape and installs the faster kernel per shape (whichever it is)."""
    monkeypatch.setattr(kernel, "AUTO_MIN_ELEMENTS", 0)
    model = _model()
    model.b = _layer(4, 16, "float", 32, 40, "stored")
    rec = kernel.select_kernel(model, "auto", tokens=16)
    assert set(rec["layers"]) == {"24x48", "40x32"} and set(rec["layers"].values()) <= {"eager", "compiled"}
    assert model.a.cfg.kernel == rec["layers"]["24x48"] and model.b.cfg.kernel == rec["layers"]["40x32"]
    assert rec["used"] in ("eager", "compiled", "mixed") and "self-check passed" in rec["reason"]
