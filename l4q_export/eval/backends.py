"""Scoring backends: one small interface (`formats.runtime.Backend`) over the runtimes a user ships to.

    TorchBackend     an L4Q checkpoint (PyTorch fake-quant: the folded, dequantized weights -- exactly what the
                     exporters write -- or, with forward="train", the method's training layers) or a plain HF dir
    an artifact      whatever export target recognises it (`formats.detect_target`) opens its own runtime:
                     llama.cpp for .gguf, onnxruntime for ONNX, transformers/GPTQModel for packed safetensors, ...

Every backend returns log-softmax rows in float64 computed the same way (`log_softmax`), so differences
between backends are differences between runtimes, not between scoring code.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import L4QInputError
from ..formats.runtime import Backend, HFTokenizer, ModuleBackend, log_softmax, max_positions

__all__ = ["Backend", "HFTokenizer", "TorchBackend", "log_softmax", "open_backend"]


class TorchBackend(ModuleBackend):
    """PyTorch on CPU/GPU in fp32.  For a checkpoint, forward="fold" evaluates the deployed weights."""

    def __init__(self, target: Path, forward: str = "fold", device: str = "cpu", tokenizer: Path | None = None) -> None:
        import torch

        from ..checkpoint import CONFIG_FILE, load_checkpoint
        from ..training.methods import checkpoint_model
        from ..training.surgery import load_base_model

        if (target / CONFIG_FILE).is_file():
            ck = load_checkpoint(target)
            model = checkpoint_model(ck, forward)
            name = f"torch[{ck.method}, {forward}]"
        elif (target / "config.json").is_file():
            model = load_base_model(target, dtype=torch.float32)
            name = "torch[float]"
        else:
            raise L4QInputError(f"{target} is neither an L4Q checkpoint nor a Hugging Face model directory")
        super().__init__(model, tokenizer or target, name, device)
        self.max_length = max_positions(target)


def open_backend(target: Path, forward: str = "fold", tokenizer: Path | None = None, n_ctx: int | None = None,
                 threads: int | None = None) -> Backend:
    """Pick the runtime from what TARGET is: an artifact -> the export target that detects it opens its runtime;
    a checkpoint or HF dir -> torch."""
    from ..checkpoint import CONFIG_FILE
    from ..formats import detect_target

    target = Path(target)
    if not target.exists():
        raise L4QInputError(f"eval target not found: {target}")
    if not (target.is_dir() and (target / CONFIG_FILE).is_file()):
        fmt = detect_target(target)
        if fmt is not None:
            return fmt.runtime(target, threads=threads, n_ctx=n_ctx)
    if target.is_dir():
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchBackend(target, forward, tokenizer=tokenizer)
    raise L4QInputError(f"{target}: expected an L4Q checkpoint dir, an HF model dir or an artifact of a known export "
                        "target (.gguf, ONNX, packed safetensors)")
