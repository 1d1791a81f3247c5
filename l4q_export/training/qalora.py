"""QA-LoRA (Xu et al., ICLR 2024): a frozen group-quantized base plus a group-pooled LoRA that folds into
*float* zero points (algorithms.md §2).

Choices (each one is what `docs/methods.md` lists):
- Base: RTN min/max with integer zero points (`quant.init_params(W0, integer spec, "minmax")`), frozen.
  Codes `u = round(clamp(W0/d + z))`, scales `d` and zeros `z` never train (no STE anywhere).
  `--zero-point symmetric` gives z = 2^(bits-1) instead.  No GPTQ base, so act-order cannot arise.
- Pooling: the official repo's *mean* over each contiguous input group (`nn.AvgPool1d(g)`); a partial last
  group is averaged over the columns it really has.  A: [r, G] (Xavier-uniform, as the repo), B: [out, r] = 0.
- Merge (§2.2): the adapter adds alpha*(B@A)[j, k]/len_k to every weight of group k of row j, a constant per
  (row, group), so it folds into the float minimum  m' = -d*z + alpha*(B@A)/len  (fp32; fp16 only with
  --scale-grid fp16, snapped with an exact straight-through estimator).  The checkpoint's spec is therefore
  zero_point="float": W = u*d + m'.

Exactness by construction: the training forward does not compute `x@W^T + alpha*B@A@pool(x)` (equal only in
real arithmetic); it computes m' with `qalora_minimum` -- the function the fold calls -- then
`W = dequantize_codes(u, (d, m'))`, then `y = x @ W^T`.  Fold and forward therefore run the same ops on the
same fp32 inputs, and `QuantizedTensor.dequantize()` equals the weight the model trained with, bit for bit.
The price is one dense [out, in] weight per forward (no memory-optimised backward as for L4Q).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..quant import (
    SCALE_FLOOR,
    GroupParams,
    QuantizedTensor,
    QuantSpec,
    dequantize_codes,
    init_params,
    lora_delta,
    quantize,
)
from ..quant.core import to_grid
from .layer import adopt_frozen_base, lora_init


def grid_ste(t: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """Snap to the fp16 grid with a straight-through gradient whose *value* is exactly the snapped one.

    `snapped + (t - t.detach())` adds an exact +0.0, unlike `t + (snapped - t).detach()`, which can round.
    """
    if not fp16_grid:
        return t
    return to_grid(t.detach(), True) + (t - t.detach())


def group_lengths(spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Columns in each group, fp32 [G] (the last group may be partial)."""
    g = spec.group_len(in_features)
    n = spec.n_groups(in_features)
    lens = torch.full((n,), float(g))
    lens[-1] = float(in_features - (n - 1) * g)
    return lens


def base_spec(spec: QuantSpec) -> QuantSpec:
    """The frozen base's integer-zero grid (symmetric stays symmetric; float means the RTN integer default)."""
    return QuantSpec(spec.bits, spec.group_size, "symmetric" if spec.zero_point == "symmetric" else "integer")


def base_params(W0: torch.Tensor, spec: QuantSpec, fp16_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen RTN min/max scale d and integer zero z, [out, G] fp32."""
    bspec = base_spec(spec)
    s, z = init_params(W0.detach(), bspec, "minmax")
    d = to_grid(s, fp16_grid).clamp_min(SCALE_FLOOR)
    if z is None:
        z = torch.full_like(d, float(bspec.half))
    return d, z


def base_codes(W0: torch.Tensor, d: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Frozen base codes u = round(clamp(W0/d + z)), uint8 [out, in] -- one function for layer and fold."""
    return quantize("", W0.float(), GroupParams(scale=d, zero=z), base_spec(spec)).codes


def qalora_minimum(d: torch.Tensor, z: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float,
                   lens: torch.Tensor, fp16_grid: bool) -> torch.Tensor:
    """m' = -d*z + alpha*(B@A)/len per (row, group): the mean-pooled adapter merged into the float minimum."""
    m = -(d * z)
    return grid_ste(m + lora_delta(A, B, alpha) / lens, fp16_grid)


def float_spec(spec: QuantSpec) -> QuantSpec:
    """The merged result's spec: float minimum, same bits and groups."""
    return QuantSpec(spec.bits, spec.group_size, "float")


class QALoRALinear(nn.Module):
    """Frozen RTN base + group-pooled LoRA, trained through the exact merged weight."""

    l4q_method_layer = True

    def __init__(self, base: nn.Linear, spec: QuantSpec, rank: int, lora_alpha: float, fp16_grid: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("QA-LoRA needs rank >= 1")
        adopt_frozen_base(self, base)
        self.spec = float_spec(spec)
        self.rank, self.lora_alpha, self.alpha, self.fp16_grid = rank, lora_alpha, lora_alpha / rank, fp16_grid
        dev = self.weight.device
        with torch.no_grad():
            d, z = base_params(self.weight, spec, fp16_grid)
        self.register_buffer("scale", d.to(dev))
        self.register_buffer("zero", z.to(dev))
        self.register_buffer("codes", base_codes(self.weight, d, z, spec).to(dev))
        self.register_buffer("lens", group_lengths(spec, self.in_features).to(dev))
        n_groups = spec.n_groups(self.in_features)
        xavier = math.sqrt(6.0 / (n_groups + rank))  # xavier_uniform_ on the [r, G] lora_A, as the official repo
        self.lora_A, self.lora_B = lora_init(rank, n_groups, self.out_features, generator, dev, xavier)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Adopt saved (scale, zero, lora_A, lora_B) and re-derive the base codes from them."""
        with torch.no_grad():
            for k in ("scale", "zero", "lora_A", "lora_B"):
                getattr(self, k).copy_(t[k])
            self.codes.copy_(base_codes(self.weight, self.scale, self.zero, self.spec))

    def minimum(self) -> torch.Tensor:
        return qalora_minimum(self.scale, self.zero, self.lora_A, self.lora_B, self.alpha, self.lens, self.fp16_grid)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_codes(self.codes, GroupParams(scale=self.scale, minimum=self.minimum()), self.spec)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        return QuantizedTensor(name=name, spec=self.spec, codes=self.codes.clone(), scale=self.scale.clone(),
                               minimum=self.minimum(), zero=None)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scale": self.scale, "zero": self.zero, "lora_A": self.lora_A, "lora_B": self.lora_B}
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.lora_A, self.lora_B], []


def fold_qalora_tensors(name: str, W0: torch.Tensor, spec: QuantSpec, alpha: float, fp16_grid: bool,
                        t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The fold: frozen base codes + merged float minimum, via the very functions the layer's forward uses."""
    d, z = t["scale"].float(), t["zero"].float()
    m = qalora_minimum(d, z, t["lora_A"].float(), t["lora_B"].float(), alpha, group_lengths(spec, W0.shape[1]), fp16_grid)
    return QuantizedTensor(name=name, spec=float_spec(spec), codes=base_codes(W0, d, z, spec), scale=d, minimum=m, zero=None)
