"""`l4q-export --to mlx`: an mlx-lm model directory holding the fold's codes, scales and minima unchanged.

Streams `fold_checkpoint` one tensor at a time into safetensors shards (peak memory: one tensor plus one layer),
inside an `AtomicDir`, so a failed export leaves nothing behind and never touches an existing output until it
is complete.  Nothing is re-quantized: codes are the fold's, packed as MLX packs them (layout.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ... import __version__
from ...checkpoint import TOKENIZER_FILES, AtomicDir, load_checkpoint, read_json
from ...errors import FidelityError, L4QInputError
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor
from ..base import ExportReport, refuse_kgrid
from ..safetensors.io import ShardWriter, parse_size
from .layout import capability, encode, mlx_config, quantization_block

EXPORT_INFO = "l4q_mlx.json"
# mlx-lm model classes these architectures load into with HF tensor names unchanged.
MLX_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def write(model_dir: Path, out: Path | None, shard_size: str | int = "5GB", allow_lossy: bool = False) -> ExportReport:
    """Export `model_dir` (an L4Q checkpoint) to the mlx-lm directory `out`; returns the per-tensor report.

    A tensor whose MLX decode is not bit-identical (integer zero points off the fp16 grid) is refused unless
    `allow_lossy`; its measured bound is then declared in l4q_mlx.json and held by verify."""
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir, overlap_hashes=True)
    refuse_kgrid(ck, "mlx")
    if ck.architecture not in MLX_MODEL_TYPES:
        raise L4QInputError(f"architecture {ck.architecture} has no mlx-lm mapping here; supported: "
                            f"{', '.join(MLX_MODEL_TYPES)}")
    max_bytes = parse_size(shard_size)
    spec = ck.spec
    out = Path(out) if out else model_dir.parent / f"{model_dir.name}-mlx"
    if out.resolve() == model_dir.resolve():
        raise L4QInputError(f"output {out} is the checkpoint itself; choose another -o")
    rows: list[dict[str, Any]] = []
    packed: dict[str, tuple[int, int]] = {}
    dense: list[str] = []
    with AtomicDir(out) as tmp:
        writer = ShardWriter(tmp, max_bytes, metadata={"format": "mlx"})
        for name, t in fold_checkpoint(ck):
            if not isinstance(t, QuantizedTensor):
                writer.add(name, t)
                continue
            module = name[: -len(".weight")]
            cap = capability(spec, t.shape)
            base_row = {"tensor": name, "shape": list(t.shape), "capability": cap.kind}
            if cap.kind == "refused":
                raise L4QInputError(f"{name}: {cap.reason}; MLX cannot hold this checkpoint")
            if cap.kind == "dense":
                writer.add(name, t.dequantize())  # the fold's fp32 W_q: exact, just not compressed
                dense.append(module)
                rows.append({**base_row, "encoding": "dense-fp32", "exact": True, "max_abs_error": 0.0,
                             "reason": cap.reason})
                continue
            enc = encode(t, cap)
            if not enc.row["exact"] and not allow_lossy:
                raise FidelityError(f"{name}: MLX decodes it within {enc.row['max_abs_error']:.3g} of the trained "
                                    "weights, not bit for bit (integer zero point off the fp16 grid); pass "
                                    "--allow-lossy to accept that bound, or train with --scale-grid fp16")
            writer.add(f"{module}.weight", enc.weight)
            writer.add(f"{module}.scales", enc.scales)
            writer.add(f"{module}.biases", enc.biases)
            packed[module] = (cap.group_size, cap.bits)  # type: ignore[assignment]
            rows.append({**base_row, **enc.row})
        index = writer.finish()
        qblock = quantization_block(packed, dense)
        (tmp / "config.json").write_text(json.dumps(mlx_config(ck.model_config(), qblock), indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (model_dir / fname).is_file():
                shutil.copyfile(model_dir / fname, tmp / fname)
        lossy = [r for r in rows if not r["exact"]]
        info = {"format": "mlx", "exporter": f"l4q-export {__version__}", "source": str(model_dir.resolve()),
                "spec": spec.to_dict(), "method": ck.method, "dense_modules": dense,
                "declared": {r["tensor"]: r["max_abs_error"] for r in rows}}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    scale_dtypes = sorted({r["scale_dtype"] for r in rows if "scale_dtype" in r})
    return ExportReport(
        target="mlx", artifact=str(out), n_quantized=len(rows), n_exact=sum(bool(r["exact"]) for r in rows),
        n_dense=len(dense), max_abs_error=max((r["max_abs_error"] for r in rows), default=0.0),
        bytes=index["metadata"]["total_size"],
        details={"bits": spec.bits, "group_size": spec.group_size, "zero_point": spec.zero_point,
                 "n_packed": len(packed), "scale_dtypes": ",".join(scale_dtypes),
                 "n_shards": len(set(index["weight_map"].values()))},
        warnings=[f"{len(lossy)} tensors within a declared bound (--allow-lossy)"] if lossy else [],
        layers=rows,
    )


def detect(artifact: Path) -> bool:
    """A directory written by this target: config.json plus our export record."""
    p = Path(artifact)
    if not (p.is_dir() and (p / "config.json").is_file() and (p / EXPORT_INFO).is_file()):
        return False
    try:
        return json.loads((p / EXPORT_INFO).read_text()).get("format") == "mlx"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def export_info(artifact: Path) -> dict[str, Any]:
    return read_json(Path(artifact) / EXPORT_INFO, "MLX export record")
