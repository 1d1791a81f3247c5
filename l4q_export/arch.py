"""The supported decoder architectures: one table that training, fold, every exporter and verify read.

Adding an architecture is one `Arch` entry here plus whatever graph pieces its attention/MLP need (ONNX) --
the lists below say what each part must know:

* ``linears``: the quantized linear names inside a decoder block, exactly as the model names them.  Fused
  linears (Phi-3's ``qkv_proj`` [q; k; v] and ``gate_up_proj`` [gate; up], concatenated along the *output*
  dim) stay one quantized tensor: groups run along the input dim, so every row keeps its own groups and
  fusing rows changes no code, scale or offset.  Every target that stores them fused (llama.cpp ``attn_qkv`` /
  ``ffn_up``, HF safetensors, ONNX) then writes them as trained; see docs/architectures.md.
* ``splits``: how a fused linear's output rows divide (``"q"``/``"kv"`` = heads x head_dim, ``"ff"`` =
  intermediate_size), in order.
* ``qk_norm``: RMSNorm over head_dim on each query/key head before RoPE (Qwen3 ``q_norm``/``k_norm``).
* ``gguf``: llama.cpp's ``general.architecture``; ``gguf_permute_qk``: llama.cpp rotates adjacent pairs
  (NORM rope) and needs HF's half-split q/k rows reordered (LLaMA only; Qwen2/3 and Phi-3 use NEOX rope).
* ``sliding``: how HF applies ``sliding_window`` -- ``"all"`` layers (Mistral, Phi-3), ``"layer_types"``
  (Qwen2/3: only with ``use_sliding_window``, per ``layer_types``/``max_window_layers``), ``"gemma"`` (always,
  on the ``sliding_attention`` entries of ``layer_types``) or ``"none"``.
* ``required_keys``: config.json keys the exporters read without a default (for base-config validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import L4QInputError

_COMMON_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_UNFUSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    name: str
    model_type: str
    gguf: str
    linears: tuple[str, ...] = _UNFUSED
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    qk_norm: bool = False
    gguf_permute_qk: bool = False
    sliding: str = "none"
    required_keys: tuple[str, ...] = _COMMON_KEYS

    @property
    def fused_qkv(self) -> bool:
        return "qkv_proj" in self.linears

    @property
    def fused_gate_up(self) -> bool:
        return "gate_up_proj" in self.linears


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("LlamaForCausalLM", "llama", "llama", gguf_permute_qk=True),
    Arch("MistralForCausalLM", "mistral", "llama", gguf_permute_qk=True, sliding="all"),
    Arch("Qwen2ForCausalLM", "qwen2", "qwen2", sliding="layer_types"),
    # head_dim is required: Qwen3Config defaults it to 128, not hidden_size / num_attention_heads
    Arch("Qwen3ForCausalLM", "qwen3", "qwen3", qk_norm=True, sliding="layer_types",
         required_keys=(*_COMMON_KEYS, "head_dim")),
    Arch("Phi3ForCausalLM", "phi3", "phi3", linears=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
         splits={"qkv_proj": ("q", "kv", "kv"), "gate_up_proj": ("ff", "ff")}, sliding="all"),
    # Gemma 3 text: (1 + w) RMSNorms, sqrt(hidden)-scaled embeddings, GELU-tanh MLP, q/k-norm, interleaved local
    # (sliding) / global layers per layer_types with two rope bases; query_pre_attn_scalar replaces head_dim
    Arch("Gemma3ForCausalLM", "gemma3_text", "gemma3", qk_norm=True, sliding="gemma",
         required_keys=(*_COMMON_KEYS, "head_dim", "query_pre_attn_scalar", "sliding_window")),
)}
SUPPORTED = tuple(ARCHS)
# every linear name any supported architecture quantizes (surgery matches module names against it)
ALL_LINEARS = tuple(dict.fromkeys(n for a in ARCHS.values() for n in a.linears))


def get(architecture: str) -> Arch:
    """The table entry, or one clear line naming what is supported."""
    if architecture not in ARCHS:
        raise L4QInputError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED)}")
    return ARCHS[architecture]


def from_config(cfg: dict[str, Any]) -> Arch:
    archs = cfg.get("architectures") or []
    return get(archs[0] if archs else str(cfg.get("model_type")))


def split_sizes(arch: Arch, linear: str, cfg: dict[str, Any]) -> list[int]:
    """Output rows of each part of a fused linear, e.g. Phi-3 qkv_proj -> [Hq*D, Hkv*D, Hkv*D]."""
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    d = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    size = {"q": heads * d, "kv": kv * d, "ff": int(cfg["intermediate_size"])}
    return [size[p] for p in arch.splits[linear]]
