"""How one quantized linear is written in each ONNX form, and how verify reads it back.

Canonical L4Q weights are ``W = u*d + m`` (float offsets) or ``W = (u - z)*d`` (integer/symmetric).
Neither DequantizeLinear nor MatMulNBits has a float offset: both compute ``(u - zp)*scale``, and
``zp = -m/d`` is not exact in floating point.  We therefore split the product exactly (in real arithmetic):

    x @ W^T = x @ (u*d)^T + sum_g (sum_{i in g} x_i) * m_g          (per output row)

The first term is an ordinary quantized matmul with zero point 0 (DequantizeLinear/MatMulNBits), the
second a [.., G] x [G, N] float MatMul on group sums of x: m is stored as-is, bit for bit, costing as
much as the scales.  Integer/symmetric checkpoints use their integer zero points directly.

Blocks: MatMulNBits and ORT's DQ->MatMulNBits fusion need power-of-two blocks >= 16, so a group of
g columns is written as blocks of the largest power of two dividing g (at most 128, the CUDA decode
limit) with the scale repeated; per-channel uses blocks of 128 (32 for K < 128) the same way.  K that
is not a multiple of the block is zero-padded (MatMulNBits) or left as a partial last block (DQ).
2/3-bit codes live in a 4-bit container, 5-bit in an 8-bit one, with explicit zero points (exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ...errors import FidelityError, L4QInputError
from ...quant import QuantizedTensor, pack_bits, unpack_bits
from .graph import MS_DOMAIN, ExternalData, GraphBuilder

FORMS = ("matmulnbits", "qdq", "dequantized")
MAX_BLOCK = 128


def container_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def choose_block(group_len: int, k: int, per_channel: bool) -> int | None:
    """Largest power of two <= 128 dividing the group (>= 16), or None if there is none."""
    if per_channel:
        return MAX_BLOCK if k >= MAX_BLOCK else 32
    b = group_len & -group_len  # largest power of two dividing group_len
    b = min(b, MAX_BLOCK)
    return b if b >= 16 else None


@dataclass
class LinearLayout:
    """Where one quantized linear's data lives in the graph (recorded in the model metadata for verify)."""

    form: str
    bits: int
    container_bits: int
    block_size: int
    group_len: int
    k: int
    n: int
    inits: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def exact_cast(name: str, what: str, t: torch.Tensor, np_dtype: Any) -> np.ndarray:
    """fp32 -> graph dtype, refusing if any value would change (fp16 graphs need fp16-grid scales)."""
    a = t.detach().float().numpy()
    c = a.astype(np_dtype)
    if not np.array_equal(c.astype(np.float32).view(np.int32), a.view(np.int32)):
        bad = int((c.astype(np.float32) != a).sum())
        raise FidelityError(f"{name}: {bad} {what} values are not representable in {np.dtype(np_dtype).name}; "
                            "train with --scale-grid fp16 or export with --dtype fp32")
    return c


# Bytes of fp32 per chunk of a streamed float initializer: large enough that a chunk of the transposed lm_head
# reads whole cache lines of each source row, small next to the 500 MB an fp32 7B embedding or head would take whole.
FLOAT_CHUNK_BYTES = 8 << 20


