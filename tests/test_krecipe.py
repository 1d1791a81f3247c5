"""quant/krecipe.py: llama.cpp's per-tensor K-quant types, checked against llama.cpp itself.

The real check quantizes tiny LLaMA GGUFs with llama.cpp (tools/check_krecipe.py) and compares every tensor's type:
through llama-cpp-python's libllama (llama_model_quantize, always available) and, when L4Q_LLAMA_QUANTIZE names a
built `llama-quantize` binary, through the CLI too.  The unit cases below are read off llama-quant.cpp by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from check_krecipe import check  # tools/, on sys.path via conftest
from gguf import GGMLQuantizationType as T

from l4q_export.quant.krecipe import ArchInfo, recipe, use_more_bits

GQA4_UNTIED = ArchInfo(n_head=4, n_head_kv=1, tied_embeddings=False)
SMOL_TIED = ArchInfo(n_head=9, n_head_kv=3, tied_embeddings=True)


def test_use_more_bits_layers():
    # n = 8: first eighth (0), last eighth (7), and every third after the first eighth (3, 6)
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


@pytest.mark.parametrize(
    "ft,name,shape,arch,want",
    [
        ("Q4_K_M", "output.weight", (512, 256), GQA4_UNTIED, T.Q6_K),
        ("Q4_K_M", "token_embd.weight", (512, 256), GQA4_UNTIED, T.Q4_K),  # untied: the default type
        ("Q4_K_M", "token_embd.weight", (256, 576), SMOL_TIED, T.Q8_0),  # tied and 576 % 256 != 0
        ("Q4_K_M", "blk.0.attn_v.weight", (64, 256), GQA4_UNTIED, T.Q6_K),
        ("Q4_K_M", "blk.1.attn_v.weight", (64, 256), GQA4_UNTIED, T.Q4_K),
        ("Q4_K_M", "blk.3.ffn_down.weight", (256, 512), GQA4_UNTIED, T.Q6_K),
        ("Q4_K_M", "blk.3.ffn_down.weight", (256, 640), GQA4_UNTIED, T.Q8_0),  # Q6_K falls back to Q8_0
        ("Q4_K_M", "blk.2.attn_q.weight", (576, 576), SMOL_TIED, T.Q5_0),  # Q4_K falls back to Q5_0
        ("Q3_K_M", "blk.1.attn_v.weight", (64, 256), GQA4_UNTIED, T.Q5_K),
        ("Q3_K_M", "blk.2.attn_v.weight", (64, 256), GQA4_UNTIED, T.Q4_K),
        ("Q3_K_M", "blk.5.attn_output.weight", (256, 256), GQA4_UNTIED, T.Q4_K),
        ("Q2_K", "blk.5.attn_v.weight", (64, 256), GQA4_UNTIED, T.Q4_K),  # n_gqa 4
        ("Q2_K", "blk.5.attn_v.weight", (192, 576), SMOL_TIED, T.Q4_0),  # n_gqa 3: Q3_K, falls back to Q4_0
        ("Q2_K", "blk.5.ffn_up.weight", (512, 256), GQA4_UNTIED, T.Q2_K),
        ("Q2_K", "blk.5.ffn_norm.weight", (256,), GQA4_UNTIED, None),
    ],
)
def test_hand_read_cases(ft, name, shape, arch, want):
    assert recipe(ft, name, shape, 8, arch) == want


def test_unknown_file_type_is_refused():
    with pytest.raises(ValueError, match="unknown K-quant file type"):
        recipe("Q4_K_X", "output.weight", (8, 256), 8, GQA4_UNTIED)


def _assert_ok(report: dict) -> None:
    bad = [(r["model"], r["file_type"], r["mismatches"][:3], r["layout_mismatches"][:3]) for r in report["results"]]
    bad = [b for b in bad if b[2] or b[3]]
    assert report["ok"] and not bad, bad
    assert len(report["results"]) >= 6


@pytest.mark.slow
def test_matches_llama_cpp_quantizer_libllama(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    _assert_ok(check(None, tmp_path, ("Q4_K_M", "Q3_K_M", "Q2_K")))


@pytest.mark.slow
def test_matches_llama_quantize_binary(tmp_path):
    binary = os.environ.get("L4Q_LLAMA_QUANTIZE")
    if not binary or not Path(binary).is_file():
        pytest.skip("set L4Q_LLAMA_QUANTIZE to a built llama-quantize (see tools/check_krecipe.py --build-from) to run")
    _assert_ok(check(Path(binary), tmp_path, ("Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_M", "Q4_K_S")))
