"""l4q-eval: scorers on hand-checked cases (fake backends whose answers are known by construction), the ONNX
backend on a hand-built graph, the CLI on a real checkpoint, and PyTorch vs llama.cpp perplexity of the float
stories260K model (f32 GGUF written here with gguf-py, independently of our exporter)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared

from l4q_export.errors import L4QInputError
from l4q_export.eval.backends import log_softmax
from l4q_export.eval.perplexity import perplexity, strided_nll
from l4q_export.eval.tasks import Doc, Scorer, hellaswag_preprocess, mc_docs, mmlu, mmlu_prompt, score_docs


class CharBackend:
    """Tokens are characters.  `table(ids)` gives raw per-row log-prob rows (no normalisation needed by scorers)."""

    name = "fake"

    def __init__(self, table, max_length: int = 64, vocab: int = 128) -> None:
        self.table, self.max_length, self.vocab = table, max_length, vocab
        self.bos_id, self.eot_id = 1, 2
        self.calls: list[list[int]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.calls.append(list(ids))
        return self.table(ids)


def test_log_softmax_rows_normalised():
    lp = log_softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
    assert lp[0].tolist() == [math.log(0.5)] * 2
    assert lp[1, 0] == 0.0 and lp[1, 1] == -1000.0


def test_strided_windows_score_each_token_once_with_window_context():
    # Row j (j tokens of context inside the window) has logits [0, j]; every id is 0, so -log p = log(1 + e^j).
    def table(ids):
        return log_softmax(np.array([[0.0, float(j)] for j in range(len(ids))]))

    b = CharBackend(table, max_length=4, vocab=2)
    nll, n, windows = strided_nll(b, [0] * 10, max_length=4, stride=2)
    # windows [0,4) scores positions 1,2,3 (j=0,1,2); [2,6) 4,5; [4,8) 6,7; [6,10) 8,9 (j=1,2 each)
    want = math.log(2) + 4 * (math.log(1 + math.e) + math.log(1 + math.e**2))  # j=0 once; j=1 and j=2 four times each
    assert (n, windows) == (9, 4)
    assert nll == pytest.approx(want, rel=1e-12)
    assert [len(c) for c in b.calls] == [4, 4, 4, 4]


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    b = CharBackend(lambda ids: np.full((len(ids), 128), -math.log(128)), max_length=32)
    r = perplexity(b, text, max_tokens=300, stride=8)
    assert r["ppl"] == pytest.approx(128.0, rel=1e-12)
    assert r["tokens"] == 300 and r["tokens_scored"] == 299
    with pytest.raises(L4QInputError):
        perplexity(b, tmp_path / "missing.txt")


def _char_logprob_table(lp_of: dict[str, float]):
    """Every row gives log p(c) = lp_of[c] (default -5) whatever the context."""
    row = np.full(256, -5.0)
    for c, v in lp_of.items():
        row[ord(c)] = v
    return lambda ids: np.tile(row, (len(ids), 1))


def test_acc_and_acc_norm_differ_by_construction():
    # " a": ll = 0 - 1.0 = -1.0 ; " bbbb": ll = 4 * -0.4 = -1.6  -> acc picks "a", acc_norm (-1/1 vs -1.6/4) picks "bbbb".
    b = CharBackend(_char_logprob_table({" ": 0.0, "a": -1.0, "b": -0.4}))
    doc = Doc(["Q:"] * 2, [" a", " bbbb"], ["a", "bbbb"], gold=1)
    r = score_docs(b, [doc, doc])
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["n"] == 2


def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    b = CharBackend(_char_logprob_table({}))
    sc = Scorer(b)
    assert sc.encode_pair("Q: ", "x") == ([ord("Q"), ord(":")], [ord(" "), ord("x")])
    assert sc.encode_pair("", " x") == ([b.eot_id], [ord(" "), ord("x")])


def test_context_is_truncated_from_the_left():
    b = CharBackend(_char_logprob_table({"z": -2.0}), max_length=8)
    ll = Scorer(b).loglikelihood("0123456789abcdef", "zz")
    assert ll == -4.0
    assert b.calls[-1] == [ord(c) for c in "9abcdefz"]  # (ctx + cont)[-(8+1):][:-1]


def test_forward_pass_is_shared_only_when_inputs_coincide():
    # " A".." D" differ only in the last token, so (ctx + cont)[:-1] is the same input for all four: one pass.
    b = CharBackend(_char_logprob_table({"B": -0.1}))
    r = score_docs(b, [Doc(["Question?\nAnswer:"] * 4, [" A", " B", " C", " D"], list("ABCD"), gold=1)], norm=False)
    assert len(b.calls) == 1 and r["acc"] == 1.0
    b2 = CharBackend(_char_logprob_table({"B": -0.1}))
    score_docs(b2, [Doc(["Q:"] * 2, [" AA", " BB"], ["AA", "BB"], gold=1)], norm=False)
    assert len(b2.calls) == 2


def test_hellaswag_preprocess_matches_harness_rules():
    assert hellaswag_preprocess(" Roof [title] Remove the shingles. [step]  Then  go ") == "Roof. Remove the shingles.  Then go"


def test_mmlu_prompt_and_scoring(tmp_path):
    root = tmp_path / "mmlu"
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "dev" / "toy_topic_dev.csv").write_text("1+1?,1,2,3,4,B\n2+2?,3,4,5,6,B\n")
    (root / "test" / "toy_topic_test.csv").write_text("q1,a,b,c,d,B\nq2,a,b,c,d,C\nq3,a,b,c,d,B\n\"q, 4\",a,b,c,d,A\n")
    want = ("The following are multiple choice questions (with answers) about toy topic.\n\n"
            "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
            "q1\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert mmlu_prompt("toy topic", [["1+1?", "1", "2", "3", "4", "B"]], ["q1", "a", "b", "c", "d", "B"]) == want
    b = CharBackend(_char_logprob_table({"B": -0.1, " ": 0.0}), max_length=4096)
    r = mmlu(b, tmp_path, shots=1)
    assert r["n"] == 4 and r["acc"] == 0.5 and r["subjects"]["toy_topic"]["acc"] == 0.5
    assert r["acc_macro"] == 0.5 and r["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3), rel=1e-12)
    r2 = mmlu(b, tmp_path, shots=0, limit=1)
    assert r2["n"] == 1 and r2["acc"] == 1.0


def test_local_sets_build_harness_prompts():
    data = require_shared("eval")
    arc = mc_docs("arc_easy", data, limit=2)
    assert len(arc) == 2 and arc[0].contexts[0].startswith("Question: ") and arc[0].contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in arc[0].continuations)
    boolq = mc_docs("boolq", data, limit=1)[0]
    assert boolq.choices == ["no", "yes"]
    wg = mc_docs("winogrande", data, limit=1)[0]
    assert wg.contexts[0] != wg.contexts[1] and wg.continuations[0] == wg.continuations[1]
    hs = mc_docs("hellaswag", data, limit=1)[0]
    assert len(hs.choices) == 4 and hs.gold == 3
    piqa = mc_docs("piqa", data, limit=1)[0]
    assert piqa.contexts[0].endswith("?\nAnswer:")
    with pytest.raises(L4QInputError):
        mc_docs("siqa_typo", data)


def test_onnx_backend_on_hand_built_graph(tmp_path, stories_dir):
    """logits = table[input_ids]; the optimum-style past inputs are fed empty.  Expected values by numpy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from l4q_export.formats.onnx.runtime import OrtBackend

    rng = np.random.default_rng(0)
    V = 512
    table = rng.normal(size=(V, V)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"])]
    for n in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{n}", TensorProto.FLOAT, ["b", 4, "p", 8]))
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "g", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])],
                              initializer=[numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    d = tmp_path / "onnx"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    (d / "config.json").write_text((stories_dir / "config.json").read_text())  # exporters put config.json beside it
    b = OrtBackend(d, tokenizer=stories_dir)
    ids = [1, 5, 9, 300]
    got = b.logprobs(ids)
    rows = table[ids].astype(np.float64)
    want = rows - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True)) - rows.max(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert b.max_length == 512 and b.encode("Once upon a time") == b.encode("Once upon a time")


def test_cli_on_checkpoint_fold_equals_train_forward(stories_checkpoint, tmp_path):
    """An exact method's exported weights and training forward give the same perplexity; JSON + table written."""
    from click.testing import CliRunner

    from l4q_export.eval.cli import main, run_eval

    text = require_shared("text", "wikitext2_test.txt")
    data = require_shared("eval")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, [str(stories_checkpoint), "--tasks", "ppl,arc_easy,winogrande,boolq", "--text", str(text),
                                    "--data-dir", str(data), "--limit", "4", "--max-tokens", "700", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["backend"] == "torch[l4q, fold]" and "| perplexity |" in res.output
    assert rep["results"]["arc_easy"]["n"] == 4 and "acc_norm" in rep["results"]["arc_easy"]
    assert "acc_norm" not in rep["results"]["winogrande"] and "acc_norm" not in rep["results"]["boolq"]  # harness: acc only
    train = run_eval(stories_checkpoint, ["ppl"], text=text, max_tokens=700, forward="train")
    assert train["results"]["ppl"]["ppl"] == pytest.approx(rep["results"]["ppl"]["ppl"], rel=1e-5)
    bad = CliRunner().invoke(main, [str(stories_checkpoint), "--tasks", "ppl"])
    assert bad.exit_code == 2 and "--text" in bad.output


def write_f32_gguf(model_dir: Path, path: Path) -> None:
    """The unquantized HF LLaMA as an all-F32 GGUF, written with gguf-py only (llama.cpp's own Q/K row order)."""
    import gguf
    import sentencepiece as spm
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    nh, nkv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hd)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    toks, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        toks.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())

    def permute(x: np.ndarray, heads: int) -> np.ndarray:  # HF rotate-half rows -> llama.cpp interleaved rows
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        for hf, name in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                         ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
                         ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + hf + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], nkv))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
