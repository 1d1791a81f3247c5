"""QA-LoRA on a frozen GPTQ base (`l4q-train --method qalora --qalora-base GPTQ_DIR`).

The GPTQ fixtures are written by our own exporter (`--flavor gptq` / `gptq-v1`) from an integer-zero L4Q
checkpoint with random LoRA (fp16 scales), so the golden codes/scales/zeros come independently from that
checkpoint's *fold* (not from the GPTQ reader under test), and the GPTQ dequantized weight is `(u - z)*d` of that
fold, computed by `QuantizedTensor.dequantize()` in its integer form.  Its codes are NOT the RTN codes of W0 on
the same (d, z) (checked), so a fold that re-derived codes from W0 instead of the stored ones would fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from l4q_export.checkpoint import load_checkpoint
from l4q_export.cli import train_cmd
from l4q_export.errors import L4QInputError
from l4q_export.fold import fold_checkpoint
from l4q_export.quant import QuantizedTensor, QuantSpec
from l4q_export.training.qalora import GPTQBase
from l4q_export.training.trainer import TrainArgs, train
from l4q_export.verify import main as verify_main

TEXT = ("Once upon a time there was a little robot who liked to count numbers and sing songs about the sea. " * 40)
SPEC = QuantSpec(4, 32, "float")
MODULE = "model.layers.1.mlp.down_proj"
# fp32 scale grid: QA-LoRA folds the GPTQ zero into a float minimum m = -d*z, exact in fp32; the fp16 default would
# round m to fp16 (what GGUF stores), so step 0 would differ from the GPTQ dequantization by that rounding.
COMMON = dict(bits=4, group_size=32, batch_size=2, grad_accum=1, seq_len=64, save_every=0, scale_grid="fp32")


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """An integer-zero L4Q checkpoint (fp16 scales, so GPTQ holds it exactly) and its GPTQ v2 and v1 exports."""
    from conftest import make_checkpoint

    from l4q_export.formats import get_target

    st = get_target("safetensors")

    w = tmp_path_factory.mktemp("qalora_gptq")
    data = w / "train.txt"
    data.write_text("\n\n".join([TEXT] * 4))
    rtn = make_checkpoint(tiny_base, w / "src", bits=4, group_size=32, zero_point="integer", fp16_grid=True, lora_std=0.2)
    out = {"base": tiny_base, "data": data, "rtn": rtn, "work": w}
    for flavor in ("gptq", "gptq-v1"):
        rep = st.write(rtn, w / flavor, flavor=flavor).to_dict()
        assert all(r["encoding"] == "packed" for r in rep["layers"]), rep["layers"]
        out[flavor] = Path(rep["artifact"])
    return out


def _rtn_fold(env) -> dict[str, QuantizedTensor]:
    return {n[: -len(".weight")]: t for n, t in fold_checkpoint(load_checkpoint(env["rtn"])) if isinstance(t, QuantizedTensor)}


def _qalora(env, out: Path, base: Path, steps: int, **kw):
    return train(TrainArgs(model=env["base"], data=env["data"], out=out, method="qalora", steps=steps,
                           extra={"qalora_base": str(base)}, **{**COMMON, **kw}))


@pytest.mark.parametrize("flavor", ["gptq", "gptq-v1"])
def test_gptq_base_equals_the_exported_integers(env, flavor):
    """Codes, scales and zeros read from the GPTQ dir == the source checkpoint's fold (v1's z - 1 undone)."""
    gb = GPTQBase(env[flavor], SPEC)
    folded = _rtn_fold(env)
    assert len(folded) == 14
    for module, qt in folded.items():
        codes, d, z = gb.layer(module, tuple(qt.shape))
        assert codes.dtype == torch.uint8 and torch.equal(codes, qt.codes), module
        assert torch.equal(d, qt.scale.float()) and torch.equal(z, qt.zero.float()), module


def test_gptq_codes_are_not_rtn_of_w0(env):
    """The fixture is discriminating: re-deriving codes from W0 on the GPTQ (d, z) gives different integers."""
    from safetensors import safe_open

    qt = _rtn_fold(env)[MODULE]
    with safe_open(str(next(env["base"].glob("*.safetensors"))), framework="pt") as f:
        W0 = f.get_tensor(MODULE + ".weight").float()
    d, z = (t.repeat_interleave(32, dim=1) for t in (qt.scale.float(), qt.zero.float()))
    rtn = torch.clamp(torch.round(W0 / d + z), 0, 15).to(torch.uint8)
    assert (rtn != qt.codes).float().mean() > 0.05


def test_step0_fold_equals_gptq_dequantized_weights(env):
    """With B = 0 the QA-LoRA fold is the GPTQ model's W = (u - z)*d, bit for bit, and the codes are the stored ones."""
    ck_dir = env["work"] / "qa0"
    _qalora(env, ck_dir, env["gptq"], steps=0, eval_examples=0)
    folded = _rtn_fold(env)
    got = {n[: -len(".weight")]: t for n, t in fold_checkpoint(load_checkpoint(ck_dir)) if isinstance(t, QuantizedTensor)}
    assert got.keys() == folded.keys()
    for module, qt in got.items():
        ref = folded[module]
        assert qt.zero is None and torch.equal(qt.codes, ref.codes), module
        w = qt.dequantize()
        assert torch.equal(w.view(torch.int32), ref.dequantize().view(torch.int32)), module
    cfg = json.loads((ck_dir / "l4q_config.json").read_text())
    assert cfg["qalora"]["base"] == "gptq" and cfg["qalora"]["gptq"]["checkpoint_format"] == "gptq_v2"
    assert f"{MODULE}.base_codes" in load_file(str(ck_dir / "l4q_adapter.safetensors"))


