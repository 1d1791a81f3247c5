"""Choosing the L4Q layer's kernel (`l4q-train --kernel`, `l4q_export.api.select_kernel`): eager or torch.compile'd.

    eager     the chunked autograd Function of layer.py, plain PyTorch ops (the reference)
    compiled  the same Function with its per-chunk element-wise chains compiled (training/fused.py)
    auto      where the self-check below passes, per layer shape the kernel a quick timing finds faster (the fused
              chains win on some shapes and lose on others, docs/results/gpu.md); eager when the check fails or
              every layer is too small to pay back a compilation; the choice and reason go to train_report.json

The self-check runs before step 0 on one layer of every distinct shape of the model itself (its own W0, a random
non-zero LoRA B and perturbed scales, so the LoRA path and clipping are exercised): W_q of every row chunk must be
bit-identical to the fold's codes dequantized, the forward output bit-identical, and every gradient within the
tolerance tests/test_layer_grad.py holds the Function to (max |diff| / max |ref| < 1e-5).  A compiler that fused
a multiply-add into an FMA or turned the division into a reciprocal would change codes, and with them what the
fold exports -- so a failing check is never trained through: `compiled` refuses, `auto` falls back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from ..errors import L4QInputError
from ..quant import combined_weight, effective_params, quantize
from ..quant.base_int8 import int8_dequant
from . import fused
from .layer import L4QFunction, L4QLinear, _row_chunks, _rows

KERNELS = ("auto", "eager", "compiled")

GRAD_RTOL = 1e-5  # tests/test_layer_grad.py's bound on the Function against plain autograd
CHECK_TOKENS = 8
# auto: below this many weights in the largest L4Q layer, eager without compiling (compile time, tens of seconds on
# CPU, cannot pay back and the fused chunk is launch-bound; see docs/results/gpu.md's CPU section)
AUTO_MIN_ELEMENTS = 1 << 18


def _l4q_layers(model: nn.Module) -> list[tuple[str, L4QLinear]]:
    """The layers with a compiled kernel: exactly L4QLinear (not the baselines that reuse its Function)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is L4QLinear]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12))


def _layer_inputs(layer: L4QLinear, seed: int) -> tuple[torch.Tensor, ...]:
    """(W0, w0_scale, A, B, scale, offset) of `layer` with a random non-zero B and perturbed grid (copies)."""
    g = torch.Generator().manual_seed(seed)
    dev = layer.scale.device
    if layer.base_dtype == "int8":
        W0, w0s = layer.weight_int8, layer.weight_int8_scale
    else:
        W0, w0s = layer.weight, None
    A = None if layer.lora_A is None else layer.lora_A.detach().clone()
    B = None
    if layer.lora_B is not None:
        B = (torch.randn(layer.lora_B.shape, generator=g) * 0.05).to(dev, layer.lora_B.dtype)
    scale = (layer.scale.detach() * (1 + 0.05 * torch.rand(layer.scale.shape, generator=g).to(dev))).to(layer.scale.dtype)
    off = None
    if layer.offset is not None:
        off = layer.offset.detach() + 0.2 * scale * torch.randn(layer.offset.shape, generator=g).to(dev)
    return W0, w0s, A, B, scale, off


def _check_dtypes(model: nn.Module) -> tuple[torch.dtype, ...]:
    """fp32 (every bit of W_q) and the half-precision activation dtypes the model computes in (its norms' and
    embeddings' dtype, by the trainer's policy): the graphs round W_q to it inside, so that variant is compiled and
    checked on its own."""
    half = sorted({p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}, key=str)
    return (torch.float32, *half)


@torch.no_grad()
def _wq_equal(layer: L4QLinear, inputs: tuple, dtype: torch.dtype, seed: int) -> bool:
    """Every row chunk's W_q in `dtype`, from the forward and the backward graph, vs the fold's codes dequantized
    (then rounded to `dtype`), bit for bit."""
    W0, w0s, A, B, scale, off = inputs
    cfg = layer.cfg
    p = effective_params(cfg.spec, scale, off, cfg.fp16_grid)
    out_f, in_f = W0.shape
    Af, Bf = (None, None) if A is None else (A.float(), B.float())
    g = torch.Generator().manual_seed(seed)
    for r0, r1 in _row_chunks(out_f, in_f):
        w0 = W0[r0:r1] if w0s is None else int8_dequant(W0[r0:r1], w0s[r0:r1])
        want = quantize("", combined_weight(w0, A, _rows(B, r0, r1), cfg.lora_scale), p.rows(r0, r1), cfg.spec)
        want = want.dequantize().to(dtype)
        G = torch.randn(r1 - r0, in_f, generator=g).to(W0.device, dtype)
        for got in (fused.forward_rows(W0, w0s, Af, Bf, p, cfg.spec, cfg.lora_scale, r0, r1, dtype),
                    fused.backward_rows(W0, w0s, Af, Bf, p, cfg.spec, cfg.lora_scale, r0, r1, G, dtype, A is not None)[0]):
            if not torch.equal(got.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                               want.view(torch.int16 if dtype.itemsize == 2 else torch.int32)):
                return False
    return True


