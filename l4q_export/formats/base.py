"""The export-target protocol: what every format implements, and the two reports every format returns.

A target is one sub-package of `formats/` exposing one object that satisfies `Target`.  The registry in
`formats/__init__.py` is the only list of targets; `l4q-export` builds its options from `Target.options`,
`--allow-lossy` applies where `Target.lossy` says so, `demo` asks `capability` which checkpoint a target can hold
exactly, `verify` runs the same three levels on every target (`read_back` against the fold, `runtime` against the
PyTorch reference, then the target's own `checks`), and `l4q-eval` scores through `runtime`.

Why a capability query: "can this format hold the trained integers?" was answered in four places (GGUF's type
ladder, ONNX's block choice, safetensors' zero-point rules, the demo's table).  Each target answers it once, for a
spec, a tensor shape and a scale dtype, as `Exact`, `Bounded(err)` (lossy, within a stated bound -- needs
`--allow-lossy`) or `Refused(reason, fix)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    import click

    from ..checkpoint import Checkpoint
    from ..quant import QuantizedTensor, QuantSpec
    from .runtime import Backend


# ------------------------------------------------------------------------------------------------ capability

@dataclass(frozen=True)
class Exact:
    """The target stores the trained integers and parameters bit for bit.

    dense: non-empty when the target's packed encodings cannot tile this tensor, so it is stored as plain fp32 W_q
    (still exact, but 32 bits per weight -- the training preflight and export summaries count its cost); the text
    says why.
    """

    dense: str = ""


@dataclass(frozen=True)
class Bounded:
    """Only a lossy encoding exists; `error` is the worst-case |W_export - W_train| relative to the scale."""

    error: float
    reason: str = ""


@dataclass(frozen=True)
class Refused:
    """No encoding of this target holds the tensor; `fix` says what to change (checkpoint option or target option)."""

    reason: str
    fix: str


Capability = Exact | Bounded | Refused


def refuse_kgrid(ck: Checkpoint, target: str) -> None:
    """Targets without ggml's K-quant blocks refuse a checkpoint with K-grid modules (l4q-train --grid) up front:
    a super-block's fp16 d times 6-bit sub-scales has no exact form there that we write yet, and re-quantizing
    would break the promise silently."""
    from ..errors import FidelityError

    grids = ck.config.get("module_grids") or {}
    k = sorted(m for m, g in grids.items() if g.get("grid") == "kquant")
    if k:
        raise FidelityError(f"{ck.dir}: {len(k)} module(s) (e.g. {k[0]}) were trained on a GGUF K-quant grid "
                            f"(--grid {ck.config.get('grid')}), which {target} cannot hold exactly; export it with "
                            "--to gguf, or retrain without --grid for this target")


# ------------------------------------------------------------------------------------------------ reports

@dataclass
class ExportReport:
    """What `Target.write` returns; `to_dict()` is the `l4q-export --json` report (same keys for every target).

    n_quantized: quantized linears in the fold; n_exact: of those, stored so that they decode to the training
    W_q bit for bit; n_dense: quantized linears stored as plain float W_q (exact, not compressed);
    max_abs_error: worst declared |decoded - W_q| over the quantized linears; bytes: total artifact size.
    `details` holds the target's own keys (types, forms, flavors); `layers` one row per tensor.
    """

    target: str
    artifact: str
    n_quantized: int
    n_exact: int
    n_dense: int
    max_abs_error: float
    bytes: int
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, base_bytes: int | None = None) -> str:
        """One line that leads with exactness, then dense fallbacks and what they cost against the base model."""
        line = (f"{self.target}: {self.n_exact}/{self.n_quantized} quantized layers exact, "
                f"max |W_export - W_q| {self.max_abs_error:.3g}")
        ratio = f"{self.bytes / base_bytes:.2f}x the base model ({base_bytes / 1e6:.1f} MB)" if base_bytes else ""
        if self.n_dense:
            line += f"; {self.n_dense}/{self.n_quantized} layers stored dense: file {self.bytes / 1e6:.1f} MB"
            line += f", {ratio}" if ratio else ""
        else:
            line += f"; file {self.bytes / 1e6:.1f} MB" + (f" ({ratio})" if ratio else "")
        return line

    def to_dict(self, base_bytes: int | None = None) -> dict[str, Any]:
        """Exactness first (summary, n_exact/n_quantized, max error, dense count), then the target's own keys."""
        d = asdict(self)
        details = d.pop("details")
        layers = d.pop("layers")
        lead = {"format": self.target, "summary": self.summary(base_bytes), "exact": self.n_exact == self.n_quantized,
                "n_exact": self.n_exact, "n_quantized": self.n_quantized, "max_abs_error": self.max_abs_error,
                "n_dense": self.n_dense, "bytes": self.bytes,
                "base_bytes": base_bytes, "bytes_vs_base": self.bytes / base_bytes if base_bytes else None}
        return {**lead, **{k: v for k, v in d.items() if k not in lead}, **details, "layers": layers}


