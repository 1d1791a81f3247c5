"""l4q-export: quantization-aware LoRA training (L4Q and siblings) and exact export.

The package is layered so that one module owns each fact:
- `quant`     : the quantizer math (codes, scales, offsets, bit packing) -- the single source of truth.
- `training`  : the L4Q layer, model surgery, data and the training loop.
- `checkpoint`: the on-disk L4Q checkpoint every exporter reads.
- `fold`      : streams folded tensors (float or canonical quantized) out of a checkpoint.
- `formats`   : one module per export target.
- `verify`    : proves artifacts reproduce the training forward.
"""

__version__ = "0.1.0"

__all__ = ["prepare", "save_checkpoint", "load_checkpoint"]


def __getattr__(name: str):
    """`l4q_export.prepare` etc. (docs/python-api.md), imported lazily so the CLIs do not pay for torch twice."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'l4q_export' has no attribute {name!r}")
