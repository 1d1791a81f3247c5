"""Verify an exported MLX directory against the L4Q checkpoint it came from.

(a) codes: every packed linear is decoded by MLX itself -- `mx.dequantize(weight, 1, 0)` is MLX's own unpacking
    of the uint32 words -- and must equal the fold's codes, all of them; mlx-lm's loader must build exactly the
    modules we declared (QuantizedLinear with that group/bits, or a plain Linear for dense fallbacks);
(b) weights: `mx.dequantize` with the stored scales/biases vs the fold's W_q (the training forward's weights):
    max |error| within the bound declared at export (0 for float offsets);
(c) runtime: mlx-lm's model forward (CPU, fp32 activations) vs the PyTorch reference (`reference_model`, the
    training model with fake quantization) on fixed prompts -- top-1 agreement, mean KL, max |dlogit| -- and
    greedy decoding through mlx-lm's `generate_step`, compared up to the first position where the reference's
    top-2 logit margin is below GREEDY_MARGIN (beyond a near-tie, which token wins is rounding noise).

Tolerances for (c) come from the measured noise floor (docs/mlx.md): with bit-identical weights the only
difference is fp32 summation order, measured max |dlogit| ~1e-6 relative to the largest |logit|.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import Checkpoint, load_checkpoint
from ...errors import L4QInputError
from ...eval.backends import log_softmax
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor
from ...training.methods import reference_model
from . import runtime
from .export import detect, export_info

PROMPTS = (
    "Once upon a time",
    "The little girl went to the park and saw a big dog. She",
    "Tom had a red ball. He liked to play with it every day, but one day",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
)
GREEDY_PROMPT = "Once upon a time"
GREEDY_TOKENS = 24
# (c) tolerances.  Same weights in both runtimes, fp32 everywhere: only accumulation order differs.
# Measured floor (docs/mlx.md): max |dlogit| 2.4e-7 at |logit| <= 0.8 (tiny GQA), 2.0e-5 at |logit| <= 19.5
# (stories260K), i.e. ~1e-6 relative; mean KL <= 3e-12.  Tolerances sit ~100x above it.
MAX_ABS_DLOGIT_REL = 1e-4  # max |dlogit| <= this * max(1, max |logit|)
MIN_TOP1 = 0.99            # argmax can flip only at near-ties
MAX_MEAN_KL = 1e-8         # nats per position
GREEDY_MARGIN = 1e-3       # top-2 logit gap of the reference below which greedy is not compared further (50x floor)


def read_back(artifact: Path) -> dict[str, dict[str, Any]]:
    """Every linear of the artifact decoded by MLX: {module.weight: {codes, weight, scales_dtype, group_size, bits}}
    for packed ones, {weight} for dense tensors.  Reads one shard at a time."""
    mx = runtime.require_mlx()
    artifact = Path(artifact)
    cfg = json.loads((artifact / "config.json").read_text())
    qblock = cfg.get("quantization") or {}
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(artifact.glob("model*.safetensors")):
        tensors = mx.load(str(shard))
        for name, w in tensors.items():
            if name.endswith((".scales", ".biases")):
                continue
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            if f"{module}.scales" not in tensors:
                out[name] = {"weight": np.array(w.astype(mx.float32))}
                continue
            params = qblock.get(module) or qblock
            g, b = int(params["group_size"]), int(params["bits"])
            s, bias = tensors[f"{module}.scales"], tensors[f"{module}.biases"]
            codes = mx.dequantize(w, mx.ones_like(s), mx.zeros_like(bias), group_size=g, bits=b)
            deq = mx.dequantize(w, s.astype(mx.float32), bias.astype(mx.float32), group_size=g, bits=b)
            out[name] = {"codes": np.array(codes).astype(np.int64), "weight": np.array(deq), "group_size": g, "bits": b,
                         "scales_dtype": str(s.dtype).removeprefix("mlx.core.")}
        del tensors
    return out


def loaded_modules(model: Any) -> dict[str, tuple[str, int | None, int | None]]:
    """module path -> (class name, group_size, bits) as mlx-lm built it."""
    return {p: (type(m).__name__, getattr(m, "group_size", None), getattr(m, "bits", None))
            for p, m in model.named_modules()}


def check_tensors(artifact: Path, ck: Checkpoint, model: Any) -> dict[str, Any]:
    """Levels (a) and (b)."""
    declared = export_info(artifact).get("declared", {})
    decoded = read_back(artifact)
    built = loaded_modules(model)
    rows = []
    for name, t in fold_checkpoint(ck):
        if not isinstance(t, QuantizedTensor):
            continue
        module = name[: -len(".weight")]
        wq = t.dequantize().numpy().astype(np.float64)
        got = decoded.get(name)
        if got is None:
            rows.append({"tensor": name, "codes_identical": False, "within_bound": False, "error": "missing"})
            continue
        if "codes" in got:
            codes, source = got["codes"], "mx.dequantize"
            want_module = ("QuantizedLinear", got["group_size"], got["bits"])
        else:  # dense: codes read back through the fold's own grid
            g = t.spec.group_len(t.shape[1])
            d = np.repeat(t.scale.numpy(), g, 1)[:, : t.shape[1]].astype(np.float64)
            m = np.repeat(t.minimum.numpy(), g, 1)[:, : t.shape[1]].astype(np.float64)
            codes, source = np.rint((got["weight"].astype(np.float64) - m) / d), "fold grid (dense)"
            want_module = ("Linear", None, None)
        n_same = int((codes == t.codes.numpy()).sum())
        err = float(np.abs(got["weight"].astype(np.float64) - wq).max())
        bound = float(declared.get(name, 0.0))
        rows.append({"tensor": name, "encoding": "packed" if "codes" in got else "dense",
                     "scales_dtype": got.get("scales_dtype"), "codes_identical": n_same == t.codes.numel(),
                     "codes_matching": f"{n_same}/{t.codes.numel()}", "codes_from": source, "max_abs_error": err,
                     "declared_bound": bound, "within_bound": err <= bound,
                     "mlx_lm_module": "/".join(map(str, built.get(module, ("missing",)))),
                     "module_as_declared": built.get(module) == want_module})
    ok = bool(rows) and all(r["codes_identical"] and r["within_bound"] and r.get("module_as_declared") for r in rows)
    return {"passed": ok, "layers": rows, "n_quantized": len(rows),
            "n_codes_identical": sum(bool(r["codes_identical"]) for r in rows),
            "n_within_bound": sum(bool(r["within_bound"]) for r in rows),
            "n_dense": sum(r.get("encoding") == "dense" for r in rows),
            "max_abs_error": max((r.get("max_abs_error", float("inf")) for r in rows), default=0.0)}


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"max_abs_dlogit": float(np.abs(ref - got).max()), "max_abs_logit": float(np.abs(ref).max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "positions": int(ref.shape[0])}


def greedy_reference(model: torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Reference greedy tokens and, per step, the top-2 logit margin that decided each one."""
    out, margins = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1].double()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            out.append(int(logits.argmax()))
    return out[len(ids):], margins


