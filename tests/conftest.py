"""Shared fixtures: tiny real HF models built on the fly, checkpoints, and the ../shared data.

Checkpoints made by `make_checkpoint` are not trained: the L4Q layers get random LoRA updates and
perturbed scales/offsets so every code path (non-zero B@A, float offsets, clipping) is exercised in
seconds. Tests that need a *trained* model use the real stories260K run in `stories_checkpoint`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("L4Q_SHARED", REPO.parent / "shared")) / "data"
STORIES = SHARED / "models" / "stories260K"


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (clone with ../shared beside the repo to run this test)")
    return p


def make_checkpoint(
    base_dir: Path,
    out_dir: Path,
    bits: int = 4,
    group_size: int = 32,
    zero_point: str = "float",
    rank: int = 4,
    alpha: float = 8.0,
    fp16_grid: bool = False,
    seed: int = 0,
    lora_std: float = 0.05,
) -> Path:
    """An L4Q checkpoint with random (non-trivial) adapter values on top of a real base directory."""
    from l4q_export.checkpoint import BaseWeights, write_checkpoint
    from l4q_export.quant import QuantSpec
    from l4q_export.training.surgery import adapter_state, load_base_model, quantize_model, quantized_layers

    spec = QuantSpec(bits, group_size, zero_point)
    model = load_base_model(base_dir)
    modules = quantize_model(
        model, spec, rank, alpha, init="minmax" if zero_point != "symmetric" else "l4q", fp16_grid=fp16_grid, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * lora_std)
            layer.scale.mul_(1 + 0.05 * torch.rand(layer.scale.shape, generator=g))
            if layer.offset is not None and zero_point == "float":
                layer.offset.add_(0.1 * layer.scale * torch.randn(layer.offset.shape, generator=g))
    cfg = model.config.to_dict()
    write_checkpoint(
        out_dir,
        method="l4q",
        spec=spec,
        rank=rank,
        lora_alpha=alpha,
        fp16_grid=fp16_grid,
        lsq_grad_scale=True,
        adapter=adapter_state(model),
        modules=modules,
        base_dir=base_dir,
        base_hashes=BaseWeights(base_dir).shard_hashes(),
        architecture=cfg["architectures"][0],
        copy_base=False,
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random LLaMA (GQA 4/2 heads, hidden 64, MLP 192) with a SentencePiece tokenizer."""
    from l4q_export.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (q/k/v bias) with a SentencePiece tokenizer."""
    from l4q_export.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture
def checkpoint_factory(tmp_path):
    """make_checkpoint bound to a fresh temp dir: factory(base_dir, **kw) -> model_dir."""
    counter = iter(range(1000))

    def factory(base_dir: Path, **kw) -> Path:
        return make_checkpoint(base_dir, tmp_path / f"ck{next(counter)}", **kw)

    return factory


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return require_shared("models", "stories260K")


@pytest.fixture(scope="session")
def stories_checkpoint(tmp_path_factory, stories_dir) -> Path:
    """stories260K really trained with L4Q (4-bit, group 32, float offsets, fp16 grid) for a few steps."""
    from l4q_export.training.trainer import TrainArgs, train

    data = require_shared("instruct", "alpaca_en_demo.json")
    out = tmp_path_factory.mktemp("stories_l4q")
    train(
        TrainArgs(
            model=stories_dir,
            data=data,
            out=out,
            bits=4,
            group_size=32,
            steps=8,
            batch_size=4,
            grad_accum=1,
            seq_len=128,
            lr=2e-3,
            scale_grid="fp16",
            save_every=0,
            eval_examples=8,
        )
    )
    return out


_TRAINED: dict[tuple, Path] = {}


def trained(base: Path, data: Path, tmp: Path, method: str = "l4q", bits: int = 4, group: int = 32, **kw) -> Path:
    """A 2-step checkpoint of `base`, trained once per (base, method, bits, group, options) and shared by the
    architecture test modules (training dominates their run time)."""
    import json

    from l4q_export.training.trainer import TrainArgs, train

    key = (str(base), method, bits, group, json.dumps(kw, sort_keys=True, default=str))
    if key not in _TRAINED:
        out = tmp / f"{base.name}_{method}_{bits}_{group}_{len(_TRAINED)}"
        train(TrainArgs(model=base, data=data, out=out, method=method, bits=bits, group_size=group, steps=2, batch_size=2,
                        grad_accum=1, seq_len=64, lr=5e-3, save_every=0, eval_examples=0, **kw))
        _TRAINED[key] = out
    return _TRAINED[key]


def gguf_field(path: Path, key: str):
    """One metadata value of a GGUF as gguf-py reads it (None when the key is absent)."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return None if f is None else f.contents()


def rewrite_gguf(src: Path, dst: Path, fields: dict | None = None, tensor=None) -> None:
    """Copy a GGUF through gguf-py's reader -> writer for negative controls: metadata values in `fields` replace
    the file's, and `tensor(name, data)` (when given) returns each tensor's new data, or None to drop it.
    Quantized tensors arrive as uint8 [rows, bytes], which the writer maps back to their shape."""
    import gguf
    import numpy as np

    fields = fields or {}
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), gguf_field(src, "general.architecture"))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, fields.get(f.name, f.contents()), vtype, sub_type=sub)
    for t in r.tensors:
        data = np.asarray(t.data)
        if tensor is not None:
            data = tensor(t.name, data)
            if data is None:
                continue
        w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType(int(t.tensor_type)) if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
