"""`KQuantLinear`: L4Q-style QAT through an exact GGUF K-quant grid (Q2_K..Q6_K, quant/kquant.py).

LoRA sits inside the quantizer as in L4QLinear: W = W0 + alpha*B@A (quant.combined_weight's fixed-order sum), and
the forward uses W_q = kquant.decode of the integers, so what trains is exactly what the GGUF block holds.

Trainable, per super-block of 256: d, dmin [out, nb] (continuous; the forward snaps them to fp16 with an identity
STE so the exported fp16 value is the one trained with).  Per sub-block: sc, mn [out, nb, n_sub] continuous latents,
rounded and clamped to their integer range in the forward with an LSQ-style STE (gradient passes where the latent
lies inside the range).  Codes q = round(clamp(v, qmin, qmax)) with v = (W + dmin*mn)/(d*sc).

Backward (custom Function, nothing [out, in]-sized saved: x and parameter references only, W_q recomputed):
  G = dy^T x;  inside = qmin <= v <= qmax
  dW   = inside * G                          -> dA = alpha B^T dW,  dB = alpha dW A^T
  ddl  = sum_sub( (q - v) inside | q outside ) * G )        dl = d*sc   (LSQ's step gradient)
  dml  = -sum_sub( outside * G )                            ml = dmin*mn
  dd   = sum_j ddl*sc,  dsc = ddl*d*mask_sc;   ddmin = sum_j dml*mn,  dmn = dml*dmin*mask_mn
tests/test_kquant.py checks these against plain autograd (tools/naive_kquant.py).  No LSQ gradient scaling yet:
the latents live in different units (d ~ 1e-3, sc ~ 1..63), so an optimizer wants per-parameter learning rates
(see `lr_groups`).

"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import combined_weight
from ..quant.kquant import (
    KINIT_METHODS,
    KQuantized,
    KQuantSpec,
    decode_sub,
    encode,
    ggml_init_kquant,
    init_kquant,
    round_kcodes,
    sub_scales,
    unrounded_codes,
)
from .layer import MethodLinear, add_lora, adopt_frozen_base, detached_state


@dataclass(frozen=True)
class KLayerConfig:
    """Static settings of one K-quant layer (hashable, passed through autograd untouched)."""

    spec: KQuantSpec
    alpha: float  # LoRA scaling lora_alpha / r


def _ste_int(t: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(round(clamp(t, lo, hi)), mask of latents inside [lo, hi]) -- the forward value and the STE gradient mask."""
    return t.clamp(lo, hi).round(), (t >= lo) & (t <= hi)


