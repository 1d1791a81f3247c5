"""The frozen-base grids of QA-LoRA and DL-QAT and the straight-through estimators their forwards use.

Training forward and fold both call these functions, so dequant(fold) equals the training W_q bit for bit
(training/qalora.py and training/dlqat.py explain each method; this module holds only the arithmetic).
"""

from __future__ import annotations

import torch

from .core import SCALE_FLOOR, GroupParams, init_params, lora_delta, quantize, shifted_input, to_grid
from .spec import QuantSpec


def integer_spec(spec: QuantSpec) -> QuantSpec:
    """The integer-zero grid of a spec: symmetric stays symmetric, float becomes integer (RTN / DL-QAT default)."""
    return QuantSpec(spec.bits, spec.group_size, "symmetric" if spec.zero_point == "symmetric" else "integer")


def float_spec(spec: QuantSpec) -> QuantSpec:
    """Same bits and groups with a float minimum (QA-LoRA's merged result)."""
    return QuantSpec(spec.bits, spec.group_size, "float")


def grid_ste(t: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """Snap to the fp16 grid with a straight-through gradient whose *value* is exactly the snapped one.

    `snapped + (t - t.detach())` adds an exact +0.0, unlike `t + (snapped - t).detach()`, which can round.
    """
    if not fp16_grid:
        return t
    return to_grid(t.detach(), True) + (t - t.detach())


def round_clamp_ste(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """round(clamp(v, 0, umax)) in value; gradient straight through round, masked by clamp outside the range."""
    c = v.clamp(0, spec.umax)
    return c.detach().round() + (c - c.detach())


def group_lengths(spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Columns in each group, fp32 [G] (the last group may be partial)."""
    g = spec.group_len(in_features)
    n = spec.n_groups(in_features)
    lens = torch.full((n,), float(g))
    lens[-1] = float(in_features - (n - 1) * g)
    return lens


def rtn_integer_params(W0: torch.Tensor, spec: QuantSpec, fp16_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen RTN min/max scale d (grid-snapped, floored) and integer zero z ([out, G] fp32); z = 2^(bits-1)
    in symmetric mode.  QA-LoRA's base."""
    bspec = integer_spec(spec)
    s, z = init_params(W0.detach(), bspec, "minmax")
    d = to_grid(s, fp16_grid).clamp_min(SCALE_FLOOR)
    if z is None:
        z = torch.full_like(d, float(bspec.half))
    return d, z


def rtn_integer_codes(W0: torch.Tensor, d: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Frozen base codes u = round(clamp(W0/d + z)), uint8 [out, in]."""
    return quantize("", W0.float(), GroupParams(scale=d, zero=z), integer_spec(spec)).codes


def qalora_minimum(d: torch.Tensor, z: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   lens: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """m' = -d*z + scale*(B@A)/len per (row, group): the mean-pooled adapter merged into the float minimum."""
    m = -(d * z)
    return grid_ste(m + lora_delta(A, B, scale) / lens, fp16_grid)


def dlqat_input(W0: torch.Tensor, s: torch.Tensor, z: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                spec: QuantSpec) -> torch.Tensor:
    """Unrounded code v = W0/s + z + scale*B@A (fp32): DL-QAT's LoRA added in the integer space before rounding."""
    return shifted_input(W0.float(), GroupParams(scale=s, zero=z), spec) + lora_delta(A, B, scale)


def dlqat_scale(s: torch.Tensor, magnitude: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """DL-QAT's effective (exported) scale m*s, fp16-snapped on request, floored."""
    return grid_ste(magnitude * s, fp16_grid).clamp_min(SCALE_FLOOR)
