"""Verify a packed-safetensors export with the real libraries, against the fold and the training model.

(a) Format level, per quantized layer: the packed fields are decoded by compressed-tensors' own code
    (`unpack_from_int32` for codes and zero points, `PackedQuantizationCompressor.decompress` for the weight;
    GPTQ's packing is the same dense LSB-first bitstream, so its qweight/qzeros go through the same unpacker
    along the GPTQ axes).  Codes, zero points and dequantized weights must equal the fold's bit for bit.
(b) Loader level: transformers `from_pretrained` decompresses the compressed-tensors model on CPU
    (`CompressedTensorsConfig(dequantize=True)`), every Linear weight is compared with the fold, and the logits
    and greedy text are compared with the PyTorch training model (fake-quant L4QLinear, fp32).  GPTQ is loaded
    by GPTQModel when it is importable; otherwise the decoded weights are put into transformers' dense model
    and the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, load_checkpoint, read_json
from ..errors import L4QInputError
from ..fold import fold_checkpoint
from ..quant import QuantizedTensor
from ..quant.gptq import decode_gptq_tensors
from ..training.methods import reference_model
from .safetensors_io import ShardReader
from .safetensors_layout import resolve_zero

PROMPT = "Once upon a time"
NEW_TOKENS = 24


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def expected_layer(qt: QuantizedTensor, rounded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer zero points, fp32 weight) the artifact must hold: the fold's, or the rounded-zero ones of a lossy export."""
    if not rounded:
        if qt.zero is None:
            raise L4QInputError(f"{qt.name}: checkpoint has float zero points but the export claims exact integer ones "
                                "(was it exported from another checkpoint?)")
        return qt.zero, qt.dequantize()
    z = resolve_zero(qt).zero
    return z, QuantizedTensor(qt.name, qt.spec, qt.codes, qt.scale, -(qt.scale * z), z).dequantize()


