"""Grid conversions an export target needs when its format's grid differs from training's.

Kept here, beside the rest of the quantizer math, so a writer and its verifier compute them the same way.
"""

from __future__ import annotations

import torch

from .core import QuantizedTensor


def rounded_zero_point(qt: QuantizedTensor) -> QuantizedTensor:
    """The nearest integer-zero-point tensor to a float-offset one: z = clamp(round(-m/d), 0, 2^b - 1), m' = -d*z.

    Codes and scales are unchanged, so each weight moves by d*|z - (-m/d)| <= d/2 (clamping aside): the error a
    format with integer zero points only (compressed-tensors, GPTQ) has to declare for an L4Q checkpoint.
    """
    z = (-qt.minimum / qt.scale).round().clamp(0, qt.spec.umax)
    return QuantizedTensor(qt.name, qt.spec, qt.codes, qt.scale, -(qt.scale * z), z)


def same_weights(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    """Bit-identical dequantized weights (the test of whether a conversion was exact)."""
    return bool(torch.equal(a.dequantize().view(torch.int32), b.dequantize().view(torch.int32)))
