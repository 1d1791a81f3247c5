"""A plain-autograd STE implementation of QAT through a GGUF K-quant grid: the oracle of tests/test_kquant.py.

Written directly from the decode formula (w = d*sc*q - dmin*mn per sub-block) with torch autograd doing all the
differentiation, so it shares no gradient code with l4q_export.training.kquant_layer.
"""

from __future__ import annotations

import torch


def ste_round(t: torch.Tensor) -> torch.Tensor:
    return t + (t.round() - t).detach()


def ste_fp16(t: torch.Tensor) -> torch.Tensor:
    return t + (t.half().float() - t).detach()


def reference_kquant_wq(W0, A, B, d, sc, dmin, mn, *, n_sub, qmin, qmax, sc_min, sc_max, mn_max, alpha):
    """W_q [out, in] of the K-quant QAT forward; d/dmin [out, nb], sc/mn [out, nb, n_sub] latents."""
    out_f, in_f = W0.shape
    W = (W0.float() + alpha * (B @ A)).reshape(out_f, -1, n_sub, 256 // n_sub)
    dl = (ste_fp16(d).unsqueeze(-1) * ste_round(torch.clamp(sc, sc_min, sc_max))).unsqueeze(-1)
    ml = 0.0
    if dmin is not None:
        ml = (ste_fp16(dmin).unsqueeze(-1) * ste_round(torch.clamp(mn, 0, mn_max))).unsqueeze(-1)
    q = ste_round(torch.clamp((W + ml) / dl, qmin, qmax))
    return (dl * q - ml).reshape(out_f, in_f)
