"""How a packed-safetensors export is loaded to run: the `Backend` `verify` and `l4q-eval` use.

compressed-tensors: transformers `from_pretrained` with `CompressedTensorsConfig(dequantize=True)` (CPU, fp32).
GPTQ: GPTQModel when it is importable (its own kernels); otherwise transformers' dense model built from the
artifact's config holding the weights compressed-tensors' unpacker decodes from the file -- the backend's `name`
says which loader ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...errors import L4QInputError
from ..runtime import ModuleBackend
from .check import SafetensorsArtifact


def load_ct_model(artifact: Path) -> Any:
    """transformers + compressed-tensors, decompressed to dense fp32 on CPU at load time."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        str(artifact), dtype=torch.float32, local_files_only=True, trust_remote_code=False,
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def load_decoded_model(artifact: Path) -> Any:
    """transformers' dense model (from the artifact's config) holding the artifact's tensors, decoded.

    Built without transformers' random initialisation (`no_init_weights`: 11.6 s for 4 layers of 7B shapes),
    because every parameter is overwritten below or refused; the buffers computed in the modules' constructors
    (RoPE frequencies) are built as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = json.loads((artifact / "config.json").read_text())
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with no_init_weights():  # which also skips the tying of a tied head: done here, before it could stay unset
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.tie_weights()
    art = SafetensorsArtifact(artifact)
    state = model.state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    with torch.no_grad():
        for name in state:
            got = art.get(name)
            if got is None:
                if name in tied:
                    continue
                raise L4QInputError(f"{artifact}: tensor {name} of the model is not in the export")
            state[name].copy_(got if isinstance(got, torch.Tensor) else got.whole_weight().float())
    return model.eval()


def load_gptqmodel(artifact: Path) -> Any | None:
    """GPTQModel's loader on CPU, or None when the package is not installed."""
    try:
        from gptqmodel import GPTQModel  # type: ignore[import-not-found]
    except ImportError:
        return None
    return GPTQModel.load(str(artifact), device="cpu").model.eval()


def open_runtime(artifact: Path) -> ModuleBackend:
    art = SafetensorsArtifact(artifact)
    if art.method == "compressed-tensors":
        return ModuleBackend(load_ct_model(artifact), artifact, "transformers+compressed-tensors (dequantize=True, CPU fp32)")
    model = load_gptqmodel(artifact)
    if model is not None:
        return ModuleBackend(model, artifact, "GPTQModel (CPU)")
    return ModuleBackend(load_decoded_model(artifact), artifact,
                         "transformers dense model + compressed-tensors unpacker (GPTQ; GPTQModel not installed)")
