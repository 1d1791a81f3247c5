"""The baselines L4Q is compared with: QAT-LoRA (LSQ+ on W0 with a separate float LoRA branch) and plain float
LoRA whose export is "merge, then RTN" (LoRA-then-PTQ).  `rtn` needs no layer: it is an untrained `L4QLinear`
with rank 0 and min/max init.

Neither baseline has an exact integer export, by definition:
- qat-lora trains y = x@Q(W0)^T + alpha*(x@A^T)@B^T.  Q(W0)'s codes are exact, but the float branch is not an
  integer tensor, and no single-grid format (GGUF, ONNX MatMulNBits, GPTQ) can hold "4+16" mixed precision.
  Choice: the fold REFUSES (FidelityError) unless the checkpoint says `"qat_lora_export": "merge"`
  (`l4q-train --qat-lora-export merge`, or edit l4q_config.json), in which case it exports
  quantize(W0 + alpha*B@A) on the *learned* LSQ+ grid -- a re-quantization whose deviation from the training
  forward `verify` measures and reports (it is lossy by design, never passed off as exact).
- lora trains float W0 + alpha*B@A; the checkpoint stores RTN min/max (scale, offset) of the merged weight,
  computed when it is written, and the fold quantizes the merged weight on that grid (L4Q's fold with those
  parameters).  Lossy by design too; verify reports the PTQ error.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..quant import QuantizedTensor, QuantSpec, combined_weight, effective_params, init_params, quantize
from .layer import L4QFunction, LayerConfig, MethodLinear, add_learned_grid, adopt_frozen_base, detached_state, lora_init


class _FrozenBase(MethodLinear):
    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.lora_scale


class QATLoRALinear(_FrozenBase):
    """LSQ+ (learned scale and float offset, L4Q's Function with no LoRA inside) on W0 + a float LoRA branch."""

    def __init__(self, base: nn.Linear, spec: QuantSpec, rank: int, lora_alpha: float, init: str | None = "l4q",
                 fp16_grid: bool = False, lsq_grad_scale: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        adopt_frozen_base(self, base)
        self.spec, self.rank, self.lora_alpha, self.fp16_grid = spec, rank, lora_alpha, fp16_grid
        self.lora_scale = lora_alpha / rank
        dev = self.weight.device
        self.lora_A, self.lora_B = lora_init(rank, self.in_features, self.out_features, generator, dev)
        add_learned_grid(self, spec, init)
        # alpha=0 inside the Function: it quantizes W0 alone; LoRA is the separate branch.
        self.cfg = LayerConfig(spec=spec, lora_scale=0.0, fp16_grid=fp16_grid, lsq_grad_scale=lsq_grad_scale)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q(W0)^T -- the integer part of the training forward."""
        return L4QFunction.apply(x, self.weight, None, None, None, self.scale, self.offset, self.cfg)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The whole training forward (no bias): quantized base + float LoRA branch ("4+16")."""
        return self.base_matmul(x) + self.lora_branch(x)

    @torch.no_grad()
    def base_quantized(self, name: str = "") -> QuantizedTensor:
        """codes(W0) on the learned grid: the exactly exportable part."""
        p = effective_params(self.spec, self.scale, self.offset, self.fp16_grid)
        return quantize(name, self.weight.float(), p, self.spec)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        """The merge-export reference: quantize(W0 + alpha*B@A) on the learned grid (lossy by design)."""
        p = effective_params(self.spec, self.scale, self.offset, self.fp16_grid)
        return quantize(name, combined_weight(self.weight, self.lora_A, self.lora_B, self.lora_scale), p, self.spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scale": self.scale, "lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.offset is not None:
            out["offset"] = self.offset
        return detached_state(out)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self._copy_in(t, ("scale", "offset", "lora_A", "lora_B"))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.lora_A, self.lora_B], [p for p in (self.scale, self.offset) if p is not None]


class FloatLoRALinear(_FrozenBase):
    """Plain LoRA on a float base; quantization happens only at export (RTN of the merged weight)."""

    def __init__(self, base: nn.Linear, spec: QuantSpec, rank: int, lora_alpha: float, fp16_grid: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        adopt_frozen_base(self, base)
        self.spec, self.rank, self.lora_alpha, self.fp16_grid = spec, rank, lora_alpha, fp16_grid
        self.lora_scale = lora_alpha / rank
        self.lora_A, self.lora_B = lora_init(rank, self.in_features, self.out_features, generator, self.weight.device)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The float training forward x @ W0^T + alpha*(x@A^T)@B^T (nothing is quantized while training)."""
        return F.linear(x, self.weight.to(x.dtype)) + self.lora_branch(x)

    @torch.no_grad()
    def rtn_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RTN min/max (scale, offset) of the merged weight: the PTQ step of LoRA-then-PTQ."""
        init = "minmax" if self.spec.zero_point != "symmetric" else "l4q"
        return init_params(combined_weight(self.weight, self.lora_A, self.lora_B, self.lora_scale), self.spec, init)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        s, off = self.rtn_params()
        p = effective_params(self.spec, s, off, self.fp16_grid)
        return quantize(name, combined_weight(self.weight, self.lora_A, self.lora_B, self.lora_scale), p, self.spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        s, off = self.rtn_params()
        out = {"scale": s, "lora_A": self.lora_A, "lora_B": self.lora_B}
        if off is not None:
            out["offset"] = off
        return detached_state(out)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self._copy_in(t, ("lora_A", "lora_B"))  # scale/offset are derived (RTN of the merge), not state

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.lora_A, self.lora_B], []
