"""Benchmark the ONNX export in ONNX Runtime: MatMulNBits (and QDQ) vs an fp32 ONNX of the same model.

    python tools/bench_onnx.py [--model L4Q_CHECKPOINT] [--hidden 1024 --layers 4 ...] [--json bench.json]

Without --model a random LLaMA (default hidden 1024, MLP 2816, 4 layers, 16 q / 4 kv heads) is built and given an
RTN L4Q checkpoint (`l4q-train --method rtn`, no training: speed does not depend on the values).  Every variant is
written by our exporter from the same checkpoint, so the graphs are identical except for the linear layers:

    fp32          plain fp32 MatMul on the dequantized weights (the "unquantized" baseline: same decomposed graph, fp32
                  weights)
    fp32-fused    the same with ORT's GroupQueryAttention + SkipSimplifiedLayerNormalization
    matmulnbits   com.microsoft::MatMulNBits, accuracy_level 0 (exact fp32 compute; what verify checks), fused
                  attention/norms (the export default)
    matmulnbits-unfused  the same with decomposed attention/RMSNorm (--no-onnx-fused)
    qdq           standard DequantizeLinear + MatMul, which ORT fuses to MatMulNBits when the session is created
                  (decomposed attention/RMSNorm: standard ops only)
    matmulnbits-acc4  accuracy_level 4 (int8 activations in MLAS; faster, ~5e-3 relative error per matmul), fused

For each: file size (model.onnx + data), session creation, prefill time of a --prompt token prompt, and greedy decode
tokens/s over --decode steps with the KV cache (variants timed round-robin); ratios are against fp32.  CPU EP only
unless onnxruntime-gpu sees a GPU (then the CUDA EP rows are added).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# name -> (onnx_form, accuracy_level, fused contrib attention/norms)
VARIANTS = {"fp32": ("dequantized", 0, False), "fp32-fused": ("dequantized", 0, True),
            "matmulnbits": ("matmulnbits", 0, True), "matmulnbits-unfused": ("matmulnbits", 0, False),
            "qdq": ("qdq", 0, False), "matmulnbits-acc4": ("matmulnbits", 4, True)}


def build_checkpoint(work: Path, a: argparse.Namespace) -> Path:
    """A random LLaMA of the requested shape plus an RTN L4Q checkpoint on it (no training steps)."""
    from l4q_export.demo import build_tiny_model, instruction_records
    from l4q_export.training.trainer import TrainArgs, train

    base = build_tiny_model(work / "base", hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                            kv_heads=a.kv_heads)
    data = work / "data.json"
    data.write_text(json.dumps(instruction_records(16)))
    out = work / "ck"
    train(TrainArgs(model=base, data=data, out=out, method="rtn", bits=a.bits, group_size=a.group_size,
                    zero_point=a.zero_point, init="minmax" if a.zero_point != "symmetric" else "l4q",
                    steps=0, batch_size=1, grad_accum=1, seq_len=64, save_every=0, eval_examples=0))
    return out


def session(path: Path, provider: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # QDQ fusion: exact, like verify
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def _stepper(sess: Any, spec: Any) -> Any:
    """step(new_ids [1,S]) -> logits [S,V], carrying present -> past between calls (the decode loop being timed)."""
    from l4q_export.formats.onnx.graph import kv_names

    past = {n: np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32) for i in range(spec.layers) for n in kv_names(i)[:2]}
    outputs = ["logits"] + [n for i in range(spec.layers) for n in kv_names(i)[2:]]
    state = {"past": past, "total": 0}

    def step(ids: np.ndarray) -> np.ndarray:
        total = state["total"] + ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(state["total"], total, dtype=np.int64)[None], **state["past"]}
        res = sess.run(outputs, feeds)
        state["past"] = {n: res[1 + j] for j, n in enumerate(n for i in range(spec.layers) for n in kv_names(i)[:2])}
        state["total"] = total
        return res[0][0]

    return step


def run_once(sess: Any, spec: Any, prompt: np.ndarray, decode: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds for `decode` tokens, tokens) with the KV cache fed back each step."""
    step = _stepper(sess, spec)
    t0 = time.perf_counter()
    tok = int(step(prompt[None])[-1].argmax())
    t1 = time.perf_counter()
    tokens = [tok]
    for _ in range(decode):
        tokens.append(int(step(np.array([[tokens[-1]]], np.int64))[-1].argmax()))
    return t1 - t0, time.perf_counter() - t1, tokens