@dataclass
class VerifyReport:
    """What `verify` returns for every artifact; `to_dict()` is the `verify --json` report.

    (a) n_codes_identical: quantized linears whose stored fields (codes, scales, zero points, offsets) equal the
    fold's; (b) n_within_bound: whose decoded weights are within the declared bound of W_q, max_abs_error the
    worst; n_exact = both.  (c) `logits` / `greedy`: the runtime vs the PyTorch reference (see verify.py);
    `checks`: the target's own hooks (tokenizer parity, op counts, loaders), each with a "passed" key.
    """

    check: str
    artifact: str
    model_dir: str
    passed: bool
    summary: str
    runtime: str
    n_quantized: int
    n_exact: int
    n_codes_identical: int
    n_within_bound: int
    n_dense: int
    max_abs_error: float
    logits: dict[str, Any]
    greedy: dict[str, Any]
    tolerance: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        layers = d.pop("layers")
        return {**d, "layers": layers}


# ------------------------------------------------------------------------------------------------ read-back

def same_bits(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> bool:
    """Equal shape, dtype and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = (np.ascontiguousarray(t).reshape(-1).view(np.uint8) for t in (a, b))
    if x.size % 8 == 0:  # compared as 64-bit words, in slices: no byte-sized bool temporary of a whole weight
        x, y = x.view(np.uint64), y.view(np.uint64)
    step = 1 << 20
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, x.size, step))


def max_abs_diff(got: torch.Tensor, want: torch.Tensor | Callable[[int, int], torch.Tensor],
                 shape: tuple[int, ...] | None = None) -> float:
    """max |got - want|, with `want` first rounded to got's dtype (a library computes in the artifact's dtype).

    `want`: the reference, or a function giving its rows r0:r1 with its `shape` (so the reference is never whole
    in memory).  Over row slices on one thread: a whole-tensor difference costs two [out, in] fp32 temporaries,
    each page-faulted in fresh (that, not the arithmetic, was most of verify's system time).  A NaN anywhere gives
    NaN (so no bound is met), a shape mismatch inf."""
    from ..quant.inplace import block_rows, one_thread, row_blocks

    rows_of = want if callable(want) else (lambda r0, r1: want[r0:r1])
    if tuple(got.shape) != tuple(want.shape if shape is None else shape):
        return float("inf")
    if got.numel() == 0:
        return 0.0
    g = got.reshape(got.shape[0], -1) if got.dim() > 1 else got.reshape(1, -1)
    step = block_rows(g.shape[1])
    buf = torch.empty(min(step, g.shape[0]), g.shape[1])  # one difference buffer, reused: no fresh pages per block
    worst = []
    with one_thread():
        for r0, r1 in row_blocks(g.shape[0], step):
            d = torch.sub(g[r0:r1].float(), rows_of(r0, r1).reshape(r1 - r0, -1).to(g.dtype).float(), out=buf[: r1 - r0])
            worst.append(d.abs_().amax())
    return float(torch.stack(worst).amax())


@dataclass
class Decoded:
    """One quantized linear as the artifact holds it, decoded by the format's own library.

    fields: the stored integers and parameters, in the order of the fold's tensor (HF row order);
    expect: what those fields must be for the fold's `QuantizedTensor` (the target's stored layout of it);
    weight: the decoded [N, K] float weight (None where the fields alone define it, bit for bit);
    bound: the declared max |weight - W_q| (0 = exact);
    rows: instead of whole `fields` and `weight` (left empty), output rows r0:r1 of both, decoded on demand, with
    `expect` then called on the fold's same rows (`QuantizedTensor.rows`); `shape` is then the decoded tensor's.
    The verifier walks such a tensor in cache-sized slices, so it never exists decoded whole: for a 7B MLP weight
    that is a fresh 180 MB fp32 and a 90 MB int16 array per tensor, whose page zeroing and trip through DRAM cost
    more than the decode itself.
    """

    name: str
    fields: dict[str, np.ndarray]
    expect: Callable[[QuantizedTensor], dict[str, np.ndarray]]
    weight: torch.Tensor | None = None
    bound: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    rows: Callable[[int, int], tuple[dict[str, np.ndarray], torch.Tensor | None]] | None = None
    shape: tuple[int, ...] = ()

    def whole_weight(self) -> torch.Tensor | None:
        """The decoded weight at once, row-wise or not: for a runtime that builds its model from the artifact."""
        return self.weight if self.rows is None else self.rows(0, self.shape[0])[1]


class ArtifactReader(Protocol):
    """Random access to an artifact's decoded tensors by HF name (one tensor in memory at a time)."""

    def names(self) -> Iterator[str]:
        """HF names of the tensors the artifact holds."""

    def get(self, name: str) -> Decoded | torch.Tensor | None:
        """A quantized linear (`Decoded`), a float tensor, or None when the artifact lacks it."""


