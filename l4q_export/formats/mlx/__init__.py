"""`--to mlx`: an mlx-lm model directory (Apple MLX affine quantization).  See docs/mlx.md.

MLX stores per group a scale and a float *bias* (``w = scales*q + biases``) -- the canonical ``W = d*u + m`` --
so L4Q's learned float offsets, which integer-zero-point formats cannot hold, are exact here.  layout.py says what
MLX can hold and packs one tensor, export.py writes the directory, check.py reads it back with MLX itself
(`mx.dequantize`) and holds the mlx-lm module-build check, runtime.py runs it in mlx-lm.  Writing needs no MLX,
but the target is only registered where `mlx` and `mlx_lm` import (`pip install l4q-export[mlx]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from ...checkpoint import Checkpoint
from ...quant import QuantSpec
from ..base import ArtifactReader, Bounded, Capability, Exact, ExportReport, Refused, Tolerance
from . import export, layout

# Runtime tolerances, from the measured floor (docs/mlx.md): bit-identical weights, fp32 everywhere, so only
# summation order differs -- max |dlogit| ~1e-6 of max |logit|, mean KL <= 3e-12.  The limits sit ~100x above it;
# a reference top-2 margin below 1e-3 of max(1, max |logit|) (~1000x the floor) is a near-tie.
TOLERANCE = Tolerance(min_top1=0.99, max_mean_kl=1e-8, max_abs_dlogit=1e-4, tie_margin=1e-3, relative=True)


class MLXTarget:
    name = "mlx"
    lossy = "MLX integer/symmetric zero points off the fp16 grid (biases = -d*z, within a per-tensor ulp bound)"

    @property
    def options(self) -> list[click.Option]:
        return [click.Option(["--mlx-shard-size", "mlx_shard_size"], default="5GB", show_default=True,
                             help="mlx: maximum safetensors shard size (e.g. 5GB, 500MB); also bounds the "
                                  "exporter's memory.")]

    def capability(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> Capability:
        """Float offsets: exact (packed, or dense where MLX has no group layout).  Integer zero points: exact on
        the fp16 grid (every product and sum is exact in fp32), else bounded by an ulp of the largest weight."""
        cap = layout.capability(spec, shape)
        if cap.kind == "refused":
            return Refused(cap.reason, "train with 1-6 or 8 bits")
        if cap.kind == "bounded" and dtype != torch.float16:
            return Bounded(2.0 ** -(23 - spec.bits), cap.reason)
        return Exact()

    def write(self, model_dir: Path, output: Path | None, allow_lossy: bool = False,
              mlx_shard_size: str | int = "5GB", **_: Any) -> ExportReport:
        return export.write(Path(model_dir), output, shard_size=mlx_shard_size, allow_lossy=allow_lossy)

    def detect(self, artifact: Path) -> bool:
        return export.detect(Path(artifact))

    def read_back(self, artifact: Path) -> ArtifactReader:
        from .check import MLXArtifact

        return MLXArtifact(Path(artifact))

    def runtime(self, artifact: Path, threads: int | None = None, n_ctx: int | None = None):
        from .runtime import MlxBackend

        return MlxBackend(Path(artifact))

    def tolerance(self, artifact: Path) -> Tolerance:
        return TOLERANCE

    def checks(self, artifact: Path, ck: Checkpoint, backend: Any) -> dict[str, dict[str, Any]]:
        from .check import module_build, tokenizer_parity

        return {"mlx_lm_modules": module_build(Path(artifact), backend.model),
                "tokenizer": tokenizer_parity(Path(artifact), ck)}


TARGET = MLXTarget()
