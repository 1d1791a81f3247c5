"""Perplexity with strided sliding windows (the Hugging Face "Perplexity of fixed-length models" recipe).

Windows of `max_length` tokens start every `stride` tokens; each window scores only the tokens the previous
window did not, so every token after the first is scored exactly once, with up to max_length-1 tokens of
context.  Where the guide weights each window's mean loss by (targets - 1), we sum the exact per-token
negative log-likelihoods, so ppl = exp(sum NLL / tokens scored) holds exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import L4QInputError
from .backends import Backend


def text_ids(backend: Backend, path: Path, max_tokens: int | None = None) -> list[int]:
    """BOS + the file's tokens (capped at max_tokens).  Only a generous prefix of the text is tokenized."""
    path = Path(path)
    if not path.is_file():
        raise L4QInputError(f"perplexity text not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if max_tokens:
        text = text[: max_tokens * 16]  # no tokenizer here averages more than 16 characters per token
    ids = ([backend.bos_id] if backend.bos_id is not None else []) + backend.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise L4QInputError(f"{path} has fewer than two tokens")
    return ids


def strided_nll(backend: Backend, ids: list[int], max_length: int, stride: int) -> tuple[float, int, int]:
    """(sum of NLL, tokens scored, windows) over `ids`."""
    if not 0 < stride <= max_length:
        raise L4QInputError(f"stride {stride} must be in 1..{max_length} (the window length)")
    nll, count, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        lp = backend.logprobs(ids[begin:end])
        first = max(prev_end, begin + 1)  # targets new to this window that have context inside it
        pos = np.arange(first, end)
        if pos.size:
            nll -= float(lp[pos - 1 - begin, np.asarray(ids)[pos]].sum())
            count += int(pos.size)
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    return nll, count, windows


def perplexity(backend: Backend, path: Path, max_tokens: int | None = None, ctx: int | None = None,
               stride: int | None = None) -> dict[str, Any]:
    """Perplexity of the text file under `backend`, with the settings that produced it."""
    max_length = min(ctx or backend.max_length, backend.max_length)
    stride = stride or max(1, max_length // 2)
    ids = text_ids(backend, path, max_tokens)
    nll, n, windows = strided_nll(backend, ids, max_length, stride)
    return {"task": "perplexity", "file": str(path), "ppl": math.exp(nll / n), "nll": nll, "tokens_scored": n,
            "tokens": len(ids), "ctx": max_length, "stride": stride, "windows": windows}
