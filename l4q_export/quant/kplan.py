"""`l4q-train --grid`: which grid each quantized linear trains on, decided once, before training.

A grid is either one K-quant type for every linear (``q2_k`` .. ``q6_k``) or one of llama.cpp's K file-type
recipes (``q2_k_m`` = llama-quantize's ``Q2_K``, ``q3_k_m``, ``q4_k_s``, ``q4_k_m``, ``q5_k_m``), typed per tensor
by `krecipe.recipe` exactly as llama-quantize would type it.  Why decide at train time: the GGUF can then hold
what was trained, bit for bit, instead of re-quantizing it.

Each module gets a *module grid*:
  * a `KQuantSpec` (trained by `KQuantLinear`), when its ggml type is a K-quant;
  * the uniform `QuantSpec` that is exactly a legacy ggml type (trained by `L4QLinear` on the fp16 scale grid),
    where the recipe or llama.cpp's shape fallback (rows not a multiple of 256) gives Q4_0 / Q5_0 / Q5_1 / Q8_0.
Anything else (F16 for rows not a multiple of 32) is refused: there is no trainable exact form of it here.
The checkpoint (format version 2) stores one entry per module (`grid_to_dict`).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..arch import ARCHS
from ..errors import L4QInputError
from .kquant import KQUANT_SPECS, KQuantSpec, encode, ggml_init_kquant, kquant_spec
from .krecipe import ArchInfo, fallback, recipe
from .spec import QuantSpec

UNIFORM_GRIDS = tuple(KQUANT_SPECS)  # q2_k, q3_k, q4_k, q5_k, q6_k
RECIPE_GRIDS = {"q2_k_m": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M"}
GRIDS = (*UNIFORM_GRIDS, *RECIPE_GRIDS)

# general.file_type of the GGUF: the recipe's own; a uniform grid is closest to llama.cpp's "_S" (or only) mix.
FILE_TYPES = {"q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S",
              "q6_k": "MOSTLY_Q6_K", "q2_k_m": "MOSTLY_Q2_K", "q3_k_m": "MOSTLY_Q3_K_M", "q4_k_s": "MOSTLY_Q4_K_S",
              "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M"}

# Legacy ggml types as uniform specs whose decode is the type's, bit for bit, on the fp16 scale grid:
# Q4_0 / Q5_0 / Q8_0 are d*(q - 2^(b-1)) (symmetric), Q5_1 is d*q + m (L4Q's float offset).
LEGACY_SPECS: dict[T, QuantSpec] = {
    T.Q4_0: QuantSpec(4, 32, "symmetric"),
    T.Q5_0: QuantSpec(5, 32, "symmetric"),
    T.Q5_1: QuantSpec(5, 32, "float"),
    T.Q8_0: QuantSpec(8, 32, "symmetric"),
}

ModuleGrid = KQuantSpec | QuantSpec


def check_grid(grid: str) -> str:
    g = grid.lower()
    if g not in GRIDS:
        raise L4QInputError(f"--grid {grid!r} is not one of {', '.join(GRIDS)}")
    return g


def arch_info(cfg: dict[str, Any]) -> ArchInfo:
    """The model facts llama.cpp's recipe depends on, from an HF config.json."""
    heads = int(cfg["num_attention_heads"])
    return ArchInfo(n_head=heads, n_head_kv=int(cfg.get("num_key_value_heads") or heads),
                    tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), arch=_gguf_arch(cfg))


def _gguf_arch(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHS:
        raise L4QInputError(f"--grid: unsupported architecture {archs!r}")
    return ARCHS[archs[0]].gguf


def gguf_tensor_name(hf_name: str, cfg: dict[str, Any]) -> str:
    """The llama.cpp tensor name of an HF tensor (what the recipe is keyed on)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_gguf_arch(cfg).upper()], int(cfg["num_hidden_layers"]))
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise L4QInputError(f"--grid: tensor {hf_name} has no llama.cpp name")
    return name


def tensor_type(grid: str, gguf_name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> T | None:
    """The ggml type the GGUF gives this tensor under `grid` (None: kept as float, e.g. norms)."""
    g = check_grid(grid)
    if g in RECIPE_GRIDS:
        return recipe(RECIPE_GRIDS[g], gguf_name, shape, int(cfg["num_hidden_layers"]), arch_info(cfg))
    if len(shape) < 2:
        return None
    return fallback(T[g.upper()], int(shape[-1]))


def module_grid(grid: str, hf_module: str, shape: tuple[int, int], cfg: dict[str, Any]) -> ModuleGrid:
    """The spec one quantized linear trains on under `grid` (refuses types with no trainable exact form)."""
    t = tensor_type(grid, gguf_tensor_name(hf_module + ".weight", cfg), shape, cfg)
    if t is not None and t.name.lower() in KQUANT_SPECS:
        return kquant_spec(t.name)
    if t in LEGACY_SPECS:
        return LEGACY_SPECS[t]
    raise L4QInputError(f"--grid {grid}: {hf_module}.weight {list(shape)} would be stored as "
                        f"{'float' if t is None else t.name}, which has no exact trainable grid here "
                        "(rows must be a multiple of 32)")


def grid_to_dict(g: ModuleGrid) -> dict[str, Any]:
    if isinstance(g, KQuantSpec):
        return {"grid": "kquant", "type": g.name}
    ggml = next(t for t, s in LEGACY_SPECS.items() if s == g)
    return {"grid": "uniform", "ggml_type": ggml.name, **g.to_dict()}


def grid_from_dict(d: Any, where: str) -> ModuleGrid:
    """One l4q_config.json module_grids entry; one clear line for a malformed one."""
    try:
        if d["grid"] == "kquant":
            return kquant_spec(d["type"])
        if d["grid"] == "uniform":
            spec = QuantSpec.from_dict(d)
            if LEGACY_SPECS.get(T[d["ggml_type"]]) != spec:
                raise ValueError(f"{d['ggml_type']} is not {spec}")
            return spec
        raise ValueError(f"grid {d['grid']!r} is neither kquant nor uniform")
    except (KeyError, TypeError, ValueError, L4QInputError) as e:
        raise L4QInputError(f"{where}: invalid module grid {d!r} ({e})") from None



def quantize_untrained(t: T, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes, decoded fp32) of a tensor the recipe quantizes but training never touched (token embeddings,
    output head): ggml's own reference quantizer for K types (kquant.ggml_init_kquant, the bytes llama-quantize
    writes without an imatrix), gguf-py's for Q8_0 (a port of ggml's), so the file and verify's runtime reference
    hold the same weights."""
    w = w.detach().float().cpu()
    if t.name.lower() in KQUANT_SPECS:
        spec = kquant_spec(t.name)
        raw = encode(spec, w, *ggml_init_kquant(spec, w)).pack()
    elif t == T.Q8_0:
        raw = gguf.quants.quantize(w.numpy(), T.Q8_0)
    else:
        raise ValueError(f"quantize_untrained: {t.name} is not a type a K recipe gives embeddings")
    return raw, gguf.quants.dequantize(raw, t).reshape(tuple(w.shape)).astype(np.float32)


def recipe_embedding_type(grid: str | None, gguf_name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> T | None:
    """The recipe's type for token_embd / output (None: not a recipe checkpoint, or kept as float)."""
    if grid not in RECIPE_GRIDS:
        return None
    t = tensor_type(grid, gguf_name, shape, cfg)
    return t if t is not None and (t.name.lower() in KQUANT_SPECS or t == T.Q8_0) else None
