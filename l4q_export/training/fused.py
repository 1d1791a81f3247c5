"""`--kernel compiled`: the row-chunk pieces of L4QFunction (layer.py) as torch.compile'd graphs.

The eager kernel (blocked.py) runs each chunk's chain -- widen W0, r LoRA passes, shift, clamp, round, dequantize;
in backward the same plus the STE mask and the group sums -- as ~40 separate passes over cache-sized blocks.
Here each chunk's chain is one traced graph that inductor fuses into one loop (forward) or a few (SmolLM2's
1536x576 forward piece, one thread: 2.8 ms eager, 0.67 ms compiled on an EPYC; 0.48 ms on a Xeon with the group
parameters read by column index, `quant.expand_groups`, 0.85 ms with per-group views, which made inductor
materialise every intermediate in fp32).  The backward graph, whose group sums are reductions, is the other way
round: per-group views (`quant.inplace.group_views`) let inductor fuse the sums into the chain's loop.  The graphs
are the eager operations (core's
expressions, `lora_delta_loop`: the same IEEE op per element, in the same order), so W_q is expected to be
bit-identical; whether the compiler kept it so (no contraction into FMA, no reciprocal for the division) is
*checked*, not assumed: training/kernel.py compares compiled and eager on the run's own layers at start-up and
refuses (or falls back to eager) when a single bit of W_q differs.  The fp16-grid snap of the parameters
(`effective_params`) stays outside, eager: inductor does not emulate precision casts by default and drops the
fp32 -> fp16 -> fp32 round trip inside a graph.  Shapes are static (one compilation per chunk shape, a few per model):
with dynamic shapes inductor's loops were slower than eager.  The GEMMs stay outside (eager); the cast of W_q to
the activation dtype is inside, so the self-check compares the graphs in that dtype as well as in fp32 (kernel.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..quant import GroupParams, QuantSpec, expand_groups, lora_delta_loop
from ..quant.base_int8 import int8_dequant
from ..quant.inplace import group_views


def _merged(W0r: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, Br: torch.Tensor | None,
            alpha: float) -> torch.Tensor:
    """Rows of W0 (or the int8 base's W0') + alpha*B@A in fp32, per element the very ops of the fold."""
    w = W0r.float() if w0_scale is None else int8_dequant(W0r, w0_scale)
    return w if A is None or Br is None else w + lora_delta_loop(A, Br, alpha)


def forward_graph(W0r, w0_scale, A, Br, scale, minimum, zero, spec: QuantSpec, alpha: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """W_q of one row chunk in `dtype` (computed in fp32, rounded once at the end)."""
    n = W0r.shape[1]
    g = spec.group_len(n)
    w = _merged(W0r, w0_scale, A, Br, alpha)
    d, m, z = (None if t is None else expand_groups(t, g, n) for t in (scale, minimum, zero))
    v = (w - m) / d if m is not None else w / d + z
    u = v.clamp(0, spec.umax).round()
    return (u * d + m if m is not None else (u - z) * d).to(dtype)


def backward_graph(W0r, w0_scale, A, Br, scale, minimum, zero, G, spec: QuantSpec, alpha: float,
                   wq_dtype: torch.dtype | None, need_lora: bool):
    """(W_q in wq_dtype or None, mask*G or None, dd [rows, G], dm/dz [rows, G]) of one row chunk given its G = dy^T x
    (in the activation dtype; widened here, exactly) -- layer.py's formulas, as blocked.backward_rows computes them.

    Each part of a row (its full groups as a [rows, groups, group_len] view, then a partial last group) comes from
    `group_views` with the group parameters broadcast along the last axis, so the group sums are reductions over
    that axis and inductor computes the element-wise chain, the W_q and mask*G stores and the sums in one loop per
    part.  Written over the
    flat row with the sums taken afterwards, inductor stored v in fp32 and read it back with G in a second loop.
    One thread, cold caches as inside a training step, Xeon: 256x4096 chunk 2.09 -> 1.53 ms and 2.43 -> 2.12 ms in
    two runs, 95x11008 2.50 -> 2.13 ms; SmolLM2's 1536x576 (a partial group) unchanged within noise."""
    rows, n = W0r.shape
    w = _merged(W0r, w0_scale, A, Br, alpha)
    wqs, gws, dds, dms = [], [], [], []
    for (wp, Gp), (d, m, z) in group_views(spec.group_len(n), (w, G), (scale, minimum, zero)):
        keep = wp.dim() == 2  # the partial last group: [rows, rest], one sum per row
        Gp = Gp.float()
        v = (wp - m) / d if m is not None else wp / d + z
        c = v.clamp(0, spec.umax)
        mask = (c == v).float()  # 1.0 where 0 <= v <= umax
        u = c.round()
        if wq_dtype is not None:
            wqs.append((u * d + m if m is not None else (u - z) * d).to(wq_dtype).reshape(rows, -1))
        masked = Gp * mask
        dd = u - v * mask if m is not None else u - v * mask - (1.0 - mask) * z
        outside = Gp - masked
        gws.append(masked.reshape(rows, -1))
        dds.append((dd * Gp).sum(-1, keepdim=keep))
        dms.append((outside if m is not None else outside * -d).sum(-1, keepdim=keep))
    wq = _cat(wqs) if wqs else None
    return wq, _cat(gws) if need_lora else None, _cat(dds), _cat(dms)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


# Each distinct (chunk shape, quantizer spec, LoRA scale, which gradients are needed) is one compilation of a graph;
# a model has a handful, a test session more than dynamo's default of 8 per code object.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(name: str) -> Callable:
    """The torch.compile'd graph ("forward" or "backward"), built on first use (compilation happens per shape at its
    first call)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    fn = {"forward": forward_graph, "backward": backward_graph}[name]
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _args(W0, w0_scale, A, B, p: GroupParams, r0: int, r1: int) -> tuple:
    pr = p.rows(r0, r1)
    return (W0[r0:r1], None if w0_scale is None else w0_scale[r0:r1], A, None if B is None else B[r0:r1],
            pr.scale, pr.minimum, pr.zero)


def forward_rows(W0: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None,
                 p: GroupParams, spec: QuantSpec, alpha: float, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """blocked.forward_rows through the compiled graph."""
    return compiled("forward")(*_args(W0, w0_scale, A, B, p, r0, r1), spec, alpha, dtype)


def backward_rows(
    W0: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None,
    p: GroupParams, spec: QuantSpec, alpha: float, r0: int, r1: int, G: torch.Tensor | None,
    wq_dtype: torch.dtype | None, need_lora: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """blocked.backward_rows through the compiled graph (only W_q, from the forward graph, when G is None).  G may
    be in the activation dtype: the graph widens it."""
    args = _args(W0, w0_scale, A, B, p, r0, r1)
    if G is None:
        return compiled("forward")(*args, spec, alpha, wq_dtype), None, None, None
    return compiled("backward")(*args, G, spec, alpha, wq_dtype, need_lora)