def effective_kparams(
    spec: KQuantSpec, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None, mn: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Trained latents -> the values the file stores: d, dmin on the fp16 grid; sc, mn integer-valued in range."""
    d_e = d.detach().half().float()
    sc_e = _ste_int(sc.detach(), spec.sc_min, spec.sc_max)[0]
    if dmin is None or mn is None:
        return d_e, sc_e, None, None
    return d_e, sc_e, dmin.detach().half().float(), _ste_int(mn.detach(), 0, spec.mn_max)[0]


class KQuantFunction(torch.autograd.Function):
    """y = x @ W_q^T, W_q = exact K-quant decode of W0 + alpha*B@A; W_q recomputed (not saved) in backward."""

    @staticmethod
    def forward(ctx, x, W0, A, B, d, sc, dmin, mn, cfg: KLayerConfig):  # type: ignore[override]
        spec = cfg.spec
        with torch.no_grad():
            d_e, sc_e, dmin_e, mn_e = effective_kparams(spec, d, sc, dmin, mn)
            dl, ml = sub_scales(d_e, sc_e, dmin_e, mn_e)
            w = combined_weight(W0, A, B, cfg.alpha)
            wq = decode_sub(spec, dl, ml, round_kcodes(spec, unrounded_codes(spec, w, dl, ml)))
            y = x @ wq.to(x.dtype).T
        ctx.cfg = cfg
        ctx.save_for_backward(x, W0, A, B, d, sc, dmin, mn)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, W0, A, B, d, sc, dmin, mn = ctx.saved_tensors
        cfg: KLayerConfig = ctx.cfg
        spec = cfg.spec
        out_f, in_f = W0.shape
        x2 = x.reshape(-1, in_f)
        gy2 = grad_y.reshape(-1, out_f)
        with torch.no_grad():
            d_e, sc_e, dmin_e, mn_e = effective_kparams(spec, d, sc, dmin, mn)
            dl, ml = sub_scales(d_e, sc_e, dmin_e, mn_e)
            w = combined_weight(W0, A, B, cfg.alpha)
            v = unrounded_codes(spec, w, dl, ml)
            del w
            q = round_kcodes(spec, v)
            grad_x = (gy2 @ decode_sub(spec, dl, ml, q).to(gy2.dtype)).view(x.shape) if ctx.needs_input_grad[0] else None
            G = (gy2.T @ x2.to(gy2.dtype)).float()
            inside = (v >= spec.qmin) & (v <= spec.qmax)
            blocks = (out_f, -1, spec.n_sub, spec.sub_len)
            gA = gB = None
            if A is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
                gw = G * inside
                gB = cfg.alpha * (gw @ A.float().T)
                gA = cfg.alpha * (B.float().T @ gw)
                del gw
            g_dl = (G * (q - v * inside)).reshape(blocks).sum(-1)
            gd = (g_dl * sc_e).sum(-1)
            gsc = g_dl * d_e.unsqueeze(-1) * _ste_int(sc, spec.sc_min, spec.sc_max)[1]
            gdmin = gmn = None
            if dmin is not None:
                g_ml = -(G * ~inside).reshape(blocks).sum(-1)
                gdmin = (g_ml * mn_e).sum(-1)
                gmn = g_ml * dmin_e.unsqueeze(-1) * _ste_int(mn, 0, spec.mn_max)[1]
        return (
            grad_x.to(x.dtype) if grad_x is not None else None,
            None,
            gA.to(A.dtype) if gA is not None else None,
            gB.to(B.dtype) if gB is not None else None,
            gd.to(d.dtype),
            gsc.to(sc.dtype),
            gdmin.to(dmin.dtype) if gdmin is not None else None,
            gmn.to(mn.dtype) if gmn is not None else None,
            None,
        )


_KINIT = {"rtn": init_kquant, "ggml": ggml_init_kquant}  # --init for K grids: closed-form RTN or ggml's quantizer
_ADAPTER_KEYS = ("d", "sc", "dmin", "mn", "lora_A", "lora_B")


@torch.no_grad()
def fold_kquant_tensors(spec: KQuantSpec, name: str, W0: torch.Tensor, alpha: float, t: dict[str, torch.Tensor]) -> KQuantized:
    """The fold of one K-grid module from its saved tensors: encode(W0 + alpha*B@A) under the effective
    (fp16 d/dmin, integer sc/mn) -- the training forward's operations, so dequantize() equals its W_q bit for bit."""
    d, sc, dmin, mn = effective_kparams(spec, t["d"], t["sc"], t.get("dmin"), t.get("mn"))
    w = combined_weight(W0.float(), t.get("lora_A"), t.get("lora_B"), alpha)
    return encode(spec, w, d, sc, dmin, mn, name=name)


class KQuantLinear(MethodLinear):
    """A frozen base linear whose effective weight is the K-quant decode of W0 + alpha*B@A.

    Trainable: lora_A [r, in], lora_B [out, r], d [out, nb], sc [out, nb, n_sub] and, for Q2_K/Q4_K/Q5_K, dmin and mn.
    Initialised on the frozen W0 by quant.kquant.init_kquant (init="rtn", closed-form round-to-nearest) or
    ggml_init_kquant (init="ggml": ggml's own reference quantizer, so step 0 is llama-quantize's file).
    """

    def __init__(
        self,
        base: nn.Linear,
        spec: KQuantSpec,
        rank: int,
        lora_alpha: float,
        init: str = "rtn",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        spec.check_shape(tuple(base.weight.shape))
        if init not in KINIT_METHODS:
            raise ValueError(f"unknown K-quant init {init!r}; choose one of {KINIT_METHODS}")
        adopt_frozen_base(self, base)
        self.spec = spec
        add_lora(self, rank, lora_alpha, generator)
        dev = self.weight.device
        with torch.no_grad():
            d, sc, dmin, mn = _KINIT[init](spec, self.weight.detach())
        self.d = nn.Parameter(d.to(dev))
        self.sc = nn.Parameter(sc.to(dev))
        if dmin is None:
            self.register_parameter("dmin", None)
            self.register_parameter("mn", None)
        else:
            self.dmin = nn.Parameter(dmin.to(dev))
            self.mn = nn.Parameter(mn.to(dev))
        self.cfg = KLayerConfig(spec=spec, alpha=(lora_alpha / rank) if rank > 0 else 0.0)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_q^T through the custom autograd Function (no bias)."""
        return KQuantFunction.apply(x, self.weight, self.lora_A, self.lora_B, self.d, self.sc, self.dmin, self.mn, self.cfg)

    @torch.no_grad()
    def quantized(self, name: str = "") -> KQuantized:
        """The integers + fp16 super-scales of the current parameters: what the GGUF writer packs (KQuantized.pack)."""
        t = {k: getattr(self, k) for k in _ADAPTER_KEYS if getattr(self, k) is not None}
        return fold_kquant_tensors(self.spec, name, self.weight, self.cfg.alpha, t)

    def dequantized_weight(self) -> torch.Tensor:
        """W_q as the forward uses it (no gradient)."""
        return self.quantized().dequantize()

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weight-decayed LoRA matrices, undecayed quantizer parameters), as every MethodLinear gives AdamW."""
        lora = [p for p in (self.lora_A, self.lora_B) if p is not None]
        return lora, [p for p in (self.d, self.sc, self.dmin, self.mn) if p is not None]

    def lr_groups(self, lr: float, scale_rel_lr: float = 1e-3, int_lr: float = 0.01) -> list[dict]:
        """Per-parameter-lr optimizer groups (for Adam-like optimizers, whose step is about the lr whatever the gradient's size).

        LoRA at lr; each super-scale tensor (d, dmin) at scale_rel_lr times its mean magnitude, because d spans
        orders of magnitude across types (Q6_K's d ~ max|w|/4096, Q2_K's ~ max|w|/45), so one absolute lr is too
        big for one and too small for another; the integer latents sc/mn at int_lr, in integer steps."""
        groups = [{"params": [p for p in (self.lora_A, self.lora_B) if p is not None], "lr": lr}]
        for p in (self.d, self.dmin):
            if p is not None:
                groups.append({"params": [p], "lr": scale_rel_lr * float(p.detach().abs().mean().clamp_min(2.0**-24))})
        groups.append({"params": [p for p in (self.sc, self.mn) if p is not None], "lr": int_lr})
        return [g for g in groups if g["params"]]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors (suffix -> tensor) for the adapter file."""
        return detached_state({k: getattr(self, k) for k in _ADAPTER_KEYS if getattr(self, k) is not None})

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Adopt saved adapter tensors (inverse of adapter_tensors)."""
        self._copy_in(t, _ADAPTER_KEYS)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.spec.name}, r={self.rank}"
