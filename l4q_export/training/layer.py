"""`L4QLinear`: LoRA merged *inside* the LSQ+ quantizer, with a memory-optimised backward.

Forward:  W_q = dequant(round(clamp(v))) with v computed from W_comb = W0 + alpha*B@A  (quant/core.py),
          y = x @ W_q^T.
Backward: nothing [out, in]-sized is saved.  We keep only x and *references* to W0, A, B, s, b, and
          recompute W_comb, v, the codes and W_q in backward.  The weight-shaped gradient G_W = dy^T x is
          formed transiently and reduced immediately into the small A/B/s/b gradients (L4Q App. A), never
          materialised as a `.grad`.  All of this is done in row chunks of the output dimension, so the
          transient buffers are bounded by `chunk x in`, not `out x in` -- peak memory stays close to plain
          LoRA's instead of several weight copies (see tools/bench_train_memory.py).

Gradients (STE, mask = 0 <= v <= 2^bits-1, computed on the unrounded v as L4Q's code clamps first):
  dW_comb = mask * G_W;  dA = alpha B^T dW_comb;  dB = alpha dW_comb A^T
  dd      = sum_group( (u - v) inside | (u - z) outside ) * G_W )       [z = 0 in float mode]
  dm      = sum_group( outside * G_W )                         (float mode; m = b - 2^(bits-1) d)
  dz      = sum_group( -d * outside * G_W )                    (integer mode, STE through round(z))
  then chain to (s, b): ds = dd - 2^(bits-1) dm, db = dm, each times the LSQ gradient scale.
These reduce to exactly the paper's formulas; tests/test_layer_grad.py checks them against plain autograd.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..quant import (
    SCALE_FLOOR,
    QuantizedTensor,
    QuantSpec,
    combined_weight,
    effective_params,
    init_params,
    quantize,
)
from ..quant.base_int8 import BASE_DTYPES, int8_absmax, int8_dequant
from . import blocked, fused

# Transient buffers in forward/backward are limited to about this many fp32 elements per buffer.
CHUNK_ELEMENTS = 1 << 20
# Rows of W_q gathered for one input-gradient GEMM in backward (_InputGrad): 8 MiB in bf16, whatever the layer.  At
# 7B shapes, 256 tokens, one thread: a 4096x4096 layer's input gradient in 14.0 ms with 1024-row GEMMs, 13.7 with
# 2048, 26.0 with the 256-row chunks, 10.1 as one GEMM.
GRAD_X_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LayerConfig:
    """Static settings of one quantized layer (hashable, passed through autograd untouched)."""

    spec: QuantSpec
    lora_scale: float  # LoRA scaling alpha_L = lora_alpha / r
    fp16_grid: bool = False
    lsq_grad_scale: bool = True
    kernel: str = "eager"  # "compiled": the torch.compile'd chunk pieces of training/fused.py (see kernel.py)


def _row_chunks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    rows = max(1, CHUNK_ELEMENTS // max(in_features, 1))
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _kernel(cfg: LayerConfig):
    """The module whose forward_rows/backward_rows run a row chunk: blocked.py (eager) or fused.py (compiled)."""
    return fused if cfg.kernel == "compiled" else blocked


def _rows(t: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | None:
    return None if t is None else t[r0:r1]


class L4QFunction(torch.autograd.Function):
    """y = x @ W_q^T with W_q recomputed (not saved) in backward.

    W0 is the frozen base in its stored dtype, or (w0_scale given) the int8 codes of `--base-dtype int8`."""

    @staticmethod
    def forward(ctx, x, W0, w0_scale, A, B, scale, offset, cfg: LayerConfig):  # type: ignore[override]
        out_f, in_f = W0.shape
        x2 = x.reshape(-1, in_f)
        chunks = _row_chunks(out_f, in_f)
        with torch.no_grad():
            p = effective_params(cfg.spec, scale, offset, cfg.fp16_grid)
            Af, Bf = _float(A), _float(B)
            kernel = _kernel(cfg)
            if len(chunks) == 1:  # the product is the output: no buffer to copy it into
                y2 = x2 @ kernel.forward_rows(W0, w0_scale, Af, Bf, p, cfg.spec, cfg.lora_scale, 0, out_f, x2.dtype).T
            else:
                y2 = x2.new_empty(x2.shape[0], out_f)
                for r0, r1 in chunks:
                    wq = kernel.forward_rows(W0, w0_scale, Af, Bf, p, cfg.spec, cfg.lora_scale, r0, r1, x2.dtype)
                    y2[:, r0:r1] = x2 @ wq.T
        ctx.cfg = cfg
        ctx.save_for_backward(x, W0, w0_scale, A, B, scale, offset)
        return y2.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, W0, w0_scale, A, B, scale, offset = ctx.saved_tensors
        cfg: LayerConfig = ctx.cfg
        spec = cfg.spec
        out_f, in_f = W0.shape
        x2 = x.reshape(-1, in_f)
        gy2 = grad_y.reshape(-1, out_f)
        need_x = ctx.needs_input_grad[0]
        need_lora = A is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        need_q = ctx.needs_input_grad[5] or (offset is not None and ctx.needs_input_grad[6])
        need_w = need_lora or need_q

        grad_x = _InputGrad(gy2, in_f) if need_x else None
        gA = torch.zeros(A.shape, dtype=torch.float32, device=A.device) if need_lora else None
        gB = torch.zeros(B.shape, dtype=torch.float32, device=B.device) if need_lora else None
        gd = torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
        gm = torch.zeros_like(gd)  # d/dm (float mode) or d/dz (integer mode)
        with torch.no_grad():
            p = effective_params(spec, scale, offset, cfg.fp16_grid)
            Af, Bf = _float(A), _float(B)
            kernel = _kernel(cfg)
            for r0, r1 in _row_chunks(out_f, in_f):
                gy = gy2[:, r0:r1]
                G = gy.T @ x2.to(gy2.dtype) if need_w else None  # transient [rows, in]; never a .grad
                wq, gw, dd, dm = kernel.backward_rows(
                    W0, w0_scale, Af, Bf, p, spec, cfg.lora_scale, r0, r1, G, gy.dtype if need_x else None, need_lora)
                if dd is not None:
                    gd[r0:r1], gm[r0:r1] = dd, dm
                if grad_x is not None:
                    grad_x.add(r0, r1, wq)
                if gw is not None:
                    gB[r0:r1] = cfg.lora_scale * (gw @ Af.T)
                    gA += cfg.lora_scale * (Bf[r0:r1].T @ gw)
                del G, wq, gw

        gs = spec.lsq_grad_scale(in_f) if cfg.lsq_grad_scale else 1.0
        if spec.zero_point == "float":
            grad_s = (gd - spec.half * gm) * gs
            grad_off = gm * gs
        else:
            grad_s = gd * gs
            grad_off = gm * gs if offset is not None else None
        return (
            grad_x.result().to(x.dtype).view(x.shape) if grad_x is not None else None,
            None,
            None,
            gA.to(A.dtype) if need_lora else None,
            gB.to(B.dtype) if need_lora else None,
            grad_s.to(scale.dtype) if ctx.needs_input_grad[5] else None,
            grad_off.to(offset.dtype) if grad_off is not None and ctx.needs_input_grad[6] else None,
            None,
        )


class _InputGrad:
    """grad_x = gy @ W_q, accumulated over W_q's row chunks, several chunks per GEMM.

    The row chunks split this GEMM's reduction dimension, so one GEMM per chunk writes a whole [tokens, in] partial
    sum, widened and added in fp32: at LLaMA-2-7B shapes and 256 tokens that took 2.6x one GEMM's time before the
    adds.  Chunks are gathered up to GRAD_X_ELEMENTS (a constant, not the layer's size) and multiplied at once.
    A single product is the gradient as it comes (in the activation dtype, rounded once); further ones are added
    in fp32 (in place, by addmm, for fp32 activations)."""

    def __init__(self, gy2: torch.Tensor, in_features: int) -> None:
        self.gy2, self.rows = gy2, max(1, GRAD_X_ELEMENTS // max(in_features, 1))
        self.parts: list[torch.Tensor] = []
        self.r0 = self.n = 0
        self.total: torch.Tensor | None = None

    def add(self, r0: int, r1: int, wq: torch.Tensor) -> None:
        """Rows r0:r1 of W_q (the chunks arrive in order)."""
        if not self.parts:
            self.r0 = r0
        self.parts.append(wq.to(self.gy2.dtype))
        self.n += r1 - r0
        if self.n >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        w = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        gy = self.gy2[:, self.r0 : self.r0 + self.n]
        if self.total is None:
            self.total = gy @ w
        elif gy.dtype == torch.float32:
            self.total.addmm_(gy, w)
        else:
            self.total = self.total.float().add_((gy @ w).float())
        self.parts, self.n = [], 0

    def result(self) -> torch.Tensor:
        self._flush()
        assert self.total is not None, "no row chunk was added"
        return self.total


def adopt_frozen_base(layer: nn.Module, base: nn.Linear) -> None:
    """Take over `base`'s weight and bias, frozen and in their stored dtype (the fold reads the same shard and
    must see the same numbers, so W0 is never silently down-cast).  Shared by every method's layer."""
    layer.in_features, layer.out_features = base.in_features, base.out_features
    layer.weight = base.weight
    layer.weight.requires_grad_(False)
    layer.bias = base.bias
    if layer.bias is not None:
        layer.bias.requires_grad_(False)


