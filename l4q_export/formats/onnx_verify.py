"""Verify an exported ONNX decoder against the checkpoint it came from.

(a) storage: every quantized initializer, read back from model.onnx(.data), equals the fold bit for bit
    (codes, block scales, zero points, float offsets);
(b) runtime: ONNX Runtime (CPU EP; CUDA EP too when onnxruntime-gpu sees a GPU) runs a prefill plus
    greedy decode steps through the KV cache and is compared with the *training* model in PyTorch
    (base model + L4Q fake-quant layers with the trained adapter, fp32, eval) -- logits and tokens;
    the DQ->MatMulNBits fusion is pinned to accuracy level 0 so the check measures the export, not an
    int8-activation approximation;
(c) graph: the ORT-optimized graph (ORT_ENABLE_EXTENDED, saved to disk) has one MatMulNBits per
    quantized linear, i.e. the QDQ form really fuses and the MatMulNBits form keeps its kernels (QDQ linears
    whose group has no power-of-two block >= 16 cannot fuse: they are reported as `unfusible`, not expected);
    a fused export also keeps one GroupQueryAttention per layer and 2 SkipSimplifiedLayerNormalization per layer.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from ..checkpoint import load_checkpoint
from ..errors import L4QInputError
from ..fold import fold_checkpoint
from ..quant import QuantizedTensor
from ..training.methods import reference_model
from .onnx_graph import kv_names
from .onnx_linear import compare, read_back

LOGIT_TOL_FP32 = 1e-3
# fp16 graphs round activations and the KV cache to fp16 at every op; measured max |dlogits| on the
# test models is ~1e-2 relative to the largest |logit| (docs/onnx.md), so 5% leaves margin while still
# catching a wrong weight (which moves logits by O(1)).
LOGIT_TOL_FP16_REL = 5e-2
MIN_TOP1_FP16 = 0.9


def _meta(model: onnx.ModelProto) -> dict[str, Any]:
    for prop in model.metadata_props:
        if prop.key == "l4q_export":
            return json.loads(prop.value)
    raise L4QInputError("model.onnx has no l4q_export metadata: it was not written by l4q-export")


def initializer_reader(model: onnx.ModelProto, base_dir: Path) -> Callable[[str], np.ndarray]:
    """Load one initializer at a time (external data read per tensor, never the whole file)."""
    inits = {t.name: t for t in model.graph.initializer}

    def get(name: str) -> np.ndarray:
        if name not in inits:
            raise L4QInputError(f"initializer {name} missing from model.onnx")
        t = onnx.TensorProto()
        t.CopyFrom(inits[name])
        if external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, str(base_dir))
        return numpy_helper.to_array(t)

    return get


def check_storage(model: onnx.ModelProto, path: Path, ck: Any, meta: dict[str, Any]) -> list[dict[str, Any]]:
    get = initializer_reader(model, path.parent)
    rows = []
    for name, t in fold_checkpoint(ck):
        if not isinstance(t, QuantizedTensor):
            continue
        layout = meta["layers"].get(name)
        if layout is None:
            rows.append({"tensor": name, "ok": False, "error": "not in the ONNX model"})
            continue
        rows.append(compare(t, layout, read_back(layout, get)))
    return rows


def ort_session(path: Path, provider: str, level: Any = None, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def ort_stepper(sess: Any, n_layers: int, kv_heads: int, head_dim: int, np_dtype: Any) -> Callable:
    """step(new_ids [1,S]) -> logits [S,V] (fp32), carrying present -> past between calls."""
    state: dict[str, Any] = {"past": {}, "total": 0}
    for i in range(n_layers):
        pk, pv, _, _ = kv_names(i)
        state["past"][pk] = state["past"][pv] = np.zeros((1, kv_heads, 0, head_dim), np_dtype)
    outputs = ["logits"] + [n for i in range(n_layers) for n in kv_names(i)[2:]]

    def step(ids: np.ndarray) -> np.ndarray:
        s = ids.shape[1]
        total = state["total"] + s
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(state["total"], total, dtype=np.int64)[None], **state["past"]}
        res = sess.run(outputs, feeds)
        for i in range(n_layers):
            pk, pv, _, _ = kv_names(i)
            state["past"][pk], state["past"][pv] = res[1 + 2 * i], res[2 + 2 * i]
        state["total"] = total
        return res[0][0].astype(np.float32)

    return step


def torch_stepper(model: torch.nn.Module) -> Callable:
    from transformers import DynamicCache

    state: dict[str, Any] = {"cache": DynamicCache(), "total": 0}

    @torch.no_grad()
    def step(ids: np.ndarray) -> np.ndarray:
        s = ids.shape[1]
        total = state["total"] + s
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.ones(1, total, dtype=torch.long),
                    position_ids=torch.arange(state["total"], total)[None], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["total"] = out.past_key_values, total
        return out.logits[0].float().numpy()

    return step


def greedy(step: Callable, prompt: np.ndarray, steps: int, forced: list[int] | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Prefill + `steps` decode steps; feeds its own argmax, or the `forced` tokens (teacher forcing)."""
    logits = [step(prompt[None])]
    tokens = [int(logits[0][-1].argmax())]
    for j in range(steps):
        nxt = forced[j] if forced is not None else tokens[-1]
        logits.append(step(np.array([[nxt]], np.int64)))
        tokens.append(int(logits[-1][-1].argmax()))
    return logits, tokens