@pytest.mark.runtime
def test_float_stories_perplexity_pytorch_vs_llamacpp_f32(stories_dir, tmp_path):
    from l4q_export.eval.backends import TorchBackend
    from l4q_export.eval.perplexity import text_ids
    from l4q_export.formats.gguf.runtime import LlamaCppBackend

    text = require_shared("text", "wikitext2_test.txt")
    gg = tmp_path / "stories_f32.gguf"
    write_f32_gguf(stories_dir, gg)
    torch_b = TorchBackend(stories_dir)
    cpp_b = LlamaCppBackend(gg, threads=2)
    ids = text_ids(torch_b, text, max_tokens=3000)  # the same ids for both: this compares the runtimes' numerics
    t_nll, n, _ = strided_nll(torch_b, ids, 512, 256)
    c_nll, n2, _ = strided_nll(cpp_b, ids, 512, 256)
    ppl_t, ppl_c = math.exp(t_nll / n), math.exp(c_nll / n2)
    assert n == n2 == 2999
    assert abs(ppl_c - ppl_t) / ppl_t < 1e-3, (ppl_t, ppl_c)
    # and each runtime's own tokenizer agrees on this text (llama.cpp reads the vocab we embedded)
    sample = text.read_text()[:2000]
    assert cpp_b.encode(sample) == torch_b.encode(sample)


