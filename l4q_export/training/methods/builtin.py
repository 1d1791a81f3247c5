"""The built-in methods, one `register(Method(...))` each:

    l4q       LoRA merged inside a learned LSQ+ quantizer (layer.py)              exact, float offsets
    qalora    frozen RTN (or GPTQ) base + group-pooled LoRA merged into float minima (qalora.py)   exact
    dlqat     frozen (s, z), per-group magnitude, LoRA in the integer space (dlqat.py)    exact, integer zeros
    qat-lora  LSQ+ on W0 + separate float LoRA (baselines.py)      refuses export unless merge is accepted
    lora      float LoRA; export = merge then RTN (baselines.py)   lossy by design (LoRA-then-PTQ)
    rtn       no training: L4QLinear with rank 0, min/max init      exact (it is the RTN grid)

Every method writes the same checkpoint format (l4q_config.json `method` + l4q_adapter.safetensors), and its
fold yields canonical `QuantizedTensor`s, so exporters never need to know which method trained a model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...checkpoint import Checkpoint
from ...errors import FidelityError, L4QInputError
from ...quant import QuantizedTensor, combined_weight, effective_params, quantize
from ...quant.grids import float_spec, integer_spec
from ..baselines import FloatLoRALinear, QATLoRALinear
from ..dlqat import DLQATLinear, fold_dlqat_tensors
from ..layer import L4QLinear
from ..qalora import GPTQBase, QALoRALinear, fold_qalora_tensors
from .registry import Method, register

QAT_LORA_EXPORT = ("refuse", "merge")


def fold_merged(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """quantize(W0 + alpha*B@A) on the stored grid: L4Q's fold (and lora's / rtn's / merged qat-lora's), with
    exactly the training forward's operations and dtype (`quant.combined_weight` + `quant.quantize`)."""
    p = effective_params(ck.spec, t["scale"], t.get("offset"), ck.fp16_grid)
    return quantize(module + ".weight", combined_weight(W0, t.get("lora_A"), t.get("lora_B"), ck.lora_scale), p, ck.spec)


