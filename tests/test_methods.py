"""Training methods other than L4Q: each one really trains a few steps, then
- verify's fold check: dequant(fold) == the method's training forward W_q bit for bit (exact methods), or equals
  the method's declared re-quantized merge with the deviation reported (lora, qat-lora);
- an independent re-derivation of the folded weights from the method's formula (plain torch ops, not ours);
- GGUF export: codes decoded from the file == fold codes, and llama.cpp's logits match PyTorch on the folded weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l4q_export.checkpoint import load_checkpoint
from l4q_export.errors import FidelityError, L4QInputError
from l4q_export.fold import fold_checkpoint
from l4q_export.quant import QuantizedTensor
from l4q_export.training.trainer import TrainArgs, train
from l4q_export.verify import verify_fold

TEXT = ("Once upon a time there was a little robot who liked to count numbers and sing songs about the sea. " * 40)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text("\n\n".join([TEXT] * 4))
    return p


_CACHE: dict[tuple, Path] = {}


def trained(base: Path, data: Path, tmp: Path, method: str, bits: int = 3, group: int = 32, **kw) -> Path:
    """A real (short) training run of `method`; cached per configuration within the module."""
    key = (str(base), method, bits, group, json.dumps(kw, sort_keys=True, default=str))
    if key not in _CACHE:
        out = tmp / f"{method}_{bits}_{group}_{len(_CACHE)}"
        train(TrainArgs(model=base, data=data, out=out, method=method, bits=bits, group_size=group, steps=3, batch_size=2,
                        grad_accum=1, seq_len=64, lr=5e-3, save_every=0, eval_examples=0, **kw))
        _CACHE[key] = out
    return _CACHE[key]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods")


def _adapter(ck_dir: Path, module: str) -> dict[str, torch.Tensor]:
    t = load_file(str(ck_dir / "l4q_adapter.safetensors"))
    return {k[len(module) + 1:]: v for k, v in t.items() if k.startswith(module + ".")}


def _folded(ck_dir: Path) -> dict[str, QuantizedTensor]:
    return {n: t for n, t in fold_checkpoint(load_checkpoint(ck_dir)) if isinstance(t, QuantizedTensor)}


@pytest.mark.parametrize("method", ["qalora", "dlqat", "rtn", "l4q"])
@pytest.mark.parametrize("fp16", [False, True])
def test_exact_methods_fold_bit_identical_to_training_forward(tiny_base, text_data, work, method, fp16):
    ck = trained(tiny_base, text_data, work, method, scale_grid="fp16" if fp16 else "fp32")
    rep = verify_fold(ck)
    assert rep["passed"] and not rep["lossy_by_design"]
    assert rep["n_bit_identical"] == rep["n_layers"] == 14
    assert all(r["max_abs_diff"] == 0.0 for r in rep["layers"])
    cfg = json.loads((ck / "l4q_config.json").read_text())
    assert cfg["method"] == method and cfg["lora"]["rank"] == (0 if method == "rtn" else 4)


def test_methods_actually_train(tiny_base, text_data, work):
    """LoRA factors move away from B = 0 (the run is not a no-op), and rtn stores no LoRA at all."""
    for method in ("qalora", "dlqat", "qat-lora", "lora"):
        extra = {"qat_lora_export": "merge"} if method == "qat-lora" else {}
        t = _adapter(trained(tiny_base, text_data, work, method, extra=extra), "model.layers.0.self_attn.q_proj")
        assert t["lora_B"].abs().max() > 0, method
    rtn = _adapter(trained(tiny_base, text_data, work, "rtn"), "model.layers.0.self_attn.q_proj")
    assert set(rtn) == {"scale", "offset"}


def test_qalora_fold_matches_the_paper_formula(tiny_base, text_data, work):
    """W = d*u + m' with m' = -d*z + alpha*(B@A)/g (mean pooling), u = RTN codes of W0; and the training forward
    equals QA-LoRA's  x@W_base^T + alpha*B@A@pool(x)  in real arithmetic (checked to fp32 rounding).  The fp32
    grid: the formula has no fp16 snapping (the fp16 grid's fold is checked bit-exact above)."""
    ck = trained(tiny_base, text_data, work, "qalora", scale_grid="fp32")
    fold = _folded(ck)
    base = load_file(str(tiny_base / "model.safetensors"))
    alpha = 8.0 / 4
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        t = _adapter(ck, module)
        W0 = base[module + ".weight"].float()
        d, z, A, B = t["scale"], t["zero"], t["lora_A"], t["lora_B"]
        g = 32
        u = torch.clamp(torch.round(W0 / d.repeat_interleave(g, 1) + z.repeat_interleave(g, 1)), 0, 7)
        qt = fold[module + ".weight"]
        assert torch.equal(qt.codes.float(), u)
        assert qt.zero is None and qt.spec.zero_point == "float"
        want = (u - z.repeat_interleave(g, 1)) * d.repeat_interleave(g, 1) + (alpha * (B @ A) / g).repeat_interleave(g, 1)
        torch.testing.assert_close(qt.dequantize(), want, rtol=0, atol=1e-5)
        x = torch.randn(5, W0.shape[1], dtype=torch.float64)
        W_base = ((u - z.repeat_interleave(g, 1)) * d.repeat_interleave(g, 1)).double()
        pooled = x.view(5, -1, g).mean(-1)
        y_paper = x @ W_base.T + alpha * pooled @ (B @ A).double().T
        torch.testing.assert_close(x @ qt.dequantize().double().T, y_paper, rtol=1e-5, atol=1e-5)


def test_dlqat_fold_matches_the_reconstruction(tiny_base, text_data, work):
    """codes = clamp(round(W0/s + z + alpha*B@A)), scale = m*s, integer zero z (frozen s, z from RTN min/max)."""
    ck = trained(tiny_base, text_data, work, "dlqat", scale_grid="fp32")  # scale = m*s unsnapped
    fold = _folded(ck)
    base = load_file(str(tiny_base / "model.safetensors"))
    module = "model.layers.0.mlp.gate_proj"
    t = _adapter(ck, module)
    W0 = base[module + ".weight"].float()
    g = 32
    s, z, m = (t[k].repeat_interleave(g, 1) for k in ("scale", "zero", "magnitude"))
    v = W0 / s + z + 2.0 * (t["lora_B"] @ t["lora_A"])
    qt = fold[module + ".weight"]
    u = torch.clamp(torch.round(v), 0, 7)
    assert (qt.codes.float() == u).float().mean() > 0.999  # GEMM vs ordered sum may flip an exact .5 tie
    assert qt.spec.zero_point == "integer" and torch.equal(qt.zero, t["zero"]) and torch.equal(t["zero"], t["zero"].round())
    torch.testing.assert_close(qt.scale, t["magnitude"] * t["scale"], rtol=0, atol=0)
    assert (t["magnitude"] != 1).any()  # the magnitude really trained
    torch.testing.assert_close(qt.dequantize(), (qt.codes.float() - z) * (m * s), rtol=1e-6, atol=1e-7)


def test_lora_exports_rtn_of_the_merged_weight(tiny_base, text_data, work):
    ck = trained(tiny_base, text_data, work, "lora", scale_grid="fp32")  # plain fp32 RTN, no fp16 snapping
    rep = verify_fold(ck)
    assert rep["passed"] and rep["lossy_by_design"] and rep["n_bit_identical"] == 0
    assert "lossy by design" in rep["summary"]
    base = load_file(str(tiny_base / "model.safetensors"))
    module = "model.layers.1.self_attn.v_proj"
    t = _adapter(ck, module)
    W = base[module + ".weight"].float() + 2.0 * t["lora_B"] @ t["lora_A"]
    Wg = W.view(W.shape[0], -1, 32)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    s = (hi - lo) / 7
    rtn = (torch.clamp(torch.round((Wg - lo) / s), 0, 7) * s + lo).view_as(W)
    got = _folded(ck)[module + ".weight"].dequantize()
    torch.testing.assert_close(got, rtn, rtol=0, atol=1e-5)
    assert (got - W).abs().max() <= s.max() / 2 + 1e-5  # RTN error bound


def test_qat_lora_refuses_export_unless_merge_accepted(tiny_base, text_data, work):
    ck = trained(tiny_base, text_data, work, "qat-lora")
    with pytest.raises(FidelityError, match="qat_lora_export"):
        list(fold_checkpoint(load_checkpoint(ck)))
    merged = trained(tiny_base, text_data, work, "qat-lora", extra={"qat_lora_export": "merge"})
    rep = verify_fold(merged)
    assert rep["passed"] and rep["lossy_by_design"] and rep["n_bit_identical"] == 0
    assert all(r["codes_identical"] for r in rep["layers"]) and all(r["max_abs_diff"] > 0 for r in rep["layers"])


def test_qat_lora_base_part_is_exact(tiny_base, text_data, work):
    """The integer part of qat-lora's forward (LSQ+ on W0) is what base_quantized() exports, bit for bit."""
    from l4q_export.training.methods import build_layer
    from l4q_export.verify import IDENTITY_ROWS

    ck_dir = trained(tiny_base, text_data, work, "qat-lora", extra={"qat_lora_export": "merge"})
    ck = load_checkpoint(ck_dir)
    module = "model.layers.0.self_attn.o_proj"
    W0 = ck.base().get(module + ".weight")
    layer = build_layer(ck, W0, ck.adapter(module))
    with torch.no_grad():
        wq = layer.base_matmul(torch.eye(W0.shape[1])[:IDENTITY_ROWS]).T
    assert torch.equal(layer.base_quantized().dequantize(), wq)


def test_bad_method_options(tiny_base, text_data, tmp_path):
    with pytest.raises(L4QInputError, match="method"):
        train(TrainArgs(model=tiny_base, data=text_data, out=tmp_path / "x", method="gptq", steps=1))
    with pytest.raises(L4QInputError, match="rank"):
        train(TrainArgs(model=tiny_base, data=text_data, out=tmp_path / "y", method="qalora", rank=0, steps=1))
    with pytest.raises(L4QInputError, match="qat-lora-export"):
        train(TrainArgs(model=tiny_base, data=text_data, out=tmp_path / "z", method="qat-lora", steps=1,
                        extra={"qat_lora_export": "maybe"}))


def test_cli_method_choice_and_verify_exit_codes(tiny_base, text_data, work, tmp_path):
    from click.testing import CliRunner

    from l4q_export.cli import train_cmd
    from l4q_export.verify import main as verify_main

    out = tmp_path / "cli_qalora"
    args = ["--model", str(tiny_base), "--data", str(text_data), "--out", str(out), "--method", "qalora", "--bits", "4",
            "--group-size", "64", "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "64",
            "--save-every", "0", "--eval-examples", "0"]
    res = CliRunner().invoke(train_cmd, args)
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(verify_main, [str(out), "--quiet"]).exit_code == 0
    refused = CliRunner().invoke(verify_main, [str(trained(tiny_base, text_data, work, "qat-lora"))])
    assert refused.exit_code == 1 and "merge" in refused.output


@pytest.mark.runtime
@pytest.mark.parametrize("method", ["qalora", "dlqat", "rtn", "lora", "qat-lora"])
def test_gguf_export_of_every_method(tiny_base, text_data, work, tmp_path, method):
    """GGUF holds each method's folded codes exactly, and llama.cpp runs it like PyTorch runs the fold."""
    import numpy as np

    from l4q_export.eval.backends import TorchBackend
    from l4q_export.formats import get_target
    from l4q_export.formats.gguf.runtime import LlamaCppBackend
    from l4q_export.verify import verify_artifact

    gguf = get_target("gguf")

    ck = trained(tiny_base, text_data, work, method, bits=4, extra={"qat_lora_export": "merge"} if method == "qat-lora" else {})
    rep = gguf.write(ck, tmp_path / "m.gguf").to_dict()
    ids = TorchBackend(ck).encode(TEXT[:300])[:96]
    ref = TorchBackend(ck).logprobs(ids)
    got = LlamaCppBackend(Path(rep["artifact"]), threads=2).logprobs(ids)
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert kl < 1e-3 and top1 > 0.95, (kl, top1)
    assert math.isfinite(kl)
    verdict = verify_artifact(gguf, Path(rep["artifact"]), ck)  # the user's command: the reference is the method's forward
    assert verdict["passed"], verdict["summary"]
    assert verdict["n_codes_identical"] == verdict["n_within_bound"] == verdict["n_quantized"] == 14


def test_registry_is_the_only_method_table():
    """Every registered method has a concrete MethodLinear (nothing abstract left), and no module outside
    training/methods compares a method name with a string (dispatch goes through the registry)."""
    import ast
    import inspect

    from l4q_export.training.layer import MethodLinear
    from l4q_export.training.methods import LOSSY_BY_DESIGN, METHODS, get_method, method_names

    assert METHODS == method_names() and set(LOSSY_BY_DESIGN) == {"qat-lora", "lora"}
    for name in method_names():
        m = get_method(name)
        assert issubclass(m.layer, MethodLinear) and not inspect.isabstract(m.layer), name
    pkg = Path(__file__).resolve().parents[1] / "l4q_export"
    offenders = []
    for path in pkg.rglob("*.py"):
        if "methods" in path.relative_to(pkg).parts[:2]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts]
                if any(isinstance(c, ast.Constant) and c.value in method_names() for c in consts):
                    offenders.append(f"{path.relative_to(pkg)}:{node.lineno}")
    assert not offenders, offenders


def test_a_new_method_is_one_register_call(tiny_base, text_data, tmp_path, monkeypatch):
    """A method registered from outside the package trains, folds and passes verify's fold check unchanged."""
    import dataclasses

    from l4q_export.training.methods import get_method, registry

    toy = dataclasses.replace(get_method("l4q"), name="toy-l4q", summary="test-only copy of l4q")
    monkeypatch.setitem(registry._REGISTRY, toy.name, toy)
    out = tmp_path / "toy"
    train(TrainArgs(model=tiny_base, data=text_data, out=out, method="toy-l4q", bits=4, group_size=32, steps=1,
                    batch_size=2, grad_accum=1, seq_len=64, lr=5e-3, save_every=0, eval_examples=0))
    assert json.loads((out / "l4q_config.json").read_text())["method"] == "toy-l4q"
    rep = verify_fold(out)
    assert rep["passed"] and rep["method"] == "toy-l4q"
