"""GPTQ's packed layout decoded to canonical codes, integer zeros and weight (v1 and v2 checkpoints).

qweight [K*b/32, N] is packed along K and qzeros [G, N*b/32] along N, both in compressed-tensors' dense int32
bitstream, so `unpack_from_int32` (the maintained implementation) unpacks them.  Then
W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]) in fp32; v1 files store z - 1.
Used by the packed-safetensors verifier and by QA-LoRA's GPTQ base.
"""

from __future__ import annotations

import torch


def decode_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                        bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """{"codes": int32 [N, K], "zero": int32 [N, G], "weight": fp32 [N, K], "scale_dtype": scales.dtype}."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    g_idx = g_idx.long()
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    half = 1 << (bits - 1)
    q = unpack_from_int32(qweight, bits, torch.Size([k, n]), packed_dim=0).to(torch.int32) + half  # [K, N]
    z = unpack_from_int32(qzeros, bits, torch.Size([scales.shape[0], n]), packed_dim=1).to(torch.int32) + half + int(v1)
    w = (q - z[g_idx]).float() * scales.float()[g_idx]
    return {"codes": q.T, "zero": z.T, "weight": w.T.contiguous(), "scale_dtype": scales.dtype}
