"""Chat and prompt/completion data, any file the `datasets` library reads, and packing.

Record schemas, detected per record by its fields (the first that fits):
    messages               [{"role", "content"}, ...]   rendered with the tokenizer's own chat template;
                           loss on the assistant turns only (content + the template's end-of-turn token)
    prompt + completion    strings (loss on the completion) or message lists (TRL's conversational form)
    instruction + output   Alpaca (training/data.py's template, kept as it was)
    text                   causal LM on the whole string

The assistant mask is found by rendering: the template's text for messages[:k] with the generation prompt is a
prefix of its text for messages[:k+1]; the difference is assistant turn k.  Segments are tokenized separately,
which equals tokenizing the whole rendering whenever the segment boundaries are special tokens (ChatML's
<|im_start|>/<|im_end|>, Llama-3's headers); tests/test_chat_data.py checks that on SmolLM2's template.

Packing concatenates examples into --seq-len blocks and restarts `position_ids` at every example with no
attention_mask: transformers (masking_utils.find_packed_sequence_indices) then builds a block-diagonal causal
mask, so attention never crosses examples (sdpa/eager/flex and flash-attention alike) -- provided the model runs
without a KV cache (`config.use_cache = False`, which l4q-train and `l4q_export.prepare` set): with a cache,
transformers skips that detection and the mask would cross examples.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import L4QInputError

IGNORE = -100
DATA_FORMATS = ("auto", "json", "jsonl", "parquet", "arrow", "csv", "dataset-dir", "text")
_DATASETS_BUILDERS = {"parquet": "parquet", "arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json"}
Example = tuple[list[int], list[int]]


def resolve_format(path: Path, data_format: str) -> str:
    """`auto` -> the reader for this path (a directory is a `datasets.save_to_disk` dir)."""
    if data_format not in DATA_FORMATS:
        raise L4QInputError(f"--data-format must be one of {', '.join(DATA_FORMATS)}")
    if not path.exists():
        raise L4QInputError(f"data file not found: {path}")
    if data_format != "auto":
        return data_format
    if path.is_dir():
        return "dataset-dir"
    suffix = path.suffix.lower().lstrip(".")
    return {"json": "json", "jsonl": "jsonl", "parquet": "parquet", "arrow": "arrow", "csv": "csv"}.get(suffix, "text")


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) from .json (a list) or .jsonl (one object a line, with its real line number)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise L4QInputError(f"{path} is not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise L4QInputError(f"{path} line {n} is not valid JSON: {e}") from None
        return out
    try:
        recs = json.loads(text)
    except json.JSONDecodeError as e:
        raise L4QInputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(recs, list):
        raise L4QInputError(f"{path}: expected a JSON list of records")
    return [(f"{path} record {i}", r) for i, r in enumerate(recs)]


def read_datasets_records(path: Path, fmt: str) -> list[tuple[str, Any]]:
    """Rows of a parquet/arrow/csv/json file or a saved dataset directory, read by `datasets` (offline, no cache
    left behind; a DatasetDict contributes its `train` split)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise L4QInputError(f"reading {fmt} data needs the `datasets` package: pip install 'l4q-export[train]'") from None
    try:
        with tempfile.TemporaryDirectory(prefix="l4q-datasets-") as cache:
            if fmt == "dataset-dir":
                ds = datasets.load_from_disk(str(path), keep_in_memory=True)
            else:
                ds = datasets.load_dataset(_DATASETS_BUILDERS[fmt], data_files=str(path), cache_dir=cache, keep_in_memory=True)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise L4QInputError(f"{path}: dataset has splits {list(ds)} but no 'train'")
                ds = ds["train"]
            rows = ds.to_list()
    except L4QInputError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        raise L4QInputError(f"cannot read {path} as {fmt} with datasets: {str(e).splitlines()[0]}") from None
    return [(f"{path} row {i}", r) for i, r in enumerate(rows)]


def schema_of(where: str, rec: Any) -> str:
    if not isinstance(rec, dict):
        raise L4QInputError(f"{where}: expected an object (record), got {type(rec).__name__}")
    for name, keys in (("messages", ("messages",)), ("prompt-completion", ("prompt", "completion")),
                       ("alpaca", ("instruction", "output")), ("text", ("text",))):
        if all(rec.get(k) is not None for k in keys):
            return name
    raise L4QInputError(
        f"{where}: record has fields {sorted(rec)}; expected 'messages', 'prompt'+'completion', "
        "'instruction'+'output' or 'text'"
    )


