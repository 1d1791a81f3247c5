"""What every runtime backend shares: the `Backend` interface, log-softmax, the local tokenizer, greedy decoding.

Each target's own runtime (llama.cpp, onnxruntime, transformers) lives in its package and implements `Backend`;
`verify` and `l4q-eval` use the same objects, so a runtime is loaded in exactly one way.  Every backend returns
raw fp32 logits and log-softmax rows computed by `log_softmax`, so differences between backends are differences
between runtimes, not between scoring code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import L4QInputError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (numerically stable)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Backend(Protocol):
    """What the scorers and `verify` need: tokenization, a context limit, logits and greedy decoding."""

    name: str
    max_length: int
    bos_id: int | None
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] raw float logits: row j scores the token after ids[: j + 1]."""

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float64 log-probabilities (`log_softmax` of `logits`)."""

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """n greedy tokens after ids, and the [n, vocab] logits each was chosen from (through the KV cache where
        the runtime has one, so the decode path is what is measured)."""


class HFTokenizer:
    """A local HF tokenizer (SentencePiece / BPE), never fetched from a hub, never running repository code."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except Exception as e:  # noqa: BLE001 -- transformers raises OSError/ValueError/... for a missing tokenizer
            raise L4QInputError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
        self.bos_id = self.tok.bos_token_id
        self.eot_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)


def max_positions(config_dir: Path, default: int = 2048) -> int:
    cfg = config_dir / "config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_position_embeddings", default))
    return default


class ModuleBackend:
    """Any PyTorch causal LM (fp32), scored without a cache; the base of the torch-run backends."""

    def __init__(self, model: Any, tokenizer_dir: Path, name: str, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.device = device
        self.model = model.to(device).eval()
        self.model.config.use_cache = False
        tk = HFTokenizer(tokenizer_dir)
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        self.max_length = max_positions(tokenizer_dir)
        self.name = name

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            return self.model(input_ids=x).logits[0].float().cpu().numpy()

    def logprobs(self, ids: list[int]) -> np.ndarray:
        return log_softmax(self.logits(ids))

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """Through transformers' KV cache, as `generate` decodes: the prompt in one forward, then one token per
        forward (recomputing the whole sequence per token was 12 s of a 2-layer 7B-shaped verify's 50)."""
        torch = self.torch
        tokens: list[int] = []
        rows, past = [], None
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            for _ in range(n):
                out = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                rows.append(out.logits[0, -1].float().cpu().numpy())
                tokens.append(int(np.argmax(rows[-1])))
                x = torch.tensor([[tokens[-1]]], dtype=torch.long, device=self.device)
        return tokens, np.stack(rows)


def greedy_by_recompute(backend: Any, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding for a runtime without a cache: one full forward per new token."""
    out, rows = list(ids), []
    for _ in range(n):
        row = backend.logits(out)[-1]
        rows.append(row)
        out.append(int(np.argmax(row)))
    return out[len(ids):], np.stack(rows)


def tokenizer_truth(model_dir: Path) -> tuple[str, Any]:
    """(name, text -> ids) the model was trained with, BOS included.  For SentencePiece models that is SentencePiece
    itself: transformers 5 drops SentencePiece's extra leading '▁' on texts that begin with whitespace
    (docs/gguf.md), so the HF tokenizer is not the reference there."""
    spm_path = model_dir / "tokenizer.model"
    if spm_path.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        tc_path = model_dir / "tokenizer_config.json"
        add_bos = json.loads(tc_path.read_text()).get("add_bos_token", True) if tc_path.is_file() else True
        bos = [sp.bos_id()] if add_bos and sp.bos_id() >= 0 else []
        return "sentencepiece", (lambda text: bos + sp.encode(text))
    hf = HFTokenizer(model_dir).tok
    return "hf", (lambda text: list(hf(text)["input_ids"]))
