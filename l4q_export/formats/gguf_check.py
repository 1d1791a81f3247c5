"""Verification of a GGUF artifact against the L4Q checkpoint it came from.

(a) codes: every quantized tensor is read with gguf-py's `GGUFReader` and decoded with `gguf.quants.dequantize`
    (an implementation independent of our packers); the stored integers are recovered from that decoder alone
    (`gguf_pack.recover_codes`) and must equal the fold's codes -- all of them.
(b) weights: the decoded tensor vs the training forward's W_q (the fold's dequantization): max |error| must be
    within the bound the exporter declared for that tensor (0 where it declared the tensor exact).
(c) runtime: llama.cpp (llama-cpp-python, F32 KV cache) logits on fixed prompts vs the PyTorch reference -- the
    trained model with fake quantization, fp32 -- plus greedy decoding, and tokenizer parity.

Tolerances for (c) come from measurement (docs/gguf.md): llama.cpp quantizes activations to 8 bits inside
quantized matmuls (Q8_0 / Q8_1 blocks) and the embeddings may be F16, so logits are close, not identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..eval.backends import log_softmax
from ..fold import fold_checkpoint
from ..quant import QuantizedTensor
from ..training.methods import reference_model
from . import gguf_pack as P

# (c) tolerances, set from measurement on stories260K and the tiny test models (see docs/gguf.md).
MIN_TOP1 = 0.90        # fraction of positions where llama.cpp's argmax == the reference's
MAX_MEAN_KL = 0.02     # mean KL(reference || llama.cpp) per position, nats

PROMPTS = (
    "Once upon a time",
    "The little girl went to the park and saw a big dog. She",
    "Tom had a red ball. He liked to play with it every day, but one day",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
)
GREEDY_PROMPT = "Once upon a time"
GREEDY_TOKENS = 24
TOKENIZER_TEXTS = (
    "Hello world", " Hello world", "  two leading spaces", "\tTab and\nnewline", "Numbers 1234567 and 3.14",
    "Once upon a time, there was a little girl named Lily.", "émigré café naïve – “quotes” 😀", "a\n\n\nb   c",
    "", " ", "UPPER lower MiXeD", "l'été, it's, we'll, they're",
)


def _tensor_map(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_tensors(artifact: Path, ck: Checkpoint) -> dict[str, Any]:
    """Levels (a) and (b) for every quantized tensor of the fold."""
    from .gguf import gguf_name, permute_quantized, qk_permutation
    from .gguf_vocab import MODEL_ARCH, gguf_arch

    reader = gguf.GGUFReader(str(artifact))
    cfg = ck.model_config()
    arch = gguf_arch(cfg)
    if _field(reader, "general.architecture") != arch:
        found = _field(reader, "general.architecture")
        return {"passed": False, "layers": [], "n_quantized": 0, "n_codes_identical": 0, "n_within_bound": 0,
                "max_abs_error": float("nan"), "error": f"file architecture {found!r} != {arch!r}"}
    declared = json.loads(_field(reader, "l4q.tensor_report") or "{}")
    tensors = _tensor_map(reader)
    tmap = gguf.get_tensor_name_map(MODEL_ARCH[arch], int(cfg["num_hidden_layers"]))
    rows = []
    for hf_name, t in fold_checkpoint(ck):
        if not isinstance(t, QuantizedTensor):
            continue
        gname = gguf_name(tmap, hf_name)
        qt = permute_quantized(t, qk_permutation(hf_name, arch, cfg, t.shape[0]))
        wq = qt.dequantize().numpy()
        rt = tensors.get(gname)
        if rt is None:
            rows.append({"tensor": hf_name, "gguf": gname, "type": None, "codes_identical": False, "within_bound": False})
            continue
        qtype = gguf.GGMLQuantizationType(int(rt.tensor_type))
        raw = np.asarray(rt.data)
        decoded = gguf.quants.dequantize(raw, qtype).reshape(qt.shape)
        tname = qtype.name.lower()
        if tname in P.QTYPES:
            codes = P.recover_codes(raw, tname).reshape(qt.shape)
            expected = P.expected_stored_codes(qt, tname)
            source = "gguf-py decoder"
        else:  # F32/F16 fallback: codes read back through the fold's own (d, m) grid
            g = qt.spec.group_len(qt.shape[1])
            d = np.repeat(qt.scale.numpy(), g, 1)[:, : qt.shape[1]]
            m = np.repeat(qt.minimum.numpy(), g, 1)[:, : qt.shape[1]]
            codes = np.rint((decoded.astype(np.float64) - m) / d)
            expected = qt.codes.numpy().astype(np.float64)
            source = "fold grid"
        n_same = int((codes == expected).sum())
        err = float(np.abs(decoded.astype(np.float64) - wq).max())
        bound = float(declared.get(gname, {}).get("max_abs_error", 0.0))
        rows.append({"tensor": hf_name, "gguf": gname, "type": qtype.name, "codes_identical": n_same == codes.size,
                     "codes_matching": f"{n_same}/{codes.size}", "codes_from": source, "max_abs_error": err,
                     "declared_bound": bound, "within_bound": err <= bound})
    n_id = sum(bool(r["codes_identical"]) for r in rows)
    n_ok = sum(bool(r["within_bound"]) for r in rows)
    return {"passed": bool(rows) and n_id == len(rows) and n_ok == len(rows), "layers": rows, "n_quantized": len(rows),
            "n_codes_identical": n_id, "n_within_bound": n_ok,
            "max_abs_error": max((r.get("max_abs_error", float("inf")) for r in rows), default=0.0)}


# --------------------------------------------------------------------------------------------------------
# (c) llama.cpp vs the PyTorch reference
# --------------------------------------------------------------------------------------------------------

def load_llama(artifact: Path, n_ctx: int = 512, vocab_only: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(artifact), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                 n_threads=2, n_threads_batch=2, type_k=0, type_v=0, vocab_only=vocab_only, seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float64)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    rc, gc = ref - ref.mean(-1, keepdims=True), got - got.mean(-1, keepdims=True)
    rel = float(np.linalg.norm(gc - rc) / max(np.linalg.norm(rc), 1e-30))  # scale-free: tiny random models have tiny logits
    return {"max_abs_diff": float(np.abs(ref - got).max()), "rel_l2": rel, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "positions": int(ref.shape[0])}


def greedy_torch(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _hf_tokenizer(ck: Checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ck.dir), local_files_only=True, trust_remote_code=False)


def tokenizer_truth(ck: Checkpoint):
    """text -> ids the model was trained with.  For SentencePiece models that is SentencePiece itself: transformers 5
    drops SentencePiece's extra leading '▁' on texts that begin with whitespace (documented in docs/gguf.md)."""
    spm_path = ck.dir / "tokenizer.model"
    hf = _hf_tokenizer(ck)
    if spm_path.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        tc_path = ck.dir / "tokenizer_config.json"
        add_bos = json.loads(tc_path.read_text()).get("add_bos_token", True) if tc_path.is_file() else True
        bos = [sp.bos_id()] if add_bos and sp.bos_id() >= 0 else []
        return "sentencepiece", (lambda text: bos + sp.encode(text)), hf
    return "hf", (lambda text: list(hf(text)["input_ids"])), hf


