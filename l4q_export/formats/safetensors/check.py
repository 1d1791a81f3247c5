"""Reading a packed-safetensors export back with the real libraries, and safetensors' own check (the loader).

read-back, per quantized layer: the packed fields are decoded by compressed-tensors' own code
(`unpack_from_int32` for codes and zero points, then its `dequantize` for the weight, as its decompressor does; GPTQ's
packing is the same dense LSB-first bitstream, so its qweight/qzeros go through the same unpacker along the GPTQ
axes).  `verify` holds codes and zero points to the fold's (or, for a `--allow-lossy` export, to the rounded zero
points `quant.convert.rounded_zero_point` gives) and the library's weight to W_q in the artifact's dtype.
loader: the model the runtime loads (runtime.py) holds exactly those weights, parameter by parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import Checkpoint, read_json
from ...errors import L4QInputError
from ...fold import fold_checkpoint
from ...quant import QuantizedTensor
from ...quant.convert import rounded_zero_point
from ...quant.gptq import gptq_rows
from ..base import Decoded, same_bits
from .io import ShardReader

EXPORT_INFO = "l4q_export.json"


def decode_ct(reader: ShardReader, module: str, scheme: Any, bits: int) -> dict[str, torch.Tensor]:
    """Codes, zero points and weight of one pack-quantized Linear, decoded by compressed-tensors itself."""
    shape, _dtype, rows = ct_rows(reader, module, scheme, bits)
    return rows(0, shape[0])


def ct_rows(reader: ShardReader, module: str, scheme: Any, bits: int
            ) -> tuple[tuple[int, ...], torch.dtype, Callable[[int, int], dict[str, torch.Tensor]]]:
    """The weight's shape, its scale's dtype (the library decodes in it), and `decode_ct` of output rows r0:r1 (the
    same bits as those rows of the whole: every step is per row).

    The steps of `PackedQuantizationCompressor.decompress` -- `unpack_from_int32` of the zero point (where its
    strategy packs it; once, here) and of the codes, then the library's `dequantize` -- called one by one, so that
    the unpacked integers (a) checks are the very ones the weight (b) checks was decoded from, and each is unpacked
    once (the second unpack was 0.2 s of a 1.1 s decode per 11008x4096 tensor)."""
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = scheme.weights
    shape = torch.Size(reader.get(f"{module}.weight_shape").tolist())
    scale = reader.get(f"{module}.weight_scale")
    zkey = f"{module}.weight_zero_point"
    zp = reader.get(zkey) if zkey in reader else None
    if zp is not None and not args.symmetric and args.strategy in PACK_ZP_STRATS:
        zp = unpack_from_int32(zp, bits, torch.Size([shape[0], scale.shape[1]]), packed_dim=0)
    packed = reader.get(f"{module}.weight_packed")
    half = 1 << (bits - 1)

    def rows(r0: int, r1: int) -> dict[str, torch.Tensor]:
        z = None if zp is None else zp[r0:r1]
        unpacked = unpack_from_int32(packed[r0:r1], bits, torch.Size([r1 - r0, *shape[1:]]))
        weight = dequantize(x_q=unpacked, scale=scale[r0:r1], zero_point=z, args=args)
        zero = torch.full((r1 - r0, scale.shape[1]), half, dtype=torch.int16) if z is None else z.to(torch.int16) + half
        return {"codes": unpacked.to(torch.int16) + half, "zero": zero, "weight": weight, "scale_dtype": scale.dtype}

    return tuple(shape), scale.dtype, rows


def _expected(qt: QuantizedTensor, rounded: bool) -> dict[str, np.ndarray]:
    """The integers the artifact must hold for the fold's tensor: its codes and (trained or rounded) zero points."""
    if rounded:
        qt = rounded_zero_point(qt)
    if qt.zero is None:
        raise L4QInputError(f"{qt.name}: checkpoint has float zero points but the export claims exact integer ones "
                            "(was it exported from another checkpoint?)")
    return {"codes": qt.codes.to(torch.int16).numpy(), "zero": qt.zero.to(torch.int16).numpy()}


