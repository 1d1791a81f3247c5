"""Direct ONNX graph construction for LLaMA/Mistral/Qwen2/Qwen3/Phi-3/Gemma 3 decoders with a KV cache.

The graph is written with `onnx.helper` node by node instead of traced from torch: tracing would
re-derive weights from a float module, while here every quantized initializer is copied from the
fold's integers.  Attention, RMSNorm, RoPE and SiLU are decomposed into standard opset-21 ops so one
graph body serves every form; ONNX Runtime's optimizer fuses the norm and the (DQ +) MatMul patterns
itself.  Initializers go to one external data file as they arrive (`ExternalData`), so peak memory
stays around one tensor, whatever the model size.

`fused=True` (the MatMulNBits form's default) swaps the decomposed attention for ORT's
`com.microsoft::GroupQueryAttention` (RoPE inside, from a cos/sin cache computed by transformers' own
math) and every residual-add + RMSNorm for `com.microsoft::SkipSimplifiedLayerNormalization`; these are
exact up to fp32 summation order (docs/onnx.md measures it) and ORT never fuses the decomposed forms itself.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ... import arch as A
from ...errors import L4QInputError

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
DATA_FILE = "model.onnx.data"
# Tensors smaller than this stay inside model.onnx (norm vectors, small shape constants).
INLINE_BYTES = 1024
ALIGN = 64

DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
ARCH_TYPES = {a.name: a.model_type for a in A.ARCHS.values()}
GEMMA3 = "Gemma3ForCausalLM"
# the MLP activations the graph writes: HF hidden_act / hidden_activation name -> ours
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# (inv_freq fp32 [head_dim/2], HF's attention_scaling applied to cos/sin), both from transformers' rotary module
Rope = tuple[np.ndarray, float]


@dataclass(frozen=True)
class DecoderSpec:
    """The shape facts of a supported decoder, read once from its HF config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tied: bool
    ropes: tuple[Rope, ...]  # the distinct RoPE tables (Gemma 3: global, local), computed by transformers itself
    layer_rope: tuple[int, ...]  # per layer: index into ropes
    windows: tuple[int | None, ...]  # per layer: sliding-window length or None
    max_positions: int
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q/k head before RoPE
    qkv_split: tuple[int, ...] | None = None  # Phi-3: one fused qkv_proj, split into q/k/v rows
    gate_up_split: tuple[int, ...] | None = None  # Phi-3: one fused gate_up_proj, split into gate/up rows
    attn_scale: float | None = None  # softmax scale of q.k; None = head_dim^-1/2 (Gemma 3: query_pre_attn_scalar^-1/2)
    act: str = "silu"  # gated-MLP activation: silu or gelu_tanh (Gemma 3)
    norm_offset: float = 0.0  # Gemma 3: RMSNorm gains are (1 + w); the writer stores the sum in fp32
    embed_scale: float | None = None  # Gemma 3: embeddings times sqrt(hidden) (as the fp32 constant HF multiplies by)
    sandwich_norms: bool = False  # Gemma 3: post-attention / post-feedforward norms on each branch before its residual

    @staticmethod
    def from_config(cfg: dict[str, Any], architecture: str) -> DecoderSpec:
        if architecture not in ARCH_TYPES:
            raise L4QInputError(f"ONNX export supports {', '.join(ARCH_TYPES)}; checkpoint architecture is {architecture}")
        gemma = architecture == GEMMA3
        act_key = "hidden_activation" if gemma else "hidden_act"
        act = ACTIVATIONS.get(cfg.get(act_key, "gelu_pytorch_tanh" if gemma else "silu"))
        if act is None or (act == "gelu_tanh") != gemma:
            raise L4QInputError(f"config.json {act_key}={cfg.get(act_key)!r}: the ONNX exporter writes "
                                f"{'gelu_pytorch_tanh' if gemma else 'silu'} MLPs for {architecture}")
        heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        if heads % kv:
            raise L4QInputError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        _refuse_rope(cfg)
        arch = A.get(architecture)
        n_layers = int(cfg["num_hidden_layers"])
        if gemma:
            hf = _gemma3_config(cfg)
            types = sorted(set(hf.layer_types))
            ropes, layer_rope = _gemma3_ropes(hf, types), tuple(types.index(t) for t in hf.layer_types)
            extra: dict[str, Any] = dict(attn_scale=float(hf.query_pre_attn_scalar) ** -0.5, act=act, norm_offset=1.0,
                                         embed_scale=float(np.float32(hidden ** 0.5)), sandwich_norms=True)
        else:
            ropes, layer_rope, extra = (_rope(cfg, architecture),), (0,) * n_layers, {}
        return DecoderSpec(
            model_type=ARCH_TYPES[architecture], hidden=hidden, intermediate=int(cfg["intermediate_size"]), layers=n_layers,
            heads=heads, kv_heads=kv, head_dim=head_dim, vocab=int(cfg["vocab_size"]), eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied=bool(cfg.get("tie_word_embeddings", False)), ropes=ropes, layer_rope=layer_rope,
            windows=_windows(cfg, architecture, n_layers), max_positions=int(cfg.get("max_position_embeddings", 2048)),
            qk_norm=arch.qk_norm,
            qkv_split=tuple(A.split_sizes(arch, "qkv_proj", cfg)) if arch.fused_qkv else None,
            gate_up_split=tuple(A.split_sizes(arch, "gate_up_proj", cfg)) if arch.fused_gate_up else None,
            **extra,
        )

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.attn_scale is None else self.attn_scale


