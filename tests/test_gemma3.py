"""Gemma 3 text (`Gemma3ForCausalLM`) through training, fold verify, every exporter and verify in the real runtimes.

A tiny random Gemma 3 built here with transformers (bf16): 6 layers (5 local sliding-window + 1 global, the
Gemma 3 pattern), GQA 4/1 (one KV head), head_dim 32 != hidden/heads = 16, q/k-norm, non-trivial (1 + w) norm
gains, tied embeddings, a sliding window (4) shorter than the verify prompts so local and global layers really
differ, and the real LLaMA-2 SentencePiece (byte fallback) without its dummy prefix (as Gemma's) with Gemma's turn
markers and chat template added.
Expected values come from the runtimes (llama.cpp, transformers + compressed-tensors) compared by the verifiers
with the PyTorch training forward; the negative controls show those checks can fail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
from conftest import gguf_field, require_shared, rewrite_gguf, trained

from l4q_export.errors import L4QInputError
from l4q_export.formats import get_target
from l4q_export.formats.onnx import graph as onnx_graph
from l4q_export.verify import verify_artifact, verify_fold

TEXT = ("Once upon a time there was a little robot who liked to count numbers and sing songs about the sea. "
        "It's a quiet day; we'll see 1234 stars. ") * 30
SPECS = [(4, 32), (4, 64)]
TURNS = ["<start_of_turn>", "<end_of_turn>"]
CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
WINDOW = 4


def build_gemma3(out: Path, **overrides) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    out.mkdir(parents=True, exist_ok=True)
    proto = pb.ModelProto()  # Gemma's SentencePiece adds no dummy prefix: neither does this one, nor transformers
    proto.ParseFromString(require_shared("tokenizers", "llama2_tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "add_prefix_space": False,
        "model_max_length": 4096}))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": TURNS})  # ids 32000, 32001
    tok.chat_template = CHAT
    tok.save_pretrained(str(out))
    kw = dict(vocab_size=32008, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=512,
              rms_norm_eps=1e-6, sliding_window=WINDOW, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=0.3,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    kw.update(overrides)
    cfg = Gemma3TextConfig(**kw)
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma initialises norm weights to 0 (gain 1 + 0): make every (1 + w) gain matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_gemma3(tmp_path_factory.mktemp("gemma3") / "base")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("g3_data") / "train.txt"
    p.write_text("\n\n".join([TEXT] * 4))
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("g3_work")


def test_base_has_both_layer_types(base):
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"}
    assert cfg["num_key_value_heads"] == 1 and cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]


@pytest.mark.parametrize(("bits", "group"), SPECS)
def test_train_and_fold(base, text_data, work, bits, group):
    ck = trained(base, text_data, work, bits=bits, group=group)
    rep = verify_fold(ck)
    assert rep["passed"], rep.get("summary")
    assert rep["n_layers"] == 6 * 7 and rep["n_bit_identical"] == 6 * 7


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "group"), SPECS)
def test_gguf(base, text_data, work, tmp_path, bits, group):
    ck = trained(base, text_data, work, bits=bits, group=group)
    rep = get_target("gguf").write(ck, tmp_path / "m.gguf")
    art = Path(rep.artifact)
    assert rep.details["arch"] == "gemma3" and rep.n_quantized == 6 * 7 and rep.details["tied_embeddings"]
    names = {t.name for t in gguf.GGUFReader(str(art)).tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight",
            "blk.0.ffn_norm.weight"} <= names and "output.weight" not in names
    assert gguf_field(art, "gemma3.attention.sliding_window") == WINDOW
    assert gguf_field(art, "gemma3.attention.sliding_window_pattern") == [True] * 5 + [False]
    assert gguf_field(art, "gemma3.rope.freq_base") == 1e6 and gguf_field(art, "gemma3.rope.freq_base_swa") == 1e4
    assert gguf_field(art, "gemma3.attention.key_length") == 32
    # (1 + w) stored as the gain, computed in fp32 from the bf16 base weight
    from safetensors.torch import load_file

    w0 = load_file(str(base / "model.safetensors"))["model.layers.0.input_layernorm.weight"].float()
    stored = [t for t in gguf.GGUFReader(str(art)).tensors if t.name == "blk.0.attn_norm.weight"][0]
    assert np.array_equal(np.asarray(stored.data), (w0 + 1).numpy())
    v = verify_artifact(get_target("gguf"), art, ck)
    assert v["passed"], v["summary"]


@pytest.mark.slow
def test_gguf_negative_controls(base, text_data, work, tmp_path):
    """A wrong local/global pattern, or norms without the +1, load in llama.cpp but fail verify (c)."""
    ck = trained(base, text_data, work)
    art = Path(get_target("gguf").write(ck, tmp_path / "m.gguf").artifact)
    good = verify_artifact(get_target("gguf"), art, ck)
    assert good["passed"], good["summary"]
    key = "gemma3.attention.sliding_window_pattern"
    undo_plus_one = lambda name, d: d - np.float32(1.0) if name.endswith("norm.weight") else d  # noqa: E731
    for name, kw in {"pattern": {"fields": {key: [False] + [True] * 5}}, "no_plus_one": {"tensor": undo_plus_one}}.items():
        bad = tmp_path / f"{name}.gguf"
        rewrite_gguf(art, bad, **kw)
        v = verify_artifact(get_target("gguf"), bad, ck)
        assert not v["passed"], (name, v["summary"])


def test_gguf_refuses_softcapping_and_query_scale(tmp_path):
    from l4q_export.formats.gguf.vocab import add_hparams

    cfg = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
           "sliding_window": 4, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
           "rope_parameters": {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 1e6}}}
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gemma3")
    add_hparams(w, cfg, "gemma3", 100, "x")  # the good config passes
    for bad, match in [({"attn_logit_softcapping": 50.0}, "softcapping"), ({"query_pre_attn_scalar": 64}, "query_pre_attn"),
                       ({"rope_parameters": {"sliding_attention": {"rope_theta": 1e4},
                                             "full_attention": {"rope_type": "yarn", "factor": 4}}}, "yarn")]:
        with pytest.raises(L4QInputError, match=match):
            add_hparams(gguf.GGUFWriter(str(tmp_path / "y.gguf"), "gemma3"), {**cfg, **bad}, "gemma3", 100, "x")


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "group"), SPECS)
def test_safetensors_compressed_tensors(base, text_data, work, tmp_path, bits, group):
    """Integer zero points: compressed-tensors pack-quantized, loaded by transformers, verify (c) passes."""
    ck = trained(base, text_data, work, bits=bits, group=group, zero_point="integer")
    rep = get_target("safetensors").write(ck, tmp_path / "ct", flavor="compressed-tensors")
    art = Path(rep.artifact)
    cfg = json.loads((art / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" in cfg
    v = verify_artifact(get_target("safetensors"), art, ck)
    assert v["passed"], v["summary"]


@pytest.mark.parametrize("flavor", ["gptq", "gptq-v1"])
@pytest.mark.parametrize(("bits", "group"), SPECS)
def test_safetensors_gptq(base, text_data, work, tmp_path, flavor, bits, group):
    """GPTQ (integer zeros, fp16 scales): packed exactly, loaded by the GPTQ runtime the other architectures use
    (GPTQModel when installed, else transformers' Gemma3ForCausalLM holding compressed-tensors' unpacking of the
    file), verify (c) passes.  gptq-v1 stores z - 1: exact here because every trained zero point is >= 1."""
    ck = trained(base, text_data, work, bits=bits, group=group, zero_point="integer", scale_grid="fp16")
    rep = get_target("safetensors").write(ck, tmp_path / "gptq", flavor=flavor)
    art = Path(rep.artifact)
    cfg = json.loads((art / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["quantization_config"]["quant_method"] == "gptq"
    assert all(r["exact"] for r in rep.layers) and rep.n_quantized == 6 * 7
    v = verify_artifact(get_target("safetensors"), art, ck)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 6 * 7


def test_gguf_tokenizer_chat_markers(base, text_data, work, tmp_path):
    """verify's tokenizer parity covers the chat markers: on the rendered chat template and on text around each
    marker (leading spaces, digits, unicode), llama.cpp with parse_special gives each marker its one id, the one
    transformers gives it, and SentencePiece's ids for the text between them (verify's truth for SentencePiece
    models).  The same GGUF without the tokens transformers added on top of tokenizer.model (what gguf-py's
    SentencePieceVocab alone writes) fails the check on exactly the 3 chat texts."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from l4q_export.checkpoint import load_checkpoint
    from l4q_export.formats.gguf import check as gguf_check
    from l4q_export.formats.gguf import vocab as gguf_vocab

    ck = trained(base, text_data, work)
    art = Path(get_target("gguf").write(ck, tmp_path / "m.gguf").artifact)
    rep = gguf_check.tokenizer_parity(art, load_checkpoint(ck))
    assert rep["passed"], rep["mismatches"]
    assert rep["n_chat_texts"] == 3 and rep["n_match"] == len(gguf_check.TOKENIZER_TEXTS) + 3
    tok = AutoTokenizer.from_pretrained(str(ck))
    llm = Llama(model_path=str(art), vocab_only=True, verbose=False)
    assert [llm.tokenize(m.encode(), add_bos=False, special=True) for m in TURNS] == [[32000], [32001]]
    assert tok.convert_tokens_to_ids(TURNS) == [32000, 32001]
    llm.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_vocab, "_add_hf_tokens", lambda tok_dir, tokens, types, model: 0)
        bad = Path(get_target("gguf").write(ck, tmp_path / "bad.gguf").artifact)
    rep = gguf_check.tokenizer_parity(bad, load_checkpoint(ck))
    assert not rep["passed"] and rep["n_match"] == len(gguf_check.TOKENIZER_TEXTS)