def tokenizer_parity(llm, ck: Checkpoint, texts: tuple[str, ...] | list[str] = TOKENIZER_TEXTS) -> dict[str, Any]:
    truth_name, truth, hf = tokenizer_truth(ck)
    mismatches, hf_diff = [], 0
    for text in texts:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        want = truth(text)
        if got != want:
            mismatches.append({"text": text, "llama.cpp": got[:32], truth_name: want[:32]})
        hf_diff += list(hf(text)["input_ids"]) != want
    return {"truth": truth_name, "n_texts": len(texts), "n_match": len(texts) - len(mismatches),
            "hf_differs_from_truth": hf_diff, "mismatches": mismatches[:5], "passed": not mismatches}


def check_runtime(artifact: Path, ck: Checkpoint, prompts: tuple[str, ...] = PROMPTS) -> dict[str, Any]:
    """Level (c): llama.cpp logits/greedy vs the PyTorch reference, and tokenizer parity."""
    model = reference_model(ck)
    _, truth, _ = tokenizer_truth(ck)
    llm = load_llama(artifact)
    per_prompt, ref_all, got_all = [], [], []
    with torch.no_grad():
        for text in prompts:
            ids = truth(text)[:256]
            ref = model(torch.tensor([ids])).logits[0].double().numpy()
            got = llama_logits(llm, ids)
            per_prompt.append({"prompt": text[:40], **compare_logits(ref, got)})
            ref_all.append(ref)
            got_all.append(got)
    total = compare_logits(np.concatenate(ref_all), np.concatenate(got_all))
    gids = truth(GREEDY_PROMPT)
    g_ref = greedy_torch(model, gids, GREEDY_TOKENS)
    g_cpp = greedy_llama(llm, gids, GREEDY_TOKENS)
    match = next((i for i, (a, b) in enumerate(zip(g_ref, g_cpp, strict=False)) if a != b), GREEDY_TOKENS)
    hf = _hf_tokenizer(ck)
    logits = {"top1_agreement": total["top1"], "mean_kl": total["mean_kl"], "max_kl": total["max_kl"], "rel_l2": total["rel_l2"],
              "max_abs_diff": total["max_abs_diff"], "positions": total["positions"], "per_prompt": per_prompt,
              "greedy_prompt": GREEDY_PROMPT, "greedy_tokens": GREEDY_TOKENS, "greedy_match": match,
              "greedy_reference": hf.decode(g_ref), "greedy_llama_cpp": hf.decode(g_cpp),
              "tolerance": {"min_top1": MIN_TOP1, "max_mean_kl": MAX_MEAN_KL}}
    logits["passed"] = total["top1"] >= MIN_TOP1 and total["mean_kl"] <= MAX_MEAN_KL
    tok = tokenizer_parity(llm, ck)
    llm.close()
    return {"passed": logits["passed"] and tok["passed"], "logits": logits, "tokenizer": tok}