def float_chunks(t: torch.Tensor, np_dtype: Any, chunk_bytes: int = FLOAT_CHUNK_BYTES) -> Iterator[np.ndarray]:
    """`t.float().numpy().astype(np_dtype)` (t may be a transposed view) as consecutive row chunks of its row-major
    bytes, each widened (exactly: fp16/bf16 -> fp32) into one reused fp32 buffer: the ONNX graph's fp32 copy of a
    7B embedding or transposed lm_head never exists whole.  A chunk is valid until the next is asked for.

    A transposed view's chunk is first gathered as its contiguous source columns and transposed from there: a
    chunk of the 7B head read straight from the strided view cost twice the whole-array `.T.contiguous()`
    (measured 2.0 s vs 1.1 s CPU), gathered first 0.7 s."""
    m = t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)
    rows, cols = m.shape
    step = max(1, chunk_bytes // max(1, cols * 4))
    buf = torch.empty(min(step, rows), cols, dtype=torch.float32)
    gather = not m.is_contiguous()
    for r0 in range(0, rows, step):
        blk = buf[: min(step, rows - r0)]
        src = m[r0 : r0 + blk.shape[0]]
        blk.copy_(src.T.contiguous().T if gather else src)
        yield blk.numpy().astype(np_dtype, copy=False)


def block_params(p: torch.Tensor, group_len: int, block: int, k: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, ceil(K/block)] per-block values (block divides the group)."""
    kb = -(-k // block)
    idx = torch.arange(kb) * block // group_len
    return p[:, idx]


def transposed(a: np.ndarray) -> np.ndarray:
    """`a.T` as a C-contiguous copy, by torch's cache-blocked transpose: numpy's strided copy took 0.29 s for an
    11008 x 4096 uint8 code matrix, torch 0.05 s (the QDQ export's main thread spent 4.7 s of 14 there)."""
    return torch.from_numpy(np.ascontiguousarray(a)).T.contiguous().numpy()


class LinearWriter:
    """Writes the initializers of each linear as the fold streams it, then emits its nodes on demand."""

    def __init__(self, form: str, dtype: str, data: ExternalData, g: GraphBuilder, accuracy_level: int = 0) -> None:
        self.form, self.dtype, self.data, self.g, self.accuracy_level = form, dtype, data, g, accuracy_level
        self.layouts: dict[str, LinearLayout] = {}
        self.floats: dict[str, str] = {}  # HF name -> initializer name (float tensors, incl. transposed float linears)
        self._xsum: dict[tuple[str, int], str] = {}

    # ---------------- initializers (called once per tensor, in fold order) ----------------

    def add_float(self, name: str, t: torch.Tensor, transpose: bool = False) -> None:
        a = t.detach().T if transpose else t.detach()
        chunks = float_chunks(a, self.g.np_dtype)
        self.floats[name] = self.g.add_initializer(self.data.stream(name, tuple(a.shape), self.g.np_dtype, chunks))

    def add_quantized(self, qt: QuantizedTensor) -> LinearLayout:
        n, k = qt.shape
        spec = qt.spec
        g_len = spec.group_len(k)
        cb = container_bits(spec.bits)
        npd = self.g.np_dtype
        base = qt.name.removesuffix(".weight")
        inits: dict[str, str] = {}

        def put(suffix: str, arr: np.ndarray) -> None:
            inits[suffix] = self.g.add_initializer(self.data.tensor(f"{base}.{suffix}", arr))

        if self.form == "dequantized":
            put("weight_t", exact_cast(qt.name, "dequantized weight", qt.dequantize().T.contiguous(), npd))
            layout = LinearLayout(self.form, spec.bits, 32, 0, g_len, k, n, inits)
            self.layouts[qt.name] = layout
            return layout
        block = choose_block(g_len, k, spec.group_size == -1)
        if block is None:
            if self.form == "matmulnbits":
                raise FidelityError(f"{qt.name}: group size {g_len} has no power-of-two block >= 16 dividing it, which "
                                    "MatMulNBits needs; export with --onnx-form qdq")
            block = g_len  # valid blocked DequantizeLinear; ORT just will not fuse it
        scales = exact_cast(qt.name, "scale", block_params(qt.scale, g_len, block, k), npd)
        zeros = torch.zeros_like(qt.scale) if qt.zero is None else qt.zero
        zp = block_params(zeros, g_len, block, k).round().to(torch.uint8).numpy()
        codes = qt.codes.numpy()
        if self.form == "matmulnbits":
            kb = scales.shape[1]
            padded = np.zeros((n, kb * block), np.uint8)
            padded[:, :k] = codes
            put("qweight", pack_bits(padded.reshape(n, kb, block), cb))
            put("scales", scales)
            put("zero_points", pack_bits(zp, cb))
        else:
            qtype = ml_dtypes.uint4 if cb == 4 else np.uint8
            put("qweight", transposed(codes).astype(qtype))
            put("scales", transposed(scales))
            put("zero_points", transposed(zp).astype(qtype))
        if qt.zero is None:  # float offsets: the exact group-sum term
            put("offsets", transposed(exact_cast(qt.name, "offset", qt.minimum, npd)))
        layout = LinearLayout(self.form, spec.bits, cb, block, g_len, k, n, inits)
        self.layouts[qt.name] = layout
        return layout

    # ---------------- nodes (called by DecoderGraph while it builds) ----------------

    def group_sums(self, x: str, group_len: int, k: int) -> str:
        """[B,S,K] -> [B,S,G]: sum of x over each group (zero-padded last group); shared by linears on x."""
        key = (x, group_len)
        if key not in self._xsum:
            g = self.g
            pad = (-k) % group_len
            xp = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, pad])], "offset") if pad else x
            grouped = g.op("Reshape", [xp, g.const([0, 0, (k + pad) // group_len, group_len])], "offset")
            self._xsum[key] = g.op("ReduceSum", [grouped, g.const([-1])], "offset", keepdims=0)
        return self._xsum[key]

    def __call__(self, g: GraphBuilder, x: str, module: str, n_out: int) -> str:
        name = module + ".weight"
        hint = module.removeprefix("model.")
        layout = self.layouts.get(name)
        if layout is None:  # a float linear the checkpoint did not quantize
            if name not in self.floats:
                raise L4QInputError(f"tensor {name} is missing from the checkpoint's base model")
            y = g.op("MatMul", [x, self.floats[name]], hint)
        else:
            y = self._quantized(g, x, layout, hint)
        bias = self.floats.get(module + ".bias")
        return g.op("Add", [y, bias], hint) if bias else y

    def _quantized(self, g: GraphBuilder, x: str, L: LinearLayout, hint: str) -> str:
        i = L.inits
        if L.form == "dequantized":
            return g.op("MatMul", [x, i["weight_t"]], hint)
        if L.form == "matmulnbits":
            y = g.op("MatMulNBits", [x, i["qweight"], i["scales"], i["zero_points"]], hint, domain=MS_DOMAIN,
                     K=L.k, N=L.n, bits=L.container_bits, block_size=L.block_size, accuracy_level=self.accuracy_level)
        else:
            w = g.op("DequantizeLinear", [i["qweight"], i["scales"], i["zero_points"]], hint, axis=0, block_size=L.block_size)
            y = g.op("MatMul", [x, w], hint)
        if "offsets" in i:
            y = g.op("Add", [y, g.op("MatMul", [self.group_sums(x, L.group_len, L.k), i["offsets"]], hint)], hint)
        return y


# ---------------- read-back for verify (a) ----------------

def read_back(layout: dict[str, Any], get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the stored initializers of one linear into canonical [N, ...] arrays.

    Returns codes [N,K] uint8, pad_nonzero (count of non-zero padding codes), scale_blocks [N,kb] fp32,
    zero_blocks [N,kb] uint8, and (float offsets) minimum [N,G] fp32 -- or weight [N,K] for the
    dequantized form.
    """
    inits, n, k = layout["inits"], layout["n"], layout["k"]
    if layout["form"] == "dequantized":
        return {"weight": get(inits["weight_t"]).astype(np.float32).T}
    cb, block = layout["container_bits"], layout["block_size"]
    out: dict[str, np.ndarray] = {}
    if layout["form"] == "matmulnbits":
        qw = get(inits["qweight"])
        kb = qw.shape[1]
        full = unpack_bits(qw.reshape(n, -1), cb, kb * block)
        out["codes"], out["pad_nonzero"] = full[:, :k], np.array(int(np.count_nonzero(full[:, k:])))
        out["scale_blocks"] = get(inits["scales"]).astype(np.float32)
        out["zero_blocks"] = unpack_bits(get(inits["zero_points"]), cb, kb)
    else:
        out["codes"] = get(inits["qweight"]).astype(np.uint8).T
        out["pad_nonzero"] = np.array(0)
        out["scale_blocks"] = get(inits["scales"]).astype(np.float32).T
        out["zero_blocks"] = get(inits["zero_points"]).astype(np.uint8).T
    if "offsets" in inits:
        out["minimum"] = get(inits["offsets"]).astype(np.float32).T
    return out


def expected_fields(qt: QuantizedTensor, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """What `read_back` must return for the fold's tensor: its codes, per-block scales and zero points, offsets."""
    if layout["form"] == "dequantized":
        return {}
    g_len, block, k = layout["group_len"], layout["block_size"], layout["k"]
    zero = torch.zeros_like(qt.scale) if qt.zero is None else qt.zero
    out = {"codes": qt.codes.numpy(), "pad_nonzero": np.array(0),
           "scale_blocks": block_params(qt.scale, g_len, block, k).float().numpy(),
           "zero_blocks": block_params(zero, g_len, block, k).round().to(torch.uint8).numpy()}
    if qt.zero is None:
        out["minimum"] = qt.minimum.float().numpy()
    return out
