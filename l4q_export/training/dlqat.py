"""DL-QAT (Ke et al., EMNLP 2024 Industry) as *reconstructed* in algorithms.md §3 -- the paper's method section
was not available, so every choice below is named and can be corrected later (also listed in docs/methods.md):

    W_q = (clamp(round(W0/s + z + alpha*B@A), 0, 2^n-1) - z) * (m*s)

1. Frozen: the RTN min/max scale s and integer zero point z per (row, group) (`quant.init_params(..., "minmax")`
   on the integer grid; `--zero-point symmetric` fixes z = 2^(n-1)).  s is NOT learned.
2. LoRA enters in the integer ("quantization") space, *before* rounding: it is added to the unrounded code
   W0/s + z, not to round(W0/s) (LR-QAT's placement).  A: [r, in] (PEFT's Kaiming-uniform), B: [out, r] = 0,
   so training starts exactly at the RTN codes; alpha_L = lora_alpha/r as for every method here.
3. Magnitude granularity: one trained magnitude m per (row, group), [out, G], initialised to 1; the effective
   scale is m*s (snapped to fp16 with --scale-grid fp16, floored at SCALE_FLOOR like every scale).
4. STE: round passes the gradient straight through; clamp masks it outside [0, 2^n-1] (as §1.2).
5. Dequantization order: (u - z) * (m*s), i.e. the product m*s is formed first and is what gets exported as
   the scale.  The paper's m*s*(u - z) is equal in real arithmetic; we fix this order so export is exact.

Export is exact with an *integer* zero point: codes u, scale m*s, zero z -- the GPTQ/AWQ-style layout, unlike
L4Q's float offset.  The training forward and the fold both call `quant.grids.dlqat_input` and `dlqat_scale`, and the
STE is written so its value is exactly `round(clamp(v))`; hence dequant(fold) == training W_q bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import SCALE_FLOOR, GroupParams, QuantizedTensor, QuantSpec, dequantize_codes, init_params, round_codes
from ..quant.grids import dlqat_input, dlqat_scale, integer_spec, round_clamp_ste
from .layer import MethodLinear, adopt_frozen_base, detached_state, lora_init


class DLQATLinear(MethodLinear):
    """Frozen (s, z); trained per-group magnitude and integer-space LoRA."""

    def __init__(self, base: nn.Linear, spec: QuantSpec, rank: int, lora_alpha: float, fp16_grid: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("DL-QAT needs rank >= 1")
        adopt_frozen_base(self, base)
        self.spec = integer_spec(spec)
        self.rank, self.lora_alpha, self.lora_scale, self.fp16_grid = rank, lora_alpha, lora_alpha / rank, fp16_grid
        dev = self.weight.device
        with torch.no_grad():
            s, z = init_params(self.weight.detach(), self.spec, "minmax")
            s = s.clamp_min(SCALE_FLOOR)
            if z is None:
                z = torch.full_like(s, float(self.spec.half))
        self.register_buffer("scale", s.to(dev))
        self.register_buffer("zero", z.to(dev))
        self.magnitude = nn.Parameter(torch.ones_like(s, device=dev))
        self.lora_A, self.lora_B = lora_init(rank, self.in_features, self.out_features, generator, dev)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self._copy_in(t, ("scale", "zero", "magnitude", "lora_A", "lora_B"))

    def dequantized_weight(self) -> torch.Tensor:
        """The training W_q, with an STE whose value is exactly round(clamp(v))."""
        v = dlqat_input(self.weight, self.scale, self.zero, self.lora_A, self.lora_B, self.lora_scale, self.spec)
        u = round_clamp_ste(v, self.spec)
        p = GroupParams(scale=dlqat_scale(self.scale, self.magnitude, self.fp16_grid), zero=self.zero)
        return dequantize_codes(u, p, self.spec)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        return fold_dlqat_tensors(name, self.weight, self.spec, self.lora_scale, self.fp16_grid, self.adapter_tensors())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scale": self.scale, "zero": self.zero, "magnitude": self.magnitude, "lora_A": self.lora_A, "lora_B": self.lora_B}
        return detached_state(out)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.lora_A, self.lora_B], [self.magnitude]


def fold_dlqat_tensors(name: str, W0: torch.Tensor, spec: QuantSpec, lora_scale: float, fp16_grid: bool,
                       t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """codes = round(clamp(dlqat_input)), scale = m*s, integer zero z -- exact with integer-zero formats."""
    ispec = integer_spec(spec)
    s, z = t["scale"].float(), t["zero"].float()
    u = round_codes(dlqat_input(W0.cpu(), s, z, t["lora_A"], t["lora_B"], lora_scale, ispec), ispec)
    d = dlqat_scale(s, t["magnitude"].float(), fp16_grid)
    return QuantizedTensor(name=name, spec=ispec, codes=u.to(torch.uint8), scale=d, minimum=-(d * z), zero=z)
