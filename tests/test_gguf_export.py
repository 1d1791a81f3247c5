"""GGUF export end to end: llama.cpp (llama-cpp-python) loads what we write and reproduces the trained model.

The golden side is always independent of the exporter: the PyTorch training model with fake quantization,
gguf-py's decoder, SentencePiece / the HF tokenizer, and llama.cpp itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import require_shared

from l4q_export.checkpoint import load_checkpoint
from l4q_export.errors import FidelityError, L4QInputError
from l4q_export.formats import get_target
from l4q_export.formats.gguf import check as C
from l4q_export.formats.gguf import writer as G
from l4q_export.verify import compare_runtime, verify_artifact

TARGET = get_target("gguf")


def export(model_dir: Path, out: Path, **kw):
    return TARGET.write(model_dir, out, **kw).to_dict()


def verify(artifact: Path, model_dir: Path):
    return verify_artifact(TARGET, Path(artifact), Path(model_dir))

pytestmark = pytest.mark.runtime


def _field(path: Path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


@pytest.fixture(scope="module")
def llama_ck(tmp_path_factory, tiny_base):
    """tiny_base with q/k weights scaled up so attention is far from uniform: only then do the logits depend on
    the Q/K row layout (a random init at std 0.02 attends almost uniformly whatever the row order)."""
    from conftest import make_checkpoint
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("gguf_llama")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    w = load_file(str(base / "model.safetensors"))
    w = {k: v * 30 if (".q_proj." in k or ".k_proj." in k) else v for k, v in w.items()}
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    return make_checkpoint(base, root / "ck", bits=4, group_size=32, fp16_grid=True)


def test_gqa_llama_exact_and_llama_cpp_matches_pytorch(llama_ck, tmp_path):
    """tiny_base has 4 query / 2 KV heads: the Q/K row permutation must use n_kv for K."""
    rep = export(llama_ck, tmp_path / "m.gguf")
    assert rep["artifact"] == str(tmp_path / "m.gguf")
    assert rep["n_exact"] == rep["n_quantized"] == 14 and rep["main_type"] == "Q4_1"
    assert {r["gguf"] for r in rep["layers"] if r["permuted"]} == {f"blk.{i}.attn_{x}.weight" for i in (0, 1) for x in "qk"}
    v = verify(Path(rep["artifact"]), llama_ck)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 14 and v["max_abs_error"] == 0.0
    lg = v["logits"]
    assert lg["top1_agreement"] >= 0.9 and lg["mean_kl"] < 5e-3 and lg["rel_l2"] < 0.1
    assert v["greedy"]["passed"] and v["greedy"]["matched"] == v["greedy"]["required"]
    assert v["checks"]["tokenizer"]["truth"] == "sentencepiece" and v["checks"]["tokenizer"]["passed"]


def test_without_permutation_llama_cpp_disagrees(llama_ck, tmp_path, monkeypatch):
    """Negative control: the logits check really sees the Q/K layout (so the test above can fail)."""
    monkeypatch.setattr(G, "qk_permutation", lambda *a, **k: None)
    rep = export(llama_ck, tmp_path / "bad.gguf")
    monkeypatch.undo()
    art = Path(rep["artifact"])
    bad = compare_runtime(TARGET.runtime(art), load_checkpoint(llama_ck), TARGET.tolerance(art))[0]
    # measured: rel_l2 1.07, top1 0.09 (correct layout: 0.07, 0.94)
    assert bad["rel_l2"] > 0.5 and bad["top1_agreement"] < 0.5


@pytest.fixture(scope="module")
def llama3_rope_ck(tmp_path_factory, llama_ck):
    """llama_ck's base with LLaMA 3.1 rope scaling; original context 16 puts 7 of the 8 rotary frequencies of
    head_dim 16 in the scaled or ramp region, so a file without the factors gives visibly different logits."""
    from conftest import make_checkpoint

    root = tmp_path_factory.mktemp("gguf_llama3_rope")
    base = root / "base"
    shutil.copytree(load_checkpoint(llama_ck).base_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(max_position_embeddings=512, rope_theta=10000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})
    (base / "config.json").write_text(json.dumps(cfg))
    return make_checkpoint(base, root / "ck", bits=4, group_size=32, fp16_grid=True)


def test_llama3_rope_scaling_matches_transformers(llama3_rope_ck, tmp_path, monkeypatch):
    """LLaMA 3.1 rope scaling: llama.cpp with our rope_freqs.weight reproduces transformers' llama3 RoPE, and the
    check sees the difference (negative control: the same file without the factors)."""
    rep = export(llama3_rope_ck, tmp_path / "m.gguf")
    names = [t.name for t in gguf.GGUFReader(rep["artifact"]).tensors]
    assert "rope_freqs.weight" in names
    v = verify(Path(rep["artifact"]), llama3_rope_ck)
    assert v["passed"], v["summary"]
    good = v["logits"]
    monkeypatch.setattr(G, "rope_freq_factors", lambda cfg: None)
    bad_rep = export(llama3_rope_ck, tmp_path / "no_factors.gguf")
    monkeypatch.undo()
    bad = verify(Path(bad_rep["artifact"]), llama3_rope_ck)["logits"]
    assert good["mean_kl"] < 5e-3 and good["top1_agreement"] >= 0.9
    # measured: with the factors mean KL 5.0e-5, top-1 0.91; without them 1.2e-2, top-1 0.19
    assert bad["mean_kl"] > 10 * good["mean_kl"] and bad["top1_agreement"] < 0.5, (good, bad)


def test_unsupported_rope_scaling_is_refused(llama3_rope_ck, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(llama3_rope_ck, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(L4QInputError, match="rope scaling 'yarn'"):
        export(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_two_exports_are_byte_identical(llama_ck, tmp_path):
    a = export(llama_ck, tmp_path / "a.gguf")["artifact"]
    b = export(llama_ck, tmp_path / "sub" / "b.gguf")["artifact"]
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_failing_export_leaves_no_file(llama_ck, tmp_path, monkeypatch):
    dest = tmp_path / "out" / "m.gguf"
    calls = {"n": 0}
    real = G.P.pack_measured

    def boom(qt, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash mid-export")
        return real(qt, name)

    monkeypatch.setattr(G.P, "pack_measured", boom)
    with pytest.raises(RuntimeError):
        export(llama_ck, dest)
    assert not dest.exists()
    assert not dest.parent.exists()  # no temp or scratch file left behind, nor the directory the export created
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        export(llama_ck, dest)
    assert dest.read_bytes() == b"previous"


def test_lossy_types_refused_without_flag(llama_ck, tmp_path):
    for t in ("q4_k", "q2_k", "q6_k", "q3_k"):
        with pytest.raises(FidelityError, match="--allow-lossy"):
            export(llama_ck, tmp_path / f"{t}.gguf", gguf_type=t)
        assert not (tmp_path / f"{t}.gguf").exists()
    with pytest.raises(FidelityError, match="cannot hold"):  # float offsets have no place in Q4_0
        export(llama_ck, tmp_path / "q40.gguf", gguf_type="q4_0")
    assert not (tmp_path / "q40.gguf").exists()


def test_bad_input(tmp_path, llama_ck):
    with pytest.raises(L4QInputError):
        export(tmp_path / "missing", tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not gguf")
    assert not TARGET.detect(tmp_path / "x.gguf")
    with pytest.raises(L4QInputError):
        verify(tmp_path / "x.gguf", llama_ck)


def test_truncated_file_is_one_input_error(tmp_path, llama_ck):
    """gguf-py raises a bare ValueError on a cut-off file: verify and the runtime (l4q-eval) name the file instead."""
    art = Path(export(llama_ck, tmp_path / "m.gguf")["artifact"])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(art.read_bytes()[: art.stat().st_size // 2])
    with pytest.raises(ValueError):  # the library's own behaviour, which the target must not leak
        gguf.GGUFReader(str(cut))
    assert TARGET.detect(cut)  # the magic is intact: it is handed to the gguf target
    for call in (lambda: verify(cut, llama_ck), lambda: TARGET.runtime(cut), lambda: TARGET.read_back(cut)):
        with pytest.raises(L4QInputError, match=r"cut\.gguf is not a complete GGUF file"):
            call()


def test_architecture_mismatch_is_an_input_error(tmp_path, llama_ck, tiny_qwen2, checkpoint_factory):
    """A llama GGUF verified against a Qwen2 checkpoint is a wrong pairing (exit 2), named as such -- not a
    fidelity failure reported as missing or differing tensors."""
    art = Path(export(llama_ck, tmp_path / "m.gguf")["artifact"])
    qwen_ck = checkpoint_factory(tiny_qwen2, bits=4, group_size=32, fp16_grid=True)
    with pytest.raises(L4QInputError, match=r"architecture 'llama', but the checkpoint .* is 'qwen2'"):
        verify(art, qwen_ck)
    assert verify(art, llama_ck)["passed"]  # the same file against its own checkpoint passes


def test_layer_count_mismatch_is_an_input_error(tmp_path, tiny_base, checkpoint_factory):
    """A 3-layer llama GGUF verified against a 2-layer llama checkpoint: the two layers they share compare equal
    in levels (a) and (b), so the pairing itself is refused (exit 2), not reported as a logit mismatch."""
    from l4q_export.demo import build_tiny_model

    ck3 = checkpoint_factory(build_tiny_model(tmp_path / "base3", layers=3), bits=4, group_size=32, fp16_grid=True)
    art = Path(export(ck3, tmp_path / "m3.gguf")["artifact"])
    with pytest.raises(L4QInputError, match=r"m3\.gguf has 3 decoder layers, but the checkpoint .* has 2"):
        verify(art, checkpoint_factory(tiny_base, bits=4, group_size=32, fp16_grid=True))


def test_tampered_file_fails_verification(llama_ck, tmp_path):
    art = Path(export(llama_ck, tmp_path / "m.gguf")["artifact"])
    r = gguf.GGUFReader(str(art), "r+")
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")
    t.data[0, 5] ^= 0x21  # two codes of the first block
    r.data.flush()
    del r
    v = verify(art, llama_ck)
    assert not v["passed"] and v["n_codes_identical"] == 13



def test_row_slices_catch_what_one_slice_does(tiny_base, checkpoint_factory, tmp_path, monkeypatch):
    """verify walks a GGUF tensor in slices of rows (`Decoded.rows`); at the tiny sizes of these tests one slice is
    the whole tensor.  With one row per slice, a code changed in the last row of a permuted q_proj (its HF row is
    not its GGUF row) and of a down_proj must be caught at those tensors alone, and every other tensor's measured
    error must be the exporter's own per-tensor measurement (its fp32 scale grid makes it non-zero)."""
    from l4q_export import verify as V

    ck = checkpoint_factory(tiny_base, bits=3, group_size=64, fp16_grid=False)
    art = Path(export(ck, tmp_path / "f.gguf")["artifact"])
    declared = json.loads(_field(art, G.REPORT_KEY))
    tampered = {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
    r = gguf.GGUFReader(str(art), "r+")
    for t in r.tensors:
        if t.name in tampered:
            t.data[-1, -1] ^= 0x11  # the last block's last byte: two codes of the tensor's last GGUF row
    r.data.flush()
    del r
    whole = V.verify_tensors(TARGET, art, ck)["layers"]
    monkeypatch.setattr(V, "ROW_SLICE_ELEMENTS", 1)
    sliced = V.verify_tensors(TARGET, art, ck)["layers"]
    assert {row["gguf"] for row in sliced if not row["codes_identical"]} == tampered
    assert all(row["fields_differing"] == ["codes"] and not row["within_bound"] for row in sliced if row["gguf"] in tampered)
    assert all(row["max_abs_error"] == declared[row["gguf"]]["max_abs_error"] > 0 for row in sliced
               if row["gguf"] not in tampered)
    assert sliced == whole

@pytest.mark.slow
def test_lossy_kquant_with_flag_keeps_codes(tmp_path_factory, checkpoint_factory):
    from l4q_export.demo import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("wide"), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=1)
    ck = checkpoint_factory(base, bits=4, group_size=32, fp16_grid=True)
    rep = export(ck, tmp_path_factory.mktemp("o") / "k.gguf", gguf_type="q4_k", allow_lossy=True)
    rows = [r for r in rep["layers"] if "lossy_scales" in r]
    assert {r["type"] for r in rows} == {"Q4_K"}
    assert all(r["max_abs_error"] > 0 and not r["exact"] for r in rows)
    v = verify(Path(rep["artifact"]), ck)
    assert v["n_codes_identical"] == v["n_quantized"] == 7 and v["n_within_bound"] == 7
    assert v["logits"]["top1_agreement"] > 0.8


