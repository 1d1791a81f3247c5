"""Pack the fold's integer codes into GGUF block layouts -- never re-deriving a code.

Every packer takes the trained codes and per-group (d, m) or (d, z) of one `QuantizedTensor` and writes the
bytes of one ggml block type.  Codes are only *relabelled* (``q' = u - z + offset``, or mirrored with a
negated scale), never re-rounded, so the integers training used are exactly the integers in the file:

  Q4_1 / Q5_1          y = d*u + m           codes as trained; d, m stored as fp16
  Q4_0 / Q5_0 / Q8_0   y = d*(q' - off)      integer/symmetric zero points only: q' = +-(u - z) + off per block
  Q2_K / Q4_K          y = D*sc*u - Dmin*mn  codes kept; the learned group scales are re-encoded as 4/6-bit
                                             multiples of one fp16 super-scale -> lossy (needs --allow-lossy)
  Q3_K / Q6_K          y = D*sc*(u - z)      integer/symmetric zero points only; scales re-encoded -> lossy

Where the fold's scales are already on the fp16 grid (``--scale-grid fp16``) the legacy types decode to the
training W_q bit for bit: ggml (and gguf-py) compute ``d*q + m`` in fp32 with ``d*q`` exact (an 11-bit times
<= 8-bit product), the same two roundings as the fold's ``u*d + m``.  Otherwise the only error is the fp16
rounding of d and m, which the exporter measures and declares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ...quant import QuantizedTensor

QK = 32     # legacy block
QK_K = 256  # K-quant super-block

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
KQUANTS = ("q2_k", "q3_k", "q4_k", "q6_k")
QTYPES: dict[str, T] = {name: T[name.upper()] for name in LEGACY + KQUANTS}


class NotRepresentable(Exception):
    """This block type cannot hold this tensor.

    layout=True: the tensor's shape or grouping does not tile into the type's blocks (callers fall back to
    another type); layout=False: the codes or zero points themselves do not fit (an explicit request is refused).
    """

    def __init__(self, message: str, layout: bool = False) -> None:
        super().__init__(message)
        self.layout = layout


@dataclass(frozen=True)
class TypeInfo:
    """What one block type stores: code range, whether it has a per-block minimum, sub-block size."""

    qtype: T
    block: int           # elements per block (32 or 256)
    sub: int             # elements sharing one (sub-)scale
    code_bits: int       # width of a stored code
    has_min: bool        # y = d*q + m (codes stored as trained) vs y = d*(q - off)
    offset: int          # off for the no-min types
    lossy_scales: bool   # K-quants: learned scales re-encoded on a 6/4/8-bit grid


INFO: dict[str, TypeInfo] = {
    "q4_0": TypeInfo(T.Q4_0, QK, QK, 4, False, 8, False),
    "q4_1": TypeInfo(T.Q4_1, QK, QK, 4, True, 0, False),
    "q5_0": TypeInfo(T.Q5_0, QK, QK, 5, False, 16, False),
    "q5_1": TypeInfo(T.Q5_1, QK, QK, 5, True, 0, False),
    "q8_0": TypeInfo(T.Q8_0, QK, QK, 8, False, 0, False),
    "q2_k": TypeInfo(T.Q2_K, QK_K, 16, 2, True, 0, True),
    "q3_k": TypeInfo(T.Q3_K, QK_K, 16, 3, False, 4, True),
    "q4_k": TypeInfo(T.Q4_K, QK_K, 32, 4, True, 0, True),
    "q6_k": TypeInfo(T.Q6_K, QK_K, 16, 6, False, 32, True),
}


def bytes_per_weight(name: str) -> float:
    block, size = GGML_QUANT_SIZES[QTYPES[name]]
    return 8.0 * size / block


# --------------------------------------------------------------------------------------------------------
# Per-sub-block view of a QuantizedTensor
# --------------------------------------------------------------------------------------------------------

def _sub_params(qt: QuantizedTensor, sub: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """codes [out, n_sub, sub] and d, m, z [out, n_sub] for sub-blocks of `sub` elements.

    Each sub-block must lie inside one quantization group; otherwise it would need two scales.
    """
    out, n = qt.shape
    g = qt.spec.group_len(n)
    if n % block:
        raise NotRepresentable(f"input size {n} is not a multiple of the {block}-element block", layout=True)
    if g % sub:
        raise NotRepresentable(f"group length {g} is not a multiple of the {sub}-element sub-block", layout=True)
    gidx = (np.arange(n // sub) * sub) // g
    u = qt.codes.numpy().reshape(out, n // sub, sub)
    d = qt.scale.numpy()[:, gidx]
    m = qt.minimum.numpy()[:, gidx]
    z = None if qt.zero is None else qt.zero.numpy()[:, gidx]
    return u, d.astype(np.float32), m.astype(np.float32), z


def _fp16(x: np.ndarray, what: str) -> np.ndarray:
    h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise NotRepresentable(f"{what} overflows fp16")
    return h


def _u8(h: np.ndarray) -> np.ndarray:
    """fp16 [..., k] -> bytes [..., 2k] (little-endian)."""
    return np.ascontiguousarray(h.astype("<f2")).view(np.uint8)


def _signed_codes(u: np.ndarray, z: np.ndarray | None, lo: int, hi: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """v = u - z per element, mirrored (v -> -v, with d -> -d) in blocks whose range only fits that way.

    Returns v (int16) and the per-block sign.  Raises if some block fits neither way.
    """
    if z is None:
        raise NotRepresentable(f"{what} has no per-block minimum, so it cannot hold float offsets (use q4_1/q5_1)")
    v = u.astype(np.int16) - z[..., None].astype(np.int16)
    vmin, vmax = v.min(-1), v.max(-1)
    plus = (vmin >= lo) & (vmax <= hi)
    minus = (-vmax >= lo) & (-vmin <= hi)
    if not (plus | minus).all():
        bad = int((~(plus | minus)).sum())
        raise NotRepresentable(f"{bad} block(s) have u - z outside [{lo}, {hi}] for {what}")
    sign = np.where(plus, 1, -1).astype(np.int16)
    return v * sign[..., None], sign


# --------------------------------------------------------------------------------------------------------
# Legacy 32-element types
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyFields:
    """What one legacy block type stores for a tensor: the codes q [out, nb, 32] as stored, the fp16 block scale d
    (sign folded in for mirrored blocks) and, for min types, the fp16 minimum m.  ggml (and gguf-py) decode a
    block as fp32(d)*q + fp32(m), or fp32(d)*(q - offset) -- two (one) separately rounded fp32 operations."""

    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None
    sign: np.ndarray | None  # no-min types: +1 / -1 per block (mirrored blocks store -d and -(u - z))


def _legacy_fields(qt: QuantizedTensor, name: str) -> LegacyFields:
    info = INFO[name]
    u, d, m, z = _sub_params(qt, QK, QK)
    if info.has_min:
        if qt.spec.umax >= (1 << info.code_bits):
            raise NotRepresentable(f"{qt.spec.bits}-bit codes do not fit {name}'s {info.code_bits}-bit field")
        return LegacyFields(u.astype(np.uint8, copy=False), _fp16(d, "scale"), _fp16(m, "minimum"), None)
    lo, hi = (-128, 127) if name == "q8_0" else (-info.offset, (1 << info.code_bits) - 1 - info.offset)
    v, sign = _signed_codes(u, z, lo, hi, name)
    dd = _fp16(d * sign, "scale")
    if name == "q8_0":
        return LegacyFields(v.astype(np.int8), dd, None, sign)
    return LegacyFields((v + info.offset).astype(np.uint8), dd, None, sign)


def _assemble_legacy(f: LegacyFields, name: str) -> np.ndarray:
    """The blocks [out, nb * size]: d (, m) (, qh), then element j in the low and j+16 in the high nibble, written
    straight into the output (no concatenation copy)."""
    info = INFO[name]
    rows, nb = f.q.shape[:2]
    res = np.empty((rows, nb, GGML_QUANT_SIZES[info.qtype][1]), np.uint8)
    halves = res.view("<f2")  # every legacy block size is even: d and m are its first little-endian fp16 fields
    halves[..., 0] = f.d
    pos = 2
    if f.m is not None:
        halves[..., 1] = f.m
        pos = 4
    if name == "q8_0":
        res[..., pos:] = f.q.view(np.uint8)
        return res.reshape(rows, -1)
    q = f.q
    if info.code_bits == 5:  # bit j of the u32 = high bit of element j
        res[..., pos : pos + 4] = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
        pos += 4
    # 8 codes per uint64 word: masking each byte to its low nibble and shifting the word by 4 moves every byte's
    # nibble into its own high half (no bit crosses a byte, whatever the byte order), so byte j of the result is
    # (q[j] & 0x0F) | (q[j + 16] & 0x0F) << 4 -- computed on 4 contiguous words per block instead of 32 strided bytes
    w = np.ascontiguousarray(q).view(np.uint64)  # [rows, nb, 4]: elements 0-7, 8-15, 16-23, 24-31
    low = np.uint64(0x0F0F0F0F0F0F0F0F)
    hi = np.bitwise_and(w[..., 2:], low)
    hi <<= np.uint64(4)
    hi |= w[..., :2] & low
    res[..., pos : pos + 16] = hi.view(np.uint8)
    return res.reshape(rows, -1)


def _pack_legacy(qt: QuantizedTensor, name: str) -> np.ndarray:
    return _assemble_legacy(_legacy_fields(qt, name), name)


def _legacy_error(qt: QuantizedTensor, f: LegacyFields, name: str) -> float:
    """max |decoded - W_q| of the blocks `f`, from the fields themselves instead of decoding the packed bytes.

    The fold's W_q is d*u + m or (u - z)*d in fp32 with the group's own d, m (`dequantize_codes`); the file decodes
    to fp32(fp16 d)*q + fp32(fp16 m) or fp32(fp16 d)*(q - offset) with q - offset = +-(u - z) and the sign folded
    into d.  Where every stored d and m equals the group's own value (the fp16 scale grid) these are the same
    fp32 operations on the same numbers (a sign flip is exact), so the error is 0 with no element touched.
    Otherwise the decode is computed here exactly as ggml/gguf-py compute it (tests check it against gguf-py).
    """
    _u, d, m, _z = _sub_params(qt, QK, QK)
    d_same = np.array_equal(f.d.astype(np.float32), d if f.sign is None else d * f.sign)
    if d_same and (f.m is None or np.array_equal(f.m.astype(np.float32), m)):
        return 0.0
    if f.m is not None:
        dec = f.d.astype(np.float32)[..., None] * f.q.astype(np.float32) + f.m.astype(np.float32)[..., None]
    else:
        off = 0 if name == "q8_0" else INFO[name].offset
        dec = f.d.astype(np.float32)[..., None] * (f.q.astype(np.int16) - off).astype(np.float32)
    wq = qt.dequantize().numpy().reshape(dec.shape)
    return float(np.abs(dec - wq).max())


def pack_measured(qt: QuantizedTensor, name: str) -> tuple[np.ndarray, float]:
    """`pack` plus the max |decoded - W_q| of the packed tensor (legacy types: from the fields, see `_legacy_error`;
    K-quants: gguf-py's decoder on the packed bytes)."""
    if name in _KPACK:
        from gguf.quants import dequantize

        raw = pack(qt, name)
        return raw, float(np.abs(dequantize(raw, QTYPES[name]).reshape(qt.shape) - qt.dequantize().numpy()).max())
    f = _legacy_fields(qt, name)
    return _assemble_legacy(f, name), _legacy_error(qt, f, name)


# --------------------------------------------------------------------------------------------------------
# K-quants: codes kept, scales re-encoded as integer multiples of one fp16 super-scale (lossy)
# --------------------------------------------------------------------------------------------------------

def _fit_superscale(s: np.ndarray, lo: int, hi: int, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best fp16 D [n] and integer sc [n, k] in [lo, hi] with D*sc ~ s, minimising sum(weight*(D*sc - s)^2).

    A small search over D = max|s|/(hi - j) (the research note's "grid search" re-encoding).
    """
    amax = np.abs(s).max(-1)
    best_err = np.full(s.shape[0], np.inf)
    best_d = np.zeros(s.shape[0], np.float16)
    best_sc = np.zeros(s.shape, np.int16)
    top = max(hi, -lo)
    for j in range(min(12, top)):
        dcand = (amax / (top - j)).astype(np.float16)
        df = dcand.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(df[:, None] > 0, np.rint(s / df[:, None]), 0)
        sc = np.clip(sc, lo, hi).astype(np.int16)
        err = (weight * (df[:, None] * sc - s) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, dcand, best_d)
        best_sc = np.where(better[:, None], sc, best_sc)
    return best_d, best_sc


def _kquant_fields(qt: QuantizedTensor, name: str):
    """Codes per super-block plus fitted (D, sc) and, for min types, (Dmin, mn)."""
    info = INFO[name]
    u, d, m, z = _sub_params(qt, info.sub, QK_K)
    out, ns, sub = u.shape
    per = QK_K // sub
    u = u.reshape(out * ns // per, per, sub)
    d = d.reshape(-1, per)
    m = m.reshape(-1, per)
    sc_hi = 15 if name == "q2_k" else 63
    if info.has_min:
        if qt.spec.umax >= (1 << info.code_bits):
            raise NotRepresentable(f"{qt.spec.bits}-bit codes do not fit {name}'s {info.code_bits}-bit field")
        wq = (u.astype(np.float32) ** 2).mean(-1) + 1e-12
        D, sc = _fit_superscale(d, 1, sc_hi, wq)
        # y = D*sc*u - Dmin*mn: fit Dmin*mn to -m (sign of Dmin follows the offsets' dominant sign)
        neg = -m
        flip = np.where(neg.sum(-1) < 0, -1.0, 1.0).astype(np.float32)
        Dm, mn = _fit_superscale(neg * flip[:, None], 0, sc_hi, np.ones_like(neg))
        Dm = (Dm.astype(np.float32) * flip).astype(np.float16)
        return u.astype(np.uint8), D, sc, Dm, mn
    off = info.offset
    lo, hi = -off, (1 << info.code_bits) - 1 - off
    zz = z.reshape(-1, per) if z is not None else None
    v, sign = _signed_codes(u, zz, lo, hi, name)
    sc_lo, sc_hi = (-32, 31) if name == "q3_k" else (-128, 127)
    wq = (v.astype(np.float32) ** 2).mean(-1) + 1e-12
    D, sc = _fit_superscale(d * sign, sc_lo, sc_hi, wq)
    return v, D, sc, None, None


def _pack_q2_k(qt: QuantizedTensor) -> np.ndarray:
    u, D, sc, Dm, mn = _kquant_fields(qt, "q2_k")
    n = u.shape[0]
    q = u.reshape(n, 2, 4, 32)  # element 128c + 32j + l -> byte 32c + l, bits 2j
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    scales = (sc.astype(np.uint8) & 0x0F) | (mn.astype(np.uint8) << 4)
    return np.concatenate([scales, qs, _u8(D[:, None]), _u8(Dm[:, None])], -1)


def _pack_q3_k(qt: QuantizedTensor) -> np.ndarray:
    v, D, sc, _, _ = _kquant_fields(qt, "q3_k")
    n = v.shape[0]
    q = (v.reshape(n, QK_K) + 4).astype(np.uint8)  # 0..7: low 2 bits + "high" bit (set = no -4)
    low = (q & 3).reshape(n, 2, 4, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(n, 64)
    hb = (q >> 2).reshape(n, 8, 32)  # element 32i + l -> bit i of hmask[l]
    hmask = np.zeros((n, 32), np.uint8)
    for i in range(8):
        hmask |= hb[:, i] << i
    s6 = (sc + 32).astype(np.uint8)  # 16 x 6-bit: low nibble in byte k%8 (nibble k//8), high 2 bits in byte 8+k%4
    scales = np.zeros((n, 12), np.uint8)
    for k in range(16):
        scales[:, k % 8] |= (s6[:, k] & 0x0F) << (4 * (k // 8))
        scales[:, 8 + k % 4] |= (s6[:, k] >> 4) << (2 * (k // 4))
    return np.concatenate([hmask, qs, scales, _u8(D[:, None])], -1)


def _pack_q4_k(qt: QuantizedTensor) -> np.ndarray:
    u, D, sc, Dm, mn = _kquant_fields(qt, "q4_k")
    n = u.shape[0]
    q = u.reshape(n, 4, 2, 32)  # sub-block 2c + h, element l -> byte 32c + l, nibble h
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
    ], -1)
    return np.concatenate([_u8(D[:, None]), _u8(Dm[:, None]), scales, qs], -1)


def _pack_q6_k(qt: QuantizedTensor) -> np.ndarray:
    v, D, sc, _, _ = _kquant_fields(qt, "q6_k")
    n = v.shape[0]
    q = (v.reshape(n, QK_K) + 32).astype(np.uint8)
    lo = (q & 0x0F).reshape(n, 2, 2, 64)  # element 128c + 64h + k -> ql[64c + k], nibble h
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)    # element 128c + 32j + l -> qh[32c + l], bits 2j
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _u8(D[:, None])], -1)


_KPACK: dict[str, Callable[[QuantizedTensor], np.ndarray]] = {
    "q2_k": _pack_q2_k, "q3_k": _pack_q3_k, "q4_k": _pack_q4_k, "q6_k": _pack_q6_k,
}


def pack(qt: QuantizedTensor, name: str) -> np.ndarray:
    """uint8 [out, bytes_per_row] in the layout of block type `name`; raises NotRepresentable."""
    out, _n = qt.shape
    if name in _KPACK:
        return _KPACK[name](qt).reshape(out, -1)
    return _pack_legacy(qt, name)


# --------------------------------------------------------------------------------------------------------
# Independent code recovery (verify level a): only ggml's decoder and the documented field positions
# --------------------------------------------------------------------------------------------------------

# Per type: byte ranges (within a block) of the quant fields, each filled with a byte pattern (tiled), chosen so
# that every sub-block (the elements sharing one scale) stores the "base" code at element `base_at` and base + 1
# at element `one_at`.  One decode of such a probe gives each sub-block's intercept and slope, so
# codes = rint((y - y_base) / (y_one - y_base)) -- no header parsing here.  Where the patterns differ by element
# they follow the bit positions of ggml's layouts: Q2_K/Q3_K element 128c + 32j + l in byte 32c + l (2 bits at 2j),
# Q4_K sub-block 2c + h element l in byte 32c + l (nibble h), Q6_K element 128c + 64h + k in byte 64c + k of ql.
_PROBES: dict[str, tuple[list[tuple[int, int, bytes]], int, int]] = {
    #        ([(start, stop, pattern)], base_at, one_at)
    "q4_0": ([(2, 18, b"\x98")], 0, 16),                              # elements 0-15 in low nibbles, 16-31 high
    "q4_1": ([(4, 20, b"\x10")], 0, 16),
    "q5_0": ([(2, 6, b"\xff"), (6, 22, b"\x10")], 0, 16),             # high bits all set: codes 16 / 17
    "q5_1": ([(4, 8, b"\x00"), (8, 24, b"\x10")], 0, 16),
    "q8_0": ([(2, 34, b"\x00\x01")], 0, 1),                           # one byte per element
    "q2_k": ([(16, 80, b"\x00" * 8 + b"\x55" * 8)], 0, 8),             # l % 16 < 8: code 0, else 1, in all 4 fields
    "q3_k": ([(0, 32, b"\xff"), (32, 96, b"\x00" * 8 + b"\x55" * 8)], 0, 8),
    "q4_k": ([(16, 144, b"\x00" * 16 + b"\x11" * 16)], 0, 16),         # l < 16: code 0, else 1, both nibbles
    "q6_k": ([(0, 128, b"\x00" * 8 + b"\x11" * 8), (128, 192, b"\xaa")], 0, 8),
}


_DECODE_CHUNK_BYTES = 1 << 16  # packed bytes per slice of rows: every temporary of a slice stays in cache
NO_CODE = np.iinfo(np.int16).min  # an element whose sub-block cannot say its code (zero or non-finite slope)


def decode_with_codes(raw: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """ggml's decode (`quant.ggml.dequantize`) of a packed tensor [rows, bytes] (float32 [rows, elements]) and the
    stored integer codes it implies (int16: u for min types, +-(u - z) for the others; `NO_CODE` where a block cannot say).

    One pass over slices of rows: each slice is decoded once as stored and once as a probe while its bytes are in
    cache, so the working set is a slice, not three float64 copies of the tensor, and the results are the same
    numbers a whole-tensor pass gives (every step is element-wise per block)."""
    qtype = QTYPES[name]
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(raw).view(np.ndarray)  # a plain view of gguf-py's memmap: numpy's memmap subclass costs per slice
    rows = raw.shape[0]
    cols = raw.shape[1] // size * block
    weight = np.empty((rows, cols), np.float32)
    codes = np.empty((rows, cols), np.int16)
    step = max(1, _DECODE_CHUNK_BYTES // max(1, raw.shape[1]))
    for i in range(0, rows, step):
        _decode_slice(np.ascontiguousarray(raw[i : i + step]), name, weight[i : i + step], codes[i : i + step])
    return weight, codes


def _decode_slice(raw: np.ndarray, name: str, weight: np.ndarray, codes: np.ndarray) -> None:
    """Fill `weight` and `codes` (one slice of rows).  The probe (`_PROBES`) stores the base code and base + 1 in
    every sub-block (the elements sharing a scale), so one decode gives each sub-block's intercept and slope, and
    each element's code is rint((y - intercept) / |slope|) -- the same integer as
    rint((y - intercept) / slope) * sign(slope), since division and rint are sign-symmetric; a mirrored block
    (negative d) reads back as u - z.  float32 is enough: the decode itself rounds d*q + m to fp32 (relative
    2^-24 of |m| + |d*q|), which float64 arithmetic here could not undo either, and the two further fp32 roundings
    add as much again; the code is exact while |m| stays below ~2^20 |d| (tested at 2^12)."""
    from ...quant.ggml import dequantize

    qtype = QTYPES[name]
    size, sub = GGML_QUANT_SIZES[qtype][1], INFO[name].sub
    rows = raw.shape[0]
    fields, base_at, one_at = _PROBES[name]
    b = raw.reshape(-1, size).copy()
    for start, stop, pattern in fields:
        b[:, start:stop] = np.resize(np.frombuffer(pattern, np.uint8), stop - start)
    p = dequantize(b.reshape(rows, -1), qtype).reshape(-1, sub)
    dequantize(raw, qtype, out=weight)
    y0 = p[:, base_at : base_at + 1]
    slope = np.abs(p[:, one_at : one_at + 1] - y0)
    no_code = ~(np.isfinite(y0) & np.isfinite(slope) & (slope > 0))[:, 0]  # a sub-block that cannot say its codes
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = weight.reshape(-1, sub) - y0
        y /= slope
        np.rint(y, out=y)
    y[no_code] = NO_CODE
    np.clip(y, NO_CODE, np.iinfo(np.int16).max, out=y)  # a finite value outside int16 stays outside every code range
    codes[...] = y.reshape(codes.shape)


def expected_stored_codes(qt: QuantizedTensor, name: str) -> np.ndarray:
    """What `decode_with_codes` must read back for this tensor (int16): u (min types) or u - z (types without a
    minimum)."""
    info = INFO[name]
    u = qt.codes.numpy().astype(np.int16)
    if info.has_min or qt.zero is None:
        return u
    _out, n = qt.shape
    u -= np.repeat(qt.zero.numpy().astype(np.int16), qt.spec.group_len(n), axis=1)[:, :n]
    return u
