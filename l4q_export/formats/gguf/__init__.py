"""`--to gguf`: one .gguf file for llama.cpp (writer.py), read back by gguf-py and ggml's decoder (check.py), run in
llama-cpp-python (runtime.py); block packing in pack.py, vocabulary and hyper-parameters in vocab.py.  See docs/gguf.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from ...checkpoint import Checkpoint
from ...errors import L4QInputError
from ...quant import QuantSpec
from ..base import ArtifactReader, Bounded, Capability, Exact, ExportReport, Tolerance
from . import writer

# Runtime tolerances, set from measurement (docs/gguf.md "Tolerances"): llama.cpp quantizes activations to 8 bits
# inside quantized matmuls (Q8_0 / Q8_1 blocks), so logits of an exact file are close, not identical, and that noise
# accumulates with depth.  Measured max |dlogit| relative to max |logit|: 0.013 on stories260K (5 blocks, 0.25 of
# 19.5), 0.086 on SmolLM2-135M (30 blocks, 3.26 of 38.1, 3-bit codes in Q4_1) -- 0.0026 and 0.0029 per block.  So the
# pass rule scales with the block count L (read from the file): near-tie margin 2x the measured relative noise
# (0.006 L; a top-2 margin below it can be flipped, both logits move), mean KL 3x SmolLM2's measured 5.4e-4 per block
# (1.6e-3 L), top-1 2x its measured miss rate 0.0037 per block (1 - 0.0074 L), none looser than the stories260K
# rule (0.02 / 0.02 / 0.90) for shallow models, and top-1 never below 0.75.  A layout defect is far outside: the
# Q/K permutation removed gives top-1 0.09 (docs/gguf.md).
TOLERANCE = Tolerance(min_top1=0.90, max_mean_kl=0.02, max_abs_dlogit=None, tie_margin=0.02, relative=True)
NOISE_PER_BLOCK = {"tie_margin": 0.006, "max_mean_kl": 1.6e-3, "top1_miss": 0.0074}
MIN_TOP1_FLOOR = 0.75


def tolerance_for_depth(n_blocks: int) -> Tolerance:
    """The llama.cpp pass rule for a model of `n_blocks` decoder blocks (see the measurements above)."""
    k = NOISE_PER_BLOCK
    return Tolerance(min_top1=max(MIN_TOP1_FLOOR, min(TOLERANCE.min_top1, 1.0 - k["top1_miss"] * n_blocks)),
                     max_mean_kl=max(TOLERANCE.max_mean_kl, k["max_mean_kl"] * n_blocks), max_abs_dlogit=None,
                     tie_margin=max(TOLERANCE.tie_margin, k["tie_margin"] * n_blocks), relative=True)


def block_count(artifact: Path) -> int | None:
    """`<arch>.block_count` from the GGUF header (None when absent or unreadable)."""
    from .check import open_reader

    try:
        reader = open_reader(artifact)
    except L4QInputError:
        return None
    for key, f in reader.fields.items():
        if key.endswith(".block_count") and f.data:
            return int(f.parts[f.data[0]][0])
    return None


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
        from .check import open_reader
        from .runtime import LlamaCppBackend

        open_reader(artifact)  # a truncated file: one clear line, not llama.cpp's "Failed to load model"
        return LlamaCppBackend(Path(artifact), n_ctx, threads)

    def tolerance(self, artifact: Path) -> Tolerance:
        n = block_count(Path(artifact))
        return TOLERANCE if n is None else tolerance_for_depth(n)

    def checks(self, artifact: Path, ck: Checkpoint, backend: Any) -> dict[str, dict[str, Any]]:
        from .check import check_architecture, tokenizer_parity

        check_architecture(Path(artifact), ck)
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