def add_lora(layer: nn.Module, rank: int, lora_alpha: float, generator: torch.Generator | None) -> None:
    """`rank`, `lora_alpha` and trainable lora_A/lora_B (None at rank 0) on a layer that adopted its frozen base."""
    layer.rank = rank
    layer.lora_alpha = lora_alpha
    if rank > 0:
        layer.lora_A, layer.lora_B = lora_init(rank, layer.in_features, layer.out_features, generator, layer.weight.device)
    else:
        layer.register_parameter("lora_A", None)
        layer.register_parameter("lora_B", None)


def lora_init(
    rank: int,
    in_features: int,
    out_features: int,
    generator: torch.Generator | None,
    device: torch.device,
    bound: float | None = None,
) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA A ~ U(-bound, bound) drawn in fp32 on CPU from `generator` (so a seed gives the same A on any device),
    B = 0.  Default bound 1/sqrt(in): PEFT's Kaiming-uniform with a = sqrt(5)."""
    a = torch.empty(rank, in_features, dtype=torch.float32)
    bound = 1.0 / math.sqrt(in_features) if bound is None else bound
    a.uniform_(-bound, bound, generator=generator)
    return nn.Parameter(a.to(device)), nn.Parameter(torch.zeros(out_features, rank, device=device))


class MethodLinear(nn.Module, metaclass=ABCMeta):
    """The interface every training method's layer implements; the rest of the package uses nothing else.

    forward = quantized_matmul (no bias) + the frozen bias.  A layer defines either dequantized_weight() (the
    training W_q, differentiable; the default quantized_matmul multiplies by it) or its own quantized_matmul
    (L4Q's memory-lean Function, the float LoRA branch of the baselines).  Model surgery finds a model's method
    layers by this class; the method registry (training/methods) maps each class to its name, fold and rebuild.
    """

    spec: QuantSpec
    rank: int
    lora_alpha: float
    weight: nn.Parameter
    bias: nn.Parameter | None

    def dequantized_weight(self) -> torch.Tensor:
        """The training W_q [out, in] in fp32 (differentiable)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither dequantized_weight nor quantized_matmul")

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_q^T of the training forward, without the bias."""
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @abstractmethod
    def quantized(self, name: str = "") -> QuantizedTensor:
        """The canonical quantized tensor of the current parameters: what the method's fold yields."""

    @abstractmethod
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """suffix -> tensor written to l4q_adapter.safetensors (detached fp32 CPU copies, see detached_state)."""

    @abstractmethod
    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Adopt the saved adapter tensors (inverse of adapter_tensors; derived entries are ignored)."""

    @abstractmethod
    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weight-decayed LoRA matrices, undecayed quantizer parameters) for AdamW."""

    @torch.no_grad()
    def project_(self) -> None:
        """After each optimizer step: keep learned scales above SCALE_FLOOR (a scale through zero makes the grid
        degenerate).  Layers whose scale is a frozen buffer have nothing to project."""
        scale = getattr(self, "scale", None)
        if isinstance(scale, nn.Parameter):
            scale.clamp_(min=SCALE_FLOOR)

    @torch.no_grad()
    def _copy_in(self, t: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        """Copy t[k] into each of `keys` the layer has (None: absent in this configuration, e.g. symmetric offset)."""
        for k in keys:
            p = getattr(self, k)
            if p is not None:
                p.copy_(t[k])


def detached_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies: what l4q_adapter.safetensors stores, whatever device and dtype trained them."""
    from .distributed import full_tensor  # --fsdp: a parameter is a DTensor shard until gathered

    return {k: full_tensor(v.detach()).float().cpu().contiguous() for k, v in tensors.items()}


def add_learned_grid(layer: nn.Module, spec: QuantSpec, init: str | None) -> None:
    """Trainable LSQ+ `scale` and `offset` (None in symmetric mode) initialised from the layer's frozen W0.

    init=None: placeholders of the right shape (scale 1, offset 0) for a layer rebuilt from a checkpoint, whose
    trained values `load_tensors` copies in next.  An init from W0 would be discarded after costing an fp32 copy of
    W0: 1.25 s of a 2-layer LLaMA-2-7B-shaped reference model's 3.9 s build (~20 s for a whole 7B)."""
    dev = layer.weight.device
    if init is None:
        s = torch.ones(layer.out_features, spec.n_groups(layer.in_features))
        off = None if spec.zero_point == "symmetric" else torch.zeros_like(s)
    else:
        with torch.no_grad():
            s, off = init_params(layer.weight.detach(), spec, init)
    layer.scale = nn.Parameter(s.to(dev))
    if off is None:
        layer.register_parameter("offset", None)
    else:
        layer.offset = nn.Parameter(off.to(dev))


class L4QLinear(MethodLinear):
    """A frozen base linear whose effective weight is the L4Q-quantized W0 + alpha*B@A.

    Trainable: lora_A [r, in], lora_B [out, r], scale [out, G] and offset [out, G] (L4Q's float offset b,
    or a float zero point rounded with an STE in integer mode; absent in symmetric mode).
    The base weight keeps its stored dtype on purpose: the fold reads the same shard and must see the
    same numbers, so W0 is never silently down-cast.
    """

    def __init__(
        self,
        base: nn.Linear,
        spec: QuantSpec,
        rank: int,
        lora_alpha: float,
        init: str | None = "l4q",
        fp16_grid: bool = False,
        lsq_grad_scale: bool = True,
        generator: torch.Generator | None = None,
        base_dtype: str = "stored",
    ) -> None:
        super().__init__()
        adopt_frozen_base(self, base)
        self.spec = spec
        add_lora(self, rank, lora_alpha, generator)
        add_learned_grid(self, spec, init)
        self.cfg = LayerConfig(
            spec=spec, lora_scale=(lora_alpha / rank) if rank > 0 else 0.0, fp16_grid=fp16_grid, lsq_grad_scale=lsq_grad_scale
        )
        if base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {BASE_DTYPES}, not {base_dtype!r}")
        self.base_dtype = base_dtype
        if base_dtype == "int8":  # W0 -> int8 codes + per-row scale; the stored-dtype weight is dropped
            with torch.no_grad():
                q, s = int8_absmax(self.weight.detach())
            self.weight = None
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_int8_scale", s)

    def base_weight(self) -> torch.Tensor:
        """The W0 training learns on: the stored weight, or the int8 base's W0' = q*scale (fp32)."""
        if self.base_dtype == "int8":
            return int8_dequant(self.weight_int8, self.weight_int8_scale)
        return self.weight

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_q^T through the custom autograd Function (no bias)."""
        if self.base_dtype == "int8":
            W0, w0s = self.weight_int8, self.weight_int8_scale
        else:
            W0, w0s = self.weight, None
        return L4QFunction.apply(x, W0, w0s, self.lora_A, self.lora_B, self.scale, self.offset, self.cfg)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        """The canonical quantized tensor of the current parameters (what the fold produces)."""
        p = effective_params(self.spec, self.scale, self.offset, self.cfg.fp16_grid)
        w = combined_weight(self.base_weight(), self.lora_A, self.lora_B, self.cfg.lora_scale)
        return quantize(name, w, p, self.spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors written to l4q_adapter.safetensors (suffix -> tensor)."""
        out = {"scale": self.scale}
        if self.offset is not None:
            out["offset"] = self.offset
        if self.lora_A is not None:
            out["lora_A"] = self.lora_A
            out["lora_B"] = self.lora_B
        return detached_state(out)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self._copy_in(t, ("scale", "offset", "lora_A", "lora_B"))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return ([p for p in (self.lora_A, self.lora_B) if p is not None],
                [p for p in (self.scale, self.offset) if p is not None])

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"bits={s.bits}, group={s.group_size}, zp={s.zero_point}, r={self.rank}"
        )
