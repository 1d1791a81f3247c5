"""The one source of truth for quantizer math: spec, codes, dequantization, init, bit packing, the frozen-base
grids and STEs (grids.py) and GPTQ decoding (gptq.py, imported on its own: it needs compressed-tensors)."""

from .core import (
    INIT_METHODS,
    SCALE_FLOOR,
    GroupParams,
    QuantizedTensor,
    combined_weight,
    dequantize_codes,
    effective_params,
    expand_groups,
    group_reduce,
    group_sum,
    init_params,
    lora_delta,
    lora_delta_loop,
    quantize,
    quantize_merged,
    round_codes,
    shifted_input,
)
from .pack import pack_bits, pack_int32, unpack_bits, unpack_int32
from .spec import SUPPORTED_BITS, ZERO_POINT_MODES, QuantSpec

__all__ = [
    "INIT_METHODS",
    "SCALE_FLOOR",
    "SUPPORTED_BITS",
    "ZERO_POINT_MODES",
    "GroupParams",
    "QuantSpec",
    "QuantizedTensor",
    "combined_weight",
    "dequantize_codes",
    "effective_params",
    "expand_groups",
    "group_reduce",
    "group_sum",
    "init_params",
    "lora_delta",
    "lora_delta_loop",
    "pack_bits",
    "pack_int32",
    "quantize",
    "quantize_merged",
    "round_codes",
    "shifted_input",
    "unpack_bits",
    "unpack_int32",
]