def _check_messages(where: str, messages: Any, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise L4QInputError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise L4QInputError(f"{where}: {field}[{i}] must have string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise L4QInputError(f"{where}: field '{field}' has no assistant turn to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tok, where: str, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    except Exception as e:  # jinja raises TemplateError for role order the template refuses
        raise L4QInputError(f"{where}: the tokenizer's chat template refused the messages: {str(e).splitlines()[0]}") from None


def chat_segments(tok, where: str, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The full rendering as (text, is_assistant) segments, assistant = content + end-of-turn (no trailing space)."""
    if not getattr(tok, "chat_template", None):
        raise L4QInputError(f"{where}: chat records need a tokenizer with a chat_template (none in the model dir)")
    segs: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tok, where, messages[:k], True)
        full = _render(tok, where, messages[: k + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise L4QInputError(f"{where}: the chat template does not render turns as prefixes; cannot mask assistant turns")
        turn = full[len(prefix):]
        body = turn.rstrip()
        segs += [(prefix[len(done):], False), (body, True)]
        done = prefix + body
    whole = _render(tok, where, messages, False)
    if not whole.startswith(done):
        raise L4QInputError(f"{where}: the chat template does not render turns as prefixes; cannot mask assistant turns")
    segs.append((whole[len(done):], False))
    return [(t, a) for t, a in segs if t]


def _encode(tok, segs: list[tuple[str, bool]]) -> Example:
    """Tokenize the whole rendering once (exactly what inference sees) and learn the tokens that start inside an
    assistant segment (character offsets).  Slow tokenizers without offsets fall back to per-segment encoding."""
    text = "".join(t for t, _ in segs)
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return _encode_segments(tok, segs)
    spans, pos = [], 0
    for t, learn in segs:
        if learn:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    ids = list(enc.input_ids)
    labels = []
    for i, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        # SentencePiece puts a word's leading space into the token: its offset may start one char early
        start = a if b - a <= 1 or text[a] != " " else a + 1
        labels.append(i if any(lo <= start < hi for lo, hi in spans) else IGNORE)
    return ids, labels


def _encode_segments(tok, segs: Iterable[tuple[str, bool]]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in segs:
        t = tok(text, add_special_tokens=False).input_ids
        ids += t
        labels += t if learn else [IGNORE] * len(t)
    return ids, labels


def record_example(tok, where: str, rec: dict[str, Any], schema: str) -> Example:
    """One record -> (input_ids, labels) before truncation."""
    if schema == "messages":
        return _encode(tok, chat_segments(tok, where, _check_messages(where, rec["messages"])))
    if schema == "prompt-completion":
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, list) and isinstance(c, list):
            prompt = _check_messages(where, p + c, "prompt+completion")
            return _encode(tok, chat_segments(tok, where, prompt))
        if not isinstance(p, str) or not isinstance(c, str):
            raise L4QInputError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        pi = bos + tok(p, add_special_tokens=False).input_ids
        ci = tok(c, add_special_tokens=False).input_ids + eos
        return pi + ci, [IGNORE] * len(pi) + ci
    if schema == "alpaca":
        from .prompts import PROMPT_INPUT, PROMPT_NO_INPUT

        tmpl = PROMPT_INPUT if rec.get("input") else PROMPT_NO_INPUT
        text = {k: str(rec.get(k) or "") for k in ("instruction", "input")}
        return record_example(tok, where, {"prompt": tmpl.format(**text), "completion": str(rec["output"])}, "prompt-completion")
    if schema == "text":
        if not isinstance(rec["text"], str):
            raise L4QInputError(f"{where}: field 'text' must be a string")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = bos + tok(rec["text"], add_special_tokens=False).input_ids
        return ids, list(ids)
    raise AssertionError(schema)


def records_examples(
    records: list[tuple[str, Any]], tok, seq_len: int, source: Path, alpaca_elsewhere: bool = False
) -> list[Example] | None:
    """Tokenized examples; None when every record is Alpaca and alpaca_elsewhere (JSON files keep data.py's path)."""
    if not records:
        raise L4QInputError(f"{source} holds no records")
    schemas = [schema_of(w, r) for w, r in records]
    if alpaca_elsewhere and all(s == "alpaca" for s in schemas):
        return None
    out = []
    for (where, rec), schema in zip(records, schemas, strict=True):
        ids, labels = record_example(tok, where, rec, schema)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(lab != IGNORE for lab in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise L4QInputError(f"{source}: every example's learned tokens were truncated away; raise --seq-len")
    return out


def pack(examples: list[Example], seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy, order-preserving packing into blocks of at most seq_len tokens; position_ids restart per example
    (that is what keeps attention inside each example, see the module docstring)."""
    blocks: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for ids, labels in examples:
        if cur[0] and len(cur[0]) + len(ids) > seq_len:
            blocks.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        # the first token of each example predicts nothing across the boundary: HF shifts labels inside the block
        cur[1].extend([IGNORE] + labels[1:])
        cur[2].extend(range(len(ids)))
    if cur[0]:
        blocks.append(cur)
    return blocks


def collate_packed(batch: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed blocks -> input_ids, labels, position_ids and *no* attention_mask (padding is one more segment,
    with positions from 0 and IGNORE labels, so nothing attends to it and it learns nothing)."""
    n = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab, p) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        pos[i, : len(p)] = torch.tensor(p)
        pos[i, len(p):] = torch.arange(n - len(p))
    return {"input_ids": input_ids, "labels": labels, "position_ids": pos}


def load_any(path: Path, tok, seq_len: int, data_format: str) -> list[Example] | None:
    """Examples for load_examples, or None to let it use its own Alpaca / plain-text readers."""
    fmt = resolve_format(path, data_format)
    if fmt == "text":
        return None
    own_json = fmt in ("json", "jsonl") and path.is_file()
    records = read_json_records(path) if own_json else read_datasets_records(path, fmt)
    return records_examples(records, tok, seq_len, path, alpaca_elsewhere=own_json)
