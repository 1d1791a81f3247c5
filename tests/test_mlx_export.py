"""MLX export end to end: mlx-lm loads what we write and reproduces the trained model.

Golden sides are independent of the exporter: `mx.quantize`'s own packing, `mx.dequantize` (MLX's unpacking),
mlx-lm's loader and forward, and the PyTorch training model with fake quantization.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX not installed (pip install 'l4q-export[mlx]'; Linux needs mlx-cpu)")
pytest.importorskip("mlx_lm", reason="mlx-lm not installed (pip install 'l4q-export[mlx]')")

from conftest import make_checkpoint  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from l4q_export.formats.mlx import TARGET, TOLERANCE  # noqa: E402
from l4q_export.formats.mlx.layout import capability  # noqa: E402
from l4q_export.quant import QuantSpec, pack_bits  # noqa: E402
from l4q_export.verify import verify_artifact, verify_tensors  # noqa: E402


def export(ck: Path, out: Path, **kw) -> dict:
    return TARGET.write(ck, out, **kw).to_dict()


def verify(art: Path, ck: Path) -> dict:
    return verify_artifact(TARGET, Path(art), Path(ck))

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packing_matches_mx_quantize(bits, group):
    """Our LSB-first bit stream viewed as uint32 == the words mx.quantize itself writes (3/5/6-bit straddle words)."""
    w = mx.array(np.random.default_rng(bits * group).standard_normal((6, 384)).astype(np.float32))
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    codes = np.array(mx.dequantize(q, mx.ones_like(s), mx.zeros_like(b), group_size=group, bits=bits))
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1  # the full code range is exercised
    ours = np.ascontiguousarray(pack_bits(np.rint(codes).astype(np.uint8), bits)).view("<u4")
    np.testing.assert_array_equal(ours, np.array(q))


def test_capability():
    """layout's kinds (dense = exact but uncompressed), and the protocol answer built on them."""
    import torch

    from l4q_export.formats.base import Bounded, Exact

    assert isinstance(TARGET.capability(QuantSpec(4, 32, "integer"), (64, 64), torch.float16), Exact)
    assert isinstance(TARGET.capability(QuantSpec(4, 32, "integer"), (64, 64), torch.float32), Bounded)
    f4 = QuantSpec(4, 32, "float")
    assert capability(f4, (64, 64)).kind == "exact"
    assert capability(f4, (64, 172)).kind == "dense"  # partial last group
    assert capability(QuantSpec(4, 16, "float"), (64, 64)).kind == "dense"  # MLX has no group of 16
    assert capability(QuantSpec(4, 32, "integer"), (64, 64)).kind == "bounded"
    per_channel = QuantSpec(4, -1, "float")
    assert (capability(per_channel, (8, 64)).group_size, capability(per_channel, (8, 192)).kind) == (64, "dense")


@pytest.fixture(scope="module")
def ck_4g32(tmp_path_factory, tiny_base):
    return make_checkpoint(tiny_base, tmp_path_factory.mktemp("mlx") / "ck", bits=4, group_size=32, fp16_grid=True)


@pytest.fixture(scope="module")
def art_4g32(tmp_path_factory, ck_4g32):
    return Path(export(ck_4g32, tmp_path_factory.mktemp("mlx_out") / "m")["artifact"])


def _assert_exact_pass(v: dict, n: int, n_dense: int = 0) -> None:
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == v["n_quantized"] == n and v["n_dense"] == n_dense and v["max_abs_error"] == 0.0
    lg, gr = v["logits"], v["greedy"]
    assert v["runtime"] == "mlx-lm" and v["n_exact"] == n
    assert lg["top1_agreement"] >= TOLERANCE.min_top1 and lg["mean_kl"] <= TOLERANCE.max_mean_kl
    assert lg["max_abs_dlogit"] <= TOLERANCE.max_abs_dlogit * max(1.0, lg["max_abs_logit"]) == lg["dlogit_limit"]
    assert gr["passed"] and gr["matched"] == gr["required"]
    assert v["checks"]["tokenizer"]["passed"] and v["checks"]["mlx_lm_modules"]["passed"]


