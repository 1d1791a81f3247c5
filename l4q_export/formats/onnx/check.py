"""Reading an exported ONNX decoder back for `verify`, and ONNX's own check (what ORT's optimizer makes of it).

read-back: every quantized initializer is loaded from model.onnx(.data) with onnx's own external-data helper, one
tensor at a time, and unpacked to canonical [N, ...] arrays (`linear.read_back`); `verify` compares them with the
fold bit for bit (codes, block scales, zero points, float offsets).
graph: the ORT-optimized graph (ORT_ENABLE_EXTENDED, saved to disk) has one MatMulNBits per quantized linear,
i.e. the QDQ form really fuses and the MatMulNBits form keeps its kernels (QDQ linears whose group has no
power-of-two block >= 16 cannot fuse: they are reported as `unfusible`, not expected); a fused export also keeps
one GroupQueryAttention per layer and 2 SkipSimplifiedLayerNormalization per layer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from ...checkpoint import Checkpoint
from ...errors import L4QInputError
from ..base import Decoded
from .graph import DecoderSpec
from .linear import expected_fields, read_back
from .writer import META_KEY, model_path


def initializer_reader(model: onnx.ModelProto, base_dir: Path) -> Callable[[str], np.ndarray]:
    """Load one initializer at a time (external data read per tensor, never the whole file)."""
    inits = {t.name: t for t in model.graph.initializer}

    def get(name: str) -> np.ndarray:
        if name not in inits:
            raise L4QInputError(f"initializer {name} missing from model.onnx")
        t = onnx.TensorProto()
        t.CopyFrom(inits[name])
        if external_data_helper.uses_external_data(t):
            try:
                external_data_helper.load_external_data_for_tensor(t, str(base_dir))
            except (OSError, ValueError) as e:
                raise L4QInputError(f"{base_dir}: external data of {name} unreadable ({e})") from None
        return numpy_helper.to_array(t)

    return get


def export_meta(model: onnx.ModelProto) -> dict[str, Any]:
    import json

    for prop in model.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    raise L4QInputError("model.onnx has no l4q_export metadata: it was not written by l4q-export")


class ONNXArtifact:
    """`read_back` of an exported model.onnx: the quantized linears' stored fields by HF name."""

    def __init__(self, artifact: Path) -> None:
        self.path = model_path(artifact)
        if not self.path.is_file():
            raise L4QInputError(f"ONNX model not found: {self.path}")
        model = onnx.load(str(self.path), load_external_data=False)
        self.meta = export_meta(model)
        self.get_init = initializer_reader(model, self.path.parent)

    def names(self) -> Iterator[str]:
        return iter(self.meta["layers"])

    def get(self, name: str) -> Decoded | torch.Tensor | None:
        layout = self.meta["layers"].get(name)
        if layout is None:
            return None
        got = read_back(layout, self.get_init)
        info = {"form": layout["form"], "block_size": layout["block_size"], "container_bits": layout["container_bits"]}
        if layout["form"] == "dequantized":
            return Decoded(name, {}, lambda qt: {}, weight=torch.from_numpy(np.ascontiguousarray(got["weight"])), info=info)
        return Decoded(name, got, lambda qt: expected_fields(qt, layout), info=info)


def fusible(layout: dict[str, Any]) -> bool:
    """Whether ORT can run this linear as MatMulNBits: the form emits it, or the DQ block is a power of two >= 16."""
    if layout["form"] == "dequantized":
        return False
    b = layout["block_size"]
    return layout["form"] == "matmulnbits" or (b >= 16 and b & (b - 1) == 0)


FUSED_OPS = ("MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization")


def count_fused_ops(path: Path, tmp: Path) -> dict[str, int]:
    """Optimize at ORT_ENABLE_EXTENDED on the CPU EP, save the graph and count its ORT kernels (FUSED_OPS)."""
    import onnxruntime as ort

    from .runtime import ort_session

    opt = tmp / "optimized.onnx"
    ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, opt)
    graph = onnx.load(str(opt), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in FUSED_OPS}


def graph_check(artifact: Path, ck: Checkpoint) -> dict[str, Any]:
    """The export belongs to this checkpoint, and ORT's optimizer keeps (or makes) the quantized kernels."""
    path = model_path(artifact)
    meta = export_meta(onnx.load(str(path), load_external_data=False))
    if meta["spec"] != ck.spec.to_dict():
        raise L4QInputError(f"{path} was exported from a checkpoint with {meta['spec']}, but {ck.dir} has {ck.spec.to_dict()}")
    spec = DecoderSpec.from_config(ck.model_config(), ck.architecture)
    with tempfile.TemporaryDirectory() as tmp:
        ops = count_fused_ops(path, Path(tmp))
    fused = ops["MatMulNBits"]
    expected = sum(fusible(v) for v in meta["layers"].values())
    unfusible = 0 if meta["form"] == "dequantized" else len(meta["layers"]) - expected
    contrib = bool(meta.get("fused"))
    want = {"GroupQueryAttention": spec.layers if contrib else 0,
            "SkipSimplifiedLayerNormalization": 2 * spec.layers if contrib else 0}
    passed = fused == expected and all(ops[k] == v for k, v in want.items())
    summary = f"{meta['form']}/{meta['dtype']}: {fused}/{expected} MatMulNBits after ORT optimization"
    if contrib:
        summary += (f", {ops['GroupQueryAttention']}/{spec.layers} GroupQueryAttention, "
                    f"{ops['SkipSimplifiedLayerNormalization']}/{2 * spec.layers} SkipSimplifiedLayerNormalization")
    if unfusible:
        summary += f", {unfusible} QDQ linears with no power-of-two block >= 16 run unfused"
    return {"form": meta["form"], "dtype": meta["dtype"], "fused": contrib, "ops_after_optimization": ops,
            "matmulnbits_after_optimization": fused, "matmulnbits_expected": expected, "unfusible": unfusible,
            "passed": passed, "summary": summary}
