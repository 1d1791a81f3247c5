"""`l4q-export --to safetensors`: a Hugging Face model directory with packed integer weights.

Flavors (`--flavor`):
  compressed-tensors  (default) `pack-quantized`: 2-8 bits, symmetric or asymmetric integer zero points;
                      read by transformers (CPU decompress), vLLM and SGLang.
  gptq                `checkpoint_format: gptq_v2`: 2/3/4/8 bits, zero points stored as is, desc_act off.
  gptq-v1             the legacy `gptq` layout (stores z - 1): exact only when every zero point is >= 1
                      (always true for symmetric checkpoints); refused otherwise.

The integers come straight from the fold (codes u, integer zero z, scale d: W = (u - z)*d); nothing is
re-quantized.  L4Q's float offsets (W = d*u + m) have no exact integer zero point in general -- see
docs/safetensors.md for the proof -- so such checkpoints are refused unless every offset happens to be an
exact integer zero point, or `--allow-lossy` rounds z = round(-m/d) and reports the error.

Layers whose shape a flavor cannot pack (partial last group, GPTQ word alignment) are stored dense as the
fold's fp32 dequantized weight -- still exact -- and listed in the config's ignore / dynamic rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import torch

from ... import __version__
from ...checkpoint import TOKENIZER_FILES, AtomicDir, Checkpoint, load_checkpoint
from ...errors import FidelityError, L4QInputError
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor, QuantSpec
from ..base import ExportReport, refuse_kgrid
from .io import ShardWriter, parse_size
from .layout import (
    FLAVORS,
    GPTQ_BITS,
    ct_quantization_config,
    ct_tensors,
    decodes_exactly,
    exactly_representable,
    gptq_quantization_config,
    gptq_tensors,
    resolve_zero,
    unpackable_reason,
)

NAME = "safetensors"
EXPORT_INFO = "l4q_export.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CLI_OPTIONS: list[click.Option] = [
    click.Option(["--flavor", "flavor"], type=click.Choice(FLAVORS), default="compressed-tensors", show_default=True,
                 help="safetensors target: compressed-tensors pack-quantized, GPTQ gptq_v2, or legacy GPTQ v1 (z >= 1 only)."),
    click.Option(["--shard-size", "shard_size"], default="5GB", show_default=True,
                 help="safetensors: maximum shard size (e.g. 5GB, 500MB); memory does not depend on it."),
]

REFUSE_FLOAT = (
    "{tensor}: this checkpoint was trained with float zero points (L4Q offsets, W = d*u + m), which "
    "{flavor} cannot store exactly -- its zero points are integers and -m/d is not (rounding it moves the weights "
    "by up to {err:.3g}). Choices: (1) retrain with --zero-point integer or --zero-point symmetric and export "
    "exactly; (2) export to GGUF or ONNX, which hold float offsets exactly; (3) pass --allow-lossy "
    "to round the zero points and get the per-tensor error in the report."
)


def serving_note(flavor: str, spec: QuantSpec) -> str:
    """Which known loaders take this artifact (all of them read it exactly; the limits are kernels', not the file's)."""
    sym = spec.zero_point == "symmetric"
    if flavor == "compressed-tensors":
        if sym or spec.bits in (4, 8):
            return "transformers (CPU decompress); vLLM/SGLang WNA16 kernels"
        return (f"transformers (CPU decompress); vLLM/SGLang serve asymmetric compressed-tensors only at 4/8 bits, "
                f"not {spec.bits}")
    if sym and spec.bits in (4, 8):
        return "GPTQModel, transformers+optimum+gptqmodel (CPU); vLLM GPTQ-Marlin"
    return ("GPTQModel, transformers+optimum+gptqmodel (CPU); current vLLM serves GPTQ only symmetric 4/8-bit "
            "(older vLLM: gptq_gemm)")


def _model_dtype(model_config: dict[str, Any]) -> torch.dtype:
    name = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def _check_flavor(flavor: str, ck: Checkpoint) -> None:
    if flavor not in FLAVORS:
        raise L4QInputError(f"unknown safetensors flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if flavor.startswith("gptq") and ck.spec.bits not in GPTQ_BITS:
        raise L4QInputError(f"GPTQ holds {'/'.join(map(str, GPTQ_BITS))}-bit weights; this checkpoint is "
                            f"{ck.spec.bits}-bit -- use --flavor compressed-tensors (1-8 bits)")


def _encode(
    flavor: str, qt: QuantizedTensor, allow_lossy: bool, model_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (by suffix) and the report row of one packable quantized layer; refuses what is not exact."""
    res = resolve_zero(qt)
    if not res.exact and not allow_lossy:
        raise FidelityError(REFUSE_FLOAT.format(tensor=qt.name, flavor=flavor, err=res.max_abs_err))
    row: dict[str, Any] = {"encoding": "packed", "zero_point": "rounded" if res.rounded else qt.spec.zero_point,
                           "exact": res.exact, "max_abs_error": res.max_abs_err}
    if flavor == "compressed-tensors":
        scale_dtype = model_dtype if decodes_exactly(qt, res.zero, model_dtype) else torch.float32
        row["scale_dtype"] = str(scale_dtype).removeprefix("torch.")
        return ct_tensors(qt, res.zero, scale_dtype), row
    if not exactly_representable(qt.scale, torch.float16):
        raise FidelityError(f"{qt.name}: GPTQ stores fp16 scales and this checkpoint's scales are not on the fp16 grid; "
                            "retrain with --scale-grid fp16, or use --flavor compressed-tensors (it stores fp32 scales)")
    if flavor == "gptq-v1" and bool((res.zero < 1).any()):
        raise FidelityError(f"{qt.name}: has zero point 0, which GPTQ v1 (stores z - 1) cannot hold -- it underflows "
                            "and corrupts the neighbouring packed field in every v1 loader; use --flavor gptq (gptq_v2) "
                            "or compressed-tensors")
    row["scale_dtype"] = "float16"
    return gptq_tensors(qt, res.zero, v1=flavor == "gptq-v1"), row


