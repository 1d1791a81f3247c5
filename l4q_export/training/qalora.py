"""QA-LoRA (Xu et al., ICLR 2024): a frozen group-quantized base plus a group-pooled LoRA that folds into
*float* zero points (algorithms.md §2).

Choices (each one is what `docs/methods.md` lists):
- Base: RTN min/max with integer zero points (`quant.init_params(W0, integer spec, "minmax")`), frozen.
  Codes `u = round(clamp(W0/d + z))`, scales `d` and zeros `z` never train (no STE anywhere).
  `--zero-point symmetric` gives z = 2^(bits-1) instead.
- GPTQ base (`--qalora-base GPTQ_DIR`, `GPTQBase`): codes u, integer zeros z and fp16 scales d are read from the
  GPTQ checkpoint (decoded by `quant.gptq`, the decoder the packed-safetensors verifier uses; v1 "z - 1" undone there) and the
  base is then the same float-minimum form, m = -d*z.  Refused: act-order (pooling groups must be the
  quantization groups), bits/group-size differing from --bits/--group-size, layers the GPTQ dir does not
  quantize, shapes differing from --model, pickle-only weights.  The codes are stored bit-packed in the adapter
  (`<module>.base_codes`) so the fold never needs the GPTQ dir and never re-derives them from W0.
- Pooling: the official repo's *mean* over each contiguous input group (`nn.AvgPool1d(g)`); a partial last
  group is averaged over the columns it really has.  A: [r, G] (Xavier-uniform, as the repo), B: [out, r] = 0.
- Merge (§2.2): the adapter adds alpha*(B@A)[j, k]/len_k to every weight of group k of row j, a constant per
  (row, group), so it folds into the float minimum  m' = -d*z + alpha*(B@A)/len  (fp32; fp16 only with
  --scale-grid fp16, snapped with an exact straight-through estimator).  The checkpoint's spec is therefore
  zero_point="float": W = u*d + m'.

Exactness by construction: the training forward does not compute `x@W^T + alpha*B@A@pool(x)` (equal only in
real arithmetic); it computes m' with `quant.grids.qalora_minimum` -- the function the fold calls -- then
`W = dequantize_codes(u, (d, m'))`, then `y = x @ W^T`.  Fold and forward therefore run the same ops on the
same fp32 inputs, and `QuantizedTensor.dequantize()` equals the weight the model trained with, bit for bit.
The price is one dense [out, in] weight per forward (no memory-optimised backward as for L4Q).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import BaseWeights
from ..errors import L4QInputError
from ..quant import GroupParams, QuantizedTensor, QuantSpec, dequantize_codes, pack_bits, unpack_bits
from ..quant.gptq import decode_gptq_tensors
from ..quant.grids import float_spec, group_lengths, qalora_minimum, rtn_integer_codes, rtn_integer_params
from .layer import MethodLinear, adopt_frozen_base, detached_state, lora_init


class _GPTQReader(BaseWeights):
    """Lazy safetensors reader (the base-model one) that supplies the trivial `g_idx` (k // g) GPTQ files may
    omit when desc_act is off."""

    def __init__(self, model_dir: Path, bits: int, group_size: int) -> None:
        super().__init__(model_dir)
        self.bits, self.group_size = bits, group_size

    def get(self, name: str) -> torch.Tensor:
        if name.endswith(".g_idx") and name not in self:
            k = super().get(name[: -len("g_idx")] + "qweight").shape[0] * 32 // self.bits
            g = k if self.group_size == -1 else self.group_size
            return torch.arange(k, dtype=torch.int32) // g
        return super().get(name)


def _gptq_config(path: Path) -> dict[str, Any]:
    """quantize_config.json, else config.json's quantization_config (both are what GPTQ loaders read)."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        f = path / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise L4QInputError(f"--qalora-base: {f} is not valid JSON: {e}") from None
            cfg = cfg.get(key) if key else cfg
            if cfg:
                return cfg
    raise L4QInputError(f"--qalora-base: {path} has no quantize_config.json or config.json quantization_config; "
                        "it is not a GPTQ checkpoint")


class GPTQBase:
    """A frozen QA-LoRA base read lazily (safetensors.safe_open, never pickle) from an HF GPTQ directory."""

    def __init__(self, path: str | Path, spec: QuantSpec) -> None:
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise L4QInputError(f"--qalora-base: GPTQ directory {self.dir} not found")
        if not any(self.dir.glob("*.safetensors")) and (any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt"))):
            raise L4QInputError(f"--qalora-base: {self.dir} holds only pickle weights (*.bin/*.pt), which l4q never "
                                "unpickles; convert the GPTQ checkpoint to safetensors")
        cfg = _gptq_config(self.dir)
        if cfg.get("quant_method", "gptq") != "gptq":
            raise L4QInputError(f"--qalora-base: {self.dir} is quant_method {cfg.get('quant_method')!r}, not gptq")
        if cfg.get("desc_act") or cfg.get("act_order"):
            raise L4QInputError(f"--qalora-base: {self.dir} uses act-order (desc_act=true): its permuted g_idx groups are "
                                "not contiguous, and QA-LoRA's pooling groups must equal the quantization groups; "
                                "use a GPTQ checkpoint quantized with desc_act=false")
        self.bits, self.group_size = int(cfg.get("bits") or -1), int(cfg.get("group_size") or 0)
        if (self.bits, self.group_size) != (spec.bits, spec.group_size):
            raise L4QInputError(f"--qalora-base: {self.dir} is {self.bits}-bit group {self.group_size}, but training asks "
                                f"--bits {spec.bits} --group-size {spec.group_size}; pass the GPTQ checkpoint's values")
        self.format = str(cfg.get("checkpoint_format", cfg.get("format", "gptq")))
        if self.format not in ("gptq", "gptq_v2"):
            raise L4QInputError(f"--qalora-base: checkpoint_format {self.format!r} is not gptq or gptq_v2")
        self.sym = bool(cfg.get("sym", False))
        self.spec = spec
        self.reader = _GPTQReader(self.dir, self.bits, self.group_size)

    def record(self) -> dict[str, Any]:
        """What l4q_config.json keeps about the base (provenance; the codes themselves are in the adapter)."""
        return {"path": str(self.dir.resolve()), "checkpoint_format": self.format, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym}

    def layer(self, module: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, in], scale d fp32 [out, G], integer zero z fp32 [out, G]) of one Linear."""
        where = f"--qalora-base {self.dir}: {module}"
        if f"{module}.qweight" not in self.reader:
            raise L4QInputError(f"{where} is not GPTQ-quantized there (no .qweight); QA-LoRA needs every target layer "
                                "in the GPTQ base (no RTN fallback)")
        out, k = shape
        n_groups = self.spec.n_groups(k)
        qw, qz, sc = (self.reader.get(f"{module}.{s}") for s in ("qweight", "qzeros", "scales"))
        want = {"qweight": (k * self.bits // 32, out), "qzeros": (n_groups, out * self.bits // 32), "scales": (n_groups, out)}
        got = {"qweight": tuple(qw.shape), "qzeros": tuple(qz.shape), "scales": tuple(sc.shape)}
        if (k * self.bits) % 32 or (out * self.bits) % 32 or got != want:
            raise L4QInputError(f"{where} shapes {got} do not fit --model's [{out}, {k}] weight at {self.bits} bits "
                                f"(expected {want}); is it a GPTQ checkpoint of this model?")
        g_idx = self.reader.get(f"{module}.g_idx").long()
        if not torch.equal(g_idx, torch.arange(k) // self.spec.group_len(k)):
            raise L4QInputError(f"{where} has a permuted g_idx (act-order): QA-LoRA's pooling needs contiguous groups")
        dec = decode_gptq_tensors(qw, qz, sc, g_idx, self.bits, self.format == "gptq")
        z = dec["zero"]
        if bool((z < 0).any() or (z > self.spec.umax).any()):
            raise L4QInputError(f"{where}: decoded zero points leave [0, {self.spec.umax}] (a GPTQ-v1 file whose zero 0 "
                                "was stored as -1 and borrowed into its neighbours); re-save it as gptq_v2")
        d = sc.float().T.contiguous()
        if not bool(torch.isfinite(d).all() and (d > 0).all()):
            raise L4QInputError(f"{where}.scales has non-finite or non-positive scales")
        return dec["codes"].to(torch.uint8).contiguous(), d, z.float().contiguous()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, in] codes -> LSB-first bitstream bytes [out, ceil(in*bits/8)] (the adapter's `base_codes`)."""
    return torch.from_numpy(pack_bits(codes.cpu().numpy(), bits).copy())


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(unpack_bits(packed.cpu().numpy(), bits, in_features)))