def _refuse_rope(cfg: dict[str, Any]) -> None:
    """RoPE variants one static graph cannot reproduce exactly: refused with the reason, never approximated."""
    both = [cfg.get("rope_scaling") or {}, cfg.get("rope_parameters") or {}]  # transformers 4 / 5 spellings
    # Gemma 3 nests one parameter set per layer type (sliding_attention / full_attention)
    both += [d for d in both[1].values() if isinstance(d, dict)]
    rp = {**both[0], **both[1]}
    kinds = {d.get("rope_type", d.get("type", "default")) for d in both}
    if kind := next((k for k in kinds if k in ("su", "longrope", "dynamic")), None):
        raise L4QInputError(f"rope scaling {kind!r}: transformers changes the RoPE frequencies with the sequence length, "
                            "which a static ONNX graph does not reproduce; export to safetensors instead")
    if float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise L4QInputError("config.json partial_rotary_factor != 1: partial rotary is not supported by the ONNX exporter")


def _rope(cfg: dict[str, Any], architecture: str) -> tuple[np.ndarray, float]:
    """inv_freq and attention scaling from transformers' own rotary module (every rope_type it knows)."""
    kind = ARCH_TYPES[architecture]
    stem = architecture.removesuffix("ForCausalLM")
    config_cls = getattr(importlib.import_module(f"transformers.models.{kind}.configuration_{kind}"), stem + "Config")
    rotary_cls = getattr(importlib.import_module(f"transformers.models.{kind}.modeling_{kind}"), stem + "RotaryEmbedding")
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "auto_map")}
    try:
        rotary = rotary_cls(config_cls(**keep))
    except (KeyError, ValueError, TypeError) as e:
        raise L4QInputError(f"config.json: cannot build the RoPE parameters ({e})") from None
    return rotary.inv_freq.float().numpy().copy(), float(rotary.attention_scaling)


def _gemma3_config(cfg: dict[str, Any]) -> Any:
    """transformers' Gemma3TextConfig for this config.json (it derives layer_types from an old-style
    sliding_window_pattern and fills the per-layer-type rope_parameters), after refusing what the graph does not
    compute: attention / final-logit softcapping and bidirectional attention."""
    from transformers import Gemma3TextConfig

    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise L4QInputError(f"config.json {key}={cfg[key]}: softcapping is not written by the ONNX exporter; "
                                "export to safetensors instead")
    if cfg.get("use_bidirectional_attention"):
        raise L4QInputError("config.json use_bidirectional_attention: the ONNX decoder is causal; export to safetensors")
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "auto_map", "model_type")}
    try:
        hf = Gemma3TextConfig(**keep)
    except (KeyError, ValueError, TypeError) as e:
        raise L4QInputError(f"config.json: not a valid Gemma 3 text config ({e})") from None
    if len(hf.layer_types) != int(cfg["num_hidden_layers"]) or set(hf.layer_types) - {"sliding_attention", "full_attention"}:
        raise L4QInputError(f"config.json layer_types must list {cfg['num_hidden_layers']} sliding_attention/"
                            "full_attention entries")
    return hf


