"""GGUF model metadata and tokenizer for llama / mistral / qwen2 / qwen3 / phi3, built on gguf-py's vocab helpers.

llama.cpp reads hyper-parameters only from metadata (it never sees config.json), so every key it needs is
written explicitly, including ``rope.freq_base`` whose silent default (10000) would be wrong for Llama-3 or
Qwen2.  The tokenizer is written from the model directory's own files: SentencePiece (``tokenizer.model``,
``tokenizer.ggml.model = llama``) or a byte-level BPE ``tokenizer.json`` (``gpt2`` + merges + the right
``tokenizer.ggml.pre``, identified from the pre-tokenizer's split regex).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ... import arch as A
from ...errors import L4QInputError

ARCHES = {a.name: a.gguf for a in A.ARCHS.values()}
MODEL_ARCH = {a.gguf: gguf.MODEL_ARCH[a.gguf.upper()] for a in A.ARCHS.values()}

# Byte-level BPE pre-tokenizer split regexes -> llama.cpp pre-tokenizer names (llama-vocab.cpp).
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {_QWEN2_RE: "qwen2", _LLAMA3_RE: "llama-bpe"}


def gguf_arch(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHES:
        raise L4QInputError(f"GGUF export supports {', '.join(ARCHES)}; config.json says {archs!r}")
    return ARCHES[archs[0]]


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 moved rope_theta into rope_parameters; read either spelling."""
    rp = cfg.get("rope_parameters") or {}
    rp = rp.get("full_attention", rp)  # Gemma 3: per layer type; llama.cpp's rope.freq_base is the global one
    return float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling") or None
    rp = cfg.get("rope_parameters") or {}
    if rs is None and rp.get("rope_type", "default") != "default":
        rs = rp
    if rs and rs.get("rope_type", rs.get("type", "default")) == "default":
        rs = None
    return rs


