"""`--to gguf`: one .gguf file for llama.cpp (writer.py), read back by gguf-py (check.py), run in llama-cpp-python
(runtime.py); block packing in pack.py, vocabulary and hyper-parameters in vocab.py.  See docs/gguf.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from ...checkpoint import Checkpoint
from ...quant import QuantSpec
from ..base import ArtifactReader, Bounded, Capability, Exact, ExportReport, Tolerance
from . import writer

# Runtime tolerances, set from measurement on stories260K and the tiny test models (docs/gguf.md): llama.cpp
# quantizes activations to 8 bits inside quantized matmuls (Q8_0 / Q8_1 blocks) and the embeddings may be F16, so
# logits are close, not identical; |dlogit| is reported, not bounded.  Measured max |dlogit| is 0.8-1.3% of the
# largest |logit| (0.0057 of 0.69 on the tiny LLaMA, 0.25 of 19.5 on stories260K), and that rounding scales with the
# activations: a reference top-2 margin below 2% of max(1, max |logit|) can be flipped by it (both logits move), so
# it is a near-tie.  stories260K has one at greedy token 5 (", there was a ca|stle" vs "t"): llama.cpp takes "cat"
# on this machine and on AMD EPYC (issue 9).
TOLERANCE = Tolerance(min_top1=0.90, max_mean_kl=0.02, max_abs_dlogit=None, tie_margin=0.02, relative=True)
FP16_STEP = 2.0 ** -11  # relative rounding of a scale or minimum stored as fp16


class GGUFTarget:
    name = "gguf"
    lossy = "GGUF K-quants (re-encoded group scales)"
    options: list[click.Option] = writer.CLI_OPTIONS

    def capability(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> Capability:
        """Legacy block types (or F32 of W_q where no type tiles the tensor: `Exact(dense=...)`) hold every grid's
        codes; scales and minima are stored as fp16, so only fp16-grid scales decode bit for bit."""
        if dtype != torch.float16:
            return Bounded(FP16_STEP, "scales and minima are stored as fp16 (train with --scale-grid fp16 for exact)")
        return Exact(dense=_dense_reason(spec, shape))

    def write(self, model_dir: Path, output: Path | None, allow_lossy: bool = False, **options: Any) -> ExportReport:
        return writer.export(model_dir, output, allow_lossy=allow_lossy, **options)

    def detect(self, artifact: Path) -> bool:
        p = Path(artifact)
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"

    def read_back(self, artifact: Path) -> ArtifactReader:
        from .check import GGUFArtifact

        return GGUFArtifact(Path(artifact))

    def runtime(self, artifact: Path, threads: int | None = None, n_ctx: int | None = None):
        from .runtime import LlamaCppBackend

        return LlamaCppBackend(Path(artifact), n_ctx, threads)

    def tolerance(self, artifact: Path) -> Tolerance:
        return TOLERANCE

    def checks(self, artifact: Path, ck: Checkpoint, backend: Any) -> dict[str, dict[str, Any]]:
        from .check import tokenizer_parity

        return {"tokenizer": tokenizer_parity(Path(artifact), ck)}


def _dense_reason(spec: QuantSpec, shape: tuple[int, int]) -> str:
    """Why the writer's auto type ladder would store a layer of this shape as F32 ('' when a block type holds it).

    Asks the writer itself on a probe tensor (mid-range codes, unit fp16 scales) rather than restating its rules.
    """
    from ...quant import QuantizedTensor

    n, k = shape
    g = spec.n_groups(k)
    mid = (1 << spec.bits) // 2
    zero = None if spec.zero_point == "float" else torch.full((n, g), float(mid))
    probe = QuantizedTensor(name="probe", spec=spec, codes=torch.full((n, k), mid, dtype=torch.uint8),
                            scale=torch.ones(n, g), minimum=-torch.full((n, g), float(mid)) if zero is not None
                            else torch.zeros(n, g), zero=zero)
    _, _, row = writer.convert_quantized(probe, "auto")
    return row.get("warning", "").removeprefix("probe: ") if row["type"] == "F32" else ""


TARGET = GGUFTarget()
