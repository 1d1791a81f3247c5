"""The quantizer math, shared verbatim by the training forward, the fold, every exporter and verify.

Canonical form (what exporters consume): unsigned codes ``u in [0, 2^bits - 1]`` with per-group scale
``d`` and either a float minimum ``m`` (``W = d*u + m``) or an integer zero point ``z`` (``W = (u - z)*d``,
and ``m = -d*z``).  Both dequantization orders are kept because they round differently in fp32 and we
want each one to be bit-identical to the runtimes that use it: llama.cpp's Q4_1 computes ``d*q + m``,
integer-zero formats (GPTQ, compressed-tensors, ONNX DequantizeLinear) compute ``(q - z)*s``.

Mapping from L4Q (paper notation): signed codes ``q = u - 2^(bits-1)``, offset ``b``: ``d = s`` and
``m = b - s*2^(bits-1)``.  In real arithmetic ``d*u + m = s*q + b`` exactly.

Every function here is deterministic across devices: the LoRA product is formed as a fixed-order sum of
rank-1 outer products (element-wise multiplies and adds, which CPU and CUDA round identically) instead of
a GEMM whose accumulation order depends on the BLAS kernel.  That is what lets a CPU fold reproduce the
codes a GPU run trained with, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inplace import GroupParams, block_rows, delta_into, dequantize_, merged_into, one_thread, round_into, row_blocks
from .spec import QuantSpec

# Scales are clamped to this floor in the forward so an all-zero group can never divide by zero.
# 2^-14 is the smallest normal fp16 value, so the floor itself survives an fp16 export.
SCALE_FLOOR = 2.0**-14


def expand_groups(p: torch.Tensor, group_len: int, in_features: int) -> torch.Tensor:
    """[out, G] -> [out, in]: repeat each group's value over its columns (last group may be partial).

    Column j reads group j // group_len.  Inside a compiled graph that index is computed from the column, not
    gathered, so the compiled kernel (training/fused.py) fuses the whole chain into one loop over the chunk; the
    view formulation (expand -> reshape -> slice) made inductor skip a partial group's columns."""
    return p[:, torch.arange(in_features, device=p.device) // group_len]


def group_sum(x: torch.Tensor, group_len: int) -> torch.Tensor:
    """[out, in] -> [out, G]: sum each contiguous group of columns (zero-padding a partial last group)."""
    out, n = x.shape
    pad = (-n) % group_len
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(out, -1, group_len).sum(-1)


def group_reduce(x: torch.Tensor, group_len: int, op: str) -> torch.Tensor:
    """[out, in] -> [out, G] with op in {"amin", "amax"}; padding never wins the reduction."""
    out, n = x.shape
    pad = (-n) % group_len
    if pad:
        fill = float("inf") if op == "amin" else float("-inf")
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    x = x.view(out, -1, group_len)
    return x.amin(-1) if op == "amin" else x.amax(-1)


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * B @ A in fp32, as a fixed-order sum of rank-1 outer products (device-independent rounding).

    A: [r, in], B: [out, r].  Every element is ``((b0*a0 + b1*a1) + ...) * alpha``, each multiply and add rounded
    to fp32 on its own (no FMA, no GEMM reordering), which CPU and CUDA round identically.  The passes run over
    row blocks sized to stay in cache and write into preallocated buffers: the same IEEE operations per element
    as the plain loop, without r full-size temporaries and r trips through main memory.
    """
    A = A.float()
    B = B.float()
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        return lora_delta_loop(A, B, alpha)  # autograd cannot record out= writes
    out_f, in_f = B.shape[0], A.shape[1]
    acc = torch.empty(out_f, in_f, dtype=torch.float32, device=A.device)
    rows = block_rows(in_f)
    buf = torch.empty(min(rows, max(out_f, 1)), in_f, dtype=torch.float32, device=A.device)
    with one_thread():
        for r0, r1 in row_blocks(out_f, rows):
            delta_into(acc[r0:r1], buf[: r1 - r0], A, B[r0:r1], alpha)
    return acc


def lora_delta_loop(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """The plain form of `lora_delta` -- the very same operations per element, as new tensors instead of out=
    writes: what autograd records and what torch.compile fuses (training/fused.py)."""
    A = A.float()
    B = B.float()
    acc = B[:, 0:1] * A[0:1, :]
    for k in range(1, A.shape[0]):
        acc = acc + B[:, k : k + 1] * A[k : k + 1, :]
    return acc * alpha


def combined_weight(W0: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """W0 + alpha*B@A in fp32: LoRA is merged *before* quantization (L4Q Eq. 7)."""
    if A is None or B is None:
        return W0.float().clone()
    if _tracked(W0, A, B) or W0.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return W0.float() + lora_delta(A, B, alpha)
    # the same sum, written into the delta's buffer: fp32 addition commutes exactly, and W0 (fp16/bf16/fp32, so the
    # sum is computed in fp32) is widened on the fly: no fp32 copy of W0 and no third [out, in] buffer
    return lora_delta(A, B, alpha).add_(W0)


def _tracked(*ts: torch.Tensor | None) -> bool:
    """Would autograd record an operation on these, or is torch.compile tracing (training/fused.py)?  In-place
    variants (same IEEE operations, fewer full-size buffers: the fold of a 7B layer is memory-bound) are used only
    in plain eager code without autograd; under compile the out-of-place form is what inductor fuses, and dynamo
    cannot trace the in-place path's data-pointer test."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def to_grid(t: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """Snap a scale/offset to the fp16 grid (exact fp16 exports) or leave it in fp32."""
    return t.half().float() if fp16_grid else t.float()


def effective_params(spec: QuantSpec, scale: torch.Tensor, offset: torch.Tensor | None, fp16_grid: bool = False) -> GroupParams:
    """Turn trained parameters into the canonical (d, m) or (d, z).

    float:     offset is L4Q's b; d = s, m = b - s*2^(bits-1)  (both snapped to fp16 when fp16_grid).
    integer:   offset is a float zero point; z = clamp(round(offset), 0, 2^bits-1).
    symmetric: offset unused; z = 2^(bits-1).
    """
    d = to_grid(scale, fp16_grid).clamp_min(SCALE_FLOOR)
    if spec.zero_point == "float":
        assert offset is not None, "float zero-point mode needs an offset"
        m = to_grid(offset.float() - d * spec.half, fp16_grid)
        return GroupParams(scale=d, minimum=m)
    if spec.zero_point == "integer":
        assert offset is not None, "integer zero-point mode needs a zero point"
        z = offset.float().round().clamp(0, spec.umax)
        return GroupParams(scale=d, zero=z)
    return GroupParams(scale=d, zero=torch.full_like(d, float(spec.half)))


class _Grouped:
    """View an [out, in] tensor as [out, G, g] so per-group parameters broadcast without an expanded copy.

    A partial last group cannot be viewed that way; then parameters are expanded to [out, in] instead (the
    out-of-place forms below are what autograd and torch.compile see; the in-place ones of inplace.py split the
    partial group off instead).  Every path applies the same element-wise operations to the same numbers.
    """

    def __init__(self, t: torch.Tensor, spec: QuantSpec) -> None:
        self.out, self.n = t.shape
        self.g = spec.group_len(self.n)
        self.even = self.n % self.g == 0

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.out, self.n // self.g, self.g) if self.even else t

    def param(self, p: torch.Tensor) -> torch.Tensor:
        return p.unsqueeze(-1) if self.even else expand_groups(p, self.g, self.n)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.out, self.n)