def _gemma3_ropes(hf: Any, types: list[str]) -> tuple[Rope, ...]:
    """One (inv_freq, attention_scaling) per layer type from transformers' own Gemma3RotaryEmbedding: local layers
    use the local base, global ones the global base and any static rope scaling (linear, yarn...) it applies."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    try:
        rotary = Gemma3RotaryEmbedding(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise L4QInputError(f"config.json: cannot build the Gemma 3 RoPE parameters ({e})") from None
    return tuple((getattr(rotary, f"{t}_inv_freq").float().numpy().copy(), float(getattr(rotary, f"{t}_attention_scaling")))
                 for t in types)


def _windows(cfg: dict[str, Any], architecture: str, n_layers: int) -> tuple[int | None, ...]:
    """Sliding-window length per layer, following the HF mask rules of each architecture."""
    window = cfg.get("sliding_window")
    rule = A.get(architecture).sliding
    if rule == "all":
        return tuple([int(window) if window else None] * n_layers)
    if rule == "gemma":  # every sliding_attention layer, always (HF Gemma3Attention)
        types = _gemma3_config(cfg).layer_types
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    if rule == "layer_types" and cfg.get("use_sliding_window") and window:
        types = cfg.get("layer_types") or []
        max_window_layers = int(cfg.get("max_window_layers", n_layers))
        return tuple(
            int(window) if (types[i] == "sliding_attention" if i < len(types) else i >= max_window_layers) else None
            for i in range(n_layers)
        )
    return tuple([None] * n_layers)


# numpy dtypes whose ONNX raw_data is the array's own little-endian bytes (ml_dtypes' 4-bit types are packed by onnx)
_PLAIN_DTYPES = tuple(np.dtype(d) for d in ("<f4", "<f2", "u1", "i1", "<i4", "<i8"))
_UINT4 = np.dtype(ml_dtypes.uint4)


def pack_uint4(array: np.ndarray) -> np.ndarray:
    """ONNX's UINT4 raw_data: two elements per byte in row-major order, the first in the low nibble, an odd count
    padded with a zero nibble (what numpy_helper.from_array stores).  Packed here rather than by from_array, whose
    bytes would live in the TensorProto's protobuf arena until the whole graph is freed: clearing raw_data after
    writing it to the file does not give the memory back, so a QDQ export held every code it wrote (~100 MB a 7B
    layer)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    packed = flat[0::2] & 0x0F
    high = flat[1::2]
    packed[: high.size] |= (high & 0x0F) << 4
    return packed


