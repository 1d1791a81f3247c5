"""Model surgery: swap the decoder blocks' linears for a method's layer in supported HF causal LMs.

Only the architectures of `l4q_export.arch` are accepted: their block layouts (q/k/v/o + gate/up/down, q/k/v
bias on Qwen2, q/k-norm on Qwen3, fused qkv/gate_up on Phi-3) are what every exporter knows how to write.
Embeddings and lm_head stay float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..arch import ALL_LINEARS
from ..checkpoint import SUPPORTED_ARCHITECTURES, check_architecture
from ..errors import L4QInputError
from ..quant import QuantSpec
from .layer import L4QLinear, MethodLinear

TARGET_MODULES = ALL_LINEARS  # fused linears (Phi-3 qkv_proj, gate_up_proj) are one quantized tensor each


def target_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(qualified name, nn.Linear) for every quantizable linear of the decoder blocks, in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in TARGET_MODULES:
            yield name, mod


def check_model(model: nn.Module) -> None:
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise L4QInputError(f"unsupported architecture {arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def swap_linears(
    model: nn.Module, make_layer: Callable[[str, nn.Linear, torch.Generator], MethodLinear], seed: int = 0
) -> list[str]:
    """Replace every target linear in place by `make_layer(name, linear, generator)` and freeze everything else.

    The one surgery loop of every method (the registry supplies `make_layer`); one generator seeded with `seed`
    draws every LoRA init in model order, so a seed gives the same model.  Returns the replaced module names.
    """
    check_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, lin in list(target_linears(model)):
        if not torch.isfinite(lin.weight).all():
            raise L4QInputError(f"weight {name}.weight contains NaN/Inf; refusing to quantize")
        model.set_submodule(name, make_layer(name, lin, gen))
        names.append(name)
    if not names:
        raise L4QInputError("no decoder linear layers found to quantize")
    return names


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    rank: int,
    lora_alpha: float,
    init: str = "l4q",
    fp16_grid: bool = False,
    lsq_grad_scale: bool = True,
    seed: int = 0,
) -> list[str]:
    """L4Q layers on every target linear (the `l4q` / `rtn` methods' surgery; tests and tools call it directly)."""
    return swap_linears(
        model, lambda _, lin, gen: L4QLinear(lin, spec, rank, lora_alpha, init, fp16_grid, lsq_grad_scale, generator=gen), seed
    )


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every method's layer in the model (all are MethodLinear, see training/methods)."""
    for name, mod in model.named_modules():
        if isinstance(mod, MethodLinear):
            yield name, mod


def load_base_model(base_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a local HF causal LM without ever running repository code or touching the network.

    The weights keep their stored dtype (dtype="auto") unless asked otherwise, because the fold
    re-reads the same shards and must see identical numbers.
    """
    from transformers import AutoModelForCausalLM

    check_architecture(base_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=dtype or "auto", trust_remote_code=False, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise L4QInputError(f"cannot load base model from {base_dir}: {str(e).splitlines()[0]}") from None
    return model.to(device)


def compute_dtype(stored: torch.dtype, device: str) -> torch.dtype:
    """The dtype a base stored as `stored` trains in on `device` (CUDA keeps it and autocasts to bf16).

    On CPU, half-precision GEMM without hardware support is a trap (an fp16 7B-shaped step took minutes), so fp16
    computes in fp32 and bf16 stays bf16 only where the CPU has native bf16 dot products (AVX512-BF16/AMX), where it
    measured faster than fp32.  Widening to fp32 is exact, so W0's values -- and the codes the fold recomputes from
    the stored shards -- are unchanged; only the activations' precision differs.
    """
    if device.startswith("cuda") or not stored.is_floating_point or stored == torch.float32:
        return stored
    if stored == torch.bfloat16 and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return stored
    return torch.float32


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Flattened `module.tensor` -> tensor for l4q_adapter.safetensors."""
    out = {}
    for name, layer in quantized_layers(model):
        for k, v in layer.adapter_tensors().items():
            out[f"{name}.{k}"] = v
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `adapter_state` (exact copies, used by --resume and verify)."""
    for name, layer in quantized_layers(model):
        for k in layer.adapter_tensors():
            p = getattr(layer, k, None)
            if not isinstance(p, torch.Tensor):  # derived at save time (e.g. lora's RTN scale), not state
                continue
            key = f"{name}.{k}"
            if key not in tensors:
                raise L4QInputError(f"adapter tensor {key} missing")
            p.copy_(tensors[key].to(p.dtype))
