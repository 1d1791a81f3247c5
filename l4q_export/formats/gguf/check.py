"""Reading a GGUF artifact back for `verify`, independent of our packers, and GGUF's own check (tokenizer parity).

Every quantized tensor is read with gguf-py's `GGUFReader` and decoded by llama.cpp's own C decoder
(`quant.ggml.dequantize`: ggml's ``dequantize_row_<type>``, ~4x gguf-py's numpy port), a slice of rows at a time
as `verify` compares them (`Decoded.rows`); the stored integers are
recovered from that decoder alone (`pack.decode_with_codes`) and must be what the fold's codes become in
that block type (`pack.expected_stored_codes`: u, or u - z for types without a minimum).  The decoded weights are
held to the bound the exporter declared per tensor in the file (`l4q.tensor_report`).  Trained K-grid tensors
(declared ``kgrid``) are unpacked field by field from ggml's block layout (`kquant.unpack_blocks`): codes,
sub-scales, sub-minima and the fp16 super-scales must all equal the fold's, and ggml's decode its W_q
exactly.  Names and the q/k row
permutation come from the file's own header, so the reader needs nothing but the artifact.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ...checkpoint import Checkpoint
from ...errors import L4QInputError
from ...quant import ggml
from ...quant.kquant import KQuantized, kquant_spec, unpack_blocks
from ..base import Decoded
from ..runtime import HFTokenizer, tokenizer_truth
from . import pack as P
from .vocab import MODEL_ARCH
from .writer import REPORT_KEY, gguf_name, qk_permutation

TOKENIZER_TEXTS = (
    "Hello world", " Hello world", "  two leading spaces", "\tTab and\nnewline", "Numbers 1234567 and 3.14",
    "Once upon a time, there was a little girl named Lily.", "émigré café naïve – “quotes” 😀", "a\n\n\nb   c",
    "", " ", "UPPER lower MiXeD", "l'été, it's, we'll, they're",
)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def open_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader, with its bare ValueError (truncated or damaged file) as one clear input-error line.

    Parsed once per version of the file (path, size, mtime, inode): one verify asks for the same header four times
    (architecture, tolerance, the runtime's guard, read-back) and gguf-py parses every field eagerly -- the
    32000-entry vocabulary of a LLaMA file costs ~1.8 s each time.  A rewritten file is a new key."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise L4QInputError(f"{path} is not a complete GGUF file: {e.strerror or type(e).__name__}") from None
    return _parsed(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int, inode: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise L4QInputError(f"{path} is not a complete GGUF file: {why}") from None


def check_architecture(artifact: Path, ck: Checkpoint) -> None:
    """The file must be a GGUF of the checkpoint's architecture: verifying a llama file against a qwen3 checkpoint
    is a wrong pairing of inputs (exit 2), not a fidelity failure hidden among 'missing' tensors."""
    from .vocab import gguf_arch

    reader, cfg = open_reader(artifact), ck.model_config()
    got, want = field(reader, "general.architecture"), gguf_arch(cfg)
    if got != want:
        raise L4QInputError(f"{artifact} is a GGUF of architecture {got!r}, but the checkpoint {ck.dir} is {want!r} "
                            f"({(cfg.get('architectures') or ['?'])[0]}); pass the checkpoint it was exported from")
    blocks, layers = field(reader, f"{got}.block_count"), cfg.get("num_hidden_layers")
    if layers is not None and int(blocks) != int(layers):  # its extra layers would pass (a)+(b) unnoticed
        raise L4QInputError(f"{artifact} has {int(blocks)} decoder layers, but the checkpoint {ck.dir} has {int(layers)}; "
                            "pass the checkpoint it was exported from")


class GGUFArtifact:
    """`read_back` of a .gguf file: decoded tensors by HF name, in HF row order."""

    def __init__(self, path: Path) -> None:
        self.reader = open_reader(path)
        self.arch = field(self.reader, "general.architecture")
        if self.arch not in MODEL_ARCH:
            raise L4QInputError(f"{path}: GGUF architecture {self.arch!r} is not one l4q-export writes")
        a = self.arch
        self.cfg = {"num_hidden_layers": int(field(self.reader, f"{a}.block_count")),
                    "num_attention_heads": int(field(self.reader, f"{a}.attention.head_count")),
                    "num_key_value_heads": int(field(self.reader, f"{a}.attention.head_count_kv"))}
        self.tmap = gguf.get_tensor_name_map(MODEL_ARCH[a], self.cfg["num_hidden_layers"])
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.declared = json.loads(field(self.reader, REPORT_KEY) or "{}")

    def names(self) -> Iterator[str]:
        return iter(self.tensors)

    def get(self, hf_name: str) -> Decoded | torch.Tensor | None:
        try:
            gname = gguf_name(self.tmap, hf_name)
        except L4QInputError:  # a tensor this file's architecture has no name for: the file lacks it
            return None
        rt = self.tensors.get(gname)
        if rt is None:
            return None
        qtype = gguf.GGMLQuantizationType(int(rt.tensor_type))
        raw = np.asarray(rt.data)
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))  # ggml lists dims innermost first
        tname = qtype.name.lower()
        declared = self.declared.get(gname, {})
        kgrid = bool(declared.get("kgrid"))
        idx = qk_permutation(hf_name, self.arch, self.cfg, shape[0])
        inv = None if idx is None else np.argsort(idx)
        unperm = (lambda a: a) if inv is None else (lambda a: a[inv])
        bound = float(declared.get("max_abs_error", 0.0))
        if tname in P.QTYPES and not kgrid:  # rows decoded on demand, one pass over their bytes: weight and codes
            packed = unperm(raw.reshape(shape[0], -1))  # HF row order (a copy of the packed bytes only where permuted)

            def rows(r0: int, r1: int) -> tuple[dict[str, np.ndarray], torch.Tensor]:
                decoded, codes = P.decode_with_codes(packed[r0:r1], tname)
                return {"codes": codes}, torch.from_numpy(decoded)

            return Decoded(hf_name, {}, lambda qt: {"codes": P.expected_stored_codes(qt, tname)}, bound=bound,
                           info={"type": qtype.name, "gguf": gname, "codes_from": "ggml decoder"}, rows=rows, shape=shape)
        if tname in P.QTYPES:  # a trained K grid: ggml's own decoder (its fields are unpacked below)
            decoded = ggml.dequantize(raw.reshape(shape[0], -1), qtype)
        else:
            # F32 decodes to a view of the read-only mmap: copied (torch needs a writable array); F16 is fresh
            decoded = np.require(gguf.quants.dequantize(raw, qtype).reshape(shape), np.float32, ["C", "W"])
        weight = torch.from_numpy(np.ascontiguousarray(unperm(decoded)))
        if kgrid:  # a trained K-grid module: every stored field, block by block
            kq = unpack_blocks(kquant_spec(tname), raw, shape, hf_name)
            return Decoded(hf_name, {k: unperm(v) for k, v in kfields(kq).items()}, kfields, weight=weight, bound=bound,
                           info={"type": qtype.name, "gguf": gname, "codes_from": "ggml block layout (kquant.unpack_blocks)"})
        # F32/F16 of W_q: the weight is the whole content
        return Decoded(hf_name, {}, lambda qt: {}, weight=weight, bound=bound,
                       info={"type": qtype.name, "gguf": gname, "codes_from": "weight"})


def kfields(kq: Any) -> dict[str, np.ndarray]:
    """The stored integers and fp16 super-scales of a K-grid tensor: codes, sc, d (and mn, dmin), as numpy.

    A fold that is not a KQuantized (a checkpoint without this K grid) has none of them: every field differs."""
    if not isinstance(kq, KQuantized):
        return {}
    out = {"codes": kq.codes.numpy(), "d": kq.d.half().numpy(), "sc": kq.sc.numpy()}
    if kq.dmin is not None:
        out.update(dmin=kq.dmin.half().numpy(), mn=kq.mn.numpy())
    return out


def tokenizer_parity(artifact: Path, ck: Checkpoint, texts: tuple[str, ...] | list[str] = TOKENIZER_TEXTS) -> dict[str, Any]:
    """llama.cpp's tokenizer (from the file's vocabulary) vs the one the model was trained with, on awkward texts."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(artifact), vocab_only=True, verbose=False)
    truth_name, truth = tokenizer_truth(ck.dir)
    hf = HFTokenizer(ck.dir).tok
    mismatches, hf_diff = [], 0
    for text in texts:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        want = truth(text)
        if got != want:
            mismatches.append({"text": text, "llama.cpp": got[:32], truth_name: want[:32]})
        hf_diff += list(hf(text)["input_ids"]) != want
    chat = chat_texts(hf)
    for text in chat:  # llama.cpp parses the special tokens (parse_special), as a chat server does
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        want = special_truth(hf, truth_name, truth, text)
        if got != want:
            mismatches.append({"text": text, "llama.cpp": got[:32], truth_name: want[:32]})
        hf_diff += list(hf(text, add_special_tokens=False)["input_ids"]) != want
    llm.close()
    n = len(texts) + len(chat)
    return {"truth": truth_name, "n_texts": n, "n_chat_texts": len(chat), "n_match": n - len(mismatches),
            "hf_differs_from_truth": hf_diff, "mismatches": mismatches[:5], "passed": not mismatches,
            "summary": f"tokenizer {n - len(mismatches)}/{n}" + (f" ({len(chat)} with chat markers)" if chat else "")}


