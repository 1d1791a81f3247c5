"""Training data: Alpaca-style instructions (loss on the response only) or plain text (causal LM).

Everything is tokenized up front into lists of (input_ids, labels); examples are small and this keeps
the loop trivially deterministic, which `--resume` relies on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import L4QInputError
from .prompts import PROMPT_INPUT, PROMPT_NO_INPUT

IGNORE = -100


def load_tokenizer(path: Path):
    """Load a local tokenizer and make sure it is real (transformers can build an empty one silently)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise L4QInputError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
    probe = tok("hello world", add_special_tokens=False).input_ids
    if len(tok) < 3 or not probe:
        raise L4QInputError(f"tokenizer in {path} is empty (is `sentencepiece` installed?)")
    return tok


# A record's text is cut to this many characters before tokenizing: one huge record must not cost gigabytes
# (no tokenizer yields fewer than one token per 16 characters, so nothing within --seq-len is lost).
CHARS_PER_TOKEN_BOUND = 16
FIELDS = ("instruction", "input", "output")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise L4QInputError(f"{path} line {line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    if path.suffix == ".jsonl":
        recs = []
        for no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise L4QInputError(f"{path} line {no}: not valid JSON: {e.msg} (column {e.colno})") from None
    else:
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise L4QInputError(f"{path} is not valid JSON/JSONL: {e}") from None
    if not isinstance(recs, list) or not recs:
        raise L4QInputError(f"{path}: expected a non-empty list of records with 'instruction' and 'output'")
    for i, r in enumerate(recs):
        where = f"{path} line {i + 1}" if path.suffix == ".jsonl" else f"{path} record {i}"
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise L4QInputError(f"{where}: expected a record with 'instruction' and 'output'")
        for k in FIELDS:
            if k in r and not isinstance(r[k], str) and not (k == "input" and r[k] is None):
                raise L4QInputError(f"{where}: field {k!r} must be a string, not {type(r[k]).__name__}")
    return recs


def instruction_examples(path: Path, tok, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Alpaca prompt template; labels are IGNORE on the prompt so only the response is learned."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    cap = seq_len * CHARS_PER_TOKEN_BOUND
    for r in read_records(path):
        fields = {k: (r.get(k) or "")[:cap] for k in FIELDS}
        tmpl = PROMPT_INPUT if fields["input"] else PROMPT_NO_INPUT
        prompt = bos + tok(tmpl.format(**fields)[:cap], add_special_tokens=False).input_ids
        resp = tok(fields["output"], add_special_tokens=False).input_ids + eos
        ids = (prompt + resp)[:seq_len]
        labels = ([IGNORE] * len(prompt) + resp)[:seq_len]
        if any(lab != IGNORE for lab in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise L4QInputError(f"{path}: every example's response was truncated away; raise --seq-len")
    return out


def text_examples(path: Path, tok, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate the document (BOS + text) and cut it into seq_len blocks."""
    text = path.read_text(encoding="utf-8", errors="replace")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids: list[int] = list(bos)
    for para in text.split("\n\n"):
        if para.strip():
            ids += tok(para + "\n\n", add_special_tokens=False).input_ids
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise L4QInputError(f"{path} holds no text")
    return [(b, list(b)) for b in blocks]


def load_examples(path: Path, tok, seq_len: int, data_format: str = "auto", packing: bool = False) -> list[tuple]:
    """Chat / prompt-completion / datasets-readable files go through chat_data.py; Alpaca JSON and text stay here."""
    from .chat_data import load_any, pack

    path = Path(path)
    examples = load_any(path, tok, seq_len, data_format)
    if examples is None:
        if not path.is_file():
            raise L4QInputError(f"data file not found: {path}")
        if path.suffix in (".json", ".jsonl") and data_format != "text":
            examples = instruction_examples(path, tok, seq_len)
        else:
            examples = text_examples(path, tok, seq_len)
    return pack(examples, seq_len) if packing else examples


def collate(batch: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    if len(batch[0]) == 3:  # packed blocks carry position_ids (chat_data.pack)
        from .chat_data import collate_packed

        return collate_packed(batch, pad_id)
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
