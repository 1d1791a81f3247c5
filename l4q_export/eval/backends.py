"""Scoring backends: one small interface over the runtimes a user ships to.

    TorchBackend     an L4Q checkpoint (PyTorch fake-quant: the folded, dequantized weights -- exactly what the
                     exporters write -- or, with forward="train", the method's training layers) or a plain HF dir
    LlamaCppBackend  a .gguf file, run by llama.cpp (llama-cpp-python) with an f32 KV cache
    OrtBackend       an ONNX model (optimum I/O: input_ids, attention_mask, position_ids,
                     past_key_values.N.key|value -> logits), run by onnxruntime
    MlxBackend       an `l4q-export --to mlx` directory, run by mlx-lm on CPU (formats/mlx/runtime.py)

Every backend returns log-softmax rows in float64 computed the same way (`log_softmax`), so differences
between backends are differences between runtimes, not between scoring code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import L4QInputError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (numerically stable)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Backend(Protocol):
    """What the scorers need: tokenization, a context limit and next-token log-probabilities."""

    name: str
    max_length: int
    bos_id: int | None
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float64: row j = log p(next token | ids[: j + 1])."""


class HFTokenizer:
    """A local HF tokenizer (SentencePiece / BPE), never fetched from a hub."""

    def __init__(self, path: Path) -> None:
        from ..training.data import load_tokenizer

        self.tok = load_tokenizer(path)
        self.bos_id = self.tok.bos_token_id
        self.eot_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)


def _max_positions(config_dir: Path, default: int = 2048) -> int:
    cfg = config_dir / "config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_position_embeddings", default))
    return default


class TorchBackend:
    """PyTorch on CPU/GPU in fp32.  For a checkpoint, forward="fold" evaluates the deployed weights."""

    def __init__(self, target: Path, forward: str = "fold", device: str = "cpu", tokenizer: Path | None = None) -> None:
        import torch

        from ..checkpoint import CONFIG_FILE
        from ..training.methods import apply_checkpoint
        from ..training.surgery import load_base_model

        self.torch = torch
        self.device = device
        if (target / CONFIG_FILE).is_file():
            from ..checkpoint import load_checkpoint

            ck = load_checkpoint(target)
            model = load_base_model(ck.base_dir, dtype=torch.float32)
            apply_checkpoint(model, ck, forward)
            self.name = f"torch[{ck.method}, {forward}]"
        elif (target / "config.json").is_file():
            model = load_base_model(target, dtype=torch.float32)
            self.name = "torch[float]"
        else:
            raise L4QInputError(f"{target} is neither an L4Q checkpoint nor a Hugging Face model directory")
        self.model = model.to(device).eval()
        self.model.config.use_cache = False
        tk = HFTokenizer(tokenizer or target)
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        self.max_length = _max_positions(target)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=x).logits[0].float().cpu().numpy()
        return log_softmax(logits)


class LlamaCppBackend:
    """A GGUF file in llama.cpp; logits for every position, f32 K/V cache (type_k = type_v = GGML_TYPE_F32)."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None) -> None:
        from llama_cpp import Llama

        probe = Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = probe.metadata
        train_ctx = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", n_ctx or 2048))
        probe.close()
        self.max_length = min(n_ctx or train_ctx, train_ctx)
        n = threads or os.cpu_count() or 1  # prompt processing uses n_threads_batch (default: every CPU): set both
        self.llm = Llama(model_path=str(path), n_ctx=self.max_length, n_batch=self.max_length, n_ubatch=self.max_length,
                         logits_all=True, type_k=0, type_v=0, n_threads=n, n_threads_batch=n, verbose=False)
        self.name = "llama.cpp"
        self.bos_id = int(self.llm.token_bos())
        self.eot_id = int(self.llm.token_eos())

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return log_softmax(np.array(self.llm.scores[: len(ids)], dtype=np.float32))


class OrtBackend:
    """An ONNX decoder in onnxruntime, fed an empty KV cache so one call scores a whole window."""

    def __init__(self, path: Path, tokenizer: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        model = path / "model.onnx" if path.is_dir() else path
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        if "input_ids" not in self.inputs or "logits" not in [o.name for o in self.sess.get_outputs()]:
            raise L4QInputError(f"{model}: expected optimum-style inputs (input_ids, ...) and a 'logits' output")
        tok_dir = tokenizer or model.parent
        tk = HFTokenizer(tok_dir)
        self.encode, self.bos_id, self.eot_id = tk.encode, tk.bos_id, tk.eot_id
        self.config = json.loads((model.parent / "config.json").read_text()) if (model.parent / "config.json").is_file() else {}
        self.max_length = _max_positions(model.parent)
        self.name = "onnxruntime"

    def _empty_past(self, inp: Any) -> np.ndarray:
        """[1, kv_heads, 0, head_dim] from the input's static dims, else from config.json."""
        shape = list(inp.shape)
        cfg = self.config
        kv = shape[1] if isinstance(shape[1], int) else cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
        hd = shape[3] if isinstance(shape[3], int) else cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        dtype = np.float16 if "float16" in inp.type else np.float32
        return np.zeros((1, int(kv), 0, int(hd)), dtype=dtype)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {"input_ids": np.array([ids], dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, inp in self.inputs.items():
            if name.startswith("past_key_values."):
                feeds[name] = self._empty_past(inp)
        (logits,) = self.sess.run(["logits"], feeds)
        return log_softmax(logits[0])


def open_backend(target: Path, forward: str = "fold", tokenizer: Path | None = None, n_ctx: int | None = None,
                 threads: int | None = None) -> Backend:
    """Pick the runtime from what TARGET is: checkpoint/HF dir -> torch, .gguf -> llama.cpp, ONNX -> ORT."""
    target = Path(target)
    if not target.exists():
        raise L4QInputError(f"eval target not found: {target}")
    if target.is_file() and target.suffix == ".gguf":
        return LlamaCppBackend(target, n_ctx, threads)
    if (target.is_file() and target.suffix == ".onnx") or (target.is_dir() and (target / "model.onnx").is_file()):
        return OrtBackend(target, tokenizer, threads)
    if target.is_dir() and (target / "l4q_mlx.json").is_file():  # before the HF-dir branch: it has a config.json too
        from ..formats.mlx.runtime import MlxBackend

        return MlxBackend(target, tokenizer)
    if target.is_dir():
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchBackend(target, forward, tokenizer=tokenizer)
    raise L4QInputError(f"{target}: expected an L4Q checkpoint dir, an HF model dir, a .gguf file or an ONNX model")
