"""The quantizer's element-wise steps written into preallocated, cache-sized buffers.

`core.py` states the math as whole-tensor expressions (what autograd records and torch.compile fuses).  Folding a
7B linear or recomputing W_q in every training step that way costs ~10 trips through main memory per element and
one full-size temporary per step; here each step writes into a buffer the caller reuses block after block, so the
chain stays in cache.  Every element still sees the very same IEEE operations in the same order (element-wise
multiply, add, subtract, divide, clamp, round-half-to-even: no FMA, no reciprocal), so the results are
bit-identical to core's expressions on any device -- tests/test_inplace_fold.py and tests/test_layer_grad.py check
it against formulas written out in the tests.

A partial last group (in % group != 0) is handled as two views -- the whole groups as [rows, G, g], the partial one
as [rows, rest] -- instead of expanding every group parameter to a full [rows, in] tensor per operation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .spec import QuantSpec


@dataclass(frozen=True)
class GroupParams:
    """Effective per-group parameters of one layer, [out, G] fp32 each.

    `zero` is set (integer-valued floats) for the integer and symmetric modes, `minimum` for float mode.
    """

    scale: torch.Tensor
    minimum: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    def rows(self, r0: int, r1: int) -> GroupParams:
        """The parameters of output rows r0:r1 (views): what a row chunk of the weight is quantized with."""
        return GroupParams(scale=self.scale[r0:r1], minimum=None if self.minimum is None else self.minimum[r0:r1],
                           zero=None if self.zero is None else self.zero[r0:r1])


# Elements per row block: the block's buffers (1 MiB each in fp32) stay in cache across the ~40 passes over them.
# Measured on one 11008x4096 rank-16 fold (2-core EPYC): 0.88 s at 2^15 elements, 0.59 at 2^16, 0.36 at 2^18, 0.51
# at 2^20.  Per element the operations are the same whatever the block size, so the bits are too.
BLOCK_ELEMENTS = 1 << 18


def block_rows(in_f: int) -> int:
    """Rows per block of an [*, in_f] tensor (at least one)."""
    return max(1, BLOCK_ELEMENTS // max(in_f, 1))


def row_blocks(out_f: int, rows: int) -> Iterator[tuple[int, int]]:
    """(r0, r1) of consecutive row blocks of `rows` rows covering 0..out_f."""
    for r0 in range(0, out_f, rows):
        yield r0, min(r0 + rows, out_f)


def group_views(
    g: int, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor | None]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
    """Views of [rows, in] `tensors` and matching broadcastable views of [rows, G] `params`: the whole groups
    ([rows, G', g] with [rows, G', 1]) and then, if in % g, the partial last group ([rows, rest] with [rows, 1])."""
    rows, n = tensors[0].shape
    full = n // g
    cut = full * g
    if full:
        yield ([t[:, :cut].view(rows, full, g) for t in tensors],
               [None if p is None else p[:, :full].unsqueeze(-1) for p in params])
    if cut < n:
        yield [t[:, cut:] for t in tensors], [None if p is None else p[:, full : full + 1] for p in params]


def delta_into(blk: torch.Tensor, prod: torch.Tensor, A: torch.Tensor, Bb: torch.Tensor, alpha: float) -> None:
    """blk = alpha * Bb @ A for one row block (fp32 A, Bb), in `core.lora_delta_loop`'s order of operations:
    ``((b0*a0 + b1*a1) + ...) * alpha``, each multiply and add rounded on its own."""
    torch.mul(Bb[:, 0:1], A[0:1, :], out=blk)
    for k in range(1, A.shape[0]):
        torch.mul(Bb[:, k : k + 1], A[k : k + 1, :], out=prod)
        blk.add_(prod)
    blk.mul_(alpha)


def merged_into(
    acc: torch.Tensor, prod: torch.Tensor, W0: torch.Tensor, w0_scale: torch.Tensor | None, A: torch.Tensor | None,
    B: torch.Tensor | None, alpha: float, r0: int, r1: int,
) -> torch.Tensor:
    """acc = rows r0:r1 of W0 (or the int8 base's q*scale) + alpha*B@A in fp32 (`core.combined_weight`'s numbers:
    fp32 addition commutes exactly, so adding W0 into the delta equals adding the delta to W0).  A, B fp32."""
    w0 = W0[r0:r1]
    if A is None or B is None:
        acc.copy_(w0)
        if w0_scale is not None:
            acc.mul_(w0_scale[r0:r1])
        return acc
    delta_into(acc, prod, A, B[r0:r1], alpha)
    if w0_scale is None:
        return acc.add_(w0)
    torch.mul(w0, w0_scale[r0:r1], out=prod)  # int8 q (exact in fp32) times its row scale: base_int8.int8_dequant
    return acc.add_(prod)


def shift_into(out: torch.Tensor, w: torch.Tensor, p: GroupParams, spec: QuantSpec) -> torch.Tensor:
    """out = the unrounded code v of `core.shifted_input`: (w - m)/d or w/d + z (out may be w itself)."""
    for (o, x), (m, d, z) in group_views(spec.group_len(w.shape[1]), (out, w), (p.minimum, p.scale, p.zero)):
        if m is not None:
            torch.sub(x, m, out=o).div_(d)
        else:
            torch.div(x, d, out=o).add_(z)
    return out


def round_into(out: torch.Tensor, w: torch.Tensor, p: GroupParams, spec: QuantSpec) -> torch.Tensor:
    """`core.round_codes(core.shifted_input(w, p, spec), spec)` written into `out` (fp32; it may be w itself)."""
    return shift_into(out, w, p, spec).clamp_(0, spec.umax).round_()


def dequantize_(u: torch.Tensor, p: GroupParams, spec: QuantSpec) -> torch.Tensor:
    """u (fp32 codes) becomes `core.dequantize_codes(u, p, spec)` in place: d*u + m or (u - z)*d."""
    for (x,), (m, d, z) in group_views(spec.group_len(u.shape[1]), (u,), (p.minimum, p.scale, p.zero)):
        if m is not None:
            x.mul_(d).add_(m)
        else:
            x.sub_(z).mul_(d)
    return u


def group_sum_into(out: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
    """out [rows, G] = the sum of each group of x's columns (the partial last group summed over its own columns)."""
    rows, n = x.shape
    full = n // g
    if full:
        torch.sum(x[:, : full * g].view(rows, full, g), dim=-1, out=out[:, :full])
    if full * g < n:
        torch.sum(x[:, full * g :], dim=-1, keepdim=True, out=out[:, full:])
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's intra-op work on the calling thread only, for loops of many cache-sized operations.

    Some element-wise CPU kernels (round_, floor_) hand even a 32768-element tensor to the OpenMP pool; waking the
    pool costs more than the work (measured on 2 cores: 5-8 ms per round_ of an 8x4096 block vs 0.016 ms on one
    thread -- 7 s of a 2-second fold).  The count is restored when the last of the (possibly concurrent: the fold
    runs on a worker thread, fold.py) users exits, exceptions included.
    """
    with _ONE_THREAD_LOCK:
        if _ONE_THREAD_USERS[0] == 0:
            _ONE_THREAD_USERS[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _ONE_THREAD_USERS[0] += 1
    try:
        yield
    finally:
        with _ONE_THREAD_LOCK:
            _ONE_THREAD_USERS[0] -= 1
            if _ONE_THREAD_USERS[0] == 0:
                torch.set_num_threads(_ONE_THREAD_USERS[1])


_ONE_THREAD_LOCK = threading.Lock()
_ONE_THREAD_USERS = [0, 1]  # [active users, the thread count to restore]