ONNX_FORMS = ["matmulnbits", "qdq"]


def _gqa_windows(art: Path) -> list[int]:
    """local_window_size of each GroupQueryAttention node, in layer order (read from the file with onnx)."""
    model = onnx.load(str(art), load_external_data=False)
    return [next(a.i for a in n.attribute if a.name == "local_window_size")
            for n in model.graph.node if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("form", ONNX_FORMS)
@pytest.mark.parametrize(("bits", "group"), SPECS)
def test_onnx(base, text_data, work, tmp_path, form, bits, group):
    """Both ONNX forms run in onnxruntime and pass verify (c) against the PyTorch training forward: prefill on the
    verify prompts (longer than the window, so local and global layers differ) and greedy decoding through the
    KV cache."""
    ck = trained(base, text_data, work, bits=bits, group=group)
    rep = get_target("onnx").write(ck, tmp_path / "onnx", onnx_form=form)
    art = Path(rep.artifact)
    assert rep.n_quantized == 6 * 7 and rep.details["fused"] == (form == "matmulnbits")
    ops = [n.op_type for n in onnx.load(str(art), load_external_data=False).graph.node]
    assert ops.count("Gelu") == 6
    if form == "matmulnbits":  # the window on exactly the sliding_attention layers
        assert _gqa_windows(art) == [WINDOW] * 5 + [-1]
    v = verify_artifact(get_target("onnx"), art, ck)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 6 * 7 and v["greedy"]["required"] > 0


_REAL_FROM_CONFIG = onnx_graph.DecoderSpec.from_config


def _patched_spec(change):
    """DecoderSpec.from_config with `change` applied to the real spec (test-only: builds a wrong graph on purpose)."""
    return staticmethod(lambda cfg, architecture: change(_REAL_FROM_CONFIG(cfg, architecture)))


def _with(**fields):
    return lambda spec: dataclasses.replace(spec, **fields)


# each wrong graph gets one Gemma 3 piece wrong; every one must load in onnxruntime and fail verify (c)
WRONG = {
    "window_pattern": ("_windows", lambda cfg, arch, n: (None,) + (WINDOW,) * (n - 1)),  # layer 0 global, 1-5 local
    "no_window": ("_windows", lambda cfg, arch, n: (None,) * n),
    "no_embed_scale": ("from_config", _with(embed_scale=None)),
    "no_plus_one": ("from_config", _with(norm_offset=0.0)),
    "swapped_rope_bases": ("from_config", lambda s: dataclasses.replace(s, layer_rope=tuple(1 - r for r in s.layer_rope))),
    "silu_mlp": ("from_config", _with(act="silu")),
}


@pytest.mark.parametrize("form", ONNX_FORMS)
def test_onnx_negative_controls(base, text_data, work, tmp_path, form):
    """The same export with one Gemma 3 piece wrong (test-only monkeypatches) stores identical weights but fails
    verify (c): the window pattern, the window itself, the sqrt(hidden) embedding scale, the +1 of the norms, the
    local/global rope bases, the GELU-tanh MLP are each really exercised by the verify prompts."""
    ck = trained(base, text_data, work)
    for name, (attr, how) in WRONG.items():
        out = tmp_path / name
        with pytest.MonkeyPatch.context() as mp:
            if attr == "_windows":
                mp.setattr(onnx_graph, "_windows", how)
            else:
                mp.setattr(onnx_graph.DecoderSpec, "from_config", _patched_spec(how))
            get_target("onnx").write(ck, out, onnx_form=form)
        v = verify_artifact(get_target("onnx"), out / "model.onnx", ck)
        assert v["n_codes_identical"] == 6 * 7, name
        assert not v["passed"] and not v["logits"]["passed"], (name, v["summary"])


@pytest.mark.parametrize("form", ONNX_FORMS)
def test_onnx_query_scale_and_global_rope_scaling(tmp_path_factory, text_data, work, tmp_path, form):
    """query_pre_attn_scalar != head_dim and linear rope scaling on the global layers (Gemma 3 4B+): verify (c)
    passes, and the graph with head_dim^-1/2 instead fails it."""
    root = tmp_path_factory.mktemp("g3_qscale")
    b = build_gemma3(root / "base", query_pre_attn_scalar=48, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    ck = trained(b, text_data, work)
    get_target("onnx").write(ck, tmp_path / "onnx", onnx_form=form)
    v = verify_artifact(get_target("onnx"), tmp_path / "onnx" / "model.onnx", ck)
    assert v["passed"], v["summary"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_graph.DecoderSpec, "from_config", _patched_spec(_with(attn_scale=None)))
        get_target("onnx").write(ck, tmp_path / "bad", onnx_form=form)
    assert not verify_artifact(get_target("onnx"), tmp_path / "bad" / "model.onnx", ck)["passed"]


def test_onnx_refuses_what_it_does_not_compute(base):
    """Softcapping, bidirectional attention and length-dependent rope on the global layers: one clear line each."""
    cfg = json.loads((base / "config.json").read_text())
    onnx_graph.DecoderSpec.from_config(cfg, "Gemma3ForCausalLM")  # the real config passes
    dynamic = {**cfg["rope_parameters"], "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
    for bad, match in [({"final_logit_softcapping": 30.0}, "softcapping"), ({"attn_logit_softcapping": 50.0}, "softcapping"),
                       ({"use_bidirectional_attention": True}, "bidirectional"), ({"rope_parameters": dynamic}, "dynamic"),
                       ({"hidden_activation": "silu"}, "gelu_pytorch_tanh")]:
        with pytest.raises(L4QInputError, match=match):
            onnx_graph.DecoderSpec.from_config({**cfg, **bad}, "Gemma3ForCausalLM")


def _reference_ppl(ck: Path, text: Path, n_tokens: int) -> tuple[float, int]:
    """Perplexity of the PyTorch training forward (`reference_model`) over the first n_tokens (BOS included), in
    one window, computed here with torch's cross entropy: independent of l4q-eval's windowing and scoring."""
    from transformers import AutoTokenizer

    from l4q_export.checkpoint import load_checkpoint
    from l4q_export.training.methods import reference_model

    ids = AutoTokenizer.from_pretrained(str(ck))(text.read_text()[: n_tokens * 16])["input_ids"][:n_tokens]
    with torch.no_grad():
        logits = reference_model(load_checkpoint(ck))(torch.tensor([ids])).logits[0].double()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))), len(ids)