def _fwd_bwd(layer: L4QLinear, inputs: tuple, x: torch.Tensor, gy: torch.Tensor, kernel: str,
             need_x: bool = True) -> list[torch.Tensor]:
    """Output and every gradient of one L4QFunction call under `kernel` (need_x=False: the first decoder layer's
    q/k/v, whose input -- the frozen embedding's output -- needs no gradient)."""
    W0, w0s, A, B, scale, off = inputs
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, A, B, scale, off)]
    if not need_x:
        leaves[0] = x.detach()
    cfg = dataclasses.replace(layer.cfg, kernel=kernel)
    xx, AA, BB, ss, oo = leaves
    with torch.enable_grad():
        y = L4QFunction.apply(xx, W0, w0s, AA, BB, ss, oo, cfg)
        y.backward(gy)
    return [y.detach(), *[t.grad for t in leaves if t is not None and t.requires_grad]]


def self_check(model: nn.Module, seed: int = 0) -> tuple[bool, str]:
    """(passed, reason): compiled vs eager on one L4Q layer of each distinct (shape, base dtype, spec)."""
    seen: set = set()
    checked = 0
    dtypes = _check_dtypes(model)
    for name, layer in _l4q_layers(model):
        key = (layer.out_features, layer.in_features, layer.base_dtype, layer.cfg)
        if key in seen:
            continue
        seen.add(key)
        inputs = _layer_inputs(layer, seed + checked)
        dev = inputs[4].device
        for dt in dtypes:
            g = torch.Generator().manual_seed(seed + 1000 + checked)
            x = torch.randn(CHECK_TOKENS, layer.in_features, generator=g).to(dev, dt)
            gy = torch.randn(CHECK_TOKENS, layer.out_features, generator=g).to(dev, dt)
            try:
                if not _wq_equal(layer, inputs, dt, seed + 2000 + checked):
                    return False, f"{name}: compiled W_q ({dt}) differs from the fold's"
                pairs = [(_fwd_bwd(layer, inputs, x, gy, "eager", nx), _fwd_bwd(layer, inputs, x, gy, "compiled", nx))
                         for nx in (True, False)]  # every graph variant training will call
            except Exception as e:  # a compiler failure (no C compiler, unsupported op) is a reason, not a crash
                return False, f"torch.compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            for ref, got in pairs:
                if not torch.equal(ref[0], got[0]):
                    return False, f"{name}: compiled forward output ({dt}) differs from eager"
                for i, (r, c) in enumerate(zip(ref[1:], got[1:], strict=True)):
                    if _rel(c, r) >= GRAD_RTOL:
                        return False, (f"{name}: compiled gradient {i} ({dt}) differs from eager by {_rel(c, r):.2e} "
                                       f"(bound {GRAD_RTOL:g})")
        checked += 1
    if not checked:
        return False, "no L4Q layer in the model (other methods' layers have no compiled kernel)"
    return True, f"codes, outputs and gradients matched eager on {checked} layer shape(s)"


def _shape(layer: L4QLinear) -> str:
    return f"{layer.out_features}x{layer.in_features}"