def export(model_dir: Path, output: Path | None, flavor: str = "compressed-tensors", allow_lossy: bool = False,
           shard_size: str | int = "5GB") -> ExportReport:
    """Stream the fold into a sharded HF model directory (atomically); returns the per-tensor report."""
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir, overlap_hashes=True)
    refuse_kgrid(ck, "safetensors")
    _check_flavor(flavor, ck)
    max_bytes = parse_size(shard_size)
    spec = ck.spec
    model_config = ck.model_config()
    model_dtype = _model_dtype(model_config)
    output = Path(output) if output else model_dir.parent / f"{model_dir.name}-{flavor}"
    rows: list[dict[str, Any]] = []
    dense: list[str] = []
    with AtomicDir(output) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for name, t in fold_checkpoint(ck):
            if not isinstance(t, QuantizedTensor):
                writer.add(name, t)
                continue
            module = name[: -len(".weight")]
            base_row = {"tensor": name, "shape": list(t.shape), "bits": spec.bits}
            reason = unpackable_reason(flavor, spec, t.shape)
            if reason is not None:
                writer.add(name, t.dequantize())  # fp32 W_q: exact, just not compressed
                dense.append(module)
                rows.append({**base_row, "encoding": "dense-fp32", "exact": True, "max_abs_error": 0.0, "reason": reason})
                continue
            tensors, row = _encode(flavor, t, allow_lossy, model_dtype)
            for suffix, v in tensors.items():
                writer.add(f"{module}.{suffix}", v)
            rows.append({**base_row, **row})
        index = writer.finish()
        if flavor == "compressed-tensors":
            qcfg = ct_quantization_config(spec, dense)
        else:
            packed_modules = [r["tensor"][: -len(".weight")] for r in rows if r["encoding"] == "packed"]
            qcfg = gptq_quantization_config(spec, flavor == "gptq-v1", dense, packed_modules, __version__)
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        model_config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps({**model_config, "quantization_config": qcfg}, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (model_dir / fname).is_file():
                shutil.copyfile(model_dir / fname, tmp / fname)
        lossy = [r for r in rows if not r["exact"]]
        info = {"exporter": f"l4q-export {__version__}", "flavor": flavor, "source": str(model_dir.resolve()),
                "spec": spec.to_dict(), "dense_modules": dense, "lossy": bool(lossy),
                "zero_point": "rounded" if any(r.get("zero_point") == "rounded" for r in rows) else spec.zero_point}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    packed = [r for r in rows if r["encoding"] == "packed"]
    return ExportReport(
        target=NAME, artifact=str(output), n_quantized=len(rows), n_exact=sum(bool(r["exact"]) for r in rows),
        n_dense=len(dense), max_abs_error=max((r["max_abs_error"] for r in rows), default=0.0),
        bytes=index["metadata"]["total_size"],
        details={"flavor": flavor, "bits": spec.bits, "group_size": spec.group_size, "zero_point": info["zero_point"],
                 "n_packed": len(packed), "n_shards": len(set(index["weight_map"].values())),
                 "loaders": serving_note(flavor, spec)},
        layers=rows)
