"""The eager kernel of `L4QFunction` (layer.py): one row chunk's recompute of W_q and its gradient pieces.

L4Q saves nothing weight-sized between forward and backward, so every step recomputes W0 + alpha*B@A, the shifted
input, the codes and W_q -- and backward adds the STE mask and the group sums.  As whole-chunk expressions that is
~25 passes over 4 MiB buffers, a fresh temporary each, and a partial last group (SmolLM2's 576 inputs with group
128) expands every group parameter to a full chunk per operation: the step was 2.45x plain LoRA's.  Here the chunk
is walked in cache-sized row blocks, every step writes into a buffer reused block after block, and a partial group
is a second view (quant/inplace.py).  The per-element operations are core's, in core's order, so W_q and the codes
are bit-identical to the fold's (tests/test_layer_grad.py); only the gradients' group sums may add in another
order.  On CUDA a block is the whole chunk (no cache to fit, one launch per step).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from ..quant import GroupParams, QuantSpec
from ..quant.inplace import (
    block_rows,
    dequantize_,
    group_sum_into,
    group_views,
    merged_into,
    one_thread,
    round_into,
    row_blocks,
    shift_into,
)


class _Buffers:
    """The fp32 block buffers of one chunk walk (rows x in each).

    The STE mask is a float 0/1 buffer from an fp32 compare (clamp(v) == v), not a bool tensor: on CPU every
    operation touching a bool tensor takes a slow converting path (measured on this project's EPYC: 0.8-1.9 ns per
    element for ge, mul by bool, masked_fill_ against 0.13 for the fp32 compare and multiply), and multiplying by
    exact 0.0/1.0 gives the bool form's numbers (G or 0, v or 0)."""

    def __init__(self, rows: int, in_f: int, device: torch.device) -> None:
        self.acc = torch.empty(rows, in_f, dtype=torch.float32, device=device)
        self.prod = torch.empty_like(self.acc)
        self.u = torch.empty_like(self.acc)
        self.mask = torch.empty_like(self.acc)


# CPU block buffers, kept per thread and per (block rows, in_features): 4 MiB for each distinct input width of a
# model.  Allocating them per call cost more than the work on small layers (fresh pages are faulted in and zeroed:
# 576x576 forward 1.6 ms vs 1.15 ms with the buffers reused).
_WORKSPACE = threading.local()


def _buffers(rows: int, in_f: int, device: torch.device) -> _Buffers:
    if device.type != "cpu":  # the caching allocator already reuses device memory
        return _Buffers(rows, in_f, device)
    cache: dict[tuple[int, int], _Buffers] = _WORKSPACE.__dict__.setdefault("buffers", {})
    if (rows, in_f) not in cache:
        cache[(rows, in_f)] = _Buffers(rows, in_f, device)
    return cache[(rows, in_f)]


@contextmanager
def _walk(r0: int, r1: int, in_f: int, device: torch.device) -> Iterator[tuple[list, _Buffers]]:
    """The (b0, b1) blocks of rows r0:r1 and their buffers; on CPU the walk runs on one intra-op thread."""
    if device.type == "cpu":
        rows = block_rows(in_f)
        buf = _buffers(rows, in_f, device)
    else:
        rows = r1 - r0
        buf = _Buffers(rows, in_f, device)
    blocks = [(b0 + r0, b1 + r0) for b0, b1 in row_blocks(r1 - r0, rows)]
    with one_thread() if device.type == "cpu" else nullcontext():
        yield blocks, buf


def forward_rows(
    W0: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None,
    p: GroupParams, spec: QuantSpec, alpha: float, r0: int, r1: int, dtype: torch.dtype,
) -> torch.Tensor:
    """W_q of rows r0:r1 in `dtype` (fp32 A, B; p: the whole layer's parameters)."""
    in_f = W0.shape[1]
    wq = torch.empty(r1 - r0, in_f, dtype=dtype, device=W0.device)
    with _walk(r0, r1, in_f, W0.device) as (blocks, buf):
        for b0, b1 in blocks:
            n = b1 - b0
            acc = merged_into(buf.acc[:n], buf.prod[:n], W0, w0_scale, A, B, alpha, b0, b1)
            pb = p.rows(b0, b1)
            wq[b0 - r0 : b1 - r0].copy_(dequantize_(round_into(acc, acc, pb, spec), pb, spec))
    return wq


def backward_rows(
    W0: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None,
    p: GroupParams, spec: QuantSpec, alpha: float, r0: int, r1: int, G: torch.Tensor | None,
    wq_dtype: torch.dtype | None, need_lora: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(W_q in wq_dtype or None, mask*G or None, dd, dm/dz) of rows r0:r1 -- layer.py's docstring has the formulas.

    G: the chunk's dy^T x in the activation dtype, or None when only grad_x is needed (then only W_q is returned).
    dd and dm are [r1-r0, G] fp32."""
    in_f = W0.shape[1]
    g = spec.group_len(in_f)
    dev = W0.device
    if G is not None:  # widened exactly; consumed (an fp32 G is overwritten: its outside part is reduced in place)
        G = G.float()
    wq = torch.empty(r1 - r0, in_f, dtype=wq_dtype, device=dev) if wq_dtype is not None else None
    gw = torch.empty(r1 - r0, in_f, dtype=torch.float32, device=dev) if need_lora and G is not None else None
    gd = torch.zeros(r1 - r0, p.scale.shape[1], dtype=torch.float32, device=dev) if G is not None else None
    gm = torch.zeros_like(gd) if gd is not None else None
    with _walk(r0, r1, in_f, dev) as (blocks, buf):
        for b0, b1 in blocks:
            n, c0, c1 = b1 - b0, b0 - r0, b1 - r0
            pb = p.rows(b0, b1)
            v = shift_into(buf.acc[:n], merged_into(buf.acc[:n], buf.prod[:n], W0, w0_scale, A, B, alpha, b0, b1),
                           pb, spec)
            c = torch.clamp(v, 0, spec.umax, out=buf.u[:n])
            mask = torch.eq(c, v, out=buf.mask[:n]) if G is not None else None  # 1.0 where 0 <= v <= umax, else 0.0
            u = c.round_()
            if wq is not None:
                wq[c0:c1].copy_(dequantize_(buf.prod[:n].copy_(u), pb, spec))
            if G is None:
                continue
            Gb = G[c0:c1]
            v.mul_(mask)
            u.sub_(v)  # dd = u - v inside, u outside ...
            if pb.minimum is None:  # ... minus z outside in the integer modes: u - (1 - mask) * z
                outside_z = torch.neg(mask, out=buf.prod[:n]).add_(1.0)
                for (o,), (z,) in group_views(g, (outside_z,), (pb.zero,)):
                    o.mul_(z)
                u.sub_(outside_z)
            group_sum_into(gd[c0:c1], u.mul_(Gb), g)
            masked = torch.mul(Gb, mask, out=gw[c0:c1] if gw is not None else buf.prod[:n])  # the STE's mask * G
            outside = Gb.sub_(masked)  # exactly G outside, 0 inside
            if pb.minimum is None:  # dz = -d * outside * G
                for (o,), (d,) in group_views(g, (outside,), (pb.scale,)):
                    o.mul_(-d)
            group_sum_into(gm[c0:c1], outside, g)
    return wq, gw, gd, gm