def test_eval_on_artifacts(base, text_data, work, tmp_path):
    """`l4q-eval --tasks ppl` (the CLI) on the checkpoint, the GGUF and the ONNX export: finite, and each close to the
    reference model's own perplexity over the same 256 tokens (one window: ctx 256 >= the tokens scored)."""
    from click.testing import CliRunner

    from l4q_export.eval.cli import main as l4q_eval

    ck = trained(base, text_data, work)
    targets = {"checkpoint": ck, "gguf": Path(get_target("gguf").write(ck, tmp_path / "m.gguf").artifact),
               "onnx": Path(get_target("onnx").write(ck, tmp_path / "onnx").artifact)}
    want, n = _reference_ppl(ck, text_data, 256)
    ppl = {}
    for name, target in targets.items():
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(l4q_eval, [str(target), "--tasks", "ppl", "--text", str(text_data), "--max-tokens", "256",
                                            "--ctx", "256", "--json", str(out)])
        assert res.exit_code == 0, res.output
        r = json.loads(out.read_text())["results"]["ppl"]
        assert r["tokens"] == n and r["windows"] == 1
        ppl[name] = r["ppl"]
        assert np.isfinite(ppl[name]) and ppl[name] > 1
    assert abs(ppl["checkpoint"] / want - 1) < 1e-4  # the fold's dense weights are the training forward's W_q
    assert abs(ppl["onnx"] / want - 1) < 1e-3  # fp32 graph, same math up to summation order
    assert abs(ppl["gguf"] / want - 1) < 0.06  # llama.cpp's Q8 activations (see test_architectures' eval test)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qalora", "dlqat", "qat-lora", "lora", "rtn"])
def test_every_method_trains_and_folds(base, text_data, work, method):
    extra = {"qat_lora_export": "merge"} if method == "qat-lora" else {}
    rep = verify_fold(trained(base, text_data, work, method, extra=extra))
    assert rep["passed"], rep.get("summary")
    assert rep["n_layers"] == 6 * 7
    if method not in ("qat-lora", "lora"):
        assert rep["n_bit_identical"] == 6 * 7