def test_integer_zero_point_uses_offset_types_exactly(tiny_base, checkpoint_factory, tmp_path):
    ck = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="integer", fp16_grid=True)
    rep = export(ck, tmp_path / "z.gguf")
    assert {r["type"] for r in rep["layers"] if "lossy_scales" in r} <= {"Q4_0", "Q5_0"}
    assert rep["n_exact"] == rep["n_quantized"]
    v = verify(Path(rep["artifact"]), ck)
    assert v["passed"], v["summary"]


def test_fp32_scale_grid_declares_a_bound(tiny_base, checkpoint_factory, tmp_path):
    ck = checkpoint_factory(tiny_base, bits=3, group_size=64, fp16_grid=False)
    rep = export(ck, tmp_path / "f.gguf")
    rows = [r for r in rep["layers"] if "lossy_scales" in r]
    assert all(r["type"] == "Q4_1" and not r["exact"] and 0 < r["max_abs_error"] < 1e-3 for r in rows)
    declared = json.loads(_field(Path(rep["artifact"]), G.REPORT_KEY))
    assert all(declared[r["gguf"]]["max_abs_error"] == r["max_abs_error"] for r in rows)
    v = verify(Path(rep["artifact"]), ck)
    assert v["n_within_bound"] == v["n_quantized"] and v["n_codes_identical"] == len(rows)


