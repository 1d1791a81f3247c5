"""Streaming fold: turn a checkpoint into the tensors an exporter writes, one tensor at a time.

For each base tensor, `fold` yields either the float tensor (embeddings, norms, biases, lm_head) or a
`QuantizedTensor` (a `KQuantized` for K-grid modules, l4q-train --grid) computed by the checkpoint's method's fold
(the method registry's `fold_module`), which uses exactly the training forward's operations and dtype, so
`dequantize()` equals the training W_q bit for bit.  Peak memory is one layer.
This module knows methods only through the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .errors import L4QInputError
from .quant import QuantizedTensor
from .quant.kquant import KQuantized
from .training.methods import checkpoint_method, fold_module

T = TypeVar("T")
R = TypeVar("R")
FoldedTensor = torch.Tensor | QuantizedTensor | KQuantized  # KQuantized: a K-grid module (l4q-train --grid)
QUANTIZED = (QuantizedTensor, KQuantized)  # isinstance test for "a quantized linear of the fold"


_END = object()


def one_ahead(fn: Callable[[T], R], items: Iterable[T], thread_name: str) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in order, with fn running on a worker thread one item ahead of the consumer (torch, numpy
    and the format libraries release the GIL).  fn of the next item is submitted only once the previous result is
    handed over, so at most two results are alive; an exception surfaces at its own item."""
    it = iter(items)
    item = next(it, _END)
    if item is _END:
        return
    with ThreadPoolExecutor(1, thread_name_prefix=thread_name) as pool:
        ahead = pool.submit(fn, item)
        while ahead is not None:
            result = ahead.result()
            nxt = next(it, _END)
            ahead = None if nxt is _END else pool.submit(fn, nxt)
            yield item, result
            del result
            item = nxt


def fold_checkpoint(ck: Checkpoint) -> Iterator[tuple[str, FoldedTensor]]:
    checkpoint_method(ck)  # an unknown method fails before any tensor is read
    base = ck.base()
    targets = {m + ".weight": m for m in ck.modules}
    missing = [n for n in targets if n not in base]
    if missing:
        raise L4QInputError(f"base model lacks quantized weights listed in the checkpoint, e.g. {missing[0]}")
    def one(name: str) -> FoldedTensor:
        t = base.get(name)
        return fold_module(ck, targets[name], t) if name in targets else t

    # One tensor folds on a worker thread while the caller packs and writes the previous one.
    yield from one_ahead(one, base.names(), "l4q-fold")
    ck.confirm_base()  # a base-hash check running beside the fold (load_checkpoint(overlap_hashes=True)) ends here


def fold(model_dir: str | Path, check_hashes: bool = True) -> Iterator[tuple[str, FoldedTensor]]:
    """Stream (tensor name, float tensor | QuantizedTensor) for every tensor of the trained model."""
    return fold_checkpoint(load_checkpoint(model_dir, check_hashes=check_hashes))
