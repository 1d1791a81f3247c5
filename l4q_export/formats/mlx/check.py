"""Reading an MLX directory back for `verify`, independent of our writer, and MLX's own checks.

Every packed linear is decoded by MLX itself: `mx.dequantize(weight, 1, 0)` is MLX's own unpacking of the uint32
words (the codes), `mx.dequantize(weight, scales, biases)` its decode (the weight, held to the bound declared at
export in l4q_mlx.json).  Dense fallbacks are the fold's fp32 W_q and are returned as plain tensors.  Beyond the
shared levels: mlx-lm's loader must build exactly the modules we declared (QuantizedLinear with that group/bits,
a plain Linear for dense fallbacks), and the directory's tokenizer must tokenize like the checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ...checkpoint import Checkpoint
from ..base import Decoded
from ..runtime import HFTokenizer
from .export import export_info
from .runtime import require_mlx

TOKENIZER_TEXTS = ("Once upon a time", " Hello world", "The little girl went to the park and saw a big dog. She",
                   "Numbers 1234 and 3.14", "")


class MLXArtifact:
    """`read_back` of an exported directory: decoded tensors by HF name, one shard in memory at a time."""

    def __init__(self, artifact: Path) -> None:
        self.mx = require_mlx()
        self.dir = Path(artifact)
        self.qblock = json.loads((self.dir / "config.json").read_text()).get("quantization") or {}
        self.declared = export_info(self.dir).get("declared", {})
        self.where: dict[str, Path] = {}
        for shard in sorted(self.dir.glob("model*.safetensors")):
            with safe_open(str(shard), "np") as f:
                self.where.update({k: shard for k in f.keys()})  # noqa: SIM118 -- safe_open has no __iter__
        self._shard: tuple[Path | None, dict[str, Any]] = (None, {})

    def _tensors(self, shard: Path) -> dict[str, Any]:
        if self._shard[0] != shard:
            self._shard = (None, {})
            self._shard = (shard, self.mx.load(str(shard)))
        return self._shard[1]

    def names(self) -> Iterator[str]:
        return (n for n in self.where if not n.endswith((".scales", ".biases")))

    def packed(self) -> dict[str, tuple[int, int]]:
        """module -> (group_size, bits) of every packed linear, from the stored tensors and config.json."""
        out = {}
        for n in self.where:
            if n.endswith(".scales"):
                module = n[: -len(".scales")]
                params = self.qblock.get(module) or self.qblock
                out[module] = (int(params["group_size"]), int(params["bits"]))
        return out

    def get(self, name: str) -> Decoded | torch.Tensor | None:
        mx = self.mx
        shard = self.where.get(name)
        if shard is None:
            return None
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        t = self._tensors(shard)
        w = t[name]
        if f"{module}.scales" not in self.where:
            return torch.from_numpy(np.array(w.astype(mx.float32)) if w.dtype != mx.float32 else np.array(w))
        g, b = self.packed()[module]
        s, bias = t[f"{module}.scales"], t[f"{module}.biases"]
        codes = mx.dequantize(w, mx.ones_like(s), mx.zeros_like(bias), group_size=g, bits=b)
        deq = mx.dequantize(w, s.astype(mx.float32), bias.astype(mx.float32), group_size=g, bits=b)
        scales, biases = np.array(s), np.array(bias)
        dtype = torch.float16 if scales.dtype == np.float16 else torch.float32

        def expect(qt: Any) -> dict[str, np.ndarray]:
            """What the fold's tensor becomes in MLX: codes unchanged, scales = d, biases = m, in the stored dtype."""
            return {"codes": qt.codes.numpy().astype(np.int64), "scales": qt.scale.float().to(dtype).numpy(),
                    "biases": qt.minimum.float().to(dtype).numpy()}

        fields = {"codes": np.rint(np.array(codes)).astype(np.int64), "scales": scales, "biases": biases}
        return Decoded(name, fields, expect, weight=torch.from_numpy(np.array(deq)),
                       bound=float(self.declared.get(name, 0.0)),
                       info={"group_size": g, "bits": b, "scales_dtype": str(scales.dtype), "codes_from": "mx.dequantize"})


def module_build(artifact: Path, model: Any) -> dict[str, Any]:
    """mlx-lm built QuantizedLinear(group, bits) for every packed linear and a plain Linear for every dense one."""
    reader = MLXArtifact(artifact)
    built = {p: (type(m).__name__, getattr(m, "group_size", None), getattr(m, "bits", None))
             for p, m in model.named_modules()}
    want = {m: ("QuantizedLinear", g, b) for m, (g, b) in reader.packed().items()}
    want.update({m: ("Linear", None, None) for m in export_info(artifact).get("dense_modules", [])})
    wrong = {m: "/".join(map(str, built.get(m, ("missing",)))) for m, w in want.items() if built.get(m) != w}
    return {"passed": bool(want) and not wrong, "modules": len(want), "wrong": wrong,
            "built": {m: "/".join(map(str, built.get(m, ("missing",)))) for m in want},
            "summary": f"{len(want) - len(wrong)}/{len(want)} linears built as declared"}


def tokenizer_parity(artifact: Path, ck: Checkpoint) -> dict[str, Any]:
    """The directory's tokenizer (what mlx-lm loads) tokenizes like the checkpoint's."""
    ours, theirs = HFTokenizer(ck.dir), HFTokenizer(Path(artifact))
    differ = [t for t in TOKENIZER_TEXTS if ours.encode(t) != theirs.encode(t)]
    return {"passed": not differ, "texts": len(TOKENIZER_TEXTS), "differing": differ}
