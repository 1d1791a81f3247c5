"""Tensor layouts and configs of the packed-safetensors flavors, built from the fold's `QuantizedTensor`s.

Three flavors share one set of integers (codes u, integer zero points z, scales d, W = (u - z)*d):

* ``compressed-tensors`` -- format ``pack-quantized``: ``weight_packed`` I32 [N, ceil(K*b/32)] (dense LSB-first
  bitstream along K, zero-padded), ``weight_scale`` [N, G], ``weight_zero_point`` I32 [ceil(N*b/32), G] packed
  along N (asymmetric only), ``weight_shape`` I64 [2].  compressed-tensors shifts codes to signed q - 2^(b-1)
  and back, so every packed field is our unsigned u (or z) unchanged.
* ``gptq`` -- ``checkpoint_format: gptq_v2``: ``qweight`` I32 [K*b/32, N] packed along K, ``qzeros`` I32
  [G, N*b/32] packed along N holding z as is, ``scales`` F16 [G, N], ``g_idx`` I32 [K] = k // g (desc_act off).
* ``gptq-v1`` -- the same with ``qzeros`` holding z - 1 (loaders add 1 back).  Exact only when every z >= 1:
  z = 0 would underflow to -1 and borrow into the neighbouring field, so such tensors are refused.

All packing goes through compressed-tensors' `pack_to_int32` (one dense LSB-first bitstream, GPTQ's too); nothing
here re-derives codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import FidelityError
from ...quant import QuantizedTensor, QuantSpec
from ...quant.convert import rounded_zero_point, same_weights
from ...quant.inplace import block_rows, row_blocks

FLAVORS = ("compressed-tensors", "gptq", "gptq-v1")
GPTQ_BITS = (2, 3, 4, 8)


# Rows per `pack_to_int32` call: it widens its input to int32 and builds two more int32 arrays of that size, so a
# whole 11008x4096 weight would take ~540 MB of temporaries; row slices keep them at a few MB (rows pack independently).
_PACK_ROWS = 256


def _pack(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors' dense LSB-first int32 packing (`pack_to_int32`, also GPTQ's bitstream) of unsigned codes.

    `pack_to_int32` takes the signed int8 form (u - 2^(b-1)) and adds the offset back, so the stored words hold u.
    The signed form is computed in uint8 (wrapping subtraction, then a two's-complement view: the same int8 values
    as widening to int32) and, packing along rows, the library packs a slice of rows at a time.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = (values.to(torch.uint8) - (1 << (bits - 1))).view(torch.int8)  # a new tensor: never the caller's codes
    if packed_dim != 1 or signed.dim() != 2 or signed.shape[0] <= _PACK_ROWS:
        return pack_to_int32(signed, bits, packed_dim).contiguous()
    rows, cols = signed.shape
    out = torch.empty(rows, -(-cols * bits // 32), dtype=torch.int32)
    for r0 in range(0, rows, _PACK_ROWS):
        out[r0 : r0 + _PACK_ROWS] = pack_to_int32(signed[r0 : r0 + _PACK_ROWS], bits, 1)
    return out


def unpackable_reason(flavor: str, spec: QuantSpec, shape: tuple[int, int]) -> str | None:
    """Why a [N, K] layer cannot be packed in this flavor (it is then stored dense), or None.

    Both formats describe groups as K / group_size whole groups (compressed-tensors raises on a partial
    group; vLLM's GPTQ and CT loaders require K % group_size == 0), and GPTQ packs K and N into whole int32
    words with no padding, so K*b and N*b must be multiples of 32.
    """
    n, k = shape
    g = spec.group_len(k)
    if k % g:
        return f"in_features {k} is not a multiple of group_size {g} (partial last group)"
    if flavor == "compressed-tensors" and spec.bits == 4 and spec.zero_point != "symmetric" and n <= 8 and k > g:
        # its 4-bit unpacker views a one-word-wide transposed zero-point tensor as bytes and raises
        return f"compressed-tensors cannot unpack 4-bit zero points of a layer with {n} <= 8 outputs and several groups"
    if flavor.startswith("gptq") and ((k * spec.bits) % 32 or (n * spec.bits) % 32):
        return f"GPTQ packs whole int32 words: {n}x{k} at {spec.bits} bits needs both dims x bits divisible by 32"
    return None


@dataclass
class ZeroResolution:
    """The integer zero points written for one tensor and what they cost.

    exact:        (u - zero)*d equals the fold's dequantized weight bit for bit.
    max_abs_err:  max |(u - zero)*d - W_fold| (0.0 when exact).
    rounded:      zero came from rounding a float offset (--allow-lossy).
    """

    zero: torch.Tensor
    exact: bool
    max_abs_err: float
    rounded: bool


def resolve_zero(qt: QuantizedTensor) -> ZeroResolution:
    """Integer zero points for a folded tensor: the trained ones, or round(-m/d) for float offsets.

    The rounded candidate is always computed and checked bit for bit, so a float-offset checkpoint whose
    offsets all happen to sit on integer zero points (e.g. untouched symmetric init) still exports exactly.
    """
    if qt.zero is not None:
        return ZeroResolution(zero=qt.zero, exact=True, max_abs_err=0.0, rounded=False)
    alt = rounded_zero_point(qt)
    err = float((alt.dequantize() - qt.dequantize()).abs().max())
    return ZeroResolution(zero=alt.zero, exact=same_weights(alt, qt), max_abs_err=err, rounded=True)


def exactly_representable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).float(), t.float()))


def decodes_exactly(qt: QuantizedTensor, zero: torch.Tensor, dtype: torch.dtype) -> bool:
    """Does compressed-tensors' decode give W_q bit for bit when the scale is stored in `dtype`?

    The library computes (q - z) * s in the scale's dtype, so a 16-bit scale is exact only where every product
    fits that dtype: an fp16 scale carries up to 11 significant bits and a 4-bit (q - z) up to 4 more, so a trained
    fp16-grid scale usually decodes to fp16(W_q), not W_q (at 7B shapes that moved the logits of transformers'
    fp32 model ~40x past verify's bound).  fp32 holds every such product.  Walks row blocks and stops at the first
    that does not fit, which for trained scales is the first."""
    if dtype == torch.float32:
        return True
    if not exactly_representable(qt.scale, dtype):
        return False
    on_zero = QuantizedTensor(qt.name, qt.spec, qt.codes, qt.scale, -(qt.scale * zero), zero)
    n, k = qt.shape
    return all(exactly_representable(on_zero.rows(r0, r1).dequantize(), dtype)
               for r0, r1 in row_blocks(n, block_rows(k)))


def ct_tensors(qt: QuantizedTensor, zero: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one Linear (suffixes after `module.`)."""
    spec = qt.spec
    out = {
        "weight_packed": _pack(qt.codes, spec.bits),
        "weight_scale": qt.scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64),
    }
    if spec.zero_point != "symmetric":
        out["weight_zero_point"] = _pack(zero, spec.bits, packed_dim=0)  # [N, G] packed along N: [words, G]
    return out


def gptq_tensors(qt: QuantizedTensor, zero: torch.Tensor, v1: bool) -> dict[str, torch.Tensor]:
    """GPTQ qweight/qzeros/scales/g_idx of one Linear; scales must already be fp16-exact (checked by caller)."""
    spec = qt.spec
    k = qt.shape[1]
    stored_zero = zero - 1 if v1 else zero
    if v1 and bool((stored_zero < 0).any()):
        raise ValueError("v1 zero points must be >= 1")  # callers check first and refuse with a clear message
    g = spec.group_len(k)
    return {
        "qweight": _pack(qt.codes, spec.bits, packed_dim=1).T.contiguous(),  # [K*b/32, N], packed along K
        "qzeros": _pack(stored_zero.T, spec.bits, packed_dim=1),  # [G, N*b/32], packed along N
        "scales": qt.scale.T.to(torch.float16).contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g).to(torch.int32),
    }