def bench_variants(artifacts: dict[str, Path], spec: Any, provider: str, a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Time every variant round-robin (one run of each per repeat): on a shared machine, load changes then hit all
    variants alike instead of whichever ran during a busy minute, so the ratios stay meaningful."""
    prompt = np.random.default_rng(0).integers(3, spec.vocab, a.prompt)
    sessions, created = {}, {}
    for name, path in artifacts.items():
        t0 = time.perf_counter()
        sessions[name] = session(path, provider, a.threads)
        created[name] = time.perf_counter() - t0
        run_once(sessions[name], spec, prompt, 2)  # warm-up (kernel selection, allocator arenas)
    runs: dict[str, list] = {name: [] for name in artifacts}
    for _ in range(a.repeats):
        for name, sess in sessions.items():
            runs[name].append(run_once(sess, spec, prompt, a.decode))
    out = {}
    for name, rs in runs.items():
        prefill = statistics.median(r[0] for r in rs)
        decode = statistics.median(r[1] for r in rs)
        out[name] = {"session_s": created[name], "prefill_s": prefill, "prefill_tok_s": a.prompt / prefill,
                     "decode_tok_s": a.decode / decode, "tokens": rs[0][2]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an existing L4Q checkpoint (default: build a random LLaMA + RTN checkpoint)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--zero-point", choices=("float", "integer", "symmetric"), default="float",
                   help="float offsets cost one extra small MatMul per linear (docs/onnx.md); integer/symmetric do not")
    p.add_argument("--prompt", type=int, default=128, help="prefill length (tokens)")
    p.add_argument("--decode", type=int, default=64, help="greedy decode steps timed")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op threads")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--work", type=Path, help="keep the built model and exports here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    a = p.parse_args(argv)

    import onnxruntime as ort

    from l4q_export.checkpoint import load_checkpoint
    from l4q_export.formats import get_target
    from l4q_export.formats.onnx.graph import DecoderSpec

    tmp = tempfile.TemporaryDirectory() if a.work is None else None
    work = Path(tmp.name) if tmp else a.work
    work.mkdir(parents=True, exist_ok=True)
    ck_dir = a.model or build_checkpoint(work, a)
    ck = load_checkpoint(ck_dir)
    spec = DecoderSpec.from_config(ck.model_config(), ck.architecture)
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers()
                                            else [])
    reports, export_s = {}, {}
    for name in a.variants.split(","):
        form, level, fused = VARIANTS[name]
        t0 = time.perf_counter()
        reports[name] = get_target("onnx").write(ck_dir, work / f"onnx-{name}", onnx_form=form, onnx_accuracy_level=level,
                                                 onnx_fused=fused).to_dict()
        export_s[name] = time.perf_counter() - t0
    rows = []
    for prov in providers:
        timed = bench_variants({n: Path(r["artifact"]) for n, r in reports.items()}, spec, prov, a)
        rows += [{"variant": n, "provider": prov.removesuffix("ExecutionProvider"), "bytes": reports[n]["bytes"],
                  "export_s": export_s[n], **timed[n]} for n in reports]
    rep = next(iter(reports.values()))
    for r in rows:
        ref = next((x for x in rows if x["variant"] == "fp32" and x["provider"] == r["provider"]), r)
        r["size_ratio"] = r["bytes"] / ref["bytes"]
        r["prefill_speedup"] = ref["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = r["decode_tok_s"] / ref["decode_tok_s"]
        r["same_tokens_as_fp32"] = r["tokens"] == ref["tokens"]
    n_linear = sum(r["shape"][0] * r["shape"][1] for r in rep["layers"])
    info = {"model": str(ck_dir), "hidden": spec.hidden, "intermediate": spec.intermediate, "layers": spec.layers,
            "heads": spec.heads, "kv_heads": spec.kv_heads, "vocab": spec.vocab, "linear_params": n_linear,
            "spec": ck.spec.to_dict(),
            "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats, "threads": a.threads,
            "onnxruntime": ort.__version__, "cpu_count": os.cpu_count()}
    print(f"model: hidden {spec.hidden}, MLP {spec.intermediate}, {spec.layers} layers, {spec.heads}/{spec.kv_heads} heads, "
          f"vocab {spec.vocab}, {n_linear / 1e6:.1f}M linear weights; {ck.spec.bits}-bit g{ck.spec.group_size} "
          f"{ck.spec.zero_point}; ORT {ort.__version__}, "
          f"{a.threads} threads; prompt {a.prompt}, decode {a.decode}, median of {a.repeats}")
    print(f"{'variant':<20}{'EP':<5}{'size MB':>9}{'x fp32':>8}{'prefill ms':>12}{'x':>6}{'decode tok/s':>14}{'x':>6}"
          f"{'same tokens':>13}")
    for r in rows:
        print(f"{r['variant']:<20}{r['provider']:<5}{r['bytes'] / 1e6:>9.1f}{r['size_ratio']:>8.3f}{r['prefill_s'] * 1e3:>12.1f}"
              f"{r['prefill_speedup']:>6.2f}{r['decode_tok_s']:>14.1f}{r['decode_speedup']:>6.2f}{str(r['same_tokens_as_fp32']):>13}")
    result = {"info": info, "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