def test_tiny_gqa_4bit_g32(ck_4g32, art_4g32):
    cfg = json.loads((art_4g32 / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False
    shard = load_file(str(next(art_4g32.glob("model*.safetensors"))))
    q = "model.layers.0.self_attn.q_proj"
    assert shard[f"{q}.weight"].dtype == np.uint32 and shard[f"{q}.weight"].shape == (64, 64 * 4 // 32)
    assert shard[f"{q}.scales"].dtype == shard[f"{q}.biases"].dtype == np.float16  # fp16 grid -> fp16, exact
    _assert_exact_pass(verify(art_4g32, ck_4g32), 14)


def test_tiny_gqa_3bit_g64(tiny_base, tmp_path):
    ck = make_checkpoint(tiny_base, tmp_path / "ck", bits=3, group_size=64, fp16_grid=True, seed=3)
    rep = export(ck, tmp_path / "m")
    assert rep["exact"] and rep["n_packed"] == 14 and rep["scale_dtypes"] == "float16" and rep["n_exact"] == 14
    _assert_exact_pass(verify(Path(rep["artifact"]), ck), 14)


def test_qwen2_symmetric_8bit(tiny_qwen2, tmp_path):
    """Qwen2 (q/k/v biases stay float beside the packed weights), symmetric zero point at 8 bits."""
    ck = make_checkpoint(tiny_qwen2, tmp_path / "ck", bits=8, group_size=64, zero_point="symmetric", fp16_grid=True)
    rep = export(ck, tmp_path / "m")
    assert rep["n_packed"] == 14
    v = verify(Path(rep["artifact"]), ck)
    assert v["passed"] and v["n_codes_identical"] == 14 and v["max_abs_error"] <= rep["max_abs_error"], v["summary"]


def test_per_channel_mixed_groups(tmp_path):
    """Per-channel: in=64 layers pack at group 64, down_proj (in=128) at group 128 through a per-module override
    that mlx-lm must honour (verify checks the QuantizedLinear it built)."""
    from l4q_export.demo import build_tiny_model

    base = build_tiny_model(tmp_path / "base", intermediate=128)
    ck = make_checkpoint(base, tmp_path / "ck", bits=4, group_size=-1, fp16_grid=True)
    rep = export(ck, tmp_path / "m")
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"]) == (64, 4)
    assert q["model.layers.1.mlp.down_proj"] == {"group_size": 128, "bits": 4, "mode": "affine"}
    v = verify(Path(rep["artifact"]), ck)
    _assert_exact_pass(v, 14)
    built = v["checks"]["mlx_lm_modules"]["built"]
    assert {b for m, b in built.items() if "down_proj" in m} == {"QuantizedLinear/128/4"}


def test_fp32_grid_stores_fp32(tiny_base, tmp_path):
    """Scales off the fp16 grid would round in fp16: the exporter keeps them fp32 (mlx-lm accepts it), still exact."""
    ck = make_checkpoint(tiny_base, tmp_path / "ck", bits=5, group_size=32, fp16_grid=False)
    rep = export(ck, tmp_path / "m")
    assert rep["exact"] and rep["scale_dtypes"] == "float32"
    v = verify(Path(rep["artifact"]), ck)
    assert v["passed"] and v["max_abs_error"] == 0.0, v["summary"]


def test_integer_zero_point_bounded(tiny_base, tmp_path):
    """biases = -d*z: fl(d*u) + fl(-d*z) vs fl((u - z)*d) differs by ulps on an fp32 grid; the bound is declared
    at export (numpy emulation) and verify measures it with mx.dequantize.  Not bit-identical, so it needs
    --allow-lossy (refused without)."""
    from l4q_export.errors import FidelityError

    ck = make_checkpoint(tiny_base, tmp_path / "ck", bits=4, group_size=32, zero_point="integer", fp16_grid=False)
    with pytest.raises(FidelityError, match="allow-lossy"):
        export(ck, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    rep = export(ck, tmp_path / "m", allow_lossy=True)
    assert not rep["exact"] and 0.0 < rep["max_abs_error"] < 1e-6  # measured: 7.5e-9
    assert {r["capability"] for r in rep["layers"]} == {"bounded"}
    v = verify(Path(rep["artifact"]), ck)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 14 and v["n_within_bound"] == 14 and 0.0 < v["max_abs_error"] <= rep["max_abs_error"]


def test_dense_fallback(tiny_base, tmp_path):
    """Group 16 is not an MLX group: every linear stays dense (fp32 W_q, exact), no quantization block."""
    ck = make_checkpoint(tiny_base, tmp_path / "ck", bits=4, group_size=16, fp16_grid=True)
    rep = export(ck, tmp_path / "m")
    assert rep["n_dense"] == 14 and rep["n_packed"] == 0 and rep["exact"]
    assert "quantization" not in json.loads((tmp_path / "m" / "config.json").read_text())
    _assert_exact_pass(verify(Path(rep["artifact"]), ck), 14, n_dense=14)


def test_flipped_code_fails_verify(ck_4g32, art_4g32, tmp_path):
    """Negative control: one 4-bit code changed in the packed words -> verify fails on that tensor."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art_4g32, bad)
    shard = next(bad.glob("model*.safetensors"))
    t = load_file(str(shard))
    name = "model.layers.1.mlp.up_proj.weight"
    t[name] = t[name].copy()
    t[name][3, 2] ^= np.uint32(1)  # lowest bit of code (3, 16)
    save_file(t, str(shard), metadata={"format": "mlx"})
    v = verify_tensors(TARGET, bad, ck_4g32)  # levels (a)/(b): no runtime needed to catch it
    assert v["n_codes_identical"] == v["n_quantized"] - 1
    bad_rows = [r for r in v["layers"] if not r["codes_identical"]]
    assert [r["tensor"] for r in bad_rows] == [name] and bad_rows[0]["fields_differing"] == ["codes"]
    assert not bad_rows[0]["within_bound"]
    assert not verify(bad, ck_4g32)["passed"]


def test_mlx_lm_generate_runs(art_4g32):
    """mlx-lm's own CLI and Python API generate from the exported directory."""
    from mlx_lm import generate, load

    model, tok = load(str(art_4g32))
    text = generate(model, tok, "Once upon a time", max_tokens=8)
    assert isinstance(text, str) and text
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(art_4g32), "--prompt", "Once upon a time",
                        "--max-tokens", "8"], capture_output=True, text=True, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Generation:" in r.stdout


def test_cli_export_and_verify(ck_4g32, tmp_path):
    from click.testing import CliRunner

    from l4q_export.cli import _export_command
    from l4q_export.verify import main as verify_main

    out = tmp_path / "cli"
    r = CliRunner().invoke(_export_command(), ["--to", "mlx", str(ck_4g32), "-o", str(out), "--mlx-shard-size", "100KB"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_shards"] > 1
    r = CliRunner().invoke(verify_main, [str(out), "--model", str(ck_4g32), "--quiet"])
    assert r.exit_code == 0 and r.output.strip().endswith("PASS"), r.output  # stderr holds loader progress bars


def test_eval_backend_matches_torch(ck_4g32, art_4g32):
    from l4q_export.eval.backends import open_backend

    mlx_b, torch_b = open_backend(art_4g32), open_backend(ck_4g32, forward="train")
    assert mlx_b.name == "mlx-lm"
    ids = [torch_b.bos_id, *torch_b.encode("The little girl went to the park")]
    assert mlx_b.encode("The little girl") == torch_b.encode("The little girl")
    assert np.abs(mlx_b.logprobs(ids) - torch_b.logprobs(ids)).max() < 1e-4


@pytest.mark.slow
@pytest.mark.shared
def test_stories260k(stories_checkpoint, tmp_path):
    """Really trained stories260K (4-bit g32, fp16 grid): down_proj (in 172) stays dense, the rest packs, all exact."""
    rep = export(stories_checkpoint, tmp_path / "m")
    assert rep["n_packed"] == 30 and rep["n_dense"] == 5 and rep["exact"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.down_proj"] is False
    _assert_exact_pass(verify(Path(rep["artifact"]), stories_checkpoint), 35, n_dense=5)


def test_registry_lists_mlx_only_with_its_runtime(monkeypatch):
    """The registry entry is there, but `available()` drops it when mlx / mlx_lm cannot be imported."""
    from l4q_export import formats

    assert "mlx" in formats.available() and formats.get_target("mlx") is TARGET
    monkeypatch.setitem(formats.REQUIRES, "mlx", ("l4q_no_such_runtime",))
    assert "mlx" not in formats.available()


def test_l4q_eval_cli_dispatches_to_mlx(art_4g32, tmp_path):
    """`l4q-eval DIR` on an MLX export reaches mlx-lm through detect_target, with no MLX hook in eval."""
    from click.testing import CliRunner

    from l4q_export.eval.cli import main as eval_main

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little rabbit in the garden. " * 8)
    r = CliRunner().invoke(eval_main, [str(art_4g32), "--tasks", "ppl", "--text", str(text), "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["backend"] == "mlx-lm"
