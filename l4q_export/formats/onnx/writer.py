"""`--to onnx`: a full decoder with KV cache as ONNX, in two forms sharing one graph body.

    matmulnbits  com.microsoft::MatMulNBits (ONNX Runtime's 4/8-bit kernel), accuracy_level 0 by default, with
                 ORT's GroupQueryAttention + SkipSimplifiedLayerNormalization (--no-onnx-fused: decomposed)
    qdq          standard ops only: UINT4/UINT8 [K,N] + blocked DequantizeLinear(axis=0) -> MatMul,
                 which ORT fuses into MatMulNBits at ORT_ENABLE_EXTENDED and above

Output: OUT_DIR/model.onnx + model.onnx.data (opset 21, external data written tensor by tensor as the
fold streams), genai_config.json (onnxruntime-genai) and the tokenizer files.  I/O names follow
optimum/ORT-GenAI: input_ids, attention_mask, position_ids, past_key_values.N.key|value -> logits,
present.N.key|value.  See onnx_linear.py for how float offsets are kept exact, docs/onnx.md for more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx

from ...arch import ALL_LINEARS
from ...checkpoint import TOKENIZER_FILES, AtomicDir, load_checkpoint
from ...errors import L4QInputError
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor
from ..base import ExportReport, refuse_kgrid
from .graph import (
    DATA_FILE,
    DTYPES,
    DecoderGraph,
    DecoderSpec,
    ExternalData,
    GraphBuilder,
    add_rope_cache,
    gqa_rotary,
    make_model,
)
from .linear import FORMS, LinearWriter

NAME = "onnx"
MODEL_FILE = "model.onnx"
META_KEY = "l4q_export"

_LINEAR_SUFFIXES = ALL_LINEARS


def _float_role(name: str) -> str | None:
    """'matrix' for float weights the graph multiplies by (stored transposed [K,N]), 'plain' for the rest."""
    if name == "lm_head.weight":
        return "matrix"
    parts = name.split(".")
    if name in ("model.embed_tokens.weight", "model.norm.weight") or name.endswith(("_layernorm.weight", "_norm.weight")):
        return "plain"
    if len(parts) >= 2 and parts[-2] in _LINEAR_SUFFIXES:
        return "matrix" if parts[-1] == "weight" else "plain" if parts[-1] == "bias" else None
    return None


def _default_output(model_dir: Path, form: str, dtype: str) -> Path:
    return model_dir.parent / f"{model_dir.name}-onnx-{form}-{dtype}"


def genai_config(spec: DecoderSpec, cfg: dict[str, Any], fused: bool) -> dict[str, Any]:
    """The onnxruntime-genai description of this graph.

    past_present_share_buffer: GroupQueryAttention (fused graphs) writes the new keys into a max-length cache
    buffer in place, so genai can bind past and present to one buffer; the decomposed graph grows its cache by
    Concat and needs separate buffers.  Only keys onnxruntime-genai knows: its parser rejects unknown ones (our
    metadata lives in model.onnx).
    """
    eos = cfg.get("eos_token_id", 2)
    pad = cfg.get("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": eos, "pad_token_id": pad,
            "context_length": spec.max_positions, "vocab_size": spec.vocab, "type": spec.model_type,
            "decoder": {
                "filename": MODEL_FILE, "head_size": spec.head_dim, "hidden_size": spec.hidden,
                "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "num_hidden_layers": spec.layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": spec.max_positions, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": fused, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export(model_dir: Path, output: Path | None = None, onnx_form: str = "matmulnbits", dtype: str = "fp32",
           onnx_accuracy_level: int = 0, onnx_fused: bool | None = None) -> ExportReport:
    """Fold the checkpoint and write OUT_DIR/model.onnx (+ external data) atomically; returns the report.

    onnx_form may also be "dequantized" (plain fp MatMul on the exact W_q; used as the unquantized
    baseline by tools/bench_onnx.py).  onnx_fused (default: on for matmulnbits only) uses ORT's
    GroupQueryAttention and SkipSimplifiedLayerNormalization; the qdq form refuses it (standard ops only).
    """
    if onnx_form not in FORMS:
        raise L4QInputError(f"onnx_form={onnx_form!r}; choose one of {', '.join(FORMS)}")
    fused = onnx_form == "matmulnbits" if onnx_fused is None else bool(onnx_fused)
    if fused and onnx_form == "qdq":
        raise L4QInputError("--onnx-fused does not apply to --onnx-form qdq, which uses standard ONNX ops only; "
                            "use --onnx-form matmulnbits or drop --onnx-fused")
    if dtype not in DTYPES:
        raise L4QInputError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    if not 0 <= int(onnx_accuracy_level) <= 4:
        raise L4QInputError(f"onnx_accuracy_level={onnx_accuracy_level} must be in 0..4")
    model_dir = Path(model_dir)
    ck = load_checkpoint(model_dir, overlap_hashes=True)
    refuse_kgrid(ck, "onnx")
    cfg = ck.model_config()
    spec = DecoderSpec.from_config(cfg, ck.architecture)
    out = Path(output) if output is not None else _default_output(model_dir, onnx_form, dtype)
    if out.suffix == ".onnx" or out.is_file():
        raise L4QInputError(f"-o {out}: the ONNX export is a directory (model.onnx + {DATA_FILE} + genai_config.json); "
                            "pass a directory path")

    with AtomicDir(out) as tmp:
        g = GraphBuilder(dtype)
        data = ExternalData(tmp)
        writer = LinearWriter(onnx_form, dtype, data, g, int(onnx_accuracy_level))
        try:
            for name, t in fold_checkpoint(ck):
                if isinstance(t, QuantizedTensor):
                    writer.add_quantized(t)
                    del t  # its codes are in the file: not alive through the next fold (45 MB at a 7B MLP)
                    continue
                role = _float_role(name)
                if role is None:
                    raise L4QInputError(f"tensor {name} in the base model is not part of a supported decoder; "
                                        "cannot export it to ONNX")
                if spec.norm_offset and name.endswith("norm.weight"):  # Gemma 3: the (1 + w) gain, summed in fp32 as HF
                    t = t.float() + spec.norm_offset
                writer.add_float(name, t, transpose=role == "matrix")
            rope_cache = add_rope_cache(spec, g, data) if fused and gqa_rotary(spec) else None
        finally:
            data.close()
        graph = DecoderGraph(spec, g, writer, writer.floats, fused, rope_cache)
        graph.build()
        ins, outs = graph.io()
        meta = {"version": 1, "form": onnx_form, "dtype": dtype, "fused": fused, "accuracy_level": int(onnx_accuracy_level),
                "spec": ck.spec.to_dict(), "layers": {k: v.to_json() for k, v in writer.layouts.items()}}
        model = make_model(g, ins, outs, {META_KEY: json.dumps(meta)}, uses_ms=onnx_form == "matmulnbits" or fused)
        onnx.save_model(model, str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(spec, cfg, fused), indent=2) + "\n")
        # the HF config beside the graph, as optimum's exports have it: loaders and l4q-eval read the context length
        # and vocab from it (no quantization_config: this directory is not a transformers checkpoint)
        hf_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (model_dir / f).is_file():
                shutil.copyfile(model_dir / f, tmp / f)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name in (MODEL_FILE, DATA_FILE)}

    layers = [{"tensor": k, "shape": [v.n, v.k], "bits": v.bits, "container_bits": v.container_bits, "block_size": v.block_size,
               "group_len": v.group_len, "offsets": "exact group-sum term" if "offsets" in v.inits else
               ("integer zero point" if v.form != "dequantized" else "dequantized fp weight")}
              for k, v in writer.layouts.items()]
    return ExportReport(
        target=NAME, artifact=str(out / MODEL_FILE), n_quantized=len(layers), n_exact=len(layers),
        n_dense=sum(v.form == "dequantized" for v in writer.layouts.values()), max_abs_error=0.0, bytes=sum(sizes.values()),
        details={"output_dir": str(out), "form": onnx_form, "dtype": dtype, "fused": fused,
                 "accuracy_level": int(onnx_accuracy_level), "opset": 21, "files": sizes, "spec": ck.spec.to_dict()},
        layers=layers)


def model_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact / MODEL_FILE if artifact.is_dir() else artifact


def read_meta(artifact: Path) -> dict[str, Any] | None:
    """Our export metadata, or None if this is not an l4q-export ONNX model (never raises on foreign files)."""
    p = model_path(artifact)
    if p.suffix != ".onnx" or not p.is_file():
        return None
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 -- onnx raises DecodeError and others for non-ONNX files
        return None
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    return None