def decode_ct(reader: ShardReader, module: str, scheme: Any, bits: int) -> dict[str, torch.Tensor]:
    """Codes, zero points and weight of one pack-quantized Linear, decoded by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    sd = {k: reader.get(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
          if f"{module}.{k}" in reader}
    shape = torch.Size(sd["weight_shape"].tolist())
    half = 1 << (bits - 1)
    codes = unpack_from_int32(sd["weight_packed"], bits, shape).to(torch.int32) + half
    g = sd["weight_scale"].shape[1]
    if "weight_zero_point" in sd:
        zero = unpack_from_int32(sd["weight_zero_point"], bits, torch.Size([shape[0], g]), packed_dim=0).to(torch.int32) + half
    else:
        zero = torch.full((shape[0], g), half, dtype=torch.int32)
    weight = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    return {"codes": codes, "zero": zero, "weight": weight, "scale_dtype": sd["weight_scale"].dtype}


def decode_gptq(reader: ShardReader, module: str, bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """One GPTQ Linear's codes, zeros and weight: the math is `quant.gptq.decode_gptq_tensors`."""
    return decode_gptq_tensors(*(reader.get(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")), bits, v1)


def load_ct_model(artifact: Path):
    """transformers + compressed-tensors, decompressed to dense fp32 on CPU at load time."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        str(artifact), dtype=torch.float32, local_files_only=True, trust_remote_code=False,
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def load_decoded_model(ck: Checkpoint, reader: ShardReader, decoded: dict[str, torch.Tensor]):
    """transformers' dense model holding the artifact's tensors (decoded weights for packed layers)."""
    from ..training.surgery import load_base_model

    model = load_base_model(ck.base_dir, dtype=torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        for name in reader.names():
            if name in state:
                state[name].copy_(reader.get(name))
        for module, w in decoded.items():
            state[module + ".weight"].copy_(w)
    return model.eval()


def _greedy(model, ids: torch.Tensor) -> list[int]:
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def compare_models(loaded, ref, artifact: Path) -> dict[str, Any]:
    """Logits max |delta| on a prompt and greedy continuations of the loaded artifact vs the training model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(artifact), local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        la, lr = loaded(ids).logits, ref(ids).logits
        ga, gr = _greedy(loaded, ids), _greedy(ref, ids)
    return {"prompt": PROMPT, "logits_max_abs_diff": float((la - lr).abs().max()), "logits_identical": bool(torch.equal(la, lr)),
            "greedy_identical": ga == gr, "greedy_text": tok.decode(ga), "reference_text": tok.decode(gr)}


def verify_artifact(artifact: Path, model_dir: Path, **_: Any) -> dict[str, Any]:
    cfg = read_json(artifact / "config.json", "exported config.json")
    qcfg = cfg.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method not in ("compressed-tensors", "gptq"):
        raise L4QInputError(f"{artifact}/config.json has no compressed-tensors or GPTQ quantization_config")
    info_path = artifact / "l4q_export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    rounded = info.get("zero_point") == "rounded"
    ck = load_checkpoint(model_dir)
    reader = ShardReader(artifact)
    bits = ck.spec.bits
    v1 = method == "gptq" and qcfg.get("checkpoint_format", qcfg.get("format")) == "gptq"
    scheme = None
    if method == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        scheme = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]
    rows: list[dict[str, Any]] = []
    expected: dict[str, torch.Tensor] = {}
    decoded: dict[str, torch.Tensor] = {}
    floats_ok = True
    for name, t in fold_checkpoint(ck):
        if not isinstance(t, QuantizedTensor):
            floats_ok &= name in reader and _bit_equal(reader.get(name), t)
            continue
        module = name[: -len(".weight")]
        if name in reader:  # stored dense: the fold's fp32 W_q
            w = reader.get(name)
            expected[module] = t.dequantize()
            ok = _bit_equal(w, expected[module])
            rows.append({"tensor": name, "encoding": "dense", "codes_identical": ok, "zero_identical": ok,
                         "library_decode_bit_exact": ok})
            continue
        zero, want = expected_layer(t, rounded)
        dec = decode_ct(reader, module, scheme, bits) if scheme is not None else decode_gptq(reader, module, bits, v1)
        sd = dec["scale_dtype"]
        expected[module] = want
        decoded[module] = dec["weight"].float()
        rows.append({
            "tensor": name, "encoding": "packed", "scale_dtype": str(sd).removeprefix("torch."),
            "codes_identical": bool(torch.equal(dec["codes"], t.codes.to(torch.int32))),
            "zero_identical": bool(torch.equal(dec["zero"], zero.to(torch.int32))),
            # a half-precision scale makes the library compute in that dtype: compare with W rounded to it
            "library_decode_bit_exact": _bit_equal(dec["weight"], want.to(dec["weight"].dtype) if sd != torch.float32 else want),
            "max_abs_err_vs_training": float((dec["weight"].float() - t.dequantize()).abs().max()),
        })
    ref = reference_model(ck)
    if method == "compressed-tensors":
        loaded, loader = load_ct_model(artifact), "transformers+compressed-tensors (dequantize=True, CPU fp32)"
    else:
        loaded, loader = load_decoded_model(ck, reader, decoded), "transformers dense model + compressed-tensors unpacker (GPTQ)"
    params = dict(loaded.named_parameters())
    for row in rows:
        w = params.get(row["tensor"])
        row["loader_bit_exact"] = w is not None and _bit_equal(w.detach(), expected[row["tensor"][: -len(".weight")]])
    cmp = compare_models(loaded, ref, artifact)
    checks = ("codes_identical", "zero_identical", "library_decode_bit_exact", "loader_bit_exact")
    n_exact = sum(all(r[c] for c in checks) for r in rows)
    passed = bool(rows) and n_exact == len(rows) and floats_ok and cmp["greedy_identical"]
    flavor = method if method == "compressed-tensors" else ("gptq-v1" if v1 else "gptq_v2")
    max_err = max((r.get("max_abs_err_vs_training", 0.0) for r in rows), default=0.0)
    lossy_note = f" [LOSSY rounded zero points: max |dW| {max_err:.3g}]" if rounded else ""
    summary = (f"{flavor} {bits}-bit: {n_exact}/{len(rows)} layers bit-exact "
               f"(codes, zeros, library decode, {loader.split(' ')[0]} load){lossy_note}; "
               f"logits max|d| {cmp['logits_max_abs_diff']:.3g}; greedy {'identical' if cmp['greedy_identical'] else 'DIFFERS'}")
    return {"check": f"safetensors/{flavor}", "artifact": str(artifact), "loader": loader, "passed": passed, "summary": summary,
            "n_layers": len(rows), "n_bit_exact": n_exact, "float_tensors_identical": floats_ok, "lossy": rounded,
            "max_abs_err_vs_training": max_err, **cmp, "layers": rows}

