"""GGUF export (llama.cpp) with the trained integers intact.

Export streams the fold one tensor at a time: each `QuantizedTensor` is packed straight into a ggml block type
(`gguf_pack`), its bytes appended to a scratch file beside the output, and only the per-tensor descriptions are
kept.  A second pass hands gguf-py's `GGUFWriter` the tensor infos, the metadata, and then the bytes tensor by
tensor (`write_tensor_data`), so peak memory is one tensor however many layers the model has.  The file is
written under a temporary name and renamed only when complete.

``auto`` picks, per tensor, the smallest type that holds the codes with no re-rounding:

  float offsets (L4Q)     2/3/4-bit -> Q4_1 (d, m as fp16)   5-bit -> Q5_1   8-bit -> F32 of W_q (no 8-bit min type)
  integer / symmetric z   2/3-bit -> Q4_0    4-bit -> Q4_0 if every block's u - z fits [-8, 7] (or mirrored), else Q5_0
                          5-bit -> Q5_0 if it fits, else Q8_0           8-bit -> Q8_0 if it fits, else F32

and each tensor's decoded weights are compared with the training W_q right away: the measured max |error| is the
bound declared in the report and stored in the file (``l4q.tensor_report``) for `verify` to hold the file to.
It is 0 when the scales were trained on the fp16 grid (``--scale-grid fp16``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ...checkpoint import AtomicFile, load_checkpoint
from ...errors import FidelityError, L4QInputError
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor
from ...quant.finite import all_finite
from ...quant.kplan import FILE_TYPES as KFILE_TYPES
from ...quant.kplan import RECIPE_GRIDS, quantize_untrained, recipe_embedding_type
from ...quant.kquant import KQuantized
from ..base import ExportReport
from . import pack as P
from .vocab import MODEL_ARCH, add_hparams, add_tokenizer, gguf_arch, rope_freq_factors

NAME = "gguf"
GGUF_TYPES = ("auto", *P.LEGACY, *P.KQUANTS)
EMBED_TYPES = ("f16", "q8_0", "f32", "recipe")
REPORT_KEY = "l4q.tensor_report"

CLI_OPTIONS: list[click.Option] = [
    click.Option(["--gguf-type", "gguf_type"], type=click.Choice(GGUF_TYPES), default="auto", show_default=True,
                 help="GGUF block type for quantized linears; auto = smallest type holding the trained codes exactly. "
                      "K-quants re-encode the learned scales (lossy) and need --allow-lossy."),
    click.Option(["--embed-type", "embed_type"], type=click.Choice(EMBED_TYPES), default=None,
                 help="GGUF type of the token embeddings and output head (never quantization-aware trained). Default: "
                      "f16; for a checkpoint trained with an l4q-train --grid recipe (q4_k_m ...), 'recipe': the type "
                      "llama-quantize gives them, quantized by ggml's own reference quantizer."),
]

_AUTO_ORDER = {  # (zero-point kind, bits) -> candidate types, smallest first
    ("float", 2): ["q4_1"], ("float", 3): ["q4_1"], ("float", 4): ["q4_1"], ("float", 5): ["q5_1"], ("float", 8): [],
    ("zero", 2): ["q4_0"], ("zero", 3): ["q4_0"], ("zero", 4): ["q4_0", "q5_0"], ("zero", 5): ["q5_0", "q8_0"],
    ("zero", 8): ["q8_0"],
}
_L = gguf.LlamaFileType
FILE_TYPE = {**{n: _L[f"MOSTLY_{n.upper()}"] for n in P.LEGACY}, "q2_k": _L.MOSTLY_Q2_K, "q3_k": _L.MOSTLY_Q3_K_M,
             "q4_k": _L.MOSTLY_Q4_K_M, "q6_k": _L.MOSTLY_Q6_K}  # the file's "mostly" type (K-quants: the _M mixes)


# --------------------------------------------------------------------------------------------------------
# Names and the Q/K row permutation
# --------------------------------------------------------------------------------------------------------

def gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise L4QInputError(f"tensor {hf_name} has no GGUF equivalent for this architecture")
    return name


def qk_permutation(hf_name: str, arch: str, cfg: dict[str, Any], rows: int) -> np.ndarray | None:
    """Row order llama.cpp's LLAMA rope (interleaved pairs) expects for q/k projections; None if not needed.

    HF stores each head's rotary halves as [first half | second half]; llama.cpp's NORM rope pairs adjacent
    rows.  This moves whole output rows, so codes, scales and minima move together and nothing is re-rounded.
    Qwen2 uses NEOX rope (HF's layout) and needs none.
    """
    if arch != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        heads = int(cfg["num_attention_heads"])
    elif ".self_attn.k_proj." in hf_name:
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    else:
        return None
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def permute_quantized(qt: QuantizedTensor, idx: np.ndarray | None) -> QuantizedTensor:
    if idx is None:
        return qt
    i = torch.from_numpy(idx)
    return QuantizedTensor(name=qt.name, spec=qt.spec, codes=qt.codes[i], scale=qt.scale[i], minimum=qt.minimum[i],
                           zero=None if qt.zero is None else qt.zero[i])


def permute_kquantized(kq: KQuantized, idx: np.ndarray | None) -> KQuantized:
    """Whole rows move (codes with their super-block scales and sub-scales): nothing is re-rounded."""
    if idx is None:
        return kq
    i = torch.from_numpy(idx)
    pick = lambda t: None if t is None else t[i]  # noqa: E731
    return KQuantized(spec=kq.spec, codes=kq.codes[i], d=kq.d[i], sc=kq.sc[i], dmin=pick(kq.dmin), mn=pick(kq.mn),
                      name=kq.name)


# --------------------------------------------------------------------------------------------------------
# Per-tensor conversion
# --------------------------------------------------------------------------------------------------------

def _decode(raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


def _candidates(qt: QuantizedTensor, gguf_type: str) -> list[str]:
    """The requested type first; then (when its blocks do not tile this tensor) the exact auto ladder."""
    kind = "float" if qt.zero is None else "zero"
    auto = list(_AUTO_ORDER[(kind, qt.spec.bits)])
    return auto if gguf_type == "auto" else [gguf_type, *[a for a in auto if a != gguf_type]]


def convert_quantized(qt: QuantizedTensor, gguf_type: str) -> tuple[np.ndarray, T, dict[str, Any]]:
    """Pack one (already row-permuted) quantized tensor; returns (array, raw_dtype, report row).

    An explicit type that cannot hold the codes is refused (FidelityError); one whose blocks merely do not tile
    this tensor's shape falls back, with a warning, to the exact auto choice or to F32 of W_q.
    """
    notes = []
    for name in _candidates(qt, gguf_type):
        try:
            raw, err = P.pack_measured(qt, name)
        except P.NotRepresentable as e:
            if name == gguf_type and not e.layout:
                raise FidelityError(f"{qt.name}: {name} cannot hold the trained codes ({e}); use --gguf-type auto") from None
            notes.append(f"{name}: {e}")
            continue
        qtype = P.QTYPES[name]
        row = {"type": name.upper(), "exact": err == 0.0, "max_abs_error": err, "lossy_scales": P.INFO[name].lossy_scales,
               "rel_error": err / float(qt.scale.max())}
        if notes:
            row["warning"] = f"{qt.name}: stored as {name.upper()} ({'; '.join(notes)})"
        return raw, qtype, row
    # No block type holds this tensor: store the exact training W_q as F32 (bit-identical, 32 bits/weight).
    warning = f"{qt.name}: stored as F32 of the exact W_q ({'; '.join(notes) or 'no exact block type for this grid'})"
    return qt.dequantize().numpy(), T.F32, {"type": "F32", "exact": True, "max_abs_error": 0.0, "lossy_scales": False,
                                          "rel_error": 0.0, "warning": warning}


def convert_kquantized(kq: KQuantized, gguf_type: str) -> tuple[np.ndarray, T, dict[str, Any]]:
    """A K-grid module: its trained integers and fp16 super-scales packed as ggml's blocks (KQuantized.pack).

    The decoded file (gguf-py's dequantize) is compared with the fold right away; a difference is a bug, refused."""
    if gguf_type not in ("auto", kq.spec.name):
        raise FidelityError(f"{kq.name} was trained on the {kq.spec.name.upper()} grid; --gguf-type {gguf_type} would "
                            "re-quantize it. Use --gguf-type auto, which writes it exactly")
    raw = kq.pack()
    err = float(np.abs(_decode(raw, kq.spec.ggml_type, kq.shape) - kq.dequantize().numpy()).max())
    if err != 0.0:
        raise FidelityError(f"{kq.name}: packed {kq.spec.name.upper()} blocks decode {err:.3g} away from the fold (bug)")
    return raw, kq.spec.ggml_type, {"type": kq.spec.name.upper(), "exact": True, "max_abs_error": 0.0,
                                    "lossy_scales": False, "rel_error": 0.0, "kgrid": True}


def convert_float(gname: str, t: torch.Tensor, embed_type: str,
                  recipe_type: T | None = None) -> tuple[np.ndarray, T, dict[str, Any]]:
    """Float tensors: norms/biases F32; token embeddings and output head per --embed-type ("recipe": `recipe_type`,
    quantized by ggml's reference quantizer, i.e. the bytes llama-quantize writes without an imatrix)."""
    if t.ndim == 1 or gname not in ("token_embd.weight", "output.weight") or embed_type == "f32":
        return t.float().numpy(), T.F32, {"type": "F32", "exact": True, "max_abs_error": 0.0}
    if embed_type == "f16" and t.dtype == torch.float16 and all_finite(t):
        # fp16 -> fp32 -> fp16 is the identity on finite values, so the F16 bytes are the tensor's own (error 0)
        return t.numpy(), T.F16, {"type": "F16", "exact": True, "max_abs_error": 0.0}
    w = t.float().numpy()
    if embed_type == "recipe":
        if recipe_type is None:
            embed_type = "f16"
        else:
            raw, decoded = quantize_untrained(recipe_type, t)
            err = float(np.abs(decoded - w).max())
            return raw, recipe_type, {"type": recipe_type.name, "exact": err == 0.0, "max_abs_error": err}
    if embed_type == "q8_0" and w.shape[1] % P.QK == 0:
        raw = gguf.quants.quantize(w, T.Q8_0)  # original float weights (not trained-quantized): plain Q8_0 is fine
        err = float(np.abs(_decode(raw, T.Q8_0, w.shape) - w).max())
        return raw, T.Q8_0, {"type": "Q8_0", "exact": err == 0.0, "max_abs_error": err}
    h = w.astype(np.float16)
    err = float(np.abs(h.astype(np.float32) - w).max())
    return h, T.F16, {"type": "F16", "exact": err == 0.0, "max_abs_error": err}


def default_output(model_dir: Path) -> Path:
    return Path(model_dir).parent / f"{Path(model_dir).name}.gguf"


def resolve_output(model_dir: Path, output: Path | None) -> Path:
    if output is None:
        return default_output(model_dir)
    output = Path(output)
    if output.is_dir():
        return output / "model.gguf"
    return output


def export(model_dir: Path, output: Path | None, gguf_type: str = "auto", embed_type: str | None = None,
           allow_lossy: bool = False) -> ExportReport:
    """Write MODEL_DIR's trained model as a GGUF file; returns the report (per-tensor type and error bound)."""
    from tqdm import tqdm

    if gguf_type not in GGUF_TYPES:
        raise L4QInputError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if embed_type is not None and embed_type not in EMBED_TYPES:
        raise L4QInputError(f"--embed-type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if gguf_type in P.KQUANTS and not allow_lossy:
        raise FidelityError(f"{gguf_type} stores one fp16 scale per 256 weights times small integer sub-scales, which cannot "
                            "hold the learned group scales exactly; pass --allow-lossy to accept (the error is reported)")
    t0 = time.time()
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir, overlap_hashes=True)
    cfg = ck.model_config()
    grid = ck.config.get("grid")  # l4q-train --grid: K modules exact, legacy-type modules must land on their type
    grids = ck.config.get("module_grids") or {}
    if grid in RECIPE_GRIDS and embed_type not in (None, "recipe"):
        raise L4QInputError(f"--embed-type {embed_type}: a --grid {grid} checkpoint's embeddings and output head are "
                            "typed by the recipe (as llama-quantize types them; verify's reference holds the same)")
    if embed_type == "recipe" and grid not in RECIPE_GRIDS:
        raise L4QInputError("--embed-type recipe needs a checkpoint trained with an l4q-train --grid recipe "
                            f"({', '.join(RECIPE_GRIDS)})")
    embed_type = embed_type or ("recipe" if grid in RECIPE_GRIDS else "f16")
    arch = gguf_arch(cfg)
    out = resolve_output(model_dir, output)
    n_layers = int(cfg["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(MODEL_ARCH[arch], n_layers)
    names = ck.base().names()
    rows: list[dict[str, Any]] = []
    infos: list[tuple[str, tuple[int, ...], np.dtype, int, T]] = []
    n_vocab = None
    with AtomicFile(out) as tmp, tempfile.TemporaryFile(dir=out.parent, prefix=f".{out.name}.data-") as scratch:
        for hf_name, t in tqdm(fold_checkpoint(ck), total=len(names), desc="gguf", unit="tensor", leave=False):
            gname = gguf_name(tmap, hf_name)
            shape = tuple(t.shape)
            idx = qk_permutation(hf_name, arch, cfg, shape[0])
            if isinstance(t, KQuantized):
                arr, qtype, row = convert_kquantized(permute_kquantized(t, idx), gguf_type)
            elif isinstance(t, QuantizedTensor):
                arr, qtype, row = convert_quantized(permute_quantized(t, idx), gguf_type)
                want = grids.get(hf_name[: -len(".weight")], {}).get("ggml_type")
                if want is not None and row["type"] != want:
                    raise FidelityError(f"{hf_name} was trained on the {want} grid (--grid {grid}) but would be stored "
                                        f"as {row['type']}; use --gguf-type auto")
            else:
                if gname == "token_embd.weight":
                    n_vocab = shape[0]
                if arch == "gemma3" and hf_name.endswith("norm.weight"):
                    t = t.float() + 1.0  # Gemma3RMSNorm computes x * (1 + w) in fp32; llama.cpp stores the gain
                rtype = recipe_embedding_type(grid, gname, shape, cfg)
                arr, qtype, row = convert_float(gname, t if idx is None else t[torch.from_numpy(idx)], embed_type, rtype)
            row = {"tensor": hf_name, "gguf": gname, "shape": list(shape), "permuted": idx is not None, **row}
            rows.append(row)
            arr = np.ascontiguousarray(arr)
            _append_data(scratch, arr)
            infos.append((gname, arr.shape, arr.dtype, arr.nbytes, qtype))
            del arr, t
        if n_vocab is None:
            raise L4QInputError(f"{model_dir}: base model has no model.embed_tokens.weight")
        freqs = rope_freq_factors(cfg)
        if freqs is not None:
            _append_data(scratch, freqs)
            infos.append(("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes, None))
        tensor_report = {r["gguf"]: {"type": r["type"], "max_abs_error": r["max_abs_error"], "exact": r["exact"],
                                     **({"kgrid": True} if r.get("kgrid") else {})} for r in rows}
        w = gguf.GGUFWriter(tmp, arch)
        add_hparams(w, cfg, arch, n_vocab, model_dir.name)
        main_type = _main_type(rows)
        w.add_file_type(int(_L[KFILE_TYPES[grid]] if grid else FILE_TYPE.get(main_type.lower(), _L.ALL_F32)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok = add_tokenizer(w, ck.dir, n_vocab)
        w.add_string("l4q.quant", json.dumps(ck.spec.to_dict(), sort_keys=True))
        w.add_string("l4q.scale_grid", "fp16" if ck.fp16_grid else "fp32")
        if grid:
            w.add_string("l4q.grid", grid)
        w.add_string(REPORT_KEY, json.dumps(tensor_report, sort_keys=True))
        for gname, shape, dtype, nbytes, qtype in infos:
            w.add_tensor_info(gname, shape, dtype, nbytes, raw_dtype=qtype if dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if w.data_alignment != ALIGN:
            raise AssertionError(f"GGUF alignment {w.data_alignment} != {ALIGN}")  # the scratch data was padded to ALIGN
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())  # what write_tensor_data writes before the first tensor
        fout.flush()
        _copy_data(scratch, fout)
        w.close()
    quant_rows = [r for r in rows if r.get("lossy_scales") is not None]
    warnings = [r["warning"] for r in rows if "warning" in r]
    if arch == "phi3" and cfg.get("sliding_window"):  # llama.cpp disables Phi-3 SWA (docs/architectures.md)
        warnings.append(f"llama.cpp ignores Phi-3's sliding_window={cfg['sliding_window']}: identical to transformers "
                        "up to that many tokens, it attends further back beyond them")
    return ExportReport(
        target=NAME, artifact=str(out), n_quantized=len(quant_rows), n_exact=sum(r["exact"] for r in quant_rows),
        n_dense=sum(r["type"] == "F32" for r in quant_rows),
        max_abs_error=max((r["max_abs_error"] for r in quant_rows), default=0.0), bytes=out.stat().st_size,
        details={"arch": arch, "gguf_type": gguf_type, "main_type": main_type, "embed_type": embed_type,
                 "scale_grid": "fp16" if ck.fp16_grid else "fp32", "spec": ck.spec.to_dict(),
                 **({"grid": grid, "file_type": KFILE_TYPES[grid]} if grid else {}), "n_tensors": len(rows),
                 "tied_embeddings": "output.weight" not in tensor_report, "tokenizer": tok,
                 "seconds": round(time.time() - t0, 2)},
        warnings=warnings, layers=rows)


ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT


def _append_data(scratch: Any, arr: np.ndarray) -> None:
    """One tensor's bytes followed by the zero padding gguf-py's `write_tensor_data` puts after it, so the scratch
    file is the data section byte for byte."""
    scratch.write(memoryview(arr).cast("B"))
    pad = gguf.GGUFWriter.ggml_pad(arr.nbytes, ALIGN) - arr.nbytes
    if pad:
        scratch.write(b"\0" * pad)


def _copy_data(scratch: Any, fout: Any) -> None:
    """Append the scratch file (the data section) to `fout` in the kernel (copy_file_range), no userspace copy."""
    scratch.flush()
    n = scratch.seek(0, 2)
    src, dst = scratch.fileno(), fout.fileno()
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src, dst, n - done, done)
            if k == 0:
                break
            done += k
    except OSError:  # no copy_file_range here: copy through userspace
        pass
    if done < n:
        scratch.seek(done)
        shutil.copyfileobj(scratch, fout, 1 << 24)
        fout.flush()


def _main_type(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("lossy_scales") is not None:
            counts[r["type"]] = counts.get(r["type"], 0) + int(np.prod(r["shape"]))
    return max(counts, key=counts.__getitem__) if counts else "F32"
