"""Run telemetry for `l4q-train --report-to {none,tensorboard,csv}` and the final summary table.

Per step: loss, lr, tokens/s, grad-norm.  Per save (and at the end): the quantizer's health per layer --
the fraction of weights whose unrounded code v = (W - m)/s falls outside [-0.5, 2^b - 0.5] (clipped: rounding
alone cannot reach them, so the grid is too narrow) and the range of the learned scales.  The math is
`quant.shifted_input` on `quant.combined_weight`, the same functions the forward and the fold use.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import L4QInputError
from ..quant.core import combined_weight, effective_params, shifted_input
from .layer import L4QLinear
from .surgery import quantized_layers

REPORT_TO = ("none", "tensorboard", "csv")
METRICS_FILE = "metrics.csv"
HEALTH_FILE = "quantizer_health.csv"


@torch.no_grad()
def quantizer_health(model: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: clipped fraction (LSQ-grid layers: l4q, rtn, qat-lora) and learned-scale range."""
    rows = []
    for name, layer in quantized_layers(model):
        scale = getattr(layer, "scale", None)
        if not isinstance(scale, torch.Tensor):
            continue
        row: dict[str, Any] = {"layer": name, "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                               "clipped_frac": None}
        if isinstance(layer, L4QLinear):
            p = effective_params(layer.spec, layer.scale, layer.offset, layer.cfg.fp16_grid)
            w = combined_weight(layer.base_weight(), layer.lora_A, layer.lora_B, layer.cfg.lora_scale)
            v = shifted_input(w, p, layer.spec)
            row["clipped_frac"] = float(((v < -0.5) | (v > layer.spec.umax + 0.5)).float().mean())
        rows.append(row)
    return rows


class Telemetry:
    """Writes step metrics to TensorBoard or OUT/metrics.csv (rank 0 only) and keeps them for the summary."""

    def __init__(self, out: Path, report_to: str, enabled: bool = True) -> None:
        if report_to not in REPORT_TO:
            raise L4QInputError(f"--report-to must be one of {', '.join(REPORT_TO)}")
        self.out, self.kind, self.enabled = Path(out), report_to, enabled
        self.rows: list[dict[str, float]] = []
        self._tb = None
        if enabled and report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise L4QInputError("--report-to tensorboard needs the `tensorboard` package") from None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def log_step(self, step: int, **metrics: float) -> None:
        self.rows.append({"step": step, **metrics})
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        elif self.kind == "csv":
            path = self.out / METRICS_FILE
            new = not path.is_file() or step == 0
            self.out.mkdir(parents=True, exist_ok=True)
            with open(path, "w" if new else "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", *metrics])
                if new:
                    w.writeheader()
                w.writerow({"step": step, **metrics})

    def log_health(self, step: int, model: nn.Module) -> list[dict[str, Any]]:
        rows = quantizer_health(model)
        if not self.enabled or self.kind == "none":
            return rows
        if self._tb is not None:
            for r in rows:
                for k in ("clipped_frac", "scale_min", "scale_max"):
                    if r[k] is not None:
                        self._tb.add_scalar(f"quant/{r['layer']}/{k}", r[k], step)
        else:
            path = self.out / HEALTH_FILE
            new = not path.is_file()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "layer", "clipped_frac", "scale_min", "scale_max"])
                if new:
                    w.writeheader()
                for r in rows:
                    w.writerow({"step": step, **r})
        return rows

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def summary_table(rows: list[dict[str, float]], health: list[dict[str, Any]]) -> str:
    """A short human table: first/last/min loss, mean tokens/s and grad-norm, worst clipped layers."""
    if not rows:
        return "no optimizer steps were run"
    loss = [r["loss"] for r in rows]
    lines = [
        f"{'steps':<22}{len(rows)}",
        f"{'loss first/last/min':<22}{loss[0]:.4f} / {loss[-1]:.4f} / {min(loss):.4f}",
        f"{'tokens/s (mean)':<22}{sum(r['tokens_per_s'] for r in rows) / len(rows):.0f}",
        f"{'grad-norm (mean/max)':<22}{sum(r['grad_norm'] for r in rows) / len(rows):.4f} / "
        f"{max(r['grad_norm'] for r in rows):.4f}",
    ]
    clipped = sorted((h for h in health if h["clipped_frac"] is not None), key=lambda h: -h["clipped_frac"])
    if health:
        lines.append(f"{'scale range':<22}{min(h['scale_min'] for h in health):.3e} .. {max(h['scale_max'] for h in health):.3e}")
    for h in clipped[:3]:
        lines.append(f"{'clipped ' + h['layer'].removeprefix('model.layers.'):<22}{100 * h['clipped_frac']:.3f}%")
    return "\n".join(lines)
