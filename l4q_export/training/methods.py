"""`l4q-train --method ...`: one table of training methods, each with its layer, its fold and its rebuild.

    l4q       LoRA merged inside a learned LSQ+ quantizer (layer.py)              exact, float offsets
    qalora    frozen RTN (or GPTQ) base + group-pooled LoRA merged into float minima (qalora.py)   exact
    dlqat     frozen (s, z), per-group magnitude, LoRA in the integer space (dlqat.py)    exact, integer zeros
    qat-lora  LSQ+ on W0 + separate float LoRA (baselines.py)      refuses export unless merge is accepted
    lora      float LoRA; export = merge then RTN (baselines.py)   lossy by design (LoRA-then-PTQ)
    rtn       no training: L4QLinear with rank 0, min/max init      exact (it is the RTN grid)

Every method writes the same checkpoint format (l4q_config.json `method` + l4q_adapter.safetensors), and its
fold yields canonical `QuantizedTensor`s, so exporters never need to know which method trained a model.
`FOLDERS` (registered into `l4q_export.fold`) and `LAYER_BUILDERS` (used by `verify`) are the two registries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import FidelityError, L4QInputError
from ..quant import SCALE_FLOOR, QuantizedTensor, QuantSpec, combined_weight, effective_params, quantize
from .baselines import FloatLoRALinear, QATLoRALinear
from .dlqat import DLQATLinear, fold_dlqat_tensors, int_spec
from .layer import L4QLinear, layer_from_tensors
from .qalora import GPTQBase, QALoRALinear, float_spec, fold_qalora_tensors
from .surgery import check_model, load_base_model, quantize_model, quantized_layers, target_linears

METHODS = ("l4q", "qalora", "dlqat", "qat-lora", "lora", "rtn")
LOSSY_BY_DESIGN = ("qat-lora", "lora")  # their export is a re-quantization; verify reports the deviation
QAT_LORA_EXPORT = ("refuse", "merge")


def check_args(args: Any) -> None:
    """Refuse option combinations a method cannot honour (one clear line each)."""
    if args.method not in METHODS:
        raise L4QInputError(f"method {args.method!r} is not available; choose one of {', '.join(METHODS)}")
    if args.method != "rtn" and args.rank < 1:
        raise L4QInputError("--rank must be >= 1")
    if args.extra.get("qalora_base") and args.method != "qalora":
        raise L4QInputError("--qalora-base is a QA-LoRA option; use it with --method qalora")
    export = args.extra.get("qat_lora_export", "refuse")
    if export not in QAT_LORA_EXPORT:
        raise L4QInputError(f"--qat-lora-export must be one of {QAT_LORA_EXPORT}")


def checkpoint_spec(args: Any) -> QuantSpec:
    """The spec the *folded* tensors have (QA-LoRA's merge makes float minima; DL-QAT keeps integer zeros)."""
    spec = args.spec()
    if args.method == "qalora":
        return float_spec(spec)
    if args.method == "dlqat":
        return int_spec(spec)
    return spec


def trains(method: str) -> bool:
    return method != "rtn"


def checkpoint_rank(args: Any) -> int:
    return 0 if args.method == "rtn" else args.rank


def checkpoint_extra(args: Any) -> dict[str, Any]:
    """Method-specific keys written into l4q_config.json (read back by the fold)."""
    if args.method == "qat-lora":
        return {"qat_lora_export": args.extra.get("qat_lora_export", "refuse")}
    if args.method == "qalora":
        zeros = "fp16" if args.scale_grid == "fp16" else "fp32"
        if args.extra.get("qalora_base"):
            gptq = GPTQBase(args.extra["qalora_base"], args.spec()).record()
            return {"qalora": {"base": "gptq", "gptq": gptq, "base_codes": "adapter <module>.base_codes (LSB-first bit-packed)",
                               "pool": "mean", "zeros": zeros}}
        return {"qalora": {"base": "rtn-minmax", "pool": "mean", "zeros": zeros}}
    if args.method == "dlqat":
        return {"dlqat": {"frozen": ["scale", "zero"], "lora": "integer-space, before rounding", "magnitude": "per (row, group)"}}
    return {}


def setup_model(model: nn.Module, args: Any) -> list[str]:
    """Swap the target linears for the method's layers in place; returns the module names."""
    spec = args.spec()
    fp16 = args.scale_grid == "fp16"
    if args.method in ("l4q", "rtn"):
        init = args.init if args.method == "l4q" else ("minmax" if spec.zero_point != "symmetric" else "l4q")
        rank = args.rank if args.method == "l4q" else 0
        return quantize_model(model, spec, rank, args.alpha, init=init, fp16_grid=fp16, lsq_grad_scale=args.lsq_grad_scale,
                              seed=args.seed)
    check_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    gptq = GPTQBase(args.extra["qalora_base"], spec) if args.method == "qalora" and args.extra.get("qalora_base") else None
    names = []
    for name, lin in list(target_linears(model)):
        if not torch.isfinite(lin.weight).all():
            raise L4QInputError(f"weight {name}.weight contains NaN/Inf; refusing to quantize")
        if args.method == "qalora":
            frozen = gptq.layer(name, tuple(lin.weight.shape)) if gptq is not None else None
            layer: nn.Module = QALoRALinear(lin, spec, args.rank, args.alpha, fp16, generator=gen, frozen=frozen)
        elif args.method == "dlqat":
            layer = DLQATLinear(lin, spec, args.rank, args.alpha, fp16, generator=gen)
        elif args.method == "qat-lora":
            layer = QATLoRALinear(lin, spec, args.rank, args.alpha, args.init, fp16, args.lsq_grad_scale, generator=gen)
        else:
            layer = FloatLoRALinear(lin, spec, args.rank, args.alpha, fp16, generator=gen)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
        names.append(name)
    if not names:
        raise L4QInputError("no decoder linear layers found to quantize")
    return names


def optimizer_groups(model: nn.Module, method: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weight-decayed LoRA matrices, undecayed quantizer parameters) for AdamW."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    if not trains(method):
        return decay, no_decay
    for _, layer in quantized_layers(model):
        if isinstance(layer, L4QLinear):
            decay += [p for p in (layer.lora_A, layer.lora_B) if p is not None]
            no_decay += [p for p in (layer.scale, layer.offset) if p is not None]
        else:
            d, n = layer.param_groups()
            decay += d
            no_decay += n
    return decay, no_decay


@torch.no_grad()
def project_(model: nn.Module) -> None:
    """After each step: learned scales stay above SCALE_FLOOR (a scale through zero makes the grid degenerate)."""
    for _, layer in quantized_layers(model):
        if isinstance(layer, (L4QLinear, QATLoRALinear)):
            layer.scale.clamp_(min=SCALE_FLOOR)


# ------------------------------------------------------------------------------------------------
# Fold (registered into l4q_export.fold.FOLDERS) and rebuild of the training layer (used by verify)
# ------------------------------------------------------------------------------------------------

def _fold_merged(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    p = effective_params(ck.spec, t["scale"], t.get("offset"), ck.fp16_grid)
    return quantize(module + ".weight", combined_weight(W0, t.get("lora_A"), t.get("lora_B"), ck.alpha), p, ck.spec)


def fold_qalora_module(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    return fold_qalora_tensors(module + ".weight", W0, ck.spec, ck.alpha, ck.fp16_grid, t)


def fold_dlqat_module(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    return fold_dlqat_tensors(module + ".weight", W0, ck.spec, ck.alpha, ck.fp16_grid, t)


def fold_qat_lora_module(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Refuse by default: a float LoRA branch has no exact integer form.  With merge accepted, re-quantize."""
    if ck.config.get("qat_lora_export", "refuse") != "merge":
        raise FidelityError(
            f"{ck.dir}: qat-lora keeps a float LoRA branch beside the quantized W0, which no integer format holds; "
            "exporting means merging it and RE-QUANTIZING on the learned grid (lossy). Accept that with "
            "`l4q-train --qat-lora-export merge` or set \"qat_lora_export\": \"merge\" in l4q_config.json"
        )
    return _fold_merged(ck, module, W0, t)


FOLDERS: dict[str, Callable[[Checkpoint, str, torch.Tensor, dict], QuantizedTensor]] = {
    "qalora": fold_qalora_module,
    "dlqat": fold_dlqat_module,
    "qat-lora": fold_qat_lora_module,
    "lora": _fold_merged,  # RTN (scale, offset) of the merged weight were stored at checkpoint time
    "rtn": _fold_merged,   # rank 0: quantize(W0) on the stored RTN grid
}


def _meta_linear(W0: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W0, requires_grad=False)
    return lin


def build_layer(ck: Checkpoint, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the module's *training* layer from its base weight and saved tensors (verify and l4q-eval use it)."""
    rank, alpha = int(ck.config["lora"]["rank"]), float(ck.config["lora"]["alpha"])
    method = ck.method
    if method in ("l4q", "rtn"):
        return layer_from_tensors(W0, ck.spec, rank, alpha, ck.fp16_grid, t)
    lin = _meta_linear(W0)
    if method == "qat-lora":
        layer: nn.Module = QATLoRALinear(lin, ck.spec, rank, alpha, fp16_grid=ck.fp16_grid,
                                         lsq_grad_scale=bool(ck.config.get("lsq_grad_scale", True)))
        with torch.no_grad():
            for k in ("scale", "offset", "lora_A", "lora_B"):
                if getattr(layer, k) is not None:
                    getattr(layer, k).copy_(t[k])
        return layer
    cls = {"qalora": QALoRALinear, "dlqat": DLQATLinear, "lora": FloatLoRALinear}.get(method)
    if cls is None:
        raise L4QInputError(f"checkpoint method {method!r} is unknown; known: {', '.join(METHODS)}")
    layer = cls(lin, ck.spec, rank, alpha, ck.fp16_grid)
    layer.load_tensors(t)
    return layer


def apply_checkpoint(model: nn.Module, ck: Checkpoint, forward: str = "fold") -> None:
    """Put a checkpoint into a loaded fp32 base model, for evaluation or as a runtime reference.

    forward="fold":  each target linear gets dequant(fold) -- exactly the weights every exporter writes
                     (for exact methods this equals the training W_q bit for bit; for lora/qat-lora it is the merge).
    forward="train": each target linear is replaced by the method's training layer (qat-lora's 4+16 mixed
                     precision, lora's float W0 + alpha*B@A, ...), i.e. what the training loss saw.
    """
    from ..fold import fold_checkpoint

    if forward == "fold":
        with torch.no_grad():
            for name, t in fold_checkpoint(ck):
                if isinstance(t, QuantizedTensor):
                    model.get_submodule(name[: -len(".weight")]).weight.copy_(t.dequantize())
        return
    if forward != "train":
        raise L4QInputError(f"forward must be fold or train, not {forward!r}")
    base = ck.base()
    for module in ck.modules:
        orig = model.get_submodule(module)
        layer = build_layer(ck, base.get(module + ".weight").float(), ck.adapter(module))
        layer.bias = orig.bias
        parent, child = module.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)


def reference_model(ck: Checkpoint) -> nn.Module:
    """The fp32 PyTorch model every runtime check (GGUF, ONNX, safetensors) compares an artifact against.

    Exact methods get their own training layers -- the forward the loss saw, which the export must reproduce.
    lora / qat-lora export a re-quantized merge by design, so no file can match their training forward; they
    are compared with the fold (the weights written), and `verify` on the checkpoint reports the merge's distance.
    """
    model = load_base_model(ck.base_dir, dtype=torch.float32)
    apply_checkpoint(model, ck, forward="fold" if ck.method in LOSSY_BY_DESIGN else "train")
    return model.eval()
