"""The exported directory in its real runtime: mlx-lm's model forward on MLX's CPU device.

`load` goes through `mlx_lm.utils.load_model` (the code path `mlx_lm generate` uses: config.json's
`quantization` block, `nn.quantize` with mlx-lm's class predicate, strict `load_weights`), never through our
own reader, so a layout mlx-lm would misread shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import L4QInputError
from ...eval.backends import HFTokenizer, log_softmax


def require_mlx() -> Any:
    """Import mlx.core or say in one line why this target cannot run here."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401
    except ImportError as e:
        raise L4QInputError(f"the MLX runtime is not installed ({e}); pip install 'l4q-export[mlx]' "
                            "(Linux x86-64/arm64 use mlx-cpu, macOS arm64 the Metal build)") from None
    mx.set_default_device(mx.cpu)
    return mx


def load(artifact: Path) -> Any:
    """The mlx-lm model of an exported directory (eager, strict)."""
    require_mlx()
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(artifact), lazy=False, strict=True)
    return model


def logits(model: Any, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] fp32 logits of one full forward (no cache)."""
    import mlx.core as mx

    out = model(mx.array([ids]))
    return np.array(out[0].astype(mx.float32))


def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """n greedy tokens through mlx-lm's own decode loop (`generate_step`: prefill + KV cache, argmax sampler)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n):
        out.append(int(tok))
    return out


class MlxBackend:
    """`eval.backends.Backend` for an exported MLX directory: mlx-lm forward on CPU, tokenizer from the dir."""

    def __init__(self, path: Path, tokenizer: Path | None = None) -> None:
        self.model = load(path)
        tk = HFTokenizer(tokenizer or path)
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        cfg = json.loads((Path(path) / "config.json").read_text())
        self.max_length = int(cfg.get("max_position_embeddings", 2048))
        self.name = "mlx-lm"

    def logprobs(self, ids: list[int]) -> np.ndarray:
        return log_softmax(logits(self.model, ids))