class SafetensorsArtifact:
    """`read_back` of a packed HF directory: decoded layers by HF name."""

    def __init__(self, artifact: Path) -> None:
        cfg = read_json(artifact / "config.json", "exported config.json")
        self.qcfg = cfg.get("quantization_config") or {}
        self.method = self.qcfg.get("quant_method")
        if self.method not in ("compressed-tensors", "gptq"):
            raise L4QInputError(f"{artifact}/config.json has no compressed-tensors or GPTQ quantization_config")
        info_path = artifact / EXPORT_INFO
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.rounded = self.info.get("zero_point") == "rounded"
        self.bits = int(self.info.get("spec", {}).get("bits") or self.qcfg.get("bits") or 0)
        self.v1 = self.method == "gptq" and self.qcfg.get("checkpoint_format", self.qcfg.get("format")) == "gptq"
        self.flavor = self.method if self.method == "compressed-tensors" else ("gptq-v1" if self.v1 else "gptq_v2")
        self.scheme = None
        if self.method == "compressed-tensors":
            from compressed_tensors.quantization import QuantizationConfig

            self.scheme = QuantizationConfig.model_validate(self.qcfg).config_groups["group_0"]
            self.bits = self.bits or int(self.scheme.weights.num_bits)
        self.reader = ShardReader(artifact)

    def names(self) -> Iterator[str]:
        return iter(self.reader.names())

    def get(self, name: str) -> Decoded | torch.Tensor | None:
        if name in self.reader:  # stored dense (a float tensor, or a layer this flavor cannot pack)
            return self.reader.get(name)
        module = name.removesuffix(".weight")
        packed = f"{module}.weight_packed" if self.scheme is not None else f"{module}.qweight"
        if packed not in self.reader:
            return None
        if self.scheme is not None:
            shape, scale_dtype, decode = ct_rows(self.reader, module, self.scheme, self.bits)
        else:  # the math is `quant.gptq.gptq_rows`
            qweight, qzeros, scales, g_idx = (self.reader.get(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx"))
            decode = gptq_rows(qweight, qzeros, scales, g_idx, self.bits, self.v1)
            shape, scale_dtype = (int(scales.shape[1]), int(qweight.shape[0]) * 32 // self.bits), scales.dtype

        def rows(r0: int, r1: int) -> tuple[dict[str, np.ndarray], torch.Tensor]:
            dec = decode(r0, r1)
            weight = dec["weight"] if dec["scale_dtype"] != torch.float32 else dec["weight"].float()
            return {"codes": dec["codes"].numpy(), "zero": dec["zero"].numpy()}, weight

        # a rounded zero point moves each weight by at most d/2 (quant.convert.rounded_zero_point)
        bound = 0.0 if not self.rounded else float(self._scales(module).max()) * 0.5 * (1 + 2.0 ** -10)
        return Decoded(name, {}, lambda qt: _expected(qt, self.rounded), bound=bound, rows=rows, shape=shape,
                       info={"encoding": "packed", "scale_dtype": str(scale_dtype).removeprefix("torch.")})

    def weight_dtype(self, name: str) -> torch.dtype:
        """The dtype of `get(name)`'s weight, read from the header instead of decoding: compressed-tensors decodes
        in its scale's dtype, our GPTQ decode and dense tensors are fp32."""
        key = f"{name.removesuffix('.weight')}.weight_scale"
        if self.scheme is None or name in self.reader or key not in self.reader:
            return torch.float32
        return self.reader.get(key).dtype

    def _scales(self, module: str) -> torch.Tensor:
        key = f"{module}.weight_scale" if self.scheme is not None else f"{module}.scales"
        return self.reader.get(key).float()


def loader_check(artifact: Path, ck: Checkpoint, model: Any) -> dict[str, Any]:
    """Every parameter of the loaded model is what the artifact must decode to: the fold's float tensors, W_q for
    quantized layers (in the dtype the library computes in), the rounded-zero weight for a lossy export."""
    art = SafetensorsArtifact(artifact)
    params = dict(model.named_parameters())
    bad, n = [], 0
    for name, t in fold_checkpoint(ck):
        w = params.get(name)
        if w is None:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            bad.append(name)
            continue
        n += 1
        if isinstance(t, QuantizedTensor):
            want = (rounded_zero_point(t) if art.rounded else t).dequantize()
            if (dtype := art.weight_dtype(name)) != torch.float32:
                want = want.to(dtype).float()  # the half-precision library product, widened by the loader
        else:
            want = t
        if not same_bits(w.detach().float(), want.float()):
            bad.append(name)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not embed.weight:
        bad.append("lm_head.weight (the config ties it to the embedding; the loaded model does not)")
    return {"n_parameters": n, "n_bit_exact": n - len(bad), "differing": bad[:10], "passed": not bad,
            "summary": f"{n - len(bad)}/{n} loaded parameters bit-exact"}