def time_kernels(layer: L4QLinear, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one forward+backward of `layer`, per kernel (after a warm-up)."""
    inputs = _layer_inputs(layer, 0)
    g = torch.Generator().manual_seed(1)
    dev, dt = layer.scale.device, layer.scale.dtype
    x = torch.randn(tokens, layer.in_features, generator=g).to(dev, dt)
    gy = torch.randn(tokens, layer.out_features, generator=g).to(dev, dt)
    out = {}
    for kernel in ("eager", "compiled"):
        times = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _fwd_bwd(layer, inputs, x, gy, kernel)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[kernel] = sorted(times[1:])[len(times[1:]) // 2]
    return out


def set_kernel(model: nn.Module, kernel: str | dict[str, str]) -> None:
    """Every L4QLinear runs `kernel` ("eager" / "compiled", or a {"OUTxIN": kernel} choice per layer shape)."""
    for _, layer in _l4q_layers(model):
        k = kernel if isinstance(kernel, str) else kernel.get(_shape(layer), "eager")
        layer.cfg = dataclasses.replace(layer.cfg, kernel=k)


def _summary(choice: dict[str, str]) -> str:
    kinds = set(choice.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def select_kernel(model: nn.Module, kernel: str = "auto", tokens: int = 256, seed: int = 0) -> dict[str, Any]:
    """Check, choose and install the L4Q kernel; returns the record train_report.json keeps
    ({requested, used, reason, self_check, eager_s, compiled_s}).  `compiled` whose self-check fails raises
    L4QInputError (one line); `auto` then uses eager and says why."""
    if kernel not in KERNELS:
        raise L4QInputError(f"--kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    rec: dict[str, Any] = {"requested": kernel}
    if kernel == "eager":
        set_kernel(model, "eager")
        return {**rec, "used": "eager", "reason": "requested"}
    layers = _l4q_layers(model)
    if not layers:
        return {**rec, "used": "eager", "reason": "no L4Q layer (this method's layers run eager)"}
    largest = max(m.in_features * m.out_features for _, m in layers)
    if kernel == "auto" and largest < AUTO_MIN_ELEMENTS:
        set_kernel(model, "eager")
        return {**rec, "used": "eager", "reason": f"largest L4Q layer has {largest} weights (< {AUTO_MIN_ELEMENTS}): "
                "compiling would not pay back"}
    ok, why = self_check(model, seed)
    rec["self_check"] = why
    if not ok:
        if kernel == "compiled":
            raise L4QInputError(f"--kernel compiled: the start-up self-check failed ({why}); use --kernel eager")
        set_kernel(model, "eager")
        return {**rec, "used": "eager", "reason": f"self-check failed: {why}"}
    if kernel == "compiled":
        set_kernel(model, "compiled")
        return {**rec, "used": "compiled", "reason": "requested; self-check passed"}
    # auto: per layer shape, the faster kernel (the fused chains win on some shapes and lose on others)
    choice, times = {}, {}
    for _, layer in _l4q_layers(model):
        key = _shape(layer)
        if key not in choice:
            t = time_kernels(layer, tokens)
            times[key] = {k: round(v * 1e3, 2) for k, v in t.items()}
            choice[key] = "compiled" if t["compiled"] < t["eager"] else "eager"
    set_kernel(model, choice)
    rec.update(layers=choice, ms_per_fwd_bwd=times)
    shown = ", ".join(f"{k}: {v['compiled']} vs {v['eager']} ms" for k, v in times.items())
    return {**rec, "used": _summary(choice), "reason": f"self-check passed; per layer shape the faster kernel "
            f"(compiled vs eager per forward+backward, {tokens} tokens: {shown})"}


def agree_kernel(model: nn.Module, rec: dict[str, Any]) -> dict[str, Any]:
    """Under torchrun: every rank runs rank 0's choice (timings differ per process; the self-check passed wherever
    a rank chose compiled, and `compiled` refuses on any rank whose check fails)."""
    import torch.distributed as dist

    box = [rec]
    dist.broadcast_object_list(box, src=0)
    chosen = box[0]
    if chosen.get("used") != rec.get("used") or chosen.get("layers") != rec.get("layers"):
        if "compiled" in (chosen.get("layers") or {}).values() or chosen["used"] == "compiled":
            ok, why = self_check(model)
            if not ok:
                raise L4QInputError(f"--kernel: rank 0 chose compiled but this rank's self-check failed ({why})")
    set_kernel(model, chosen.get("layers") or chosen["used"])
    return chosen


def restore_kernel(model: nn.Module, saved: str | dict[str, str], seed: int = 0) -> dict[str, Any]:
    """--resume under auto: the kernels the run started with (the two kernels' gradients agree to 1e-5, not bit for
    bit, so re-choosing mid-run would break the bit-identical resume); compiled ones re-pass the self-check."""
    choice = {"all": saved} if isinstance(saved, str) else saved
    rec = select_kernel(model, "compiled" if "compiled" in choice.values() else "eager", seed=seed)
    set_kernel(model, saved)
    return {**rec, "requested": "auto", "used": _summary(choice), "reason": "resumed with the run's kernels",
            **({} if isinstance(saved, str) else {"layers": saved})}