# ------------------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------------------

def _bpe_qwen2_dir(tmp: Path, tiny_qwen2: Path) -> Path:
    """A tiny Qwen2 whose tokenizer is a byte-level BPE (Qwen2 split regex) trained here with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from l4q_export.demo import _corpus, instruction_records
    from l4q_export.formats.gguf.vocab import _QWEN2_RE

    d = tmp / "qwen2_bpe"
    shutil.copytree(tiny_qwen2, d)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    n_vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(_corpus(instruction_records()).splitlines(), trainer)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    fast.save_pretrained(str(d))
    assert len(fast) <= n_vocab
    return d


@pytest.mark.slow
def test_bpe_qwen2_tokenizer_and_biases(tmp_path, tiny_qwen2, checkpoint_factory):
    base = _bpe_qwen2_dir(tmp_path, tiny_qwen2)
    ck = checkpoint_factory(base, bits=4, group_size=32, fp16_grid=True)
    rep = export(ck, tmp_path / "q.gguf")
    art = Path(rep["artifact"])
    assert rep["arch"] == "qwen2" and rep["tokenizer"]["tokenizer"] == "gpt2" and rep["tokenizer"]["pre"] == "qwen2"
    assert not any(r["permuted"] for r in rep["layers"])  # NEOX rope: no Q/K permutation
    names = {t.name for t in gguf.GGUFReader(str(art)).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert _field(art, "tokenizer.ggml.pre") == "qwen2" and "im_start" in _field(art, "tokenizer.chat_template")
    v = verify(art, ck)
    assert v["passed"], v["summary"]
    tk = v["checks"]["tokenizer"]
    assert tk["truth"] == "hf" and tk["n_match"] == tk["n_texts"]
    texts = require_shared("vocab", "ggml-vocab-gpt-2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    par = C.tokenizer_parity(art, load_checkpoint(ck), texts)
    assert par["passed"], par["mismatches"]


@pytest.mark.shared
def test_spm_llama2_tokenizer_parity(tmp_path):
    """Our SentencePiece metadata for the real LLaMA-2 tokenizer: llama.cpp == SentencePiece == llama.cpp's golden ids."""
    import sentencepiece as spm
    from llama_cpp import Llama

    from l4q_export.formats.gguf.vocab import add_hparams, add_tokenizer

    model = require_shared("tokenizers", "llama2_tokenizer.model")
    inp = require_shared("vocab", "ggml-vocab-llama-spm.gguf.inp")
    outs = inp.with_name("ggml-vocab-llama-spm.gguf.out").read_text().strip("\n").split("\n")
    texts = inp.read_text().split("\n__ggml_vocab_test__\n")[: len(outs)]
    shutil.copy(model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    cfg = {"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 8}
    add_hparams(w, cfg, "llama", 32000, "v")
    add_tokenizer(w, tmp_path, 32000)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    llm = Llama(model_path=str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text, golden in zip(texts, outs, strict=False):
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert got == sp.encode(text), text
        assert got == [int(x) for x in golden.split()], text


# ------------------------------------------------------------------------------------------------------------
# The real model
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.shared
def test_stories260k_end_to_end(stories_checkpoint, tmp_path):
    rep = export(stories_checkpoint, tmp_path / "s.gguf")
    rows = {r["tensor"]: r for r in rep["layers"]}
    down = [r for n, r in rows.items() if n.endswith("down_proj.weight")]
    assert len(down) == 5 and all(r["type"] == "F32" and r["exact"] and "warning" in r for r in down)  # 172 % 32 != 0
    assert all(r["type"] == "Q4_1" for n, r in rows.items() if "lossy_scales" in r and not n.endswith("down_proj.weight"))
    assert rep["tied_embeddings"] and rep["n_exact"] == rep["n_quantized"] == 35 and len(rep["warnings"]) == 5
    v = verify(Path(rep["artifact"]), stories_checkpoint)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 35 and v["max_abs_error"] == 0.0
    # greedy: every token before the first near-tie of the reference (issue 9: on AMD EPYC llama.cpp took the
    # other side of a near-tie at token 5), and at least the first 4 -- the reference has no near-tie before them
    g = v["greedy"]
    assert v["logits"]["top1_agreement"] >= 0.97 and g["matched"] == g["required"] >= 4, g
    assert np.isfinite(v["logits"]["mean_kl"])


def test_reader_is_parsed_once_per_file_version(tmp_path):
    """The header is parsed once per (path, size, mtime, inode): asked again it is the same reader; the file
    rewritten in place (same size) or replaced is read anew; a missing file is one input-error line."""
    import os

    path = tmp_path / "t.gguf"

    def write(value: int, pad: str = "") -> None:
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_uint32("test.value", value)
        w.add_string("test.pad", pad)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(1)
    first = C.open_reader(path)
    assert C.open_reader(path) is first and C.field(first, "test.value") == 1
    st = os.stat(path)
    write(2)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later mtime even on a coarse clock
    assert os.stat(path).st_size == st.st_size and C.field(C.open_reader(path), "test.value") == 2
    write(3, pad="longer")
    assert C.field(C.open_reader(path), "test.value") == 3
    path.unlink()
    with pytest.raises(L4QInputError):
        C.open_reader(path)
