"""A naive, plain-autograd STE implementation of L4Q's quantizer.

Two uses: the oracle of tests/test_layer_grad.py (written directly from the paper's equations, with torch
autograd doing all differentiation, so it shares no gradient code with l4q_export.training.layer), and the
"naive autograd QAT-LoRA" peer in tools/bench_train_memory.py (autograd keeps every [out, in]
intermediate alive for backward, which is exactly the memory L4Q's custom Function avoids).
"""

from __future__ import annotations

import torch


def ste_round(t: torch.Tensor) -> torch.Tensor:
    return t + (t.round() - t).detach()


def grad_scaled(p: torch.Tensor, g: float) -> torch.Tensor:
    """LSQ's gradient scaling: forward value p, gradient multiplied by g."""
    return (p - p * g).detach() + p * g


def reference_wq(W0, A, B, s, off, *, bits, group, zero_point, alpha, gscale):
    out_f, in_f = W0.shape
    glen = in_f if group == -1 else group
    umax = 2**bits - 1
    half = 2 ** (bits - 1)
    s = grad_scaled(s, gscale)
    exp = lambda p: p.repeat_interleave(glen, dim=1)[:, :in_f]  # noqa: E731
    W = W0.float() + alpha * (B @ A)
    if zero_point == "float":
        b = grad_scaled(off, gscale)
        q = ste_round(torch.clamp((W - exp(b)) / exp(s), -half, half - 1))
        return q * exp(s) + exp(b)
    if zero_point == "integer":
        z = ste_round(grad_scaled(off, gscale))
    else:
        z = torch.full_like(s, float(half))
    u = ste_round(torch.clamp(W / exp(s) + exp(z), 0, umax))
    return (u - exp(z)) * exp(s)