def _fold_qalora(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    return fold_qalora_tensors(module + ".weight", W0, ck.spec, ck.lora_scale, ck.fp16_grid, t)


def _fold_dlqat(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    return fold_dlqat_tensors(module + ".weight", W0, ck.spec, ck.lora_scale, ck.fp16_grid, t)


def _fold_qat_lora(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Refuse by default: a float LoRA branch has no exact integer form.  With merge accepted, re-quantize."""
    if ck.config.get("qat_lora_export", "refuse") != "merge":
        raise FidelityError(
            f"{ck.dir}: qat-lora keeps a float LoRA branch beside the quantized W0, which no integer format holds; "
            "exporting means merging it and RE-QUANTIZING on the learned grid (lossy). Accept that with "
            "`l4q-train --qat-lora-export merge` or set \"qat_lora_export\": \"merge\" in l4q_config.json"
        )
    return fold_merged(ck, module, W0, t)


def _fp16(args: Any) -> bool:
    return args.scale_grid == "fp16"


# ---- l4q / rtn: L4QLinear -------------------------------------------------------------------------

def _make_l4q(lin: nn.Linear, name: str, gen: torch.Generator, args: Any, ctx: Any) -> L4QLinear:
    return L4QLinear(lin, args.spec(), args.rank, args.alpha, args.init, _fp16(args), args.lsq_grad_scale, generator=gen)


def _make_rtn(lin: nn.Linear, name: str, gen: torch.Generator, args: Any, ctx: Any) -> L4QLinear:
    spec = args.spec()
    init = "minmax" if spec.zero_point != "symmetric" else "l4q"
    return L4QLinear(lin, spec, 0, args.alpha, init, _fp16(args), args.lsq_grad_scale, generator=gen)


def _rebuild_l4q(lin: nn.Linear, ck: Checkpoint, rank: int, lora_alpha: float, t: dict) -> L4QLinear:
    return L4QLinear(lin, ck.spec, rank if "lora_A" in t else 0, lora_alpha, fp16_grid=ck.fp16_grid)


register(Method("l4q", L4QLinear, "LoRA merged inside a learned LSQ+ quantizer", _make_l4q, _rebuild_l4q, fold_merged))

# ---- qalora ---------------------------------------------------------------------------------------


def _qalora_context(args: Any) -> GPTQBase | None:
    return GPTQBase(args.extra["qalora_base"], args.spec()) if args.extra.get("qalora_base") else None


def _make_qalora(lin: nn.Linear, name: str, gen: torch.Generator, args: Any, gptq: GPTQBase | None) -> QALoRALinear:
    frozen = gptq.layer(name, tuple(lin.weight.shape)) if gptq is not None else None
    return QALoRALinear(lin, args.spec(), args.rank, args.alpha, _fp16(args), generator=gen, frozen=frozen)


def _qalora_extra(args: Any) -> dict[str, Any]:
    zeros = "fp16" if _fp16(args) else "fp32"
    if args.extra.get("qalora_base"):
        gptq = GPTQBase(args.extra["qalora_base"], args.spec()).record()
        return {"qalora": {"base": "gptq", "gptq": gptq, "base_codes": "adapter <module>.base_codes (LSB-first bit-packed)",
                           "pool": "mean", "zeros": zeros}}
    return {"qalora": {"base": "rtn-minmax", "pool": "mean", "zeros": zeros}}


register(Method(
    "qalora", QALoRALinear, "frozen RTN or --qalora-base GPTQ base + group-pooled LoRA in float zeros",
    _make_qalora, lambda lin, ck, rank, a, t: QALoRALinear(lin, ck.spec, rank, a, ck.fp16_grid), _fold_qalora,
    checkpoint_spec=float_spec, checkpoint_extra=_qalora_extra, options=("qalora_base",), prepare=_qalora_context,
))

# ---- dlqat ----------------------------------------------------------------------------------------

register(Method(
    "dlqat", DLQATLinear, "frozen s/z, per-group magnitude, integer-space LoRA",
    lambda lin, name, gen, args, ctx: DLQATLinear(lin, args.spec(), args.rank, args.alpha, _fp16(args), generator=gen),
    lambda lin, ck, rank, a, t: DLQATLinear(lin, ck.spec, rank, a, ck.fp16_grid), _fold_dlqat,
    checkpoint_spec=integer_spec,
    checkpoint_extra=lambda args: {"dlqat": {"frozen": ["scale", "zero"], "lora": "integer-space, before rounding",
                                             "magnitude": "per (row, group)"}},
))

# ---- baselines ------------------------------------------------------------------------------------


def _check_qat_lora(args: Any) -> None:
    if args.extra.get("qat_lora_export", "refuse") not in QAT_LORA_EXPORT:
        raise L4QInputError(f"--qat-lora-export must be one of {QAT_LORA_EXPORT}")


register(Method(
    "qat-lora", QATLoRALinear, "baseline: LSQ+ W0 + float LoRA",
    lambda lin, name, gen, args, ctx: QATLoRALinear(lin, args.spec(), args.rank, args.alpha, args.init, _fp16(args),
                                                    args.lsq_grad_scale, generator=gen),
    lambda lin, ck, rank, a, t: QATLoRALinear(lin, ck.spec, rank, a, fp16_grid=ck.fp16_grid,
                                              lsq_grad_scale=bool(ck.config.get("lsq_grad_scale", True))),
    _fold_qat_lora, lossy=True, validate=_check_qat_lora,
    checkpoint_extra=lambda args: {"qat_lora_export": args.extra.get("qat_lora_export", "refuse")},
))

register(Method(
    "lora", FloatLoRALinear, "baseline: float LoRA; export = merge then RTN",
    lambda lin, name, gen, args, ctx: FloatLoRALinear(lin, args.spec(), args.rank, args.alpha, _fp16(args), generator=gen),
    lambda lin, ck, rank, a, t: FloatLoRALinear(lin, ck.spec, rank, a, ck.fp16_grid),
    fold_merged,  # RTN (scale, offset) of the merged weight were stored at checkpoint time
    lossy=True,
))

register(Method("rtn", L4QLinear, "no training: the min/max RTN grid", _make_rtn, _rebuild_l4q,
                fold_merged,  # rank 0: quantize(W0) on the stored RTN grid
                trains=False, uses_lora=False))
