"""What MLX's affine quantization can hold, and how one folded tensor becomes MLX's `.weight/.scales/.biases`.

MLX (`mx.quantize(..., mode="affine")`, what mlx-lm ships) dequantizes ``w = scales * q + biases`` per group of
32/64/128 input columns, q unsigned 1-8 bits (not 7), packed LSB-first into little-endian uint32 words along the
input dimension -- 3/5/6-bit values straddle word boundaries.  That bit stream is exactly `quant.pack_bits`
(checked against `mx.quantize` in tests/test_mlx_export.py), so packing reuses it.

Exactness (measured, docs/mlx.md): MLX's CPU `dequantize` computes ``fl(fl(scales*q) + biases)`` in fp32 -- the
same two rounded operations as our canonical float-offset form ``W = d*u + m`` -- so with ``scales = d`` and
``biases = m`` the weights are bit-identical.  fp16 scales/biases are upcast to fp32 inside
`quantized_matmul` (an fp32 activation gives the same result as fp32 parameters), so fp16 storage is exact when
d and m are on the fp16 grid (`--scale-grid fp16`); otherwise fp32 is stored, which mlx-lm accepts.
Integer zero points (``W = (u - z)*d``) become ``biases = -d*z``: ``fl(d*u) + fl(-d*z)`` can differ from
``fl((u - z)*d)`` by an ulp, so those tensors are *bounded*, with the bound measured per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ...quant import QuantizedTensor, QuantSpec, pack_bits

MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUPS = (32, 64, 128)

Kind = Literal["exact", "bounded", "dense", "refused"]


@dataclass(frozen=True)
class Capability:
    """How one [out, in] linear of a given spec lands in MLX.

    exact:   packed, bit-identical weights;  bounded: packed, error <= a bound measured at write time;
    dense:   stored as the fold's fp32 W_q (exact, uncompressed) because MLX has no layout for it;
    refused: cannot be written at all (reason says why).
    """

    kind: Kind
    reason: str = ""
    group_size: int | None = None
    bits: int | None = None


def capability(spec: QuantSpec, shape: tuple[int, int]) -> Capability:
    """Exact / bounded / dense / refused for one linear, from its spec and shape alone (no data needed)."""
    _, n_in = shape
    g = spec.group_len(n_in)
    if spec.bits not in MLX_BITS:
        return Capability("refused", f"MLX affine quantization holds {'/'.join(map(str, MLX_BITS))}-bit codes, "
                                     f"not {spec.bits}-bit")
    if g not in MLX_GROUPS:
        return Capability("dense", f"group of {g} columns: MLX groups are {'/'.join(map(str, MLX_GROUPS))}")
    if n_in % g:
        return Capability("dense", f"input dim {n_in} is not a multiple of the group size {g} (partial last group)")
    kind: Kind = "exact" if spec.zero_point == "float" else "bounded"
    reason = "" if kind == "exact" else "integer zero point stored as biases = -d*z: fl(d*u) + fl(-d*z) may differ " \
                                        "from fl((u - z)*d) by an ulp (measured per tensor)"
    return Capability(kind, reason, g, spec.bits)


def on_fp16_grid(t: torch.Tensor) -> bool:
    """Whether every value survives a round trip through fp16 unchanged (finite, in range)."""
    h = t.half()
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), t.float())


def mlx_dequantize_np(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, g: int) -> np.ndarray:
    """MLX's affine decode, emulated in numpy fp32: fl(fl(scales*q) + biases).  Used to *declare* the bound at
    export; verify measures with MLX itself."""
    out, n = codes.shape
    q = codes.reshape(out, n // g, g).astype(np.float32)
    s = scales.astype(np.float32)[..., None]
    b = biases.astype(np.float32)[..., None]
    return ((q * s) + b).reshape(out, n)


@dataclass
class Encoded:
    """The three tensors of one packed linear and its report row."""

    weight: torch.Tensor  # uint32 [out, in*bits/32]
    scales: torch.Tensor  # fp16 or fp32 [out, in/g]
    biases: torch.Tensor
    row: dict


def encode(qt: QuantizedTensor, cap: Capability) -> Encoded:
    """Pack one fold tensor as MLX stores it: codes unchanged, scales = d, biases = m (= -d*z for integer zeros)."""
    assert cap.kind in ("exact", "bounded") and cap.group_size is not None
    codes = qt.codes.numpy()
    words = np.ascontiguousarray(pack_bits(codes, qt.spec.bits)).view("<u4")
    d, m = qt.scale.float(), qt.minimum.float()
    dtype = torch.float16 if on_fp16_grid(d) and on_fp16_grid(m) else torch.float32
    scales, biases = d.to(dtype), m.to(dtype)
    decoded = mlx_dequantize_np(codes, scales.numpy(), biases.numpy(), cap.group_size)
    err = float(np.abs(decoded.astype(np.float64) - qt.dequantize().numpy().astype(np.float64)).max())
    row = {"encoding": "packed", "group_size": cap.group_size, "bits": cap.bits,
           "scale_dtype": str(dtype).removeprefix("torch."), "exact": err == 0.0, "max_abs_error": err}
    if cap.kind == "bounded":
        row["note"] = cap.reason
    return Encoded(torch.from_numpy(words.copy()), scales.contiguous(), biases.contiguous(), row)


def quantization_block(packed: dict[str, tuple[int, int]], dense: list[str]) -> dict | None:
    """config.json's `quantization` for mlx-lm: a default (group_size, bits) plus per-module overrides.

    mlx-lm's class predicate returns `config["quantization"][path]` verbatim when the module path is a key, so a
    dense layer gets `false` and a packed layer whose (group, bits) differs from the default gets its own dict.
    None when nothing is packed (a plain dense model).
    """
    if not packed:
        return None
    counts: dict[tuple[int, int], int] = {}
    for gb in packed.values():
        counts[gb] = counts.get(gb, 0) + 1
    g, b = max(counts, key=lambda k: counts[k])
    block: dict = {"group_size": g, "bits": b, "mode": "affine"}
    for module, gb in packed.items():
        if gb != (g, b):
            block[module] = {"group_size": gb[0], "bits": gb[1], "mode": "affine"}
    for module in dense:
        block[module] = False
    return block


def mlx_config(model_config: dict, qblock: dict | None) -> dict:
    """The HF config.json rewritten for mlx-lm.

    transformers 5 keeps the RoPE base in `rope_parameters`; mlx-lm's ModelArgs read `rope_theta` /
    `rope_scaling`, and default `tie_word_embeddings` to True (HF: False) -- so both are written explicitly.
    """
    cfg = {k: v for k, v in model_config.items() if k not in ("quantization", "quantization_config")}
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    if not cfg.get("rope_scaling") and rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    if qblock is not None:
        cfg["quantization"] = qblock
        cfg["quantization_config"] = qblock  # mlx-lm's save_config writes both (HF-tree compatibility)
    return cfg