@dataclass(frozen=True)
class Tolerance:
    """Runtime pass rule of a target, set from measurement (each target's docs/<target>.md).

    min_top1: fraction of positions whose argmax equals the reference's; max_mean_kl: mean KL(ref || runtime) in
    nats; max_abs_dlogit: worst |logit difference|; both it and tie_margin are in units of max(1, max |logit|)
    when `relative` (runtimes whose rounding scales with the activations), else absolute;
    tie_margin: a reference top-2 logit margin below this is a near-tie, past which greedy agreement is only
    reported (see verify.py for why).
    """

    min_top1: float
    max_mean_kl: float
    max_abs_dlogit: float | None  # None: reported, not bounded (strict JSON has no Infinity)
    tie_margin: float
    relative: bool = False


# ------------------------------------------------------------------------------------------------ the protocol

@runtime_checkable
class Target(Protocol):
    """One export format.  Implementations live in `formats/<name>/__init__.py`."""

    name: str
    #: where --allow-lossy applies (None: the target has no lossy path)
    lossy: str | None

    @property
    def options(self) -> list[click.Option]:
        """This target's `l4q-export` options (parameter names unique across targets)."""

    def capability(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> Capability:
        """Can the target hold a tensor quantized with `spec`, of `shape`, with scales of `dtype`, with its defaults?"""

    def write(self, model_dir: Path, output: Path | None, allow_lossy: bool = False, **options: Any) -> ExportReport:
        """Stream the fold of the checkpoint in `model_dir` into the artifact (atomically); report what was stored."""

    def detect(self, artifact: Path) -> bool:
        """Is `artifact` one of ours?  Never raises on foreign files."""

    def read_back(self, artifact: Path) -> ArtifactReader:
        """The artifact's tensors decoded by the format's own library, independent of our writer."""

    def runtime(self, artifact: Path, threads: int | None = None, n_ctx: int | None = None) -> Backend:
        """The runtime a user ships to (the same backend `l4q-eval` scores with)."""

    def tolerance(self, artifact: Path) -> Tolerance:
        """Runtime pass rule for this artifact."""

    def checks(self, artifact: Path, ck: Checkpoint, backend: Backend) -> dict[str, dict[str, Any]]:
        """Target-specific checks beyond the shared three levels (each result has "passed"); `backend` is the
        runtime `verify` opened, for checks of what it loaded."""
