"""GGUF K-quant grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as first-class specs: decode, encode, init, block packing.

Each type's decode is reproduced exactly as ggml computes it (``dequantize_row_q4_K`` etc. in
``ggml/src/ggml-quants.c``, and ``gguf.quants``' ``dequantize_blocks``), per super-block of 256 weights:

  Q4_K / Q5_K  8 sub-blocks of 32:  w = (d*sc)*q - (dmin*mn)   sc, mn in [0, 63]   q in [0, 15] / [0, 31]
  Q2_K        16 sub-blocks of 16:  w = (d*sc)*q - (dmin*mn)   sc, mn in [0, 15]   q in [0, 3]
  Q3_K        16 sub-blocks of 16:  w = (d*sc)*q               sc in [-32, 31] (stored sc+32)   q in [-4, 3]
  Q6_K        16 sub-blocks of 16:  w = (d*sc)*q               sc in [-128, 127] (int8)         q in [-32, 31]

d and dmin are fp16 in the file, converted to fp32 first; every product is an fp32 multiply of the fp16 value by
small integers.  Why the fp32 result is bit-identical to ggml on every machine: an fp16 significand has 11 bits,
so d*sc has at most 11+8 = 19 significant bits and is exact in fp32; (d*sc)*q is exact too for every type but
Q6_K (at most 11+6+5 = 22 bits), and for Q6_K it is one correctly rounded product whichever way it is associated.
The only other rounding is the final subtraction of the (exact) dmin*mn.  So neither operation order, FMA
contraction nor SIMD width can change a bit -- the decode below is the type's value, not an approximation of it.

The canonical integer form here (:class:`KQuantized`) holds *decoded* integers: signed sub-scales for Q3_K/Q6_K
and signed codes q as the formula above uses them; :func:`pack_blocks` adds the storage offsets (sc+32, q+4,
q+32) and lays out ggml's ``block_q4_K`` etc. byte for byte.  Rows must be a multiple of 256 long (ggml's QK_K);
llama.cpp falls back to legacy types for other widths (see quant/krecipe.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import ggml

QK_K = 256


@dataclass(frozen=True)
class KQuantSpec:
    """One K-quant type: its sub-block geometry and integer ranges (all inclusive)."""

    name: str  # "q4_k", ...
    n_sub: int  # sub-blocks per 256-weight super-block
    qmin: int
    qmax: int
    sc_min: int
    sc_max: int
    mn_max: int  # 0: no per-sub-block minimum (symmetric types)
    block_bytes: int

    @property
    def sub_len(self) -> int:
        return QK_K // self.n_sub

    @property
    def has_min(self) -> bool:
        return self.mn_max > 0

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name.upper()]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse a weight whose rows are not whole super-blocks (ggml cannot store it in this type)."""
        if len(shape) != 2 or shape[1] % QK_K:
            raise ValueError(f"{self.name} needs 2-D weights with rows a multiple of {QK_K} long, got shape {tuple(shape)}")


KQUANT_SPECS: dict[str, KQuantSpec] = {
    s.name: s
    for s in (
        KQuantSpec("q2_k", 16, 0, 3, 0, 15, 15, 84),
        KQuantSpec("q3_k", 16, -4, 3, -32, 31, 0, 110),
        KQuantSpec("q4_k", 8, 0, 15, 0, 63, 63, 144),
        KQuantSpec("q5_k", 8, 0, 31, 0, 63, 63, 176),
        KQuantSpec("q6_k", 16, -32, 31, -128, 127, 0, 210),
    )
}


def kquant_spec(name: str) -> KQuantSpec:
    """Look a K-quant spec up by name ("q4_k" or "Q4_K")."""
    try:
        return KQUANT_SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown K-quant type {name!r}; choose one of {sorted(KQUANT_SPECS)}") from None


@dataclass
class KQuantized:
    """The canonical K-quantized tensor a GGUF writer consumes.

    codes [out, in] int8 (q as decoded), d / dmin [out, nb] fp32 holding fp16-representable values
    (dmin None for Q3_K/Q6_K), sc / mn [out, nb, n_sub] int16 (mn None for Q3_K/Q6_K); nb = in / 256.
    """

    spec: KQuantSpec
    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    mn: torch.Tensor | None = None
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """fp32 weights, bit-identical to ggml's dequantize_row for this type."""
        return decode(self.spec, self.d, self.sc, self.codes, self.dmin, self.mn)

    def pack(self) -> np.ndarray:
        """GGUF tensor data: uint8 [out, nb * block_bytes]."""
        return pack_blocks(self)


# ----------------------------------------------------------------------------------------------------
# decode / encode: the one formula the training forward, the fold and verify share
# ----------------------------------------------------------------------------------------------------


