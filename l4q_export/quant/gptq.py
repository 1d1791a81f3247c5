"""GPTQ's packed layout decoded to canonical codes, integer zeros and weight (v1 and v2 checkpoints).

qweight [K*b/32, N] is packed along K and qzeros [G, N*b/32] along N, both in compressed-tensors' dense int32
bitstream, so `unpack_from_int32` (the maintained implementation) unpacks them.  Then
W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]) in fp32; v1 files store z - 1.
Used by the packed-safetensors verifier and by QA-LoRA's GPTQ base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def decode_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                        bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """{"codes": int16 [N, K], "zero": int16 [N, G], "weight": fp32 [N, K], "scale_dtype": scales.dtype}."""
    return gptq_rows(qweight, qzeros, scales, g_idx, bits, v1)(0, qweight.shape[1])


def gptq_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int, v1: bool) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """The decode of output rows r0:r1 (`decode_gptq_tensors`' dict, those rows only, the same bits), so a verifier
    can walk a tensor in cache-sized slices.  The zeros and scales (one per group) are unpacked once, here.

    qweight is unpacked along its rows as the library does for packed_dim=0 (it transposes the words, unpacks
    along dim 1 and transposes back), minus the transpose back: the codes come out in [N, K], and only the
    8x smaller packed words are ever transposed.  The weight is built in row slices into one output."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from .inplace import block_rows, one_thread, row_blocks

    g_idx = g_idx.long()
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    half = 1 << (bits - 1)
    z = unpack_from_int32(qzeros, bits, torch.Size([scales.shape[0], n]), packed_dim=1).to(torch.int16) + half + int(v1)
    zt, st = z.T.contiguous(), scales.float().T.contiguous()  # [N, G]
    groups = zt.shape[1]
    gl = k // groups if groups and k % groups == 0 else 0
    in_order = gl > 0 and torch.equal(g_idx, torch.arange(k) // gl)  # not act-order: broadcast, no gathers

    def rows(r0: int, r1: int) -> dict[str, torch.Tensor]:
        q = unpack_from_int32(qweight.T[r0:r1], bits, torch.Size([r1 - r0, k]), packed_dim=1).to(torch.int16) + half
        w = torch.empty(r1 - r0, k)
        with one_thread():
            for b0, b1 in row_blocks(r1 - r0, block_rows(k)):
                qs, zs, ss, ws = q[b0:b1], zt[r0 + b0 : r0 + b1], st[r0 + b0 : r0 + b1], w[b0:b1]
                if in_order:
                    by_group = (b1 - b0, groups, gl)
                    torch.mul((qs.view(by_group) - zs[..., None]).float(), ss[..., None], out=ws.view(by_group))
                else:
                    torch.mul((qs - zs[:, g_idx]).float(), ss[:, g_idx], out=ws)
        return {"codes": q, "zero": zt[r0:r1], "weight": w, "scale_dtype": scales.dtype}

    return rows
