"""llama.cpp's own C block codecs (ggml's ``ggml-quants.c``), called in the libggml-base llama-cpp-python ships.

Why call them rather than port them: they are the code llama.cpp itself runs (``dequantize_row_q4_1`` is the
``to_float`` of its type traits; ``quantize_row_q4_K_ref`` is what llama-quantize writes without an imatrix), so a
decode here is the runtime's reading of the bytes, not a second implementation of it -- and, being C called through
ctypes (which releases the GIL), it decodes a 4096x11008 Q4_1 weight in ~0.05 s where gguf-py's numpy port takes
~0.2 s, on a worker thread beside the fold.  Needs llama-cpp-python (the `runtime` extra), like every llama.cpp
check.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@functools.cache
def lib() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base, loaded once."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError("ggml's codecs need llama-cpp-python (pip install 'l4q-export[runtime]')") from None
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        raise RuntimeError("llama-cpp-python ships no libggml-base shared library here")
    return ctypes.CDLL(str(libs[0]))


@functools.cache
def _to_float(qtype: GGMLQuantizationType) -> ctypes._CFuncPtr:
    """ggml's ``dequantize_row_<type>(const block *x, float *y, int64_t k)``, after checking that the library's block
    geometry is gguf-py's (a libggml of another layout would decode garbage, not fail)."""
    g = lib()
    for f in (g.ggml_blck_size, g.ggml_type_size):
        f.argtypes, f.restype = [ctypes.c_int], ctypes.c_int64
    want = GGML_QUANT_SIZES[qtype]
    got = (int(g.ggml_blck_size(int(qtype))), int(g.ggml_type_size(int(qtype))))
    if got != want:
        raise RuntimeError(f"libggml's {qtype.name} blocks are {got} (elements, bytes), gguf-py's {want}")
    name = qtype.name.lower().removesuffix("_k") + ("_K" if qtype.name.endswith("_K") else "")  # q4_1, q4_K
    fn = getattr(g, f"dequantize_row_{name}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    return fn


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's float32 decode of whole blocks of `qtype` (`raw`: their bytes, any shape), into `out` when given.

    Returns [..., elements] with raw's leading dimensions (its last one holds whole blocks), as
    `gguf.quants.dequantize` does."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % size:
        raise ValueError(f"{qtype.name}: a row of {raw.shape[-1]} bytes is not whole {size}-byte blocks")
    shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"dequantize: out must be a C-contiguous float32 array of shape {shape}")
    if out.size:
        _to_float(qtype)(raw.ctypes.data, out.ctypes.data, out.size)
    return out
