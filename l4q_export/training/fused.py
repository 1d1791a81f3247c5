"""`--kernel compiled`: torch.compile'd row-chunk pieces of L4QFunction (training/layer.py).

The eager Function walks each row chunk through ~10 separate element-wise passes over [rows, in] buffers (widen W0,
r LoRA passes, shift, clamp, round, dequantize; in backward the same again plus the STE mask and the group sums).
Here each chunk's chain is one traced function that inductor fuses into a few loops.  The operations are the
eager ones (`quant.core`, `lora_delta_loop`: the same IEEE op per element, in the same order), so the codes are
expected to be bit-identical; whether the compiler kept them so (no contraction into FMA, no reciprocal for the
division) is *checked*, not assumed: training/kernel.py compares compiled and eager on the run's own layers at
start-up and refuses (or falls back to eager) when a single code differs.  The GEMMs stay outside (eager): they
depend on the token count, these pieces only on the layer shape, so one compilation with dynamic shapes serves
every layer and batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..quant import (
    GroupParams,
    QuantSpec,
    dequantize_codes,
    expand_groups,
    group_sum,
    lora_delta_loop,
    round_codes,
    shifted_input,
)
from ..quant.base_int8 import int8_dequant


def combined_rows(
    W0r: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, Br: torch.Tensor | None, lora_scale: float
) -> torch.Tensor:
    """Rows of W0 (or the int8 base's W0') + alpha*B@A in fp32, per element the very ops of the fold."""
    w = W0r.float() if w0_scale is None else int8_dequant(W0r, w0_scale)
    if A is None or Br is None:
        return w
    return w + lora_delta_loop(A, Br, lora_scale)


def forward_rows(W0r, w0_scale, A, Br, scale, minimum, zero, spec: QuantSpec, lora_scale: float):
    """(codes uint8, W_q fp32) of one row chunk."""
    p = GroupParams(scale=scale, minimum=minimum, zero=zero)
    u = round_codes(shifted_input(combined_rows(W0r, w0_scale, A, Br, lora_scale), p, spec), spec)
    return u.to(torch.uint8), dequantize_codes(u, p, spec)


def backward_rows(W0r, w0_scale, A, Br, scale, minimum, zero, G, spec: QuantSpec, lora_scale: float,
                  need_x: bool, need_lora: bool):
    """(W_q or None, dB rows or None, this chunk's dA term or None, dd [rows, G], dm/dz [rows, G]) of one row chunk
    given G = the chunk's dy^T x -- the formulas of L4QFunction.backward (see layer.py's docstring)."""
    in_f = W0r.shape[1]
    g = spec.group_len(in_f)
    p = GroupParams(scale=scale, minimum=minimum, zero=zero)
    v = shifted_input(combined_rows(W0r, w0_scale, A, Br, lora_scale), p, spec)
    u = round_codes(v, spec)
    wq = dequantize_codes(u, p, spec) if need_x else None
    inside = (v >= 0) & (v <= spec.umax)
    gB = gA = None
    if need_lora:
        gw = G * inside
        gB = lora_scale * (gw @ A.float().T)
        gA = lora_scale * (Br.float().T @ gw)
    if minimum is not None:
        dd = u - v * inside
    else:
        dd = u - torch.where(inside, v, expand_groups(zero, g, in_f))
    gd = group_sum(dd * G, g)
    outside = G.masked_fill(inside, 0.0)
    if minimum is None:
        outside = outside * -expand_groups(scale, g, in_f)
    gm = group_sum(outside, g)
    return wq, gB, gA, gd, gm


# Each distinct (quantizer spec, LoRA scale, which gradients are needed, per-group vs partial-group layout) is one
# compilation of a piece; a model has a handful, a test session more than dynamo's default of 8 per code object.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(name: str) -> Callable:
    """The torch.compile'd piece ("forward" or "backward"), built on first use (compilation happens at the first call)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    fn = {"forward": forward_rows, "backward": backward_rows}[name]
    return torch.compile(fn, dynamic=True, fullgraph=True)