class ExternalData:
    """Append initializer bytes to one external data file as they are produced (never the whole model in RAM)."""

    def __init__(self, directory: Path, filename: str = DATA_FILE) -> None:
        self.filename = filename
        self.path = Path(directory) / filename
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 -- appended to across calls, closed by close()
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray, onnx_type: int | None = None) -> TensorProto:
        """A TensorProto for `array` (ml_dtypes uint4 arrays are packed as onnx packs them); big payloads go to the
        file."""
        array = np.ascontiguousarray(array)
        if array.dtype in _PLAIN_DTYPES or array.dtype == _UINT4:
            # from_array's proto without its copies (tobytes, the proto's own, raw_data read back: 3x a 500 MB head)
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            raw = memoryview(pack_uint4(array) if array.dtype == _UINT4 else array).cast("B")
        else:
            t = numpy_helper.from_array(array, name)
            data_type, raw = t.data_type, memoryview(t.raw_data)
        if onnx_type is not None and data_type != onnx_type:
            raise AssertionError(f"{name}: expected ONNX type {onnx_type}, got {data_type}")
        if len(raw) < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        return self._external(name, array.shape, data_type, [raw], len(raw))

    def stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> TensorProto:
        """A tensor of a plain dtype written from consecutive row-major chunks (each written before the next is
        asked for, so a chunk may reuse its predecessor's buffer): the same bytes and file layout as `tensor` on the
        whole array, without ever holding it (an fp32 7B lm_head is 500 MB)."""
        dtype = np.dtype(dtype)
        if dtype not in _PLAIN_DTYPES:
            raise AssertionError(f"{name}: stream writes plain dtypes only, not {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < INLINE_BYTES:
            return self.tensor(name, np.concatenate([np.array(c).ravel() for c in chunks]).reshape(shape))
        return self._external(name, shape, helper.np_dtype_to_tensor_dtype(dtype), chunks, nbytes)

    def _external(self, name: str, shape: tuple[int, ...], data_type: int, chunks: Iterable[Any], nbytes: int) -> TensorProto:
        """Append the chunks at the next ALIGN-aligned offset; returns the TensorProto pointing at them."""
        pad = (-self.offset) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            raw = memoryview(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk).cast("B")
            self._f.write(raw)
            self.offset += len(raw)
        if self.offset - start != nbytes:
            raise AssertionError(f"{name}: wrote {self.offset - start} bytes, expected {nbytes}")
        t = TensorProto(name=name, dims=shape, data_type=data_type, raw_data=b"")  # set_external_data wants the field
        onnx.external_data_helper.set_external_data(t, self.filename, offset=start, length=nbytes)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        return t

    def close(self) -> None:
        self._f.close()


class GraphBuilder:
    """Accumulates nodes with unique names; small constants are inlined, weights come from `ExternalData`."""

    def __init__(self, dtype: str) -> None:
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"/{hint}/{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", outputs: list[str] | None = None, n_out: int = 1,
           domain: str = "", **attrs: Any) -> Any:
        """Append one node; returns its output name (or list of names when n_out > 1)."""
        base = f"{hint or op_type}"
        outs = outputs or [self.fresh(f"{base}/{op_type}_out{i}" if n_out > 1 else f"{base}/{op_type}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{base}/{op_type}"), domain=domain, **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

    def add_initializer(self, t: TensorProto) -> str:
        if t.name in self._names:
            raise AssertionError(f"duplicate initializer {t.name}")
        self._names.add(t.name)
        self.initializers.append(t)
        return t.name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small inline constant, deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add_initializer(numpy_helper.from_array(arr, f"const_{len(self._consts)}"))
        return self._consts[key]


def gqa_rotary(spec: DecoderSpec) -> bool:
    """Whether ORT's GroupQueryAttention can apply RoPE itself: its CPU rotary kernel needs head_size % 16 == 0
    ("head_size shall be a multiple of 16", onnxruntime 1.32; stories260K has head_dim 8)."""
    return spec.head_dim % 16 == 0


def add_rope_cache(spec: DecoderSpec, g: GraphBuilder, data: ExternalData) -> list[tuple[str, str]]:
    """GroupQueryAttention's cos/sin caches [max_positions, head_dim/2], one pair per RoPE table of the spec,
    computed with torch as HF does.

    HF: freqs = position * inv_freq in fp32 (one exact product), cos/sin of it, times attention_scaling,
    cast to the activation dtype.  Rows are positions, so the cache covers the model's context length.
    """
    import torch

    pos = torch.arange(spec.max_positions, dtype=torch.float32)[:, None]
    out = []
    for r, (inv_freq, scale) in enumerate(spec.ropes):
        freqs = pos * torch.from_numpy(inv_freq)[None, :]
        prefix = "rope" if r == 0 else f"rope.{r}"
        pair = []
        for name, fn in ((f"{prefix}.cos_cache", torch.cos), (f"{prefix}.sin_cache", torch.sin)):
            t = fn(freqs) * scale if scale != 1.0 else fn(freqs)
            pair.append(g.add_initializer(data.tensor(name, t.numpy().astype(g.np_dtype))))
        out.append((pair[0], pair[1]))
    return out


def kv_names(i: int) -> tuple[str, str, str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value"


class DecoderGraph:
    """Emits the decoder around caller-supplied linear layers (the part that differs between forms).

    `linear(g, x, module, n_out)` must return the output name of x @ W(module)^T (+ bias); everything else
    (embedding, RMSNorm, RoPE, causal/padding/sliding-window mask, GQA attention with a concatenated
    KV cache, SiLU / GELU-tanh MLP, Gemma 3's scaled embedding and post-branch norms, lm_head) is built here.
    """

    def __init__(self, spec: DecoderSpec, g: GraphBuilder, linear: Any, floats: dict[str, str], fused: bool = False,
                 rope_cache: list[tuple[str, str]] | None = None) -> None:
        """fused: build the contrib-op graph; rope_cache: the (cos, sin) initializers per RoPE table from
        `add_rope_cache` when GroupQueryAttention applies RoPE itself (`gqa_rotary`), else RoPE stays decomposed
        in front of it."""
        self.s, self.g, self.linear, self.floats = spec, g, linear, floats
        self.fused, self.rope_cache = fused, rope_cache

    def weight(self, name: str) -> str:
        if name not in self.floats:
            raise L4QInputError(f"tensor {name} is missing from the checkpoint's base model")
        return self.floats[name]

    def rms_norm(self, x: str, weight: str, hint: str) -> str:
        """HF LlamaRMSNorm: fp32 x * rsqrt(mean(x^2) + eps), cast back, times weight."""
        g = self.g
        x32 = g.op("Cast", [x], hint, to=TensorProto.FLOAT) if g.onnx_dtype != TensorProto.FLOAT else x
        var = g.op("ReduceMean", [g.op("Mul", [x32, x32], hint), g.const([-1])], hint, keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(self.s.eps, np.float32)], hint)], hint)], hint)
        y = g.op("Mul", [x32, inv], hint)
        if g.onnx_dtype != TensorProto.FLOAT:
            y = g.op("Cast", [y], hint, to=g.onnx_dtype)
        return g.op("Mul", [self.weight(weight), y], hint)

    def rope_tables(self, axis: int = 1) -> list[tuple[str, str]]:
        """cos/sin [B,1,S,D] (or [B,S,1,D] with axis=2) per RoPE table of the spec, from position_ids:
        freqs = pos * inv_freq (one exact fp32 product, as HF)."""
        return [self._rope_table(inv_freq, scale, axis) for inv_freq, scale in self.s.ropes]

    def _rope_table(self, inv_freq: np.ndarray, scale: float, axis: int) -> tuple[str, str]:
        g = self.g
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "rope", to=TensorProto.FLOAT), g.const([-1])], "rope")
        freqs = g.op("Mul", [pos, g.const(inv_freq, np.float32)], "rope")
        emb = g.op("Concat", [freqs, freqs], "rope", axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb], "rope")
            if scale != 1.0:
                t = g.op("Mul", [t, g.const(scale, np.float32)], "rope")
            if g.onnx_dtype != TensorProto.FLOAT:
                t = g.op("Cast", [t], "rope", to=g.onnx_dtype)
            out.append(g.op("Unsqueeze", [t, g.const([axis])], "rope"))
        return out[0], out[1]

    def mask(self, window: int | None) -> str:
        """Additive mask [B,1,S,T]: causal over the cache offset P = T - S, padding from attention_mask."""
        g = self.g
        s_len = g.op("Gather", [g.op("Shape", ["input_ids"], "mask"), g.const(1)], "mask", axis=0)
        t_len = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask"), g.const(1)], "mask", axis=0)
        kpos = g.op("Range", [g.const(0), t_len, g.const(1)], "mask")
        qpos = g.op("Range", [g.op("Sub", [t_len, s_len], "mask"), t_len, g.const(1)], "mask")
        qpos = g.op("Unsqueeze", [qpos, g.const([1])], "mask")
        allowed = g.op("LessOrEqual", [kpos, qpos], "mask")
        if window is not None:
            recent = g.op("Greater", [kpos, g.op("Sub", [qpos, g.const(window)], "mask")], "mask")
            allowed = g.op("And", [allowed, recent], "mask")
        allowed = g.op("Unsqueeze", [allowed, g.const([0, 1])], "mask")
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "mask", to=TensorProto.BOOL), g.const([1, 2])], "mask")
        allowed = g.op("And", [allowed, pad], "mask")
        lowest = np.finfo(g.np_dtype).min
        return g.op("Where", [allowed, g.const(0.0, g.np_dtype), g.const(lowest, g.np_dtype)], "mask")

    def rotate(self, x: str, cos: str, sin: str, hint: str) -> str:
        """x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1) (HF's non-interleaved RoPE)."""
        g, half = self.g, self.s.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], hint, n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2], hint), x1], hint, axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], hint), g.op("Mul", [rot, sin], hint)], hint)

    def attention(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        g, s = self.g, self.s
        p = f"model.layers.{i}.self_attn"
        hint = f"layers.{i}.attn"
        d, hq, hkv = s.head_dim, s.heads, s.kv_heads
        heads = {}
        for proj, y in self.qkv(i, x).items():
            heads[proj] = g.op("Transpose", [y], hint, perm=[0, 2, 1, 3])  # [B, S, n, D] -> [B, n, S, D]
        q = self.rotate(heads["q"], cos, sin, hint)
        k = self.rotate(heads["k"], cos, sin, hint)
        past_k, past_v, present_k, present_v = kv_names(i)
        g.op("Concat", [past_k, k], hint, outputs=[present_k], axis=2)
        g.op("Concat", [past_v, heads["v"]], hint, outputs=[present_v], axis=2)
        # GQA without materialising repeated KV: query heads of one KV head are contiguous, so
        # [B, Hq, S, D] -> [B, Hkv, rep*S, D] lets one batched MatMul serve the whole group.
        qg = g.op("Reshape", [q, g.const([0, hkv, -1, d])], hint)
        scores = g.op("MatMul", [qg, g.op("Transpose", [present_k], hint, perm=[0, 1, 3, 2])], hint)
        scores = g.op("Reshape", [scores, g.const([0, hq, -1, 0])], hint)
        scores = g.op("Add", [g.op("Mul", [scores, g.const(s.scale, g.np_dtype)], hint), mask], hint)
        probs = g.op("Reshape", [g.op("Softmax", [scores], hint, axis=-1), g.const([0, hkv, -1, 0])], hint)
        ctx = g.op("Reshape", [g.op("MatMul", [probs, present_v], hint), g.const([0, hq, -1, d])], hint)
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], hint, perm=[0, 2, 1, 3]), g.const([0, 0, hq * d])], hint)
        return self.linear(g, ctx, f"{p}.o_proj", s.hidden)

    def qkv(self, i: int, x: str) -> dict[str, str]:
        """q/k/v as [B, S, n, D] heads: three linears or one fused qkv_proj split by rows (Phi-3), then the
        per-head q/k RMSNorm where the architecture has one (Qwen3: before RoPE, as HF)."""
        g, s = self.g, self.s
        p, hint = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
        n = {"q": s.heads, "k": s.kv_heads, "v": s.kv_heads}
        if s.qkv_split is not None:
            fused = self.linear(g, x, f"{p}.qkv_proj", sum(s.qkv_split))
            flat = dict(zip("qkv", g.op("Split", [fused, g.const(list(s.qkv_split))], hint, n_out=3, axis=-1), strict=True))
        else:
            flat = {proj: self.linear(g, x, f"{p}.{proj}_proj", n[proj] * s.head_dim) for proj in "qkv"}
        out = {proj: g.op("Reshape", [y, g.const([0, 0, n[proj], s.head_dim])], hint) for proj, y in flat.items()}
        if s.qk_norm:
            for proj in "qk":
                out[proj] = self.rms_norm(out[proj], f"{p}.{proj}_norm.weight", f"{hint}.{proj}_norm")
        return out

    def skip_norm(self, h: str, delta: str, weight: str, hint: str) -> tuple[str, str]:
        """(RMSNorm(h + delta), h + delta) in one com.microsoft::SkipSimplifiedLayerNormalization.

        ORT's kernel forms the sum in the graph dtype (as the residual Add does), accumulates the mean square
        of the fp32 sum, and scales by 1/sqrt(ms + eps) then gamma: HF's math up to summation order.
        """
        y, h_sum = self.g.op("SkipSimplifiedLayerNormalization", [h, delta, self.weight(weight)], hint,
                             outputs=[self.g.fresh(f"{hint}/ssln_out"), "", "", self.g.fresh(f"{hint}/residual")],
                             domain=MS_DOMAIN, epsilon=self.s.eps)[::3]
        return y, h_sum

    def gqa_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (int32 [B] = keys per row - 1) and total_sequence_length (int32 scalar)."""
        g = self.g
        seqlens = g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const([1])], "gqa", keepdims=0), g.const(1)], "gqa")
        total = g.op("Gather", [g.op("Shape", ["attention_mask"], "gqa"), g.const(1)], "gqa", axis=0)
        return g.op("Cast", [seqlens], "gqa", to=TensorProto.INT32), g.op("Cast", [total], "gqa", to=TensorProto.INT32)

    def fused_attention(self, i: int, x: str, lengths: tuple[str, str], tables: list[tuple[str, str]] | None) -> str:
        """q/k/v linears -> com.microsoft::GroupQueryAttention (BNSH cache, no repeated KV) -> o_proj.

        RoPE runs inside the op from the cos/sin cache, or, when `tables` ([B,S,1,D] cos/sin) are given
        (head sizes ORT's rotary kernel rejects), decomposed on [B,S,n,D] views of q and k in front of it.
        """
        g, s = self.g, self.s
        p, hint = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
        heads = self.qkv(i, x)  # [B, S, n, D], q/k already normed (Qwen3): the op's RoPE then sees what HF's does
        rotary: list[str] = []
        r = s.layer_rope[i]
        if tables is not None:
            heads["q"], heads["k"] = (self.rotate(heads[t], *tables[r], hint) for t in "qk")
        else:
            rotary = [*self.rope_cache[r], "position_ids"]  # type: ignore[index]
        q, k, v = (g.op("Reshape", [heads[t], g.const([0, 0, n * s.head_dim])], hint)
                   for t, n in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)))
        past_k, past_v, present_k, present_v = kv_names(i)
        window = s.windows[i]
        ctx = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, *lengths, *rotary], hint,
                   outputs=[g.fresh(f"{hint}/gqa"), present_k, present_v], domain=MS_DOMAIN,
                   num_heads=s.heads, kv_num_heads=s.kv_heads, do_rotary=int(tables is None), rotary_interleaved=0,
                   scale=float(s.scale),
                   # same key set as HF's sliding window (kpos > qpos - window); measured against HF on a
                   # window-5 Mistral (tests): window - 1 would drop one key
                   local_window_size=window if window is not None else -1)[0]
        return self.linear(g, ctx, f"{p}.o_proj", s.hidden)

    def mlp(self, i: int, x: str) -> str:
        g, s = self.g, self.s
        p, hint = f"model.layers.{i}.mlp", f"layers.{i}.mlp"
        if s.gate_up_split is not None:  # Phi-3: one fused gate_up_proj, gate rows first (HF chunk(2))
            fused = self.linear(g, x, f"{p}.gate_up_proj", sum(s.gate_up_split))
            gate, up = g.op("Split", [fused, g.const(list(s.gate_up_split))], hint, n_out=2, axis=-1)
        else:
            gate = self.linear(g, x, f"{p}.gate_proj", s.intermediate)
            up = self.linear(g, x, f"{p}.up_proj", s.intermediate)
        if s.act == "gelu_tanh":  # HF gelu_pytorch_tanh = torch gelu(approximate="tanh"); ONNX Gelu (opset 20)
            act = g.op("Gelu", [gate], hint, approximate="tanh")
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], hint)], hint)
        return self.linear(g, g.op("Mul", [act, up], hint), f"{p}.down_proj", s.hidden)

    def norm_names(self, i: int) -> tuple[str, str | None, str, str | None]:
        """(pre-attention, post-attention branch, pre-MLP, post-MLP branch) norm weights of layer i.  Gemma 3 norms
        both branch outputs before their residual add (its post_attention_layernorm is such a branch norm, its
        pre-MLP norm is pre_feedforward_layernorm); the others have no branch norms and call the pre-MLP norm
        post_attention_layernorm."""
        p = f"model.layers.{i}"
        if self.s.sandwich_norms:
            return (f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                    f"{p}.pre_feedforward_layernorm.weight", f"{p}.post_feedforward_layernorm.weight")
        return f"{p}.input_layernorm.weight", None, f"{p}.post_attention_layernorm.weight", None

    def branch_norm(self, y: str, weight: str | None, hint: str) -> str:
        return y if weight is None else self.rms_norm(y, weight, hint)

    def embed(self) -> str:
        """Token embeddings; Gemma 3 multiplies them by sqrt(hidden) -- HF's fp32 constant cast to the activation
        dtype (`embed_scale.to(weight.dtype)`), so the fp32 graph uses the very value the fp32 reference does."""
        g, s = self.g, self.s
        h = g.op("Gather", [self.weight("model.embed_tokens.weight"), "input_ids"], "embed", axis=0)
        if s.embed_scale is not None:
            h = g.op("Mul", [h, g.const(s.embed_scale, g.np_dtype)], "embed")
        return h

    def build(self) -> None:
        g, s = self.g, self.s
        h = self.embed()
        if self.fused:
            self.build_fused(h)
            return
        tables = self.rope_tables()
        masks: dict[int | None, str] = {}
        for i in range(s.layers):
            w = s.windows[i]
            if w not in masks:
                masks[w] = self.mask(w)
            pre_attn, post_attn, pre_mlp, post_mlp = self.norm_names(i)
            x = self.rms_norm(h, pre_attn, f"layers.{i}.norm1")
            a = self.attention(i, x, *tables[s.layer_rope[i]], masks[w])
            h = g.op("Add", [h, self.branch_norm(a, post_attn, f"layers.{i}.post_attn_norm")], f"layers.{i}")
            m = self.mlp(i, self.rms_norm(h, pre_mlp, f"layers.{i}.norm2"))
            h = g.op("Add", [h, self.branch_norm(m, post_mlp, f"layers.{i}.post_mlp_norm")], f"layers.{i}")
        self.lm_head(self.rms_norm(h, "model.norm.weight", "final_norm"))

    def build_fused(self, h: str) -> None:
        """Residual stream through SkipSimplifiedLayerNormalization: each norm also emits the residual sum."""
        s = self.s
        lengths = self.gqa_lengths()
        tables = self.rope_tables(axis=2) if self.rope_cache is None else None
        # the first norm has no residual to add: SimplifiedLayerNormalization lives in ONNX's own domain,
        # which onnx.checker cannot validate at opset 21, so it stays decomposed (1 of 2L+1 norms)
        # Gemma 3's branch norms have no residual in front of them and stay decomposed too (2 per layer)
        x = self.rms_norm(h, "model.layers.0.input_layernorm.weight", "layers.0.norm1")
        for i in range(s.layers):
            _, post_attn, pre_mlp, post_mlp = self.norm_names(i)
            a = self.branch_norm(self.fused_attention(i, x, lengths, tables), post_attn, f"layers.{i}.post_attn_norm")
            x, h = self.skip_norm(h, a, pre_mlp, f"layers.{i}.norm2")
            m = self.branch_norm(self.mlp(i, x), post_mlp, f"layers.{i}.post_mlp_norm")
            nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < s.layers else "model.norm.weight"
            x, h = self.skip_norm(h, m, nxt, f"layers.{i + 1}.norm1" if i + 1 < s.layers else "final_norm")
        self.lm_head(x)

    def lm_head(self, h: str) -> None:
        g, s = self.g, self.s
        if s.tied:
            head = g.op("Transpose", [self.weight("model.embed_tokens.weight")], "lm_head", perm=[1, 0])
        else:
            head = self.weight("lm_head.weight")  # stored already transposed, [H, V]
        g.op("MatMul", [h, head], "lm_head", outputs=["logits"])

    def io(self) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        s, dt = self.s, self.g.onnx_dtype
        ins = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outs = [helper.make_tensor_value_info("logits", dt, ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.layers):
            pk, pv, nk, nv = kv_names(i)
            past = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
            total = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
            ins += [helper.make_tensor_value_info(n, dt, past) for n in (pk, pv)]
            outs += [helper.make_tensor_value_info(n, dt, total) for n in (nk, nv)]
        return ins, outs


def make_model(g: GraphBuilder, ins: list, outs: list, metadata: dict[str, str], uses_ms: bool) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, "l4q_decoder", ins, outs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if uses_ms else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="l4q-export", ir_version=IR_VERSION)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model
