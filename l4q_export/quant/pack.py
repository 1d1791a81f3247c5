"""Vectorised LSB-first bit packing for any width 1..8.

One bitstream convention serves every target: value i occupies bits [i*bits, (i+1)*bits) of the
stream, least-significant bit first, and the stream is cut into little-endian bytes.  Viewed as
little-endian int32 words this is exactly GPTQ/compressed-tensors packing (8 x 4-bit per word, and the
3-bit layout where values straddle words); viewed as bytes it is ONNX's uint4 packing.
"""

from __future__ import annotations

import numpy as np


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers along the last axis; returns uint8 [..., ceil(n*bits/8)].

    A partial final byte is zero-padded.  Values must already fit in `bits` bits.
    """
    _check(bits)
    v = np.asarray(values)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    v = v.astype(np.uint8, copy=False)
    lead, n = v.shape[:-1], v.shape[-1]
    if 8 % bits == 0:  # whole values per byte (1/2/4/8 bits): the same stream, without the [..., n, bits] bit planes
        per = 8 // bits
        if n % per:
            v = np.concatenate([v, np.zeros((*lead, per - n % per), np.uint8)], -1)
        g = v.reshape(*lead, -1, per)
        out = g[..., 0].copy()
        for j in range(1, per):
            out |= g[..., j] << np.uint8(j * bits)
        return out
    shifts = np.arange(bits, dtype=np.uint8)
    bitplanes = (v[..., None] >> shifts) & 1  # [..., n, bits]
    return np.packbits(bitplanes.reshape(*lead, n * bits), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [..., nbytes] -> uint8 [..., n]."""
    _check(bits)
    p = np.asarray(packed, dtype=np.uint8)
    lead = p.shape[:-1]
    if p.shape[-1] * 8 < n * bits:
        raise ValueError(f"{p.shape[-1]} bytes hold fewer than {n} values of {bits} bits")
    if 8 % bits == 0:  # whole values per byte: value j of a byte is (byte >> j*bits) & mask, one pass per position
        per, mask = 8 // bits, np.uint8((1 << bits) - 1)
        out = np.empty((*lead, p.shape[-1], per), np.uint8)
        for j in range(per):
            np.bitwise_and(p >> np.uint8(j * bits), mask, out=out[..., j])
        return out.reshape(*lead, -1)[..., :n]
    stream = np.unpackbits(p, axis=-1, bitorder="little")[..., : n * bits]
    planes = stream.reshape(*lead, n, bits).astype(np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes * weights).sum(-1).astype(np.uint8)


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis into little-endian int32 words (GPTQ / compressed-tensors layout).

    n*bits must be a multiple of 32 (pad the input otherwise).
    """
    n = np.asarray(values).shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} values x {bits} bits is not a whole number of int32 words")
    return np.ascontiguousarray(pack_bits(values, bits)).view("<i4")


def unpack_int32(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_int32`."""
    w = np.ascontiguousarray(np.asarray(words, dtype="<i4"))
    return unpack_bits(w.view(np.uint8), bits, n)
