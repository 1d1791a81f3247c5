"""`QuantSpec`: what grid a layer is quantized to.

Kept tiny and frozen so it can be hashed, written to JSON and compared: the checkpoint, the fold and
every exporter must agree on exactly the same grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import L4QInputError

ZeroPointMode = Literal["float", "integer", "symmetric"]
SUPPORTED_BITS = (2, 3, 4, 5, 8)
ZERO_POINT_MODES: tuple[str, ...] = ("float", "integer", "symmetric")


@dataclass(frozen=True)
class QuantSpec:
    """A uniform, group-wise weight quantizer.

    bits:       2, 3, 4, 5 or 8.
    group_size: contiguous input-dimension group sharing one scale/offset; -1 means per output channel.
                A last, partial group is allowed (as ONNX blocked quantization does), so widths such as
                172 still train; exporters that need whole blocks refuse or fall back explicitly.
    zero_point: "float"     -- L4Q's learned additive float offset b (W = s*q + b, q signed);
                "integer"   -- a learned integer zero point z (W = s*(u - z)), rounded with an STE;
                "symmetric" -- z fixed at 2^(bits-1), i.e. b = 0.
    """

    bits: int
    group_size: int = 128
    zero_point: ZeroPointMode = "float"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise L4QInputError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise L4QInputError(f"group_size={self.group_size} must be a positive integer or -1 (per-channel)")
        if self.zero_point not in ZERO_POINT_MODES:
            raise L4QInputError(f"zero_point={self.zero_point!r} must be one of {ZERO_POINT_MODES}")

    @property
    def umax(self) -> int:
        """Largest unsigned code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def half(self) -> int:
        """2^(bits-1): the shift between L4Q's signed codes and unsigned codes."""
        return 1 << (self.bits - 1)

    @property
    def qn(self) -> int:
        """Signed lower bound Q_N = -2^(bits-1)."""
        return -self.half

    @property
    def qp(self) -> int:
        """Signed upper bound Q_P = 2^(bits-1) - 1."""
        return self.half - 1

    def group_len(self, in_features: int) -> int:
        """Elements per group for a layer with `in_features` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """Number of groups (the last one may be partial)."""
        return math.ceil(in_features / self.group_len(in_features))

    def lsq_grad_scale(self, in_features: int) -> float:
        """LSQ's gradient scale 1/sqrt(N * Q_P) with N = elements sharing the parameter."""
        return 1.0 / math.sqrt(self.group_len(in_features) * max(self.qp, 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), zero_point=d["zero_point"])
