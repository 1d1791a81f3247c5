"""`--base-dtype int8`: the frozen base W0 held as int8 codes with a per-output-channel absmax scale.

    scale[c] = max_j |W0[c, j]| / 127   (fp32; an all-zero row gets scale 1 so its codes are 0)
    q[c, j]  = clamp(round(W0[c, j] / scale[c]), -127, 127)   (round half to even)
    W0'      = q * scale                 (fp32, one multiply per element)

This changes what "the base" is: training then learns on W0', not W0.  So the fold must rebuild the very same W0'
from the stored shard -- these three lines, computed on CPU from the shard widened to fp32 (every operation is a
single IEEE-rounded op, so any device gives the same bits) -- and checks it against the sha256 the checkpoint
recorded of the codes and scales training held (`int8_digest`) before folding.
"""

from __future__ import annotations

import hashlib

import torch

BASE_DTYPES = ("stored", "int8")
INT8_SCHEME = "absmax-per-output-channel-127"
INT8_MAX = 127


def int8_absmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale fp32 [out, 1]) of a 2-D weight, computed in fp32."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = (w / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W0' = q * scale in fp32 (row-sliceable: rows r0:r1 of the result equal int8_dequant(q[r0:r1], scale[r0:r1]))."""
    return q.float() * scale


def int8_digest(q: torch.Tensor, scale: torch.Tensor) -> str:
    """sha256 of the codes' bytes then the fp32 scales' bytes (little-endian, row-major, on CPU)."""
    h = hashlib.sha256()
    h.update(q.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(scale.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
