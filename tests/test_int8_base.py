"""`--base-dtype int8`: the frozen W0 held as int8 per-output-channel absmax codes, recorded in the checkpoint and
rebuilt (hash-checked) by the fold, so the fold stays bit-exact and the GGUF export exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from l4q_export.errors import L4QInputError
from l4q_export.quant.base_int8 import int8_absmax, int8_dequant
from l4q_export.training.trainer import TrainArgs, train
from l4q_export.verify import verify_fold


def test_int8_absmax_matches_an_independent_numpy_computation():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(17, 40, generator=g) * torch.logspace(-3, 1, 17).unsqueeze(1)).to(torch.bfloat16)
    w[3] = 0  # an all-zero row: scale 1, codes 0
    q, s = int8_absmax(w)
    a = w.float().numpy()
    amax = np.abs(a).max(axis=1, keepdims=True)
    s_ref = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q_ref = np.clip(np.rint(a / s_ref), -127, 127).astype(np.int8)  # rint: round half to even
    assert q.dtype == torch.int8 and s.shape == (17, 1)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(int8_dequant(q, s).numpy(), q_ref.astype(np.float32) * s_ref)
    assert (q[3] == 0).all() and float(s[3]) == 1.0


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from l4q_export.demo import instruction_records

    p = tmp_path_factory.mktemp("data") / "instruct.json"
    p.write_text(json.dumps(instruction_records(40)))
    return p


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_base, demo_data) -> Path:
    out = tmp_path_factory.mktemp("int8") / "ck"
    train(TrainArgs(model=tiny_base, data=demo_data, out=out, bits=4, group_size=32, steps=3, batch_size=2, grad_accum=1,
                    seq_len=64, lr=5e-3, save_every=0, eval_examples=0, scale_grid="fp16", base_dtype="int8",
                    kernel="eager"))
    return out


def test_int8_base_is_recorded_and_the_fold_is_bit_exact(int8_run):
    cfg = json.loads((int8_run / "l4q_config.json").read_text())
    assert cfg["base_dtype"] == "int8" and cfg["training"]["base_dtype"] == "int8"
    assert set(cfg["base_int8"]["sha256"]) == set(cfg["modules"])
    rep = verify_fold(int8_run)
    assert rep["passed"]


def test_int8_base_trains_a_different_base_than_stored(int8_run, tiny_base):
    """The fold really uses W0' (not the stored W0): folding with the int8 record removed gives other codes."""
    from l4q_export.checkpoint import load_checkpoint
    from l4q_export.fold import fold_checkpoint
    from l4q_export.quant import QuantizedTensor

    ck = load_checkpoint(int8_run)
    folded = {n: t for n, t in fold_checkpoint(ck) if isinstance(t, QuantizedTensor)}
    ck.config = {k: v for k, v in ck.config.items() if k not in ("base_dtype", "base_int8")}
    plain = {n: t for n, t in fold_checkpoint(ck) if isinstance(t, QuantizedTensor)}
    assert any(not torch.equal(folded[n].codes, plain[n].codes) for n in folded)


def test_fold_refuses_a_mismatched_int8_hash(int8_run, tmp_path):
    import shutil

    from l4q_export.fold import fold

    bad = tmp_path / "bad"
    shutil.copytree(int8_run, bad)
    cfg = json.loads((bad / "l4q_config.json").read_text())
    first = cfg["modules"][0]
    cfg["base_int8"]["sha256"][first] = "0" * 64
    (bad / "l4q_config.json").write_text(json.dumps(cfg))
    with pytest.raises(L4QInputError, match="does not match the hash"):
        list(fold(bad))
    cfg["base_int8"]["scheme"] = "something-else"
    (bad / "l4q_config.json").write_text(json.dumps(cfg))
    with pytest.raises(L4QInputError, match="base_int8.scheme"):
        list(fold(bad))


@pytest.mark.runtime
def test_int8_base_gguf_export_is_exact(int8_run, tmp_path):
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_artifact

    target = get_target("gguf")
    rep = target.write(int8_run, tmp_path / "m.gguf").to_dict()
    assert rep["n_exact"] == rep["n_quantized"] == 14
    v = verify_artifact(target, tmp_path / "m.gguf", int8_run)
    assert v["passed"], v["summary"]
    assert v["n_codes_identical"] == 14 and v["max_abs_error"] == 0.0


def test_int8_layer_holds_no_stored_weight_and_other_methods_refuse(tiny_base, demo_data, tmp_path):
    from l4q_export.api import prepare
    from l4q_export.training.layer import L4QLinear
    from l4q_export.training.surgery import load_base_model

    model = prepare(load_base_model(tiny_base), bits=4, group_size=32, base_dtype="int8")
    layers = [m for m in model.modules() if isinstance(m, L4QLinear)]
    assert layers and all(m.weight is None and m.weight_int8.dtype == torch.int8 for m in layers)
    with pytest.raises(L4QInputError, match="--base-dtype int8 is not available with --method qalora"):
        train(TrainArgs(model=tiny_base, data=demo_data, out=tmp_path / "q", method="qalora", steps=1, batch_size=2,
                        grad_accum=1, seq_len=64, save_every=0, eval_examples=0, base_dtype="int8"))
    assert not (tmp_path / "q").exists()


def test_api_save_and_load_roundtrip_with_int8_base(tiny_base, tmp_path):
    from l4q_export.api import load_checkpoint, prepare, save_checkpoint
    from l4q_export.training.surgery import load_base_model

    model = prepare(load_base_model(tiny_base), bits=4, group_size=32, base_dtype="int8")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_checkpoint(model, tmp_path / "ck", base_dir=tiny_base)
    assert verify_fold(tmp_path / "ck")["passed"]
    again = load_checkpoint(tmp_path / "ck")
    assert again.l4q_settings.base_dtype == "int8"
