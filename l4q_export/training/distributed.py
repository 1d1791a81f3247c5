"""`l4q-train --fsdp` under torchrun: FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of DDP.

Each decoder layer is one FSDP unit and the root holds the rest, so every parameter -- the frozen W0 and the adapter
alike -- is sharded across ranks and all-gathered only while its layer runs; the AdamW state is built on the
sharded parameters and therefore sharded too.  Mixed precision keeps the parameters in their own dtype
(param_dtype=None): the L4Q quantizer's scales, offsets and LoRA matrices must stay fp32 for the codes to be the
ones the fold computes, so the bf16 compute on CUDA comes from the trainer's autocast, as without FSDP; gradients
are reduced in fp32.  Buffers are not sharded (the int8 base of --base-dtype int8 is replicated).

The checkpoint stays the one every exporter reads: the adapter tensors are gathered to full tensors on every rank
(`full_state`, a collective) and rank 0 writes them; the optimizer state is saved as PyTorch's full (unsharded,
parameter-name keyed) optimizer state dict, which a --resume with --fsdp loads back into its shards.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+$")


def shard_model(model: nn.Module) -> int:
    """fully_shard every decoder layer, then the root; returns the number of layer units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    units = [m for name, m in model.named_modules() if _DECODER_LAYER.search(name)]
    for m in units:
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return len(units)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard -> the whole tensor (a collective: every rank must call it); other tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The full, parameter-name keyed AdamW state of a sharded model, on CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`: every rank passes the full state and keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