class QALoRALinear(MethodLinear):
    """Frozen RTN base + group-pooled LoRA, trained through the exact merged weight."""

    def __init__(self, base: nn.Linear, spec: QuantSpec, rank: int, lora_alpha: float, fp16_grid: bool = False,
                 generator: torch.Generator | None = None,
                 frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """`frozen` = (codes, d, z) of an external (GPTQ) base; None: the RTN min/max base of W0."""
        super().__init__()
        if rank < 1:
            raise ValueError("QA-LoRA needs rank >= 1")
        adopt_frozen_base(self, base)
        self.spec = float_spec(spec)
        self.rank, self.lora_alpha, self.lora_scale, self.fp16_grid = rank, lora_alpha, lora_alpha / rank, fp16_grid
        dev = self.weight.device
        self.external_base = frozen is not None
        with torch.no_grad():
            codes, d, z = frozen if frozen is not None else (None, *rtn_integer_params(self.weight, spec, fp16_grid))
            codes = codes if codes is not None else rtn_integer_codes(self.weight, d, z, spec)
        self.register_buffer("scale", d.to(dev))
        self.register_buffer("zero", z.to(dev))
        self.register_buffer("codes", codes.to(dev))
        self.register_buffer("lens", group_lengths(spec, self.in_features).to(dev))
        n_groups = spec.n_groups(self.in_features)
        xavier = math.sqrt(6.0 / (n_groups + rank))  # xavier_uniform_ on the [r, G] lora_A, as the official repo
        self.lora_A, self.lora_B = lora_init(rank, n_groups, self.out_features, generator, dev, xavier)

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Adopt saved (scale, zero, lora_A, lora_B); the base codes are the stored ones (GPTQ base) or re-derived."""
        with torch.no_grad():
            for k in ("scale", "zero", "lora_A", "lora_B"):
                getattr(self, k).copy_(t[k])
            self.external_base = "base_codes" in t
            self.codes.copy_(stored_or_rtn_codes(self.weight, self.spec, t))

    def minimum(self) -> torch.Tensor:
        return qalora_minimum(self.scale, self.zero, self.lora_A, self.lora_B, self.lora_scale, self.lens, self.fp16_grid)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_codes(self.codes, GroupParams(scale=self.scale, minimum=self.minimum()), self.spec)

    @torch.no_grad()
    def quantized(self, name: str = "") -> QuantizedTensor:
        return QuantizedTensor(name=name, spec=self.spec, codes=self.codes.clone(), scale=self.scale.clone(),
                               minimum=self.minimum(), zero=None)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scale": self.scale, "zero": self.zero, "lora_A": self.lora_A, "lora_B": self.lora_B}
        out = detached_state(out)
        if self.external_base:
            out["base_codes"] = pack_codes(self.codes, self.spec.bits)
        return out

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.lora_A, self.lora_B], []


def fold_qalora_tensors(name: str, W0: torch.Tensor, spec: QuantSpec, lora_scale: float, fp16_grid: bool,
                        t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The fold: frozen base codes + merged float minimum, via the very functions the layer's forward uses."""
    d, z = t["scale"].float(), t["zero"].float()
    m = qalora_minimum(d, z, t["lora_A"].float(), t["lora_B"].float(), lora_scale, group_lengths(spec, W0.shape[1]), fp16_grid)
    return QuantizedTensor(name=name, spec=float_spec(spec), codes=stored_or_rtn_codes(W0, spec, t), scale=d, minimum=m,
                           zero=None)


def stored_or_rtn_codes(W0: torch.Tensor, spec: QuantSpec, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base codes: stored in the adapter for an external (GPTQ) base, else the RTN codes of W0 on (d, z)."""
    if "base_codes" in t:
        return unpack_codes(t["base_codes"], spec.bits, W0.shape[1])
    return rtn_integer_codes(W0, t["scale"].float(), t["zero"].float(), spec)
