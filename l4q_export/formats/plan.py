"""Export-aware training preflight: before step 0, can each export target hold what this run will train?

`l4q-train` asks every chosen target's own `capability` (never restating a format's rules) for each distinct
quantized-linear shape of the base model, read from the safetensors headers (no weights loaded).  A layer a target
can only store dense (fp32 W_q) is exact but 32 bits per weight -- at g128 on SmolLM2 that made the "quantized"
compressed-tensors export larger than the bf16 base -- so training refuses unless `--allow-dense` or fewer targets
are chosen; a `Refused` layer (no encoding at the target's defaults) refuses too.  `Bounded` (lossy at export, needs
`l4q-export --allow-lossy`) is reported, not refused: L4Q's default float offsets are exact in GGUF/ONNX and only
round in safetensors, and that choice belongs to the export.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import BaseWeights
from ..errors import L4QInputError
from ..quant import QuantSpec
from ..training.surgery import TARGET_MODULES
from . import available, get_target
from .base import Bounded, Exact, Refused

DENSE_BYTES_PER_WEIGHT = 4  # every target's dense fallback stores fp32 W_q (GGUF F32, safetensors dense-fp32)


@dataclass
class TargetPlan:
    """One target's verdict over the model's quantized linears: one row per distinct (out, in) shape."""

    target: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return sum(r["count"] for r in self.rows)

    def n(self, kind: str) -> int:
        return sum(r["count"] for r in self.rows if r["kind"] == kind)

    @property
    def dense_bytes(self) -> int:
        return sum(r["dense_bytes"] for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.n("dense") == 0 and self.n("refused") == 0


@dataclass
class Plan:
    spec: QuantSpec
    scale_dtype: str
    base_bytes: int
    targets: list[TargetPlan]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "scale_dtype": self.scale_dtype, "base_bytes": self.base_bytes,
                "targets": {t.target: {"n_layers": t.n_layers, "n_exact": t.n("exact"), "n_dense": t.n("dense"),
                                       "n_lossy": t.n("lossy"), "n_refused": t.n("refused"),
                                       "dense_bytes": t.dense_bytes, "rows": t.rows} for t in self.targets}}

    def table(self) -> str:
        """target x layer shape: exact / dense / lossy / refused, with the dense bytes."""
        lines = [f"export plan for {self.spec.bits}-bit, group {self.spec.group_size}, {self.spec.zero_point} zero "
                 f"point, {self.scale_dtype} scales (base model {self.base_bytes / 1e6:.1f} MB):",
                 f"{'target':<12} {'shape (out x in)':<18} {'layers':>6}  {'verdict':<8} {'dense MB':>9}  reason"]
        for t in self.targets:
            for r in t.rows:
                mb = f"{r['dense_bytes'] / 1e6:.1f}" if r["dense_bytes"] else "-"
                lines.append(f"{t.target:<12} {r['shape'][0]:>6} x {r['shape'][1]:<9} {r['count']:>6}  {r['kind']:<8} "
                             f"{mb:>9}  {r['reason']}")
        lines += [f"{t.target}: {self.verdict(t)}" for t in self.targets]
        return "\n".join(lines)

    def verdict(self, t: TargetPlan) -> str:
        parts = [f"{t.n('exact')}/{t.n_layers} exact and packed"]
        if t.n("dense"):
            parts.append(f"{t.n('dense')}/{t.n_layers} layers stored dense ({t.dense_bytes / 1e6:.1f} MB of fp32 W_q; "
                         f"the whole base model is {self.base_bytes / 1e6:.1f} MB)")
        if t.n("lossy"):
            parts.append(f"{t.n('lossy')} lossy at export (needs l4q-export --allow-lossy)")
        if t.n("refused"):
            parts.append(f"{t.n('refused')} refused")
        return "; ".join(parts)

    def refusal(self) -> str | None:
        """The one-line error that stops training, or None when every chosen target is exact and packed."""
        bad = [t for t in self.targets if not t.ok]
        if not bad:
            return None
        what = "; ".join(f"{t.target}: {self.verdict(t)}" for t in bad)
        fixes = {r["fix"] for t in bad for r in t.rows if r.get("fix")}
        ok = [t.target for t in self.targets if t.ok]
        hint = (f"pass --allow-dense to train anyway, drop the target (--targets {','.join(ok)})" if ok
                else "pass --allow-dense to train anyway")
        hint += ", or choose a --group-size that divides every layer's in_features" if any(
            t.n("dense") for t in bad) else ""
        return f"export preflight: {what}. {hint}" + (f" ({'; '.join(sorted(fixes))})" if fixes else "")


def linear_shapes(model_dir: Path) -> Counter[tuple[int, int]]:
    """(out, in) of every linear l4q-train quantizes, from the safetensors headers (the same selection rule as
    `training.surgery.target_linears`: decoder-block linears named in TARGET_MODULES)."""
    base = BaseWeights(Path(model_dir))
    shapes: Counter[tuple[int, int]] = Counter()
    for name in base.names():
        parts = name.split(".")
        if ".layers." not in name or parts[-1] != "weight" or len(parts) < 2 or parts[-2] not in TARGET_MODULES:
            continue
        with safe_open(str(base.dir / base.location[name]), framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        if len(shape) == 2:
            shapes[(int(shape[0]), int(shape[1]))] += 1
    return shapes


def base_bytes(model_dir: Path) -> int:
    base = BaseWeights(Path(model_dir))
    return sum((base.dir / s).stat().st_size for s in base.shards)


def parse_targets(value: str | None) -> list[str]:
    """`--targets a,b` -> names (each registered); None / "" -> every available target."""
    names = available()
    if not value:
        return names
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
        raise L4QInputError(f"--targets: unknown target(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(names)}")
    return list(dict.fromkeys(chosen))


def plan(model_dir: Path, spec: QuantSpec, targets: list[str], scale_grid: str) -> Plan:
    """Ask each target's `capability` about each distinct quantized-linear shape of the model."""
    dtype = torch.float16 if scale_grid == "fp16" else torch.float32
    shapes = linear_shapes(model_dir)
    if not shapes:
        raise L4QInputError(f"{model_dir}: no quantizable decoder linears found ({', '.join(TARGET_MODULES)})")
    out = []
    for name in targets:
        tp = TargetPlan(name)
        for shape, count in sorted(shapes.items()):
            cap = get_target(name).capability(spec, shape, dtype)
            row: dict[str, Any] = {"shape": list(shape), "count": count, "dense_bytes": 0, "reason": ""}
            if isinstance(cap, Exact) and cap.dense:
                row |= {"kind": "dense", "reason": cap.dense,
                        "dense_bytes": count * shape[0] * shape[1] * DENSE_BYTES_PER_WEIGHT}
            elif isinstance(cap, Exact):
                row |= {"kind": "exact"}
            elif isinstance(cap, Bounded):
                row |= {"kind": "lossy", "reason": cap.reason, "error": cap.error}
            elif isinstance(cap, Refused):
                row |= {"kind": "refused", "reason": cap.reason, "fix": cap.fix}
            tp.rows.append(row)
        out.append(tp)
    return Plan(spec, str(dtype).removeprefix("torch."), base_bytes(model_dir), out)