def compare_runs(ref: tuple[list[np.ndarray], list[int]], got: tuple[list[np.ndarray], list[int]], fp16: bool) -> dict[str, Any]:
    ref_l, ref_t = ref
    got_l, got_t = got
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ref_l, got_l, strict=True)]
    scale = max(float(np.abs(a).max()) for a in ref_l)
    top1 = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref_l, got_l, strict=True)])))
    res: dict[str, Any] = {"max_abs_dlogits": max(diffs), "max_abs_logit": scale, "prefill_max_abs_dlogits": diffs[0],
                           "decode_max_abs_dlogits": max(diffs[1:]) if len(diffs) > 1 else 0.0, "top1_agreement": top1,
                           "tokens_identical": ref_t == got_t, "tokens": got_t}
    if fp16:
        res["tolerance"] = LOGIT_TOL_FP16_REL * max(scale, 1.0)
        res["passed"] = res["max_abs_dlogits"] <= res["tolerance"] and top1 >= MIN_TOP1_FP16
    else:
        res["tolerance"] = LOGIT_TOL_FP32
        res["passed"] = res["max_abs_dlogits"] <= LOGIT_TOL_FP32 and res["tokens_identical"]
    return res


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

    opt = tmp / "optimized.onnx"
    ort_session(path, "CPUExecutionProvider", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, opt)
    graph = onnx.load(str(opt), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in FUSED_OPS}


def verify_onnx(path: Path, model_dir: Path, decode_steps: int = 16, prompt_len: int = 8, seed: int = 0) -> dict[str, Any]:
    import onnxruntime as ort

    if not path.is_file():
        raise L4QInputError(f"ONNX model not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    meta = _meta(model)
    ck = load_checkpoint(model_dir)
    from .onnx_graph import DTYPES, DecoderSpec

    spec = DecoderSpec.from_config(ck.model_config(), ck.architecture)
    if meta["spec"] != ck.spec.to_dict():
        raise L4QInputError(f"{path} was exported from a checkpoint with {meta['spec']}, but {model_dir} has {ck.spec.to_dict()}")
    rows = check_storage(model, path, ck, meta)
    storage_ok = bool(rows) and all(r["ok"] for r in rows)
    del model

    fp16 = meta["dtype"] == "fp16"
    np_dtype = DTYPES[meta["dtype"]][0]
    prompt = np.random.default_rng(seed).integers(3, spec.vocab, prompt_len)
    ref = greedy(torch_stepper(reference_model(ck)), prompt, decode_steps)
    runs: dict[str, Any] = {}
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if has_cuda else [])
    for prov in providers:
        try:
            t0 = time.perf_counter()
            sess = ort_session(path, prov)
            if prov not in sess.get_providers():
                raise RuntimeError(f"{prov} not active")
            stepper = ort_stepper(sess, spec.layers, spec.kv_heads, spec.head_dim, np_dtype)
            got = greedy(stepper, prompt, decode_steps, forced=ref[1][:-1] if fp16 else None)
            runs[prov] = {**compare_runs(ref, got, fp16), "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as e:
            if prov == "CPUExecutionProvider":
                raise
            runs[prov] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    with tempfile.TemporaryDirectory() as tmp:
        ops = count_fused_ops(path, Path(tmp))
    fused = ops["MatMulNBits"]
    expected = sum(fusible(v) for v in meta["layers"].values())
    unfusible = 0 if meta["form"] == "dequantized" else len(meta["layers"]) - expected
    contrib = bool(meta.get("fused"))
    want_contrib = {"GroupQueryAttention": spec.layers if contrib else 0,
                    "SkipSimplifiedLayerNormalization": 2 * spec.layers if contrib else 0}
    graph_ok = fused == expected and all(ops[k] == v for k, v in want_contrib.items())
    runtime_ok = all(r.get("passed", True) for r in runs.values())
    cpu = runs["CPUExecutionProvider"]
    cuda = runs.get("CUDAExecutionProvider")
    summary = (f"{meta['form']}/{meta['dtype']}: {sum(r['ok'] for r in rows)}/{len(rows)} linears bit-identical in the file; "
               f"ORT CPU max|dlogits| {cpu['max_abs_dlogits']:.2e} over prefill+{decode_steps} decode steps, "
               f"greedy tokens {'identical' if cpu['tokens_identical'] else 'DIFFERENT'}; "
               f"{fused}/{expected} MatMulNBits after ORT optimization")
    if contrib:
        summary += (f", fused attention/norms: {ops['GroupQueryAttention']}/{spec.layers} GroupQueryAttention, "
                    f"{ops['SkipSimplifiedLayerNormalization']}/{2 * spec.layers} SkipSimplifiedLayerNormalization")
    if unfusible:
        summary += f" ({unfusible} QDQ linears have a group with no power-of-two block >= 16: ORT runs them unfused)"
    if cuda is not None:
        summary += f"; CUDA max|dlogits| {cuda['max_abs_dlogits']:.2e}" if "max_abs_dlogits" in cuda else \
            f"; CUDA {cuda['skipped']}"
    return {"check": "onnx", "artifact": str(path), "model_dir": str(model_dir), "form": meta["form"], "dtype": meta["dtype"],
            "passed": storage_ok and runtime_ok and graph_ok, "summary": summary, "storage_bit_identical": storage_ok,
            "n_layers": len(rows), "n_bit_identical": sum(r["ok"] for r in rows), "runtime": runs,
            "matmulnbits_after_optimization": fused, "matmulnbits_expected": expected, "unfusible": unfusible,
            "fused": contrib, "ops_after_optimization": ops,
            "prompt": prompt.tolist(),
            "reference_tokens": ref[1], "onnxruntime": ort.__version__, "layers": rows}