def check_runtime(model: Any, ck: Checkpoint, artifact: Path) -> dict[str, Any]:
    """Level (c): mlx-lm vs the PyTorch reference."""
    from ...training.data import load_tokenizer

    ref_model = reference_model(ck)
    tok = load_tokenizer(ck.dir)
    exported_tok = load_tokenizer(artifact)

    def encode(text: str) -> list[int]:
        return list(tok(text).input_ids)[:256]  # with BOS, as the model was trained

    per_prompt, ref_all, got_all = [], [], []
    with torch.no_grad():
        for text in PROMPTS:
            ids = encode(text)
            ref = ref_model(torch.tensor([ids])).logits[0].double().numpy()
            got = runtime.logits(model, ids).astype(np.float64)
            per_prompt.append({"prompt": text[:40], **compare_logits(ref, got)})
            ref_all.append(ref)
            got_all.append(got)
    total = compare_logits(np.concatenate(ref_all), np.concatenate(got_all))
    gids = encode(GREEDY_PROMPT)
    g_ref, margins = greedy_reference(ref_model, gids, GREEDY_TOKENS)
    g_mlx = runtime.greedy(model, gids, GREEDY_TOKENS)
    decisive = next((i for i, mg in enumerate(margins) if mg < GREEDY_MARGIN), GREEDY_TOKENS)
    match = next((i for i, (a, b) in enumerate(zip(g_ref, g_mlx, strict=False)) if a != b), GREEDY_TOKENS)
    tol = MAX_ABS_DLOGIT_REL * max(1.0, total["max_abs_logit"])
    tok_same = all(list(tok(t).input_ids) == list(exported_tok(t).input_ids) for t in PROMPTS)
    res = {"top1_agreement": total["top1"], "mean_kl": total["mean_kl"], "max_kl": total["max_kl"],
           "max_abs_dlogit": total["max_abs_dlogit"], "max_abs_logit": total["max_abs_logit"],
           "positions": total["positions"], "per_prompt": per_prompt,
           "greedy_prompt": GREEDY_PROMPT, "greedy_tokens": GREEDY_TOKENS, "greedy_match": match,
           "greedy_decisive": decisive, "greedy_min_margin": min(margins), "greedy_reference": g_ref, "greedy_mlx": g_mlx,
           "tokenizer_identical": tok_same,
           "tolerance": {"max_abs_dlogit": tol, "min_top1": MIN_TOP1, "max_mean_kl": MAX_MEAN_KL,
                         "greedy_margin": GREEDY_MARGIN}}
    res["passed"] = (total["max_abs_dlogit"] <= tol and total["top1"] >= MIN_TOP1 and total["mean_kl"] <= MAX_MEAN_KL
                     and match >= decisive and tok_same)
    return res


