"""Bad input: one clear `error:` line, exit code 2, and nothing written. Fidelity failures exit 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from l4q_export.cli import train_cmd
from l4q_export.verify import main as verify_main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from l4q_export.demo import instruction_records

    p = tmp_path_factory.mktemp("d") / "i.json"
    p.write_text(json.dumps(instruction_records(40)))
    return p


def _train(base: Path, data: Path, out: Path, *extra: str):
    args = [
        "--model",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--seq-len",
        "64",
        "--group-size",
        "32",
        *extra,
    ]
    return CliRunner().invoke(train_cmd, args)


def _copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_error(res, needle: str, out: Path) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "error:" in res.output and needle.lower() in res.output.lower(), res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1
    assert not out.exists(), "a failed run must not leave output behind"


def test_missing_model(tmp_path, data_file):
    _assert_error(_train(tmp_path / "nope", data_file, tmp_path / "o"), "config.json", tmp_path / "o")


def test_missing_data(tmp_path, tiny_base):
    _assert_error(_train(tiny_base, tmp_path / "nope.json", tmp_path / "o"), "data file not found", tmp_path / "o")


def test_corrupt_data(tmp_path, tiny_base):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _assert_error(_train(tiny_base, bad, tmp_path / "o"), "not valid JSON", tmp_path / "o")


def test_corrupt_base_shard(tmp_path, tiny_base, data_file):
    base = _copy_base(tiny_base, tmp_path / "base")
    (base / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _assert_error(_train(base, data_file, tmp_path / "o"), "corrupt safetensors", tmp_path / "o")


def test_pickle_only_base_is_refused(tmp_path, tiny_base, data_file):
    base = _copy_base(tiny_base, tmp_path / "base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    _assert_error(_train(base, data_file, tmp_path / "o"), "never unpickled", tmp_path / "o")


def test_group_size_that_does_not_fit(tmp_path, tiny_base, data_file):
    res = CliRunner().invoke(
        train_cmd,
        ["--model", str(tiny_base), "--data", str(data_file), "--out", str(tmp_path / "o"), "--group-size", "0", "--steps", "1"],
    )
    _assert_error(res, "group_size", tmp_path / "o")


def test_unsupported_architecture(tmp_path, tiny_base, data_file):
    base = _copy_base(tiny_base, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (base / "config.json").write_text(json.dumps(cfg))
    _assert_error(_train(base, data_file, tmp_path / "o"), "LlamaForCausalLM", tmp_path / "o")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, tiny_base, data_file, bad):
    base = _copy_base(tiny_base, tmp_path / "base")
    t = load_file(str(base / "model.safetensors"))
    t["model.layers.1.self_attn.q_proj.weight"][3, 5] = bad
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    _assert_error(_train(base, data_file, tmp_path / "o"), "NaN/Inf", tmp_path / "o")


def _verify(*args: str):
    return CliRunner().invoke(verify_main, list(args))


def test_verify_missing_target(tmp_path):
    res = _verify(str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "error:" in res.output


def test_verify_detects_changed_base(tmp_path, tiny_base, checkpoint_factory):
    base = _copy_base(tiny_base, tmp_path / "base")
    ck = checkpoint_factory(base)
    assert _verify(str(ck)).exit_code == 0
    t = load_file(str(base / "model.safetensors"))
    t["model.norm.weight"] += 1
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    res = _verify(str(ck))
    assert res.exit_code == 2 and "changed since training" in res.output


@pytest.mark.parametrize("damage", ["corrupt", "zero_scale", "nan"])
def test_verify_bad_adapter(tmp_path, tiny_base, checkpoint_factory, damage):
    ck = checkpoint_factory(tiny_base)
    path = ck / "l4q_adapter.safetensors"
    if damage == "corrupt":
        path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    else:
        t = load_file(str(path))
        key = "model.layers.0.mlp.up_proj.scale"
        t[key][0, 0] = 0.0 if damage == "zero_scale" else float("nan")
        save_file(t, str(path))
    res = _verify(str(ck))
    assert res.exit_code == 2 and "error:" in res.output, res.output


def test_verify_fold_failure_exits_1(tmp_path, tiny_base, checkpoint_factory, monkeypatch):
    """The fold check can fail: a single flipped code must be caught and reported with exit 1."""
    import l4q_export.verify as v

    ck = checkpoint_factory(tiny_base)
    real = v.fold_checkpoint

    def tampered(c):
        for name, t in real(c):
            if name == "model.layers.1.mlp.down_proj.weight":
                t.codes[0, 0] = (int(t.codes[0, 0]) + 1) % (t.spec.umax + 1)
            yield name, t

    monkeypatch.setattr(v, "fold_checkpoint", tampered)
    out = tmp_path / "r.json"
    res = _verify(str(ck), "--json", str(out))
    assert res.exit_code == 1
    rep = json.loads(out.read_text())
    bad = [r for r in rep["layers"] if not r["bit_identical"]]
    assert [r["tensor"] for r in bad] == ["model.layers.1.mlp.down_proj.weight"]


def test_fold_streams_qwen2_bias_as_float(tiny_qwen2, checkpoint_factory):
    from l4q_export.fold import fold
    from l4q_export.quant import QuantizedTensor

    ck = checkpoint_factory(tiny_qwen2, bits=3, zero_point="integer", group_size=-1)
    items = dict(fold(ck))
    assert isinstance(items["model.layers.0.self_attn.q_proj.weight"], QuantizedTensor)
    assert isinstance(items["model.layers.0.self_attn.q_proj.bias"], torch.Tensor)
    assert _verify(str(ck)).exit_code == 0


def test_export_refuses_options_of_another_target(tmp_path, tiny_base, checkpoint_factory):
    """`--to onnx --gguf-type q4_0` would otherwise be silently ignored; nothing is written."""
    from l4q_export.cli import _export_command

    ck = checkpoint_factory(tiny_base, bits=4, group_size=32)
    out = tmp_path / "onnx_out"
    res = CliRunner().invoke(_export_command(), ["--to", "onnx", str(ck), "-o", str(out), "--gguf-type", "q4_0"])
    assert res.exit_code == 2
    assert "--gguf-type (gguf) do not apply to --to onnx" in res.output
    assert not out.exists()


def test_allow_lossy_is_one_flag_for_every_target(tmp_path, tiny_base, checkpoint_factory):
    """Float offsets into compressed-tensors: refused (exit 1, nothing written) unless --allow-lossy; ONNX has no
    lossy path, so the flag is an error there rather than silently ignored."""
    from l4q_export.cli import _export_command

    ck = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="float")
    out = tmp_path / "st"
    refused = CliRunner().invoke(_export_command(), ["--to", "safetensors", str(ck), "-o", str(out)])
    assert refused.exit_code == 1 and "--allow-lossy" in refused.output and not out.exists()
    report = tmp_path / "r.json"
    ok = CliRunner().invoke(
        _export_command(), ["--to", "safetensors", str(ck), "-o", str(out), "--allow-lossy", "--json", str(report)]
    )
    assert ok.exit_code == 0, ok.output
    assert (out / "config.json").is_file() and json.loads(report.read_text())["artifact"]
    onnx = CliRunner().invoke(_export_command(), ["--to", "onnx", str(ck), "-o", str(tmp_path / "o"), "--allow-lossy"])
    assert onnx.exit_code == 2 and "--allow-lossy does not apply" in onnx.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["gguf", "onnx"])
def test_export_refuses_changed_base_and_writes_nothing(tmp_path, tiny_base, checkpoint_factory, target):
    """The base hashes are checked beside the fold (load_checkpoint(overlap_hashes=True)): a changed shard still
    ends the export with the one-line error and no output, not even a temp file."""
    from l4q_export.cli import _export_command

    base = _copy_base(tiny_base, tmp_path / "base")
    ck = checkpoint_factory(base)
    t = load_file(str(base / "model.safetensors"))
    t["model.norm.weight"] += 1
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = CliRunner().invoke(_export_command(), ["--to", target, str(ck), "-o", str(out_dir / "artifact")])
    assert res.exit_code == 2 and "changed since training" in res.output
    assert list(out_dir.iterdir()) == []


def test_verify_artifact_refuses_changed_base(tmp_path, tiny_base, checkpoint_factory):
    """Artifact verify hashes the base beside the fold and the read-back (verify_tensors): a shard changed after
    export still ends it with the one-line error (exit 2) and no report, however far the comparison got."""
    from l4q_export.cli import _export_command

    base = _copy_base(tiny_base, tmp_path / "base")
    ck = checkpoint_factory(base)
    art = tmp_path / "m.gguf"
    assert CliRunner().invoke(_export_command(), ["--to", "gguf", str(ck), "-o", str(art)]).exit_code == 0
    t = load_file(str(base / "model.safetensors"))
    t["model.norm.weight"] += 1
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    report = tmp_path / "r.json"
    res = _verify(str(art), "--model", str(ck), "--json", str(report))
    assert res.exit_code == 2 and "changed since training" in res.output
    assert not report.exists()
