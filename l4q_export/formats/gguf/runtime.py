"""llama.cpp (llama-cpp-python) as a `Backend`: what `verify` and `l4q-eval` run a .gguf file in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..runtime import log_softmax


class LlamaCppBackend:
    """A GGUF file in llama.cpp; logits for every position, f32 K/V cache (type_k = type_v = GGML_TYPE_F32)."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None) -> None:
        from llama_cpp import Llama

        probe = Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = probe.metadata
        train_ctx = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", n_ctx or 2048))
        probe.close()
        self.max_length = min(n_ctx or train_ctx, train_ctx)
        n = threads or os.cpu_count() or 1  # prompt processing uses n_threads_batch (default: every CPU): set both
        self.llm = Llama(model_path=str(path), n_ctx=self.max_length, n_batch=self.max_length, n_ubatch=self.max_length,
                         logits_all=True, type_k=0, type_v=0, n_threads=n, n_threads_batch=n, verbose=False, seed=0)
        self.name = "llama.cpp"
        self.bos_id = int(self.llm.token_bos())
        self.eot_id = int(self.llm.token_eos())

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        return log_softmax(self.logits(ids))

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """Through llama.cpp's KV cache: one token evaluated per step."""
        self.llm.reset()
        self.llm.eval(ids)
        out, rows = [], []
        for _ in range(n):
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            rows.append(row)
            out.append(int(np.argmax(row)))
            self.llm.eval([out[-1]])
        return out, np.stack(rows)
