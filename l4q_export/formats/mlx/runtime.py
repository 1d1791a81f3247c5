"""The exported directory in its real runtime: mlx-lm's model forward on MLX's CPU device, as a `Backend`.

`load` goes through `mlx_lm.utils.load_model` (the code path `mlx_lm generate` uses: config.json's
`quantization` block, `nn.quantize` with mlx-lm's class predicate, strict `load_weights`), never through our
own reader, so a layout mlx-lm would misread shows up here.  Greedy decoding runs through mlx-lm's KV cache
(`make_prompt_cache`, as `generate_step` does) and returns the raw logits each token was chosen from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import L4QInputError
from ..runtime import HFTokenizer, log_softmax, max_positions


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


class MlxBackend:
    """An exported MLX directory in mlx-lm (CPU, fp32 activations); tokenizer from the directory."""

    def __init__(self, path: Path) -> None:
        self.mx = require_mlx()
        self.model = load(path)
        tk = HFTokenizer(Path(path))
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        self.max_length = max_positions(Path(path))
        self.name = "mlx-lm"

    def _row(self, out: Any) -> np.ndarray:
        return np.array(out[0].astype(self.mx.float32))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._row(self.model(self.mx.array([ids])))

    def logprobs(self, ids: list[int]) -> np.ndarray:
        return log_softmax(self.logits(ids))

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        row = self._row(self.model(self.mx.array([ids]), cache=cache))[-1]
        out, rows = [], []
        for _ in range(n):
            rows.append(row)
            out.append(int(np.argmax(row)))
            row = self._row(self.model(self.mx.array([[out[-1]]]), cache=cache))[-1]
        return out, np.stack(rows)