def sub_scales(
    d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None, mn: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sub-block fp32 (d*sc, dmin*mn), [out, nb, n_sub] -- computed first, as ggml does."""
    dl = d.float().unsqueeze(-1) * sc.float()
    ml = None if dmin is None or mn is None else dmin.float().unsqueeze(-1) * mn.float()
    return dl, ml


def _blocks(t: torch.Tensor, spec: KQuantSpec) -> torch.Tensor:
    """[out, in] -> [out, nb, n_sub, sub_len] view."""
    return t.reshape(t.shape[0], -1, spec.n_sub, spec.sub_len)


def decode_sub(spec: KQuantSpec, dl: torch.Tensor, ml: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """w = dl*q - ml in fp32 from per-sub-block scales; [out, in]."""
    q = _blocks(codes.float(), spec)
    w = dl.unsqueeze(-1) * q
    if ml is not None:
        w = w - ml.unsqueeze(-1)
    return w.reshape(codes.shape)


def decode(
    spec: KQuantSpec,
    d: torch.Tensor,
    sc: torch.Tensor,
    codes: torch.Tensor,
    dmin: torch.Tensor | None = None,
    mn: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 weights [out, in] of a K-quant tensor, exactly as ggml decodes it (see the module docstring)."""
    dl, ml = sub_scales(d, sc, dmin, mn)
    return decode_sub(spec, dl, ml, codes)


def unrounded_codes(spec: KQuantSpec, w: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor | None) -> torch.Tensor:
    """v = (w + ml)/dl per element, fp32 [out, in]; 0 where a sub-block's scale dl is 0 (its codes are moot)."""
    x = _blocks(w.float(), spec)
    if ml is not None:
        x = x + ml.unsqueeze(-1)
    dle = dl.unsqueeze(-1)
    safe = torch.where(dle == 0, torch.ones_like(dle), dle)
    v = torch.where(dle == 0, torch.zeros_like(x), x / safe)
    return v.reshape(w.shape)


def round_kcodes(spec: KQuantSpec, v: torch.Tensor) -> torch.Tensor:
    """q = round(clamp(v, qmin, qmax)) as fp32 values (round-half-to-even, clamp first as in core.round_codes)."""
    return v.clamp(spec.qmin, spec.qmax).round()


def encode(
    spec: KQuantSpec,
    w: torch.Tensor,
    d: torch.Tensor,
    sc: torch.Tensor,
    dmin: torch.Tensor | None = None,
    mn: torch.Tensor | None = None,
    name: str = "",
) -> KQuantized:
    """Codes of an fp32 weight under fixed (d, sc, dmin, mn): nearest grid point per element, packaged canonically."""
    spec.check_shape(tuple(w.shape))
    dl, ml = sub_scales(d, sc, dmin, mn)
    q = round_kcodes(spec, unrounded_codes(spec, w, dl, ml))
    return KQuantized(
        spec=spec,
        codes=q.to(torch.int8),
        d=d.float(),
        sc=sc.round().to(torch.int16),
        dmin=None if dmin is None else dmin.float(),
        mn=None if mn is None else mn.round().to(torch.int16),
        name=name,
    )


# ----------------------------------------------------------------------------------------------------
# init: round-to-nearest choice of (d, dmin, sc, mn) from a float weight
# ----------------------------------------------------------------------------------------------------


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def _int_ratio(x: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x/unit) clamped to [lo, hi]; 0 where unit is 0 (an all-zero super-block)."""
    safe = torch.where(unit == 0, torch.ones_like(unit), unit)
    return torch.where(unit == 0, torch.zeros_like(x), (x / safe).round()).clamp(lo, hi)


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, with its sign (ggml's `max` in make_q3_quants)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def init_kquant(spec: KQuantSpec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Initial (d, sc, dmin, mn) for a float weight [out, in]; d/dmin [out, nb] on the fp16 grid, sc/mn integer-valued fp32.

    Round-to-nearest, the skeleton of ggml's reference quantizers without their iterative scale search
    (make_qkx2_quants / make_q3_quants): why -- it is only the starting point QAT refines, and a closed form keeps
    init vectorized and deterministic.
      with min (Q2/Q4/Q5_K): per sub-block scale = (max - min')/qmax, m = -min' with min' = min(min, 0) (ggml keeps
        the minimum <= 0); d = max(scale)/sc_max, dmin = max(m)/mn_max (fp16); sc = round(scale/d), mn = round(m/dmin).
      symmetric (Q3/Q6_K): scale = -x*/|qmin| with x* the signed extreme (it lands on q = qmin, the longer side);
        d = -s*/|sc_min| with s* the signed extreme scale; sc = round(scale/d) clamped, as ggml does.
    """
    spec.check_shape(tuple(w.shape))
    x = _blocks(w.float(), spec)
    if spec.has_min:
        lo = x.amin(-1).clamp(max=0.0)
        hi = x.amax(-1)
        scale = (hi - lo) / spec.qmax
        m = -lo
        d = _fp16(scale.amax(-1) / spec.sc_max)
        dmin = _fp16(m.amax(-1) / spec.mn_max)
        sc = _int_ratio(scale, d.unsqueeze(-1), spec.sc_min, spec.sc_max)
        mn = _int_ratio(m, dmin.unsqueeze(-1), 0, spec.mn_max)
        return d, sc, dmin, mn
    scale = -_signed_extreme(x) / abs(spec.qmin)
    d = _fp16(-_signed_extreme(scale) / abs(spec.sc_min))
    sc = _int_ratio(scale, d.unsqueeze(-1), spec.sc_min, spec.sc_max)
    return d, sc, None, None


def rtn_kquant(spec: KQuantSpec, w: torch.Tensor, name: str = "") -> KQuantized:
    """Round-to-nearest K-quantization of a float weight (init_kquant + encode)."""
    d, sc, dmin, mn = init_kquant(spec, w)
    return encode(spec, w, d, sc, dmin, mn, name=name)


def ggml_init_kquant(
    spec: KQuantSpec, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(d, sc, dmin, mn) chosen by ggml's own reference quantizer (quantize_row_q4_K_ref etc., the code llama-quantize
    runs without an imatrix), called in llama-cpp-python's libggml-base.

    Why: encode() under these scales reproduces ggml's codes, so a layer initialised this way starts exactly at the
    bytes `llama-quantize` would write for the same weights -- QAT then starts from the peer's file, not near it.
    """
    spec.check_shape(tuple(w.shape))
    x = np.ascontiguousarray(w.detach().float().cpu().numpy())
    raw = np.zeros(x.size // QK_K * spec.block_bytes, dtype=np.uint8)
    fn = getattr(ggml.lib(), f"quantize_row_{spec.name[:2]}_K_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), raw.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    t = unpack_blocks(spec, raw, tuple(w.shape))
    f = lambda v: None if v is None else v.float().to(w.device)  # noqa: E731
    return f(t.d), f(t.sc), f(t.dmin), f(t.mn)


KINIT_METHODS = ("rtn", "ggml")


# ----------------------------------------------------------------------------------------------------
# ggml block layout (numpy, vectorized over blocks)
# ----------------------------------------------------------------------------------------------------


def _u8(t: torch.Tensor | np.ndarray, offset: int = 0) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = a.astype(np.int32) + offset
    assert a.min(initial=0) >= 0 and a.max(initial=0) <= 255, "integer out of its field's range"
    return a.astype(np.uint8)


def _f16_bytes(t: torch.Tensor, n: int) -> np.ndarray:
    a = t.detach().cpu().numpy().astype(np.float32).reshape(n)
    h = a.astype(np.float16)
    assert np.array_equal(h.astype(np.float32), a), "d/dmin must be on the fp16 grid (exact export)"
    return h.view(np.uint8).reshape(n, 2)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales: inverse of ggml's get_scale_min_k4."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_2bit_planes(u: np.ndarray) -> np.ndarray:
    """[N, 256] -> [N, 64]: element 128n + 32j + l goes to byte 32n + l, bits 2j..2j+1 (Q2_K/Q3_K qs)."""
    x = (u & 3).reshape(-1, 2, 4, 32)
    return (x[:, :, 0] | (x[:, :, 1] << 2) | (x[:, :, 2] << 4) | (x[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit_planes(qs: np.ndarray) -> np.ndarray:
    x = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (x & 3).reshape(-1, 256)


def pack_blocks(t: KQuantized) -> np.ndarray:
    """GGUF tensor data for a K-quantized tensor: uint8 [out, nb * block_bytes], ggml's block struct byte for byte."""
    spec = t.spec
    out_f, in_f = t.shape
    spec.check_shape((out_f, in_f))
    n = out_f * in_f // QK_K
    d = _f16_bytes(t.d, n)
    q = t.codes.reshape(n, QK_K)
    sc = t.sc.reshape(n, spec.n_sub)
    if spec.name in ("q4_k", "q5_k"):
        u = _u8(q)
        dmin = _f16_bytes(t.dmin, n)
        scales = _pack_scales_k4(_u8(sc), _u8(t.mn.reshape(n, spec.n_sub)))
        lo = (u & 0xF).reshape(n, 4, 2, 32)
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        if spec.name == "q4_k":
            parts = [d, dmin, scales, qs]
        else:
            hb = ((u >> 4) & 1).reshape(n, 8, 32)
            qh = np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
            parts = [d, dmin, scales, qh, qs]
    elif spec.name == "q2_k":
        mn = _u8(t.mn.reshape(n, spec.n_sub))
        parts = [_u8(sc) | (mn << 4), _pack_2bit_planes(_u8(q)), d, _f16_bytes(t.dmin, n)]
    elif spec.name == "q3_k":
        u = _u8(q, 4)
        hb = ((u >> 2) & 1).reshape(n, 8, 32)  # bit 4n + j of hmask[l] <- element 128n + 32j + l
        hmask = np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        s = _u8(sc, 32)
        scales = np.empty((n, 12), dtype=np.uint8)
        scales[:, 0:8] = (s[:, 0:8] & 0xF) | ((s[:, 8:16] & 0xF) << 4)
        h = ((s >> 4) & 3).reshape(n, 4, 4)  # [k, i]: high bits of s[4k + i] -> byte 8 + i, bits 2k
        scales[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
        parts = [hmask, _pack_2bit_planes(u), scales, d]
    else:  # q6_k
        u = _u8(q, 32).reshape(n, 2, 4, 32)  # element 128n + 32k + l
        lo, hi = u & 0xF, (u >> 4) & 3
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(n, 128)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
        scales = sc.detach().cpu().numpy().astype(np.int8).view(np.uint8)
        parts = [ql, qh, scales, d]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == spec.block_bytes
    return blocks.reshape(out_f, -1)


def unpack_blocks(spec: KQuantSpec, data: np.ndarray, shape: tuple[int, int], name: str = "") -> KQuantized:
    """Inverse of pack_blocks: read a GGUF tensor's bytes (any uint8 array of the right size) into integers.

    Why: verify compares codes in a written file with the trained ones, and tests check the layout against bytes
    produced by ggml's own quantizer (pack_blocks(unpack_blocks(b)) == b).
    """
    spec.check_shape(shape)
    out_f, in_f = shape
    n = out_f * in_f // QK_K
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, spec.block_bytes)

    def f16(col: int) -> torch.Tensor:
        return torch.from_numpy(b[:, col : col + 2].copy().view(np.float16).astype(np.float32).reshape(out_f, -1))

    dmin = mn = None
    if spec.name in ("q4_k", "q5_k"):
        d, dmin = f16(0), f16(2)
        sc, mn = _unpack_scales_k4(b[:, 4:16])
        if spec.name == "q4_k":
            qs = b[:, 16:144]
            hb = np.zeros((n, 256), dtype=np.uint8)
        else:
            qh, qs = b[:, 16:48], b[:, 48:176]
            hb = ((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, 256)
        lo = np.stack([qs.reshape(n, 4, 32) & 0xF, qs.reshape(n, 4, 32) >> 4], axis=2).reshape(n, 256)
        q = lo.astype(np.int32) | (hb.astype(np.int32) << 4)
    elif spec.name == "q2_k":
        s = b[:, 0:16]
        sc, mn = s & 0xF, s >> 4
        q = _unpack_2bit_planes(b[:, 16:80]).astype(np.int32)
        d, dmin = f16(80), f16(82)
    elif spec.name == "q3_k":
        hmask, qs, s12 = b[:, 0:32], b[:, 32:96], b[:, 96:108]
        d = f16(108)
        hb = ((hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, 256)
        q = (_unpack_2bit_planes(qs).astype(np.int32) | (hb.astype(np.int32) << 2)) - 4
        low = np.concatenate([s12[:, 0:8] & 0xF, s12[:, 0:8] >> 4], axis=1)
        high = ((s12[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3).reshape(n, 16)
        sc = (low | (high << 4)).astype(np.int32) - 32
    else:  # q6_k
        ql, qh, s = b[:, 0:128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32), b[:, 192:208]
        d = f16(208)
        lo = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
        hi = np.stack([(qh >> k) & 3 for k in (0, 2, 4, 6)], axis=2)
        q = (lo.astype(np.int32) | (hi.astype(np.int32) << 4)).reshape(n, 256) - 32
        sc = s.view(np.int8)
    return KQuantized(
        spec=spec,
        codes=torch.from_numpy(np.asarray(q, dtype=np.int8).reshape(out_f, in_f)),
        d=d,
        sc=torch.from_numpy(np.asarray(sc, dtype=np.int16).reshape(out_f, -1, spec.n_sub)),
        dmin=dmin,
        mn=None if mn is None else torch.from_numpy(np.asarray(mn, dtype=np.int16).reshape(out_f, -1, spec.n_sub)),
        name=name,
    )