def shifted_input(w: torch.Tensor, p: GroupParams, spec: QuantSpec) -> torch.Tensor:
    """The unrounded code v: (w - m)/d (float mode) or w/d + z (integer modes), in fp32.

    The STE mask is 0 <= v <= 2^bits-1 (clamp before round, as L4Q's code does).
    """
    gv = _Grouped(w, spec)
    x = gv.view(w)
    if p.minimum is not None:
        return gv.flat((x - gv.param(p.minimum)) / gv.param(p.scale))
    return gv.flat(x / gv.param(p.scale) + gv.param(p.zero))


def round_codes(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Unsigned integer codes (as fp32 values) = round(clamp(v, 0, umax)), round-half-to-even."""
    return v.clamp(0, spec.umax).round()


def dequantize_codes(u: torch.Tensor, p: GroupParams, spec: QuantSpec) -> torch.Tensor:
    """W = d*u + m (float mode) or (u - z)*d (integer modes), fp32, two separately rounded ops."""
    if _tracked(u, p.scale, p.minimum, p.zero):
        gv = _Grouped(u, spec)
        uf = gv.view(u.float())
        if p.minimum is not None:
            return gv.flat(uf * gv.param(p.scale) + gv.param(p.minimum))
        return gv.flat((uf - gv.param(p.zero)) * gv.param(p.scale))
    if u.dim() != 2 or u.device.type != "cpu":
        uf = u.float()
        if uf.data_ptr() == u.data_ptr():  # u was already fp32: never write into the caller's tensor
            uf = uf.clone()
        return dequantize_(uf, p, spec)
    # CPU: one cache-sized row block at a time (the widening copy, then the two ops in place), as the fold does:
    # the same IEEE operations on every element, three trips through memory fewer
    out = torch.empty(u.shape, dtype=torch.float32)
    with one_thread():
        for r0, r1 in row_blocks(u.shape[0], block_rows(u.shape[1])):
            dequantize_(out[r0:r1].copy_(u[r0:r1]), p.rows(r0, r1), spec)
    return out


@dataclass
class QuantizedTensor:
    """The canonical quantized tensor every exporter consumes.

    codes:   uint8 [out, in], values in [0, 2^bits - 1]
    scale:   fp32 [out, G]   (d)
    minimum: fp32 [out, G]   (m; always set, = -d*z for integer modes)
    zero:    fp32 [out, G] integer-valued, or None for float offsets (no exact integer zero point)
    """

    name: str
    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def params(self) -> GroupParams:
        if self.zero is not None:
            return GroupParams(scale=self.scale, zero=self.zero)
        return GroupParams(scale=self.scale, minimum=self.minimum)

    def dequantize(self) -> torch.Tensor:
        """fp32 weights, bit-identical to the training forward's W_q."""
        return dequantize_codes(self.codes, self.params, self.spec)

    def rows(self, r0: int, r1: int) -> QuantizedTensor:
        """Output rows r0:r1 (views): their `dequantize()` is rows r0:r1 of the whole one, bit for bit (groups run
        along a row), so a caller can walk W_q in slices without holding all of it."""
        p = self.params.rows(r0, r1)
        return QuantizedTensor(self.name, self.spec, self.codes[r0:r1], p.scale, self.minimum[r0:r1], p.zero)


def quantize(name: str, w: torch.Tensor, p: GroupParams, spec: QuantSpec) -> QuantizedTensor:
    """Codes for an fp32 combined weight under fixed group parameters, packaged canonically."""
    w = w.float()
    if _tracked(w, p.scale, p.minimum, p.zero):
        u = round_codes(shifted_input(w, p, spec), spec)
    else:
        u = round_into(torch.empty_like(w), w, p, spec)
    minimum = p.minimum if p.minimum is not None else -(p.scale * p.zero)
    return QuantizedTensor(name=name, spec=spec, codes=u.to(torch.uint8), scale=p.scale, minimum=minimum, zero=p.zero)


_BLOCKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_merged(
    name: str, W0: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, alpha: float, p: GroupParams,
    spec: QuantSpec,
) -> QuantizedTensor:
    """``quantize(name, combined_weight(W0, A, B, alpha), p, spec)``, one cache-sized row block at a time.

    The fold of a 7B linear is memory-bound: merged weight, shifted input and codes as whole [out, in] fp32 passes
    are ~7 trips through main memory per element.  Blocked, each block's delta, + W0, - m, / d, clamp and round run
    on the same cache-resident buffer and only the uint8 codes are full size.  Every element sees the very same
    IEEE operations in the same order (groups run along a row, so a row block holds whole groups), so codes are
    bit-identical to the unblocked form, which autograd, torch.compile and unusual base dtypes still take.
    """
    if (
        _tracked(W0, A, B, p.scale, p.minimum, p.zero)
        or W0.dtype not in _BLOCKED_DTYPES
        or W0.dim() != 2
        or W0.device.type != "cpu"
    ):
        return quantize(name, combined_weight(W0, A, B, alpha), p, spec)
    out_f, in_f = W0.shape
    merged = A is not None and B is not None
    Af = A.float() if merged else None
    Bf = B.float() if merged else None
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    rows = min(block_rows(in_f), max(out_f, 1))
    buf = torch.empty(rows, in_f, dtype=torch.float32)
    prod = torch.empty(rows, in_f, dtype=torch.float32) if merged else buf
    with one_thread():
        for r0, r1 in row_blocks(out_f, rows):
            acc = merged_into(buf[: r1 - r0], prod[: r1 - r0], W0, None, Af, Bf, alpha, r0, r1)
            codes[r0:r1].copy_(round_into(acc, acc, p.rows(r0, r1), spec))
    minimum = p.minimum if p.minimum is not None else -(p.scale * p.zero)
    return QuantizedTensor(name=name, spec=spec, codes=codes, scale=p.scale, minimum=minimum, zero=p.zero)


# ----------------------------------------------------------------------------------------------------
# Initialisation of (scale, offset) from a weight -- used by L4Q's init and by the RTN baseline.
# ----------------------------------------------------------------------------------------------------

INIT_METHODS = ("l4q", "minmax", "absmax")


def init_params(w: torch.Tensor, spec: QuantSpec, method: str = "l4q") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial trainable (scale, offset) per group, [out, G] fp32.

    l4q:    s = max(|min/Q_N|, |max/Q_P|), b = 0 -- symmetric and clip-free (L4Q's best init, §1.3).
    minmax: asymmetric, s = (max-min)/(2^bits-1), grid starting at the group minimum.
    absmax: s = max|w| / Q_P, b = 0.
    The offset returned is b (float mode), a float zero point (integer mode) or None (symmetric).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init {method!r}; choose one of {INIT_METHODS}")
    w = w.float()
    g = spec.group_len(w.shape[1])
    lo = group_reduce(w, g, "amin")
    hi = group_reduce(w, g, "amax")
    if method == "minmax" and spec.zero_point != "symmetric":
        s = (hi - lo) / spec.umax
    elif method == "absmax":
        s = torch.maximum(lo.abs(), hi.abs()) / max(spec.qp, 1)
    else:  # l4q (also the symmetric fallback of minmax)
        s = torch.maximum((lo / spec.qn).abs(), (hi / max(spec.qp, 1)).abs())
    s = torch.where(s > 0, s, torch.full_like(s, SCALE_FLOOR))
    if spec.zero_point == "symmetric":
        return s, None
    if spec.zero_point == "float":
        b = lo + s * spec.half if method == "minmax" else torch.zeros_like(s)
        return s, b
    z = (-lo / s).round().clamp(0, spec.umax) if method == "minmax" else torch.full_like(s, float(spec.half))
    return s, z
