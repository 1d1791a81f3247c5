"""End-to-end training: loss goes down on real data, resume is bit-identical, DDP (gloo) matches
single-process accumulation, and the fold reproduces the trained forward bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_shared
from safetensors.torch import load_file

from l4q_export.training.trainer import TrainArgs, lr_at, train
from l4q_export.verify import verify_fold

BIN = Path(sys.executable).parent


def _args(base: Path, data: Path, out: Path, **kw) -> TrainArgs:
    d = dict(
        model=base,
        data=data,
        out=out,
        bits=4,
        group_size=32,
        steps=6,
        batch_size=4,
        grad_accum=1,
        seq_len=96,
        lr=3e-3,
        save_every=0,
        eval_examples=8,
    )
    d.update(kw)
    return TrainArgs(**d)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from l4q_export.demo import instruction_records

    p = tmp_path_factory.mktemp("data") / "instruct.json"
    p.write_text(json.dumps(instruction_records(120)))
    return p


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(t, 100, 1.0) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.01


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits,zp,data", [(4, "float", ("instruct", "alpaca_en_demo.json")), (3, "integer", ("text", "wikitext2_test.txt"))]
)
def test_stories260k_loss_drops_and_fold_is_bit_exact(tmp_path, stories_dir, bits, zp, data):
    """Real model, real data: held-out loss falls, and every layer folds bit-identically."""
    path = require_shared(*data)
    rep = train(_args(stories_dir, path, tmp_path / "ck", bits=bits, zero_point=zp, steps=25, batch_size=8, seq_len=128))
    assert rep["eval_loss_after"] < rep["eval_loss_before"] - 0.05, rep
    fold = verify_fold(tmp_path / "ck")
    assert fold["passed"] and fold["n_layers"] == 35 and fold["n_bit_identical"] == 35
    # 172-wide down_proj uses a partial last group (5 x 32 + 12)
    down = [r for r in fold["layers"] if r["tensor"].endswith("down_proj.weight")]
    assert down and down[0]["shape"] == [64, 172]


def test_resume_continues_from_saved_step(tmp_path, tiny_base, demo_data, monkeypatch):
    """Stop a run after its step-3 checkpoint (a crash), resume it, and compare with an uninterrupted run."""
    from l4q_export.training import trainer as tr

    full = tmp_path / "full"
    train(_args(tiny_base, demo_data, full, steps=6))
    crashed = tmp_path / "crashed"
    orig_lr = tr.lr_at

    def die_at_step_3(step, total, base):
        if step == 3:
            raise KeyboardInterrupt  # the process dies right after the step-3 checkpoint
        return orig_lr(step, total, base)

    monkeypatch.setattr(tr, "lr_at", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_base, demo_data, crashed, steps=6, save_every=3))
    monkeypatch.setattr(tr, "lr_at", orig_lr)
    assert json.loads((crashed / "l4q_config.json").read_text())["training"]["steps_done"] == 3
    rep = train(_args(tiny_base, demo_data, crashed, steps=6, save_every=3, resume=True))
    assert rep["resumed_from"] == 3
    a = load_file(str(full / "l4q_adapter.safetensors"))
    b = load_file(str(crashed / "l4q_adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_ddp_two_process_gloo_matches_grad_accumulation(tmp_path, tiny_base, demo_data):
    """torchrun, 2 CPU processes (gloo), batch 2 each == one process with 2 accumulated micro-batches of 2."""
    common = [
        "--model",
        str(tiny_base),
        "--data",
        str(demo_data),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "96",
        "--lr",
        "3e-3",
        "--save-every",
        "0",
        "--eval-examples",
        "4",
    ]
    single = tmp_path / "single"
    subprocess.run([str(BIN / "l4q-train"), *common, "--grad-accum", "2", "--out", str(single)], check=True, capture_output=True)
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            str(BIN / "l4q-train"),
            *common,
            "--grad-accum",
            "1",
            "--out",
            str(ddp),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((ddp / "train_report.json").read_text())
    assert rep["world_size"] == 2
    a = load_file(str(single / "l4q_adapter.safetensors"))
    b = load_file(str(ddp / "l4q_adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert verify_fold(ddp)["passed"]


def test_copy_base_checkpoint_is_self_contained(tmp_path, tiny_base, demo_data):
    """--copy-base: the checkpoint still folds bit-exactly after the original base is gone."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    train(_args(base, demo_data, tmp_path / "ck", steps=2, copy_base=True))
    shutil.rmtree(base)
    moved = tmp_path / "moved"
    (tmp_path / "ck").rename(moved)
    assert json.loads((moved / "l4q_config.json").read_text())["base_model"]["path"] == "base"
    assert verify_fold(moved)["passed"]


def test_train_cli_is_generated_from_trainargs():
    """Every TrainArgs field is an l4q-train option whose --help names its default, and parsing no options
    gives exactly TrainArgs' defaults (the CLI cannot drift from the dataclass)."""
    import dataclasses

    from click.testing import CliRunner

    from l4q_export.cli import _train_args, train_cmd
    from l4q_export.training.methods import method_names

    help_text = " ".join(CliRunner().invoke(train_cmd, ["--help"]).output.split())
    for f in dataclasses.fields(TrainArgs):
        if f.name == "extra":
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        assert flag in help_text, flag
        if f.type != "bool" and f.default not in (dataclasses.MISSING, None):
            assert f"{flag} " in help_text and f"[default: {f.default}]" in help_text, f.name
    assert "[" + "|".join(method_names()) + "]" in help_text
    ctx = train_cmd.make_context("l4q-train", ["--model", "m", "--data", "d", "--out", "o"])
    no_debug = {k: v for k, v in ctx.params.items() if k != "debug"}  # --debug belongs to the error boundary
    assert _train_args(no_debug) == TrainArgs(model=Path("m"), data=Path("d"), out=Path("o"),
                                                      extra={"qat_lora_export": "refuse"})
    ctx = train_cmd.make_context("l4q-train", ["--model", "m", "--data", "d", "--out", "o", "--bits", "3",
                                               "--no-lsq-grad-scale", "--copy-base"])
    args = _train_args({k: v for k, v in ctx.params.items() if k != "debug"})
    assert (args.bits, args.lsq_grad_scale, args.copy_base) == (3, False, True)


def test_gradient_checkpointing_gives_identical_adapter(tmp_path, tiny_base, demo_data, monkeypatch):
    """--gradient-checkpointing recomputes every L4Q forward in backward, and the run is bit-identical."""
    from l4q_export.training.layer import L4QFunction

    calls = {"n": 0}
    real_forward = L4QFunction.forward

    def counting(ctx, *a):
        calls["n"] += 1
        return real_forward(ctx, *a)

    monkeypatch.setattr(L4QFunction, "forward", staticmethod(counting))
    counts, adapters = [], []
    for ckpt in (False, True):
        calls["n"] = 0
        out = tmp_path / f"ck{int(ckpt)}"
        train(_args(tiny_base, demo_data, out, steps=4, eval_examples=0, gradient_checkpointing=ckpt))
        counts.append(calls["n"])
        adapters.append(load_file(str(out / "l4q_adapter.safetensors")))
    assert counts[1] == 2 * counts[0], counts  # every layer's forward ran again in backward
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters[1].items() if "lora_B" in k)
    assert verify_fold(tmp_path / "ck1")["passed"]
