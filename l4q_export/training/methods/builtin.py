"""The built-in methods, one `register(Method(...))` each:

    l4q       LoRA merged inside a learned LSQ+ quantizer (layer.py)              exact, float offsets
              --grid q4_k / q4_k_m ...: per module a GGUF K-quant grid (kquant_layer.py) or the legacy ggml
              type llama.cpp's recipe gives it (quant/kplan.py); the fold is then a KQuantized for K modules
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
from ...quant import QuantizedTensor, effective_params, quantize_merged
from ...quant.grids import float_spec, integer_spec
from ...quant.kplan import check_grid, grid_to_dict, module_grid
from ...quant.kquant import KQuantized, KQuantSpec
from ..baselines import FloatLoRALinear, QATLoRALinear
from ..dlqat import DLQATLinear, fold_dlqat_tensors
from ..kquant_layer import KQuantLinear, fold_kquant_tensors
from ..layer import L4QLinear, MethodLinear
from ..qalora import GPTQBase, QALoRALinear, fold_qalora_tensors
from .registry import Method, register

QAT_LORA_EXPORT = ("refuse", "merge")


def fold_merged(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor | KQuantized:
    """quantize(W0 + alpha*B@A) on the stored grid: L4Q's fold (and lora's / rtn's / merged qat-lora's), with
    exactly the training forward's operations and dtype (`quant.quantize_merged`: `combined_weight` + `quantize`,
    in cache-sized row blocks).
    A K-grid module (`l4q-train --grid`, ck.kspec) folds to its K-quant integers instead."""
    if ck.kspec is not None:
        return fold_kquant_tensors(ck.kspec, module + ".weight", W0, ck.lora_scale, t)
    p = effective_params(ck.spec, t["scale"], t.get("offset"), ck.fp16_grid)
    return quantize_merged(module + ".weight", W0, t.get("lora_A"), t.get("lora_B"), ck.lora_scale, p, ck.spec)


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

def _grid_context(args: Any) -> dict[str, Any] | None:
    """--grid: the base config the per-module choice reads (quant.kplan); None without --grid."""
    if not args.extra.get("grid"):
        return None
    if getattr(args, "base_config", None):  # l4q_export.prepare on an in-memory model
        return args.base_config
    from ...checkpoint import check_architecture

    return check_architecture(args.model)


def _check_grid(args: Any) -> None:
    if args.extra.get("grid") and getattr(args, "base_dtype", "stored") != "stored":
        raise L4QInputError("--base-dtype int8 is not available with --grid (K-grid layers keep the stored W0)")
    if args.extra.get("grid"):
        args.extra["grid"] = check_grid(args.extra["grid"])
        args.scale_grid = "fp16"  # legacy-type modules are exact only on the fp16 scale grid; K modules always are


def _make_l4q(lin: nn.Linear, name: str, gen: torch.Generator, args: Any, cfg: dict[str, Any] | None) -> MethodLinear:
    """L4QLinear on --bits/--group-size; with --grid, the module's own grid (KQuantLinear or a legacy-type spec)."""
    if cfg is None:
        return L4QLinear(lin, args.spec(), args.rank, args.alpha, args.init, _fp16(args), args.lsq_grad_scale, generator=gen,
                         base_dtype=getattr(args, "base_dtype", "stored"))
    grid = module_grid(args.extra["grid"], name, tuple(lin.weight.shape), cfg)
    if isinstance(grid, KQuantSpec):  # ggml's own quantizer picks the initial scales: step 0 = llama-quantize's bytes
        layer: MethodLinear = KQuantLinear(lin, grid, args.rank, args.alpha, init="ggml", generator=gen)
    else:
        init = "minmax" if grid.zero_point == "float" else "l4q"
        layer = L4QLinear(lin, grid, args.rank, args.alpha, init, True, args.lsq_grad_scale, generator=gen)
    layer.grid = grid_to_dict(grid)  # recorded per module in l4q_config.json (methods.grid_extra)
    return layer


def _make_rtn(lin: nn.Linear, name: str, gen: torch.Generator, args: Any, ctx: Any) -> L4QLinear:
    spec = args.spec()
    init = "minmax" if spec.zero_point != "symmetric" else "l4q"
    return L4QLinear(lin, spec, 0, args.alpha, init, _fp16(args), args.lsq_grad_scale, generator=gen)


def _rebuild_l4q(lin: nn.Linear, ck: Checkpoint, rank: int, lora_alpha: float, t: dict) -> MethodLinear:
    rank = rank if "lora_A" in t else 0
    if ck.kspec is not None:  # init is overwritten by load_tensors; "rtn" is the cheap closed form
        return KQuantLinear(lin, ck.kspec, rank, lora_alpha, init="rtn")
    return L4QLinear(lin, ck.spec, rank, lora_alpha, init=None, fp16_grid=ck.fp16_grid)  # scale/offset: loaded next


register(Method("l4q", L4QLinear, "LoRA merged inside a learned LSQ+ quantizer (or, with --grid, a GGUF K-quant grid)",
                _make_l4q, _rebuild_l4q, fold_merged, options=("grid",), validate=_check_grid, prepare=_grid_context,
                int8_base=True,
                checkpoint_extra=lambda args: {"grid": args.extra["grid"]} if args.extra.get("grid") else {}))

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
    lambda lin, ck, rank, a, t: QATLoRALinear(lin, ck.spec, rank, a, init=None, fp16_grid=ck.fp16_grid,
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