def verify(artifact: Path, model_dir: Path, runtime_check: bool = True) -> dict[str, Any]:
    """(a) codes, (b) weights, (c) mlx-lm vs PyTorch; report with "passed"."""
    artifact, model_dir = Path(artifact), Path(model_dir)
    if not detect(artifact):
        raise L4QInputError(f"{artifact} is not an MLX directory written by l4q-export (no l4q_mlx.json)")
    ck = load_checkpoint(model_dir)
    info = export_info(artifact)
    if info.get("spec") != ck.spec.to_dict():
        raise L4QInputError(f"{artifact} was exported from a checkpoint with {info.get('spec')}, "
                            f"but {model_dir} has {ck.spec.to_dict()}")
    model = runtime.load(artifact)
    tensors = check_tensors(artifact, ck, model)
    rt = check_runtime(model, ck, artifact) if runtime_check else None
    passed = tensors["passed"] and (rt is None or rt["passed"])
    summary = (f"mlx: {tensors['n_codes_identical']}/{tensors['n_quantized']} linears with all codes identical "
               f"({tensors['n_dense']} dense), max|W - W_fold| {tensors['max_abs_error']:.3g}")
    if rt is not None:
        summary += (f"; mlx-lm vs PyTorch: top-1 {rt['top1_agreement']:.3f}, mean KL {rt['mean_kl']:.2e}, "
                    f"max|dlogit| {rt['max_abs_dlogit']:.2e}, greedy {rt['greedy_match']}/{GREEDY_TOKENS} "
                    f"(decisive {rt['greedy_decisive']})")
    import mlx.core as mx
    import mlx_lm

    return {"check": "mlx", "artifact": str(artifact), "model_dir": str(model_dir), "passed": passed, "summary": summary,
            "n_quantized": tensors["n_quantized"], "n_codes_identical": tensors["n_codes_identical"],
            "n_within_bound": tensors["n_within_bound"], "n_dense": tensors["n_dense"],
            "max_abs_error": tensors["max_abs_error"], "logits": rt, "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__, "layers": tensors["layers"]}
