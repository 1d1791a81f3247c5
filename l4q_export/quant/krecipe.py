"""llama.cpp's per-tensor type choice for the K-quant file types (Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M).

Transcribed from ``llama_tensor_get_type`` / ``llama_tensor_get_type_impl`` / ``tensor_type_fallback`` /
``tensor_allows_quantization`` in llama.cpp's ``src/llama-quant.cpp`` (the copy vendored in llama-cpp-python
0.3.36), restricted to what those five file types do to LLaMA-family tensor names, with no imatrix, no
``--pure`` and no per-tensor overrides.  Why a transcription and not a call: training must know each module's
grid *before* any GGUF exists, so that what trains is exactly what the file will hold; tools/check_krecipe.py
compares this table with the real ``llama-quantize`` on a tiny model.

Two facts of llama.cpp that the transcription relies on:
  * its quantizer walks tensors sorted by layer number (llama_model_loader's weight_name_comparer), so the running
    counters i_attention_wv / i_ffn_down equal the layer index N of ``blk.N.`` for a model with one attn_v /
    ffn_down per layer (all LLaMA-family dense models);
  * "tied embeddings" means the file has no ``output.weight``; then token_embd is typed like the output tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

FILE_TYPES: dict[str, T] = {  # file type -> llama_ftype_get_default_type
    "Q2_K": T.Q2_K,
    "Q3_K_M": T.Q3_K,
    "Q4_K_S": T.Q4_K,
    "Q4_K_M": T.Q4_K,
    "Q5_K_M": T.Q5_K,
}

# tensor_type_fallback: a 256-block type on a row that is not a multiple of 256 becomes this 32-block type.
FALLBACK: dict[T, T] = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

BLOCK = {T.Q2_K: 256, T.Q3_K: 256, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256, T.Q4_0: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32}


@dataclass(frozen=True)
class ArchInfo:
    """The model facts llama.cpp's choice depends on."""

    n_head: int
    n_head_kv: int
    tied_embeddings: bool  # the GGUF has no output.weight
    arch: str = "llama"
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (bumps attn_v)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def _category(name: str) -> str:
    """tensor_get_category: first match wins, substring tests as in llama.cpp."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization, the parts that can apply to a LLaMA-family model."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between.

    C's % truncates while Python's floors, but the modulo is only reached with i_layer >= n_layers // 8 (the
    short-circuit), where both agree."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_index(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"cannot tell the layer of tensor {name!r} (expected a blk.N. prefix)")
    return int(m.group(1))


def _mixture(ft: str, new: T, name: str, cols: int, n_layers: int, a: ArchInfo) -> T:
    """llama_tensor_get_type_impl for the five K file types."""
    cat = _category(name)
    falcon = a.arch == "falcon"
    if cat == "output" or (a.tied_embeddings and cat == "token_embd"):
        if falcon or cols % BLOCK[new]:
            return T.Q8_0
        return T.Q6_K if new != T.Q8_0 else new
    if cat == "token_embd":
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):  # category_is_attn_v (catches attn_qkv before its own branch)
        i = _layer_index(name)
        if ft == "Q2_K":
            new = T.Q4_K if a.n_gqa >= 4 else T.Q3_K
        elif ft == "Q3_K_M":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            new = T.Q6_K
        elif ft == "Q4_K_S" and i < 4:
            new = T.Q5_K
        if a.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if a.n_expert == 8:
            new = T.Q8_0
        return new
    if cat == "attn_k":
        return T.Q8_0 if a.n_expert == 8 else new
    if cat == "ffn_down":
        if a.n_expert > 1:
            raise ValueError("mixture-of-experts ffn_down typing is not transcribed")
        i = _layer_index(name)
        if ft == "Q2_K":
            return T.Q3_K
        if ft == "Q3_K_M":
            if i < n_layers // 16:
                return T.Q5_K
            return T.Q4_K if not falcon or use_more_bits(i, n_layers) else T.Q3_K
        if ft == "Q4_K_M":
            if falcon:
                return T.Q6_K if i < n_layers // 16 else T.Q5_K if use_more_bits(i, n_layers) else T.Q4_K
            return T.Q6_K if use_more_bits(i, n_layers) else new
        if ft == "Q5_K_M" and use_more_bits(i, n_layers):
            return T.Q6_K
        if ft == "Q4_K_S" and not falcon and i < n_layers // 8:
            return T.Q5_K
        return new
    if cat == "attn_output" and not falcon:
        if a.n_expert == 8:
            return T.Q5_K  # all five file types are in llama.cpp's list for 8-expert models
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K}.get(ft, new)
    return new


def fallback(t: T, cols: int) -> T:
    """tensor_type_fallback: the type llama.cpp really writes for a row of `cols` values."""
    if cols % BLOCK.get(t, 1) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % BLOCK[t] == 0 else T.F16


def recipe(file_type: str, tensor_name: str, shape: tuple[int, ...], n_layers: int, arch_info: ArchInfo) -> T | None:
    """The ggml type llama-quantize gives `tensor_name` for `file_type`; None where it keeps the source type
    (1-D tensors, norms).  shape is PyTorch order (rows, cols): cols, GGUF's ne[0], is the blocked dimension.
    n_layers is the model's block count (= the number of attn_v and of ffn_down tensors)."""
    ft = file_type.upper()
    if ft not in FILE_TYPES:
        raise ValueError(f"unknown K-quant file type {file_type!r}; choose one of {sorted(FILE_TYPES)}")
    if not _allows_quantization(tensor_name, tuple(shape)):
        return None
    cols = int(shape[-1])
    return fallback(_mixture(ft, FILE_TYPES[ft], tensor_name, cols, n_layers, arch_info), cols)
