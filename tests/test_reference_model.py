"""The runtime reference (`reference_model`) and l4q-eval's torch backend keep the training layers' frozen W0 in
the shard's stored dtype and compute in fp32: the logits must be those of the all-fp32 model, bit for bit.

The oracle is written out here the way the reference was built before: the base loaded as an fp32 model, every
target linear replaced by its training layer over W0 widened to fp32 (or, forward="fold", given dequant(fold)).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from l4q_export.checkpoint import load_checkpoint
from l4q_export.training.layer import MethodLinear
from l4q_export.training.methods import build_layer, checkpoint_model, fold_module, reference_model
from l4q_export.training.surgery import load_base_model
from l4q_export.training.trainer import TrainArgs, train

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 44, 71, 8], [1, 70, 3, 3, 12, 90, 41, 7, 26, 55]])


def _fp32_oracle(ck_dir: Path, forward: str) -> torch.nn.Module:
    ck = load_checkpoint(ck_dir)
    model = load_base_model(ck.base_dir, dtype=torch.float32)
    base = ck.base()
    with torch.no_grad():
        for module in ck.modules:
            W0 = base.get(module + ".weight").float()
            if forward == "fold":
                model.get_submodule(module).weight.copy_(fold_module(ck, module, W0).dequantize())
                continue
            orig = model.get_submodule(module)
            layer = build_layer(ck, W0, ck.adapter(module), module)
            layer.bias = orig.bias
            model.set_submodule(module, layer)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _half_copy(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """`src` (an HF dir with its tokenizer) saved again with its weights in `dtype`."""
    import shutil

    shutil.copytree(src, out)
    load_base_model(src).to(dtype).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fp16_llama(tmp_path_factory) -> Path:
    from l4q_export.demo import build_tiny_model

    return _half_copy(build_tiny_model(tmp_path_factory.mktemp("llama32")), tmp_path_factory.mktemp("x") / "llama16",
                      torch.float16)


@pytest.fixture(scope="module")
def bf16_gemma3(tmp_path_factory) -> Path:
    """A tiny Gemma 3 in bf16 whose embedding scale sqrt(96) is not a bf16 number (9.8125 in bf16, 9.798 in fp32)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                           max_position_embeddings=64, sliding_window=4, tie_word_embeddings=True, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("gemma3") / "base"
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def trained_fp16(fp16_llama, tmp_path_factory):
    """Short real training runs on the fp16 base, per method."""
    data = tmp_path_factory.mktemp("data") / "train.txt"
    data.write_text("Once upon a time a small robot counted the waves and sang about the sea.\n\n" * 60)
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out = tmp_path_factory.mktemp(method)
            train(TrainArgs(model=fp16_llama, data=data, out=out, method=method, bits=4, group_size=32, steps=2,
                            batch_size=2, grad_accum=1, seq_len=32, lr=5e-3, save_every=0, eval_examples=0))
            cache[method] = out
        return cache[method]

    return get


def _assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    assert torch.equal(_logits(got), _logits(want))
    want_buffers = dict(want.named_buffers())
    for name, b in got.named_buffers():
        assert b.dtype == torch.float32 or not b.is_floating_point(), name
        assert torch.equal(b, want_buffers[name]), name
    frozen = {id(m.weight) for m in got.modules() if isinstance(m, MethodLinear)}  # W0 as stored; all else fp32
    want_params = dict(want.named_parameters())
    for name, p in got.named_parameters():
        assert p.dtype == torch.float32 or id(p) in frozen or not p.is_floating_point(), name
        assert torch.equal(p.float(), want_params[name].float()), name


@pytest.mark.parametrize("method", ["l4q", "qalora", "dlqat"])
def test_reference_equals_the_fp32_model_at_half_the_base_memory(trained_fp16, method):
    ck_dir = trained_fp16(method)
    got, want = reference_model(load_checkpoint(ck_dir)), _fp32_oracle(ck_dir, "train")
    _assert_same_model(got, want)
    layers = [m for m in got.modules() if isinstance(m, MethodLinear)]
    assert len(layers) == 14 and all(m.weight.dtype == torch.float16 for m in layers)
    assert all(m.weight.dtype == torch.float32 for m in want.modules() if isinstance(m, MethodLinear))


@pytest.mark.parametrize("method,forward", [("lora", "fold"), ("lora", "train"), ("l4q", "fold")])
def test_eval_models_equal_the_fp32_model(trained_fp16, method, forward):
    ck_dir = trained_fp16(method)
    _assert_same_model(checkpoint_model(load_checkpoint(ck_dir), forward), _fp32_oracle(ck_dir, forward))


def test_bf16_gemma3_reference_recomputes_the_embedding_scale_in_fp32(bf16_gemma3, tmp_path):
    ck_dir = make_checkpoint(bf16_gemma3, tmp_path / "ck", group_size=32)
    got, want = reference_model(load_checkpoint(ck_dir)), _fp32_oracle(ck_dir, "train")
    scale = got.model.embed_tokens.embed_scale
    assert scale.dtype == torch.float32 and scale.item() == torch.tensor(math.sqrt(96), dtype=torch.float32).item()
    assert load_base_model(bf16_gemma3).model.embed_tokens.embed_scale.item() != scale.item()  # what a bf16 load holds
    assert got.model.embed_tokens.weight is got.lm_head.weight  # still tied after widening
    _assert_same_model(got, want)