def ct_quantization_config(spec: QuantSpec, ignore: list[str]) -> dict[str, Any]:
    """The minimal pack-quantized config every compressed-tensors release accepts (see the reference notes):
    no scale_dtype/zp_dtype or per-scheme `format` keys, which older releases reject (extra="forbid")."""
    channel = spec.group_size == -1
    weights = {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.zero_point == "symmetric",
        "strategy": "channel" if channel else "group", "group_size": None if channel else spec.group_size,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head", *ignore], "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": weights}},
    }


def block_suffix(module: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `mlp.down_proj` (the module's name inside its decoder block)."""
    m = re.match(r"^.*?\.layers\.\d+\.(.+)$", module)
    return m.group(1) if m else module


def gptq_quantization_config(spec: QuantSpec, v1: bool, dense: list[str], packed: list[str], version: str) -> dict[str, Any]:
    """GPTQ config read by transformers/optimum (`checkpoint_format`) and GPTQModel (`format`).

    Layers stored dense must be excluded twice, because the two loaders read different keys: GPTQModel (and
    vLLM) honour negative `dynamic` rules, while transformers' GPTQ path (optimum's GPTQQuantizer) ignores
    `dynamic` and replaces every Linear of every block unless `modules_in_block_to_quantize` lists the quantized
    ones (it matches by suffix, the same list for every block -- which holds here because the dense/packed choice
    depends only on the layer shape).  Without it transformers loads the dense layers as empty GPTQ modules.
    Note: transformers' GPTQConfig needs optimum installed to accept `modules_in_block_to_quantize`.
    """
    fmt = "gptq" if v1 else "gptq_v2"
    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
        "sym": spec.zero_point == "symmetric", "checkpoint_format": fmt, "format": fmt, "lm_head": False,
        "pack_dtype": "int32", "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
        "meta": {"quantizer": [f"l4q-export:{version}"]},
    }
    if dense:
        cfg["dynamic"] = {f"-:^{m.replace('.', '[.]')}$": {} for m in dense}
        keep = list(dict.fromkeys(block_suffix(m) for m in packed))
        mixed = set(keep) & {block_suffix(m) for m in dense}
        if mixed:
            raise FidelityError(f"GPTQ: {sorted(mixed)} are packed in some blocks and dense in others; transformers' "
                                "GPTQ loader cannot express that -- use --flavor compressed-tensors")
        cfg["modules_in_block_to_quantize"] = [keep]
    return cfg

