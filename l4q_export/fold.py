"""Streaming fold: turn a checkpoint into the tensors an exporter writes, one tensor at a time.

For each base tensor, `fold` yields either the float tensor (embeddings, norms, biases, lm_head) or a
`QuantizedTensor` whose codes are computed with exactly the training forward's operations and dtype
(`quant.combined_weight` + `quant.quantize`, the functions L4QFunction uses), so
`QuantizedTensor.dequantize()` equals the training W_q bit for bit.  Peak memory is one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .errors import L4QInputError
from .quant import QuantizedTensor, combined_weight, effective_params, quantize
from .training.methods import FOLDERS as METHOD_FOLDERS

FoldedTensor = torch.Tensor | QuantizedTensor
ModuleFolder = Callable[[Checkpoint, str, torch.Tensor, dict], QuantizedTensor]


def fold_l4q_module(ck: Checkpoint, module: str, W0: torch.Tensor, t: dict[str, torch.Tensor]) -> QuantizedTensor:
    """L4Q (and every method that stores lora_A/lora_B/scale/offset): quantize(W0 + alpha*B@A)."""
    spec = ck.spec
    p = effective_params(spec, t["scale"], t.get("offset"), ck.fp16_grid)
    w = combined_weight(W0, t.get("lora_A"), t.get("lora_B"), ck.alpha)
    return quantize(module + ".weight", w, p, spec)


# method name -> how its modules fold.  Methods with another parametrisation register here.
FOLDERS: dict[str, ModuleFolder] = {"l4q": fold_l4q_module, **METHOD_FOLDERS}


def fold_checkpoint(ck: Checkpoint) -> Iterator[tuple[str, FoldedTensor]]:
    folder = FOLDERS.get(ck.method)
    if folder is None:
        raise L4QInputError(f"checkpoint method {ck.method!r} has no fold; known: {', '.join(sorted(FOLDERS))}")
    base = ck.base()
    targets = {m + ".weight": m for m in ck.modules}
    missing = [n for n in targets if n not in base]
    if missing:
        raise L4QInputError(f"base model lacks quantized weights listed in the checkpoint, e.g. {missing[0]}")
    for name in base.names():
        t = base.get(name)
        if name in targets:
            if not torch.isfinite(t).all():
                raise L4QInputError(f"base weight {name} contains NaN/Inf")
            yield name, folder(ck, targets[name], t, ck.adapter(targets[name]))
        else:
            yield name, t


def fold(model_dir: str | Path, check_hashes: bool = True) -> Iterator[tuple[str, FoldedTensor]]:
    """Stream (tensor name, float tensor | QuantizedTensor) for every tensor of the trained model."""
    return fold_checkpoint(load_checkpoint(model_dir, check_hashes=check_hashes))