def special_truth(hf: Any, truth_name: str, truth: Any, text: str) -> list[int]:
    """The ids of a text holding special tokens, without BOS.  SentencePiece models: the text split at the special
    tokens, each one its id, each piece between them encoded by SentencePiece on its own (the model file knows no
    tokens transformers added; llama.cpp tokenizes the pieces between specials the same way), with the whitespace
    next to a token stripped where transformers' token says lstrip/rstrip (Phi-3's markers).  Others: transformers."""
    if truth_name != "sentencepiece":
        return list(hf(text, add_special_tokens=False)["input_ids"])
    import re

    specials = sorted(hf.all_special_tokens, key=len, reverse=True)
    strip = {t.content: (bool(t.lstrip), bool(t.rstrip)) for t in hf.added_tokens_decoder.values()}
    n_bos = len(truth(""))
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    out: list[int] = []
    for i, piece in enumerate(parts):
        if piece in specials:
            out.append(int(hf.convert_tokens_to_ids(piece)))
            continue
        if i > 0 and strip.get(parts[i - 1], (False, False))[1]:
            piece = piece.lstrip()
        if i + 1 < len(parts) and strip.get(parts[i + 1], (False, False))[0]:
            piece = piece.rstrip()
        if piece:
            out += truth(piece)[n_bos:]
    return out


CHAT_CONTENT = ("  Hi there 12345, naïve café 😀", "Sure: 3.14 – “done”.")


def chat_texts(hf: Any) -> list[str]:
    """Texts holding the tokenizer's extra special tokens (chat markers: Gemma's <start_of_turn>/<end_of_turn>,
    ChatML's <|im_start|>...) around content with leading spaces, digits and unicode: the conversation rendered
    by the chat template (with the generation prompt) and each marker on its own between text.  Empty when the
    tokenizer adds no such tokens, so plain tokenizers are checked exactly as before."""
    extra = getattr(hf, "extra_special_tokens", None) or getattr(hf, "additional_special_tokens", None) or []
    markers = [t for t in (extra.values() if isinstance(extra, dict) else extra) if isinstance(t, str)]
    if not markers:
        return []
    out = [f"{m}user\n{CHAT_CONTENT[0]}{m}\n" for m in markers]
    if getattr(hf, "chat_template", None):
        conv = [{"role": "user", "content": CHAT_CONTENT[0]}, {"role": "assistant", "content": CHAT_CONTENT[1]}]
        try:
            out.append(hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
        except Exception:  # noqa: BLE001 -- a template that needs other roles: the marker texts above still run
            pass
    return out
