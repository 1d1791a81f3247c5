"""`--to safetensors`: a Hugging Face directory with packed integer weights, compressed-tensors or GPTQ (writer.py,
layout.py, io.py), read back by compressed-tensors' own unpackers (check.py), loaded by transformers or GPTQModel
(runtime.py).  See docs/safetensors.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ...checkpoint import Checkpoint
from ...quant import QuantSpec
from ..base import ArtifactReader, Bounded, Capability, Exact, ExportReport, Refused, Tolerance

# The loaded model is a PyTorch fp32 model holding the decoded weights; the reference computes the same W_q in
# the training layers, so the two differ only by fp32 op order, which grows with depth and logit size: measured
# max|dlogit| / max(1, max|logit|) = 2.4e-7 on the tiny models, 5.8e-7 on stories260K (1.14e-5 at 19.5), 3.5e-6
# on SmolLM2-135M (30 blocks: 1.35e-4 at 38.1, KL 9e-12).  The bound is 2e-5 of the logit scale (5.7x the
# deepest measurement); a changed code or scale is caught by levels (a)/(b) whatever the logits do.
TOLERANCE = Tolerance(min_top1=0.99, max_mean_kl=1e-6, max_abs_dlogit=2e-5, tie_margin=1e-5, relative=True)


class SafetensorsTarget:
    name = "safetensors"
    lossy = "safetensors rounding of L4Q float offsets to integer zero points"

    @property
    def options(self) -> list[click.Option]:
        from . import writer

        return writer.CLI_OPTIONS

    def capability(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype, flavor: str = "compressed-tensors"
                   ) -> Capability:
        """Integer and symmetric zero points pack exactly (a shape a flavor cannot pack is stored dense, still exact);
        float offsets only round to integer zero points, moving each weight by up to half a step."""
        from .layout import GPTQ_BITS, unpackable_reason

        if flavor.startswith("gptq") and spec.bits not in GPTQ_BITS:
            return Refused(f"GPTQ holds {'/'.join(map(str, GPTQ_BITS))}-bit weights", "use --flavor compressed-tensors")
        if flavor.startswith("gptq") and dtype != torch.float16:
            return Refused("GPTQ stores fp16 scales", "train with --scale-grid fp16 or use --flavor compressed-tensors")
        dense = unpackable_reason(flavor, spec, shape)
        if dense:  # the writer stores such a layer as fp32 W_q whatever its zero points: exact, not compressed
            return Exact(dense=dense)
        if spec.zero_point == "float":
            return Bounded(0.5, "integer zero points only: z = round(-m/d) (train with --zero-point integer for exact)")
        return Exact()

    def write(self, model_dir: Path, output: Path | None, allow_lossy: bool = False, **options: Any) -> ExportReport:
        from . import writer

        return writer.export(model_dir, output, allow_lossy=allow_lossy, **options)

    def detect(self, artifact: Path) -> bool:
        """A directory whose config.json carries a compressed-tensors or GPTQ quantization_config."""
        cfg_path = Path(artifact) / "config.json"
        if not cfg_path.is_file():
            return False
        try:
            qcfg = json.loads(cfg_path.read_text()).get("quantization_config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
        return isinstance(qcfg, dict) and qcfg.get("quant_method") in ("compressed-tensors", "gptq")

    def read_back(self, artifact: Path) -> ArtifactReader:
        from .check import SafetensorsArtifact

        return SafetensorsArtifact(Path(artifact))

    def runtime(self, artifact: Path, threads: int | None = None, n_ctx: int | None = None):
        from .runtime import open_runtime

        if threads:
            torch.set_num_threads(threads)
        return open_runtime(Path(artifact))

    def tolerance(self, artifact: Path) -> Tolerance:
        return TOLERANCE

    def checks(self, artifact: Path, ck: Checkpoint, backend: Any) -> dict[str, dict[str, Any]]:
        from .check import loader_check

        return {"loader": loader_check(Path(artifact), ck, backend.model)}


TARGET = SafetensorsTarget()