def rope_freq_factors(cfg: dict[str, Any]) -> np.ndarray | None:
    """LLaMA 3.1-style RoPE scaling as llama.cpp holds it: a `rope_freqs.weight` F32 tensor of per-frequency divisors.

    llama.cpp rotates with theta_i / factor_i, transformers with its llama3 inverse frequencies. Taking the factors
    as default_inv_freq / llama3_inv_freq from transformers' own rope init (the reference that verify compares
    against) keeps one definition of the llama3 ramp instead of a second copy here. None when not llama3-scaled.
    """
    rs = _rope_scaling(cfg)
    if rs is None or rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig.from_dict({k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim = head_dim(cfg)
    default = 1.0 / (rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled).numpy().astype(np.float32)


def _refuse_unwritable(cfg: dict[str, Any], arch: str) -> None:
    """Configs whose llama.cpp graph would not compute what transformers does: refused, never silently dropped."""
    rp = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise L4QInputError(f"config.json partial_rotary_factor={rp.get('partial_rotary_factor')}: partial rotary "
                            "is not supported by the GGUF exporter")
    if arch == "phi3" and int(cfg["num_attention_heads"]) * head_dim(cfg) != int(cfg["hidden_size"]):
        raise L4QInputError("config.json: llama.cpp's phi3 needs num_attention_heads * head_dim == hidden_size")
    if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise L4QInputError(f"config.json use_sliding_window: llama.cpp's {arch} has no sliding-window attention, "
                            "its logits would differ from transformers' beyond the window")


def add_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any], arch: str, n_vocab: int, name: str) -> None:
    """Every hyper-parameter key llama.cpp's loader reads for llama / qwen2 / qwen3 / phi3 (as convert_hf_to_gguf.py
    writes them)."""
    _refuse_unwritable(cfg, arch)
    rs = _rope_scaling(cfg)
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind in ("su", "longrope"):
            raise L4QInputError(
                f"rope scaling {kind!r} (Phi-3.5 / Phi-4-mini long context) is not written to GGUF: transformers switches "
                "between short and long factors by sequence length, llama.cpp by context size, so the logits would "
                "not match; export to safetensors instead (transformers / vLLM apply longrope themselves)")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif not (kind == "llama3" and arch == "llama"):  # llama3: the per-frequency factors go in rope_freqs.weight
            raise L4QInputError(
                f"rope scaling {kind!r} in config.json is not supported by the GGUF exporter for {arch} "
                "(supported: linear; llama3 for LLaMA 3.1+)"
            )
    hd = head_dim(cfg)
    w.add_name(name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(hd)
    if hd * int(cfg["num_attention_heads"]) != int(cfg["hidden_size"]) or (arch in ("qwen3", "gemma3") and cfg.get("head_dim")):
        w.add_key_length(hd)  # the converter writes these whenever config.json has head_dim (Qwen3 always does)
        w.add_value_length(hd)
    if arch == "gemma3":
        _gemma3_hparams(w, cfg)
    if arch == "phi3":  # convert_hf_to_gguf.py Phi3MiniModel: orig context and sliding window (0 = none) always
        rp = cfg.get("rope_parameters") or {}
        orig = rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        w.add_rope_scaling_orig_ctx_len(int(orig or cfg.get("max_position_embeddings", 2048)))
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    w.add_vocab_size(n_vocab)


def _gemma3_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """Gemma 3 keys as `Gemma3Model.set_gguf_parameters` writes them, plus what its graph would otherwise default.

    llama.cpp's gemma3 graph scales the embeddings by sqrtf(n_embd) itself (fp32; transformers casts the scale to
    the model dtype, identical when the reference runs in fp32) and its (1 + w) norms come from the stored
    weights (the writer adds the 1, in fp32).  The layer pattern is written as the per-layer bool array read from
    ``layer_types`` (the converter leaves llama.cpp's default "every 6th is global"), and the local rope base as
    ``rope.freq_base_swa`` (the converter relies on the default 10000).  Everything llama.cpp cannot reproduce is
    refused: attention softcapping, a query scale other than the one llama.cpp derives, rope scaling on local
    layers or of a kind other than linear on global ones.
    """
    hd, heads, n = head_dim(cfg), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
    if cfg.get("attn_logit_softcapping") is not None:
        raise L4QInputError("config.json attn_logit_softcapping: llama.cpp's gemma3 has no attention softcapping")
    llama_scalar = int(cfg["hidden_size"]) // heads if n == 62 else hd  # llama.cpp: 1/sqrt(that), 27B special case
    if float(cfg["query_pre_attn_scalar"]) != float(llama_scalar):
        raise L4QInputError(f"config.json query_pre_attn_scalar={cfg['query_pre_attn_scalar']}: llama.cpp's gemma3 "
                            f"scales queries by 1/sqrt({llama_scalar}) for this model, the logits would differ")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    rp = cfg.get("rope_parameters") or {}
    local, glob = rp.get("sliding_attention") or {}, rp.get("full_attention") or {}
    if not local or not glob:
        raise L4QInputError("config.json rope_parameters: Gemma 3 needs sliding_attention and full_attention entries")
    if local.get("rope_type", "default") != "default":
        raise L4QInputError(f"rope scaling {local.get('rope_type')!r} on local layers is not supported by llama.cpp's gemma3")
    kind = glob.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(glob["factor"]))
    elif kind != "default":
        raise L4QInputError(f"rope scaling {kind!r} on Gemma 3 global layers is not supported by the GGUF exporter "
                            "(supported: linear)")
    w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    types = list(cfg.get("layer_types") or [])
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise L4QInputError(f"config.json layer_types must list {n} sliding_attention/full_attention entries")
    if "sliding_attention" in types:
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _bpe_pre(tok_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its split regex."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for s in steps:
        if s.get("type") == "Split":
            regex = (s.get("pattern") or {}).get("Regex")
            if regex in BPE_PRE:
                return BPE_PRE[regex]
            raise L4QInputError(f"unknown BPE pre-tokenizer regex {regex!r} in tokenizer.json; "
                                "llama.cpp would tokenize differently")
        if s.get("type") == "ByteLevel" and s.get("use_regex", True):
            return "gpt-2"
    raise L4QInputError("tokenizer.json has no recognisable byte-level pre-tokenizer (expected GPT-2, Llama-3 or Qwen2 style)")


def _spm_normalizer(path: Path) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) from the SentencePiece model proto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    ns = proto.normalizer_spec
    return bool(ns.add_dummy_prefix), bool(ns.remove_extra_whitespaces)