# ------------------------------------------------------------------------------------- hand-checked additions


def test_stderr_is_the_harness_sample_standard_error():
    # acc = 1/3 over 3 docs: lm-evaluation-harness's mean_stderr = sqrt(var_sample / n) = sqrt(p (1 - p) / (n - 1)).
    b = CharBackend(_char_logprob_table({" ": 0.0, "a": -1.0, "b": -2.0}))
    good, bad = Doc(["Q:"] * 2, [" a", " b"], ["a", "b"], gold=0), Doc(["Q:"] * 2, [" a", " b"], ["a", "b"], gold=1)
    r = score_docs(b, [good, bad, bad])
    assert r["acc"] == pytest.approx(1 / 3, abs=1e-15)
    assert r["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2), rel=1e-12)
    assert math.isnan(score_docs(b, [good])["acc_stderr"])  # one sample has no sample variance


def test_acc_norm_divides_by_choice_characters_not_tokens_and_first_maximum_wins():
    # Choices "ab" (2 chars, 2 tokens) and "c" (1 char).  ll(" ab") = -1 + -1 = -2 -> -1/char; ll(" c") = -1 -> -1/char:
    # a tie under acc_norm goes to the first choice (numpy argmax), and acc picks " c" (-1 > -2).
    b = CharBackend(_char_logprob_table({" ": 0.0, "a": -1.0, "b": -1.0, "c": -1.0}))
    r = score_docs(b, [Doc(["Q:"] * 2, [" ab", " c"], ["ab", "c"], gold=0)])
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0


def test_mmlu_zero_and_five_shot_prompts_are_the_harness_format(tmp_path):
    root = tmp_path / "mmlu"
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    dev = [[f"d{i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(6)]
    (root / "dev" / "high_school_physics_dev.csv").write_text("".join(",".join(r) + "\n" for r in dev))
    (root / "test" / "high_school_physics_test.csv").write_text(" What is g? ,9.8,8.9,1,0,A\n")
    row = [" What is g? ", "9.8", "8.9", "1", "0", "A"]
    zero = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
            "What is g?\nA. 9.8\nB. 8.9\nC. 1\nD. 0\nAnswer:")
    assert mmlu_prompt("high school physics", [], row) == zero
    five = mmlu_prompt("high school physics", dev[:5], row)
    shots = "".join(f"d{i}?\nA. w\nB. x\nC. y\nD. z\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5))
    assert five == zero.replace("physics.\n\n", "physics.\n\n" + shots, 1)

    seen: list[str] = []

    class Recorder(CharBackend):
        def logprobs(self, ids):
            seen.append("".join(chr(i) for i in ids))
            return super().logprobs(ids)

    b = Recorder(_char_logprob_table({}), max_length=4096)
    for shots_n, want in ((0, zero), (5, five)):
        seen.clear()
        r = mmlu(b, tmp_path, shots=shots_n)
        # the model reads the prompt plus " X" minus the last token: exactly the prompt and the space
        assert seen == [want + " "] and r["n"] == 1 and r["shots"] == shots_n
        assert r["acc"] == 1.0  # equal log-likelihoods: the first choice (A, the gold) wins


@pytest.mark.runtime
def test_multiple_choice_on_real_model_matches_independent_computation(stories_dir):
    """loglikelihood(context, continuation) on stories260K vs a from-scratch computation: SentencePiece ids,
    transformers logits, torch log_softmax, summed over the continuation tokens (harness rules: no BOS, the
    continuation tokens are what the whole string adds after the context's own encoding)."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    from l4q_export.eval.backends import TorchBackend

    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()

    def ll(context: str, cont: str) -> float:
        ctx_ids = sp.encode(context)
        whole = sp.encode(context + cont)
        assert whole[: len(ctx_ids)] == ctx_ids  # true for these strings, so the split is unambiguous
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
        return float(sum(lp[len(ctx_ids) - 1 + i, t] for i, t in enumerate(whole[len(ctx_ids):])))

    context = "Question: Where did the little cat sleep?\nAnswer:"
    choices = ["in a warm basket", "on the moon", "under the big tree by the house"]
    want = [ll(context, " " + c) for c in choices]
    sc = Scorer(TorchBackend(stories_dir))
    got = [sc.loglikelihood(context, " " + c) for c in choices]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    gold = 2
    r = score_docs(sc.b, [Doc([context] * 3, [" " + c for c in choices], choices, gold)])
    assert r["acc"] == float(int(np.argmax(want)) == gold)
    assert r["acc_norm"] == float(int(np.argmax(np.array(want) / [len(c) for c in choices])) == gold)


@pytest.mark.runtime
def test_perplexity_equals_transformers_own_loss_in_one_window(stories_dir, tmp_path):
    """With the whole text inside one window, ppl = exp(transformers' mean causal-LM loss over the same ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    from l4q_export.eval.backends import TorchBackend
    from l4q_export.eval.perplexity import text_ids

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
                    "One day, she saw a big red ball in the park.")
    b = TorchBackend(stories_dir)
    ids = text_ids(b, text)
    assert ids[0] == b.bos_id and len(ids) < b.max_length
    r = perplexity(b, text)
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert (r["windows"], r["tokens_scored"]) == (1, len(ids) - 1)
    assert r["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