def test_training_on_gptq_base_lowers_loss_and_folds_exactly(env, tmp_path):
    """A real run: held-out loss drops, the base codes stay the GPTQ ones, verify passes, GGUF verifies."""
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_artifact

    gguf = get_target("gguf")

    ck_dir = env["work"] / "qa"
    rep = _qalora(env, ck_dir, env["gptq-v1"], steps=12, lr=1e-2, eval_examples=4)
    assert rep["eval_loss_after"] < rep["eval_loss_before"], rep
    folded = _rtn_fold(env)
    got = {n[: -len(".weight")]: t for n, t in fold_checkpoint(load_checkpoint(ck_dir)) if isinstance(t, QuantizedTensor)}
    assert all(torch.equal(got[m].codes, folded[m].codes) for m in folded)
    assert not torch.equal(got[MODULE].minimum, -(folded[MODULE].scale * folded[MODULE].zero))  # the adapter moved m'
    assert CliRunner().invoke(verify_main, [str(ck_dir), "--quiet"]).exit_code == 0
    verdict = verify_artifact(gguf, Path(gguf.write(ck_dir, tmp_path / "m.gguf").artifact), ck_dir)
    assert verdict["passed"], verdict["summary"]


def _rewrite(src: Path, dst: Path, edit=None, config=None) -> Path:
    """Copy a GPTQ dir into one model.safetensors, optionally editing tensors and the quantization config."""
    shutil.copytree(src, dst)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(dst.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink()
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    if config:
        for name in ("config.json", "quantize_config.json"):
            p = dst / name
            if p.is_file():
                c = json.loads(p.read_text())
                (c.get("quantization_config", c) if name == "config.json" else c).update(config)
                p.write_text(json.dumps(c))
    return dst


def _permute_g_idx(t: dict[str, torch.Tensor]) -> None:
    t[f"{MODULE}.g_idx"] = t[f"{MODULE}.g_idx"].flip(0).contiguous()


def _drop_layer(t: dict[str, torch.Tensor]) -> None:
    for s in ("qweight", "qzeros", "scales", "g_idx"):
        t.pop(f"{MODULE}.{s}")


def _drop_g_idx(t: dict[str, torch.Tensor]) -> None:
    for k in [k for k in t if k.endswith(".g_idx")]:
        t.pop(k)


def _v1_borrow(t: dict[str, torch.Tensor]) -> None:
    t[f"{MODULE}.qzeros"][0, 0] = -1  # every stored field z - 1 = 15, i.e. a true z = 0 that borrowed


@pytest.mark.parametrize("case,needle", [
    ("act-order-config", "act-order"),
    ("act-order-g_idx", "permuted g_idx"),
    ("missing-layer", "not GPTQ-quantized"),
    ("v1-borrow", "gptq_v2"),
    ("no-config", "quantize_config.json"),
])
def test_refusals(env, tmp_path, case, needle):
    src = env["gptq-v1"] if case == "v1-borrow" else env["gptq"]
    d = tmp_path / case
    if case == "act-order-config":
        _rewrite(src, d, config={"desc_act": True})
    elif case == "act-order-g_idx":
        _rewrite(src, d, edit=_permute_g_idx)
    elif case == "missing-layer":
        _rewrite(src, d, edit=_drop_layer)
    elif case == "v1-borrow":
        _rewrite(src, d, edit=_v1_borrow)
    else:
        _rewrite(src, d)
        (d / "config.json").unlink()
        (d / "quantize_config.json").unlink()
    with pytest.raises(L4QInputError, match=needle):
        gb = GPTQBase(d, SPEC)
        for module, qt in _rtn_fold(env).items():
            gb.layer(module, tuple(qt.shape))


def test_missing_g_idx_means_contiguous_groups(env, tmp_path):
    """g_idx is optional: without it the groups are k // g, and the integers are the same."""
    gb = GPTQBase(_rewrite(env["gptq"], tmp_path / "nog", edit=_drop_g_idx), SPEC)
    qt = _rtn_fold(env)[MODULE]
    codes, d, z = gb.layer(MODULE, tuple(qt.shape))
    assert torch.equal(codes, qt.codes) and torch.equal(z, qt.zero.float())


def _cli(env, out: Path, *extra: str):
    args = ["--model", str(env["base"]), "--data", str(env["data"]), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--seq-len", "64", "--eval-examples", "0", *extra]
    return CliRunner().invoke(train_cmd, args)


@pytest.mark.parametrize("extra,needle", [
    (["--method", "qalora", "--bits", "3", "--group-size", "32"], "4-bit group 32"),
    (["--method", "qalora", "--bits", "4", "--group-size", "64"], "--group-size 64"),
    (["--method", "l4q", "--group-size", "32"], "use it with --method qalora"),
])
def test_cli_refusals(env, tmp_path, extra, needle):
    out = tmp_path / "out"
    res = _cli(env, out, *extra, "--qalora-base", str(env["gptq"]))
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not out.exists()


def test_cli_refuses_missing_and_pickle_only_dirs(env, tmp_path):
    res = _cli(env, tmp_path / "o1", "--method", "qalora", "--group-size", "32", "--qalora-base", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "not found" in res.output, res.output
    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copy(env["gptq"] / "config.json", pk / "config.json")
    (pk / "pytorch_model.bin").write_bytes(b"not unpickled")
    res = _cli(env, tmp_path / "o2", "--method", "qalora", "--group-size", "32", "--qalora-base", str(pk))
    assert res.exit_code == 2 and "pickle" in res.output, res.output
    assert "--qalora-base" in CliRunner().invoke(train_cmd, ["--help"]).output


@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [False, True])
def test_decode_gptq_tensors_is_the_plain_formula(bits, act_order, v1):
    """Words packed by compressed-tensors' own `pack_to_int32` along GPTQ's axes decode to the codes, zeros and
    W[n, k] = s[g(k), n] * (q[n, k] - z[n, g(k)]) computed here with explicit gathers, over two row slices; an
    act-order g_idx (the groups permuted over K) takes the gather path, contiguous groups the broadcast one."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from l4q_export.quant.gptq import decode_gptq_tensors, gptq_rows

    g = torch.Generator().manual_seed(bits * 10 + act_order + 2 * v1)
    n, k, gl = 320, 1024, 128  # 2^18 elements per row slice: 256 rows, then a partial slice of 64
    groups = k // gl
    half = 1 << (bits - 1)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    z = torch.randint(1 if v1 else 0, 1 << bits, (n, groups), generator=g)
    scales = (0.01 + 0.01 * torch.rand(groups, n, generator=g)).half()
    g_idx = torch.arange(k) // gl
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    qweight = pack_to_int32((q.T - half).to(torch.int8).contiguous(), bits, packed_dim=0)
    qzeros = pack_to_int32((z.T - half - int(v1)).to(torch.int8).contiguous(), bits, packed_dim=1)
    dec = decode_gptq_tensors(qweight, qzeros, scales, g_idx, bits, v1)
    want = (q - z[:, g_idx]).float() * scales.float().T[:, g_idx]
    assert torch.equal(dec["codes"].long(), q) and torch.equal(dec["zero"].long(), z)
    assert torch.equal(dec["weight"].view(torch.int32), want.view(torch.int32))
    rows = gptq_rows(qweight, qzeros, scales, g_idx, bits, v1)  # verify's slices: any cut gives the same bits
    parts = [rows(r0, min(r0 + 77, n)) for r0 in range(0, n, 77)]
    for key in ("codes", "zero", "weight"):
        assert torch.equal(torch.cat([d[key] for d in parts]), dec[key]), key