def add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, n_vocab: int) -> dict[str, Any]:
    """Write the vocabulary, special tokens and chat template; pad to the embedding rows with unique names.

    Returns a small report (model, pre, number of real and padding tokens).
    """
    tok_dir = Path(tok_dir)
    if (tok_dir / "tokenizer.model").is_file():
        vocab: Any = gguf.SentencePieceVocab(tok_dir)
        model, pre = "llama", "default"
        add_prefix, remove_ws = _spm_normalizer(tok_dir / "tokenizer.model")
    elif (tok_dir / "tokenizer.json").is_file():
        tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
        try:
            vocab = gguf.BpeVocab(tok_dir)
        except FileNotFoundError:
            raise L4QInputError(f"{tok_dir}/tokenizer.json is not a byte-level BPE tokenizer "
                                "and there is no tokenizer.model") from None
        model, pre = "gpt2", _bpe_pre(tj)
        add_prefix = remove_ws = None
    else:
        raise L4QInputError(f"no tokenizer in {tok_dir} (need tokenizer.model or tokenizer.json)")
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else bytes(text))
        scores.append(float(score))
        types.append(int(ttype))
    if len(tokens) > n_vocab:
        raise L4QInputError(f"tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    n_real = len(tokens)
    for i in range(n_vocab - n_real):  # llama.cpp asserts unique token strings, so padding gets unique names
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    n_added = _add_hf_tokens(tok_dir, tokens, types, model)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if model == "llama":
        w.add_token_scores(scores)
        w.add_add_space_prefix(add_prefix)
        w.add_remove_extra_whitespaces(remove_ws)
    special = gguf.SpecialVocab(tok_dir, load_merges=(model == "gpt2"), n_vocab=n_vocab)
    if model == "gpt2" and not special.merges:
        raise L4QInputError(f"BPE tokenizer in {tok_dir} has no merges; llama.cpp cannot load a gpt2 vocab without them")
    special.add_to_gguf(w, quiet=True)
    return {"tokenizer": model, "pre": pre, "n_tokens": n_real, "n_added": n_added, "n_padding": n_vocab - n_real - n_added,
            "chat_template": special.chat_template is not None}


def _add_hf_tokens(tok_dir: Path, tokens: list[bytes], types: list[int], model: str) -> int:
    """Tokens transformers adds on top of the model's vocabulary (chat markers such as Gemma's <start_of_turn> or
    ChatML's <|im_start|>), typed as convert_hf_to_gguf.py does: special -> CONTROL (llama.cpp parses them with
    parse_special; as NORMAL tokens it spells them out as text).  SentencePiece (`model` "llama"): gguf-py's
    SentencePieceVocab only reads added_tokens.json, which transformers 5 no longer writes, so added ids past
    tokenizer.model would stay `[PAD]` rows; they get their text, non-special ones as USER_DEFINED with
    SentencePiece's '▁' as a space.  Byte-level BPE: gguf-py's BpeVocab lists the added tokens as NORMAL; special
    ones become CONTROL (their text is already right).  The ids come from tokenizer.json's added_tokens and
    tokenizer_config.json's added_tokens_decoder; only rows that are padding or normal pieces change, ids past the
    embedding are ignored (as the converter does).  Returns how many padding rows became tokens."""
    added: dict[int, tuple[str, bool]] = {}
    if (tok_dir / "tokenizer.json").is_file():
        for t in json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []:
            added[int(t["id"])] = (str(t["content"]), bool(t.get("special")))
    if (tok_dir / "tokenizer_config.json").is_file():
        tc = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        for k, t in (tc.get("added_tokens_decoder") or {}).items():
            added[int(k)] = (str(t["content"]), bool(t.get("special")))
    n = 0
    for tid, (content, special) in sorted(added.items()):
        if tid >= len(tokens) or types[tid] not in (gguf.TokenType.UNUSED, gguf.TokenType.NORMAL):
            continue
        if model != "llama":  # BPE: the listed text is the token's own; only the type is the converter's
            if special and tokens[tid] == content.encode("utf-8"):
                types[tid] = int(gguf.TokenType.CONTROL)
            continue
        n += types[tid] == gguf.TokenType.UNUSED
        tokens[tid] = (content if special else content.replace("\u2581", " ")).encode("utf-8")
        types[tid] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return n
