"""Finiteness of a (large) weight tensor without widening it.

`torch.isfinite(W).all()` on a 7B-shaped fp16/bf16 matrix materialises a bool tensor of the same size and, on a
shared CPU, costs ~0.45 s per 11008x4096 tensor -- a measurable part of an export (issue 17).  A half-precision
value is NaN/Inf iff its exponent bits are all set, so the check runs on the raw 16-bit patterns in slices with
numpy: one thread, a 2 MiB scratch buffer, the same answer.  fp32/fp64 tensors (adapters: scales, LoRA factors) go
through numpy too: torch hands a 65536-element `isfinite` to its OpenMP pool, whose wake-up on a busy 2-core machine
costs ~18 ms per call (3 s of a 2-layer 7B export, measured), against microseconds of work.
"""

from __future__ import annotations

import numpy as np
import torch

# (bits & 0x7FFF) >= threshold  <=>  exponent all ones  <=>  NaN or +-Inf
_HALF_NONFINITE = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
_NUMPY_FLOATS = (torch.float32, torch.float64)
_SLICE = 1 << 20


def all_finite(t: torch.Tensor) -> bool:
    """True iff every element of `t` is finite (fp16/bf16 on the raw bits, fp32/fp64 with numpy, other dtypes
    with torch.isfinite)."""
    limit = _HALF_NONFINITE.get(t.dtype)
    if t.device.type != "cpu" or (limit is None and t.dtype not in _NUMPY_FLOATS):
        return bool(torch.isfinite(t).all())
    if limit is None:
        flat = t.detach().contiguous().reshape(-1).numpy()
        ok = np.empty(min(_SLICE, flat.size), bool)
        return all(np.isfinite(flat[i : i + _SLICE], out=ok[: min(_SLICE, flat.size - i)]).all()
                   for i in range(0, flat.size, _SLICE))
    bits = t.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    buf = np.empty(min(_SLICE, bits.size), np.uint16)
    for i in range(0, bits.size, _SLICE):
        b = buf[: min(_SLICE, bits.size - i)]
        np.bitwise_and(bits[i : i + _SLICE], np.uint16(0x7FFF), out=b)
        if b.max() >= limit:
            return False
    return True
