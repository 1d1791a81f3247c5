"""onnxruntime as a `Backend`: what `verify` and `l4q-eval` run an exported ONNX decoder in (CPU EP).

Sessions pin `session.qdq_matmulnbits_accuracy_level` to 0, so ORT's DQ->MatMulNBits fusion computes in floating
point and a measurement is of the export, not of an int8-activation approximation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import L4QInputError
from ..runtime import HFTokenizer, greedy_by_recompute, log_softmax, max_positions


def ort_session(path: Path, level: Any = None, optimized: Path | None = None, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- ORT raises its own Fail/InvalidGraph/... types
        raise L4QInputError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


class OrtBackend:
    """An ONNX decoder (optimum I/O: input_ids, attention_mask, position_ids, past_key_values.N.key|value -> logits,
    present.N.key|value) in onnxruntime."""

    def __init__(self, path: Path, tokenizer: Path | None = None, threads: int | None = None) -> None:
        model = path / "model.onnx" if path.is_dir() else path
        self.sess = ort_session(model, threads=threads)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.outputs:
            raise L4QInputError(f"{model}: expected optimum-style inputs (input_ids, ...) and a 'logits' output")
        tk = HFTokenizer(tokenizer or model.parent)
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        cfg_path = model.parent / "config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.max_length = max_positions(model.parent)
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        # a graph that returns its cache (present.*) is decoded through it; one that does not, by recomputation
        self.cached = bool(self.past) and all(p.replace("past_key_values.", "present.") in self.outputs for p in self.past)
        self.name = "onnxruntime"

    def _empty_past(self, inp: Any) -> np.ndarray:
        """[1, kv_heads, 0, head_dim] from the input's static dims, else from config.json."""
        shape = list(inp.shape)
        cfg = self.config
        kv = shape[1] if isinstance(shape[1], int) else cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
        hd = shape[3] if isinstance(shape[3], int) else cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        dtype = np.float16 if "float16" in inp.type else np.float32
        return np.zeros((1, int(kv), 0, int(hd)), dtype=dtype)

    def _run(self, ids: list[int], start: int, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = start + len(ids)
        feeds: dict[str, np.ndarray] = {"input_ids": np.array([ids], dtype=np.int64), **past}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, n, dtype=np.int64)[None]
        presents = [p.replace("past_key_values.", "present.") for p in self.past] if self.cached else []
        res = self.sess.run(["logits", *presents], feeds)
        return res[0][0].astype(np.float32), dict(zip(self.past if self.cached else [], res[1:], strict=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._run(ids, 0, {p: self._empty_past(self.inputs[p]) for p in self.past})[0]

    def logprobs(self, ids: list[int]) -> np.ndarray:
        return log_softmax(self.logits(ids))

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """Prefill, then one token per step through the KV cache (present.* fed back as past_key_values.*)."""
        if not self.cached:
            return greedy_by_recompute(self, ids, n)
        logits, past = self._run(list(ids), 0, {p: self._empty_past(self.inputs[p]) for p in self.past})
        rows, out, pos = [logits[-1]], [int(logits[-1].argmax())], len(ids)
        for _ in range(n - 1):
            logits, past = self._run([out[-1]], pos, past)
            pos += 1
            rows.append(logits[-1])
            out.append(int(logits[-1].argmax()))
        return out, np.stack(rows)
