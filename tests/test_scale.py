"""Training at scale (issue 15): the GPU benchmark's code path on CPU, and the GPU-only cross-device check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_variant_on_cpu(tmp_path):
    """`tools/bench_gpu.py --tiny` exercises the CUDA command's code path: every variant builds, steps, reports."""
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--tiny", "--seq", "32", "--layers", "1", "--steps", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["total_layers"] == 32
    variants = {r["variant"]: r for r in rep["rows"]}
    assert set(variants) == {"lora", "lora+ckpt", "l4q", "l4q+ckpt", "l4q+int8+ckpt", "l4q+compiled+ckpt"}
    for r in variants.values():
        assert "error" not in r, r
        assert r["peak_bytes_1"] > 0 and r["step_s"] > 0
    assert "paper: LoRA 25.1 GB" in res.stdout


def _cross_device(tmp_path: Path, base: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """tools/check_cross_device.py (train on CUDA, fold on CPU) on the tiny base; its process and JSON report."""
    from l4q_export.demo import instruction_records

    data = tmp_path / "instruct.json"
    data.write_text(json.dumps(instruction_records(64)))
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_cross_device.py"), "--model", str(base), "--data", str(data),
         "--out", str(out), "--bits", "4", "--group-size", "32", "--steps", "4", "--batch-size", "4", "--grad-accum", "1",
         "--seq-len", "64", "--save-every", "0", "--eval-examples", "0", *extra],
        capture_output=True, text=True, timeout=600,
    )
    return res, json.loads((out / "cross_device.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: tools/check_cross_device.py trains on CUDA "
                    "and folds on CPU; no CUDA device here (run on a GPU machine, see docs/results/gpu.md)")
def test_cuda_trained_checkpoint_folds_on_cpu_to_the_same_codes(tmp_path, tiny_base):
    res, rep = _cross_device(tmp_path, tiny_base)
    assert rep["train_device"].startswith("cuda")
    assert rep["layers"] > 0
    assert rep["codes_identical"] == rep["layers"], rep
    assert rep["dequant_bit_identical"] == rep["layers"], rep
    assert res.returncode == 0, res.stderr[-2000:]


_CRASH_AT_STEP_2 = """
import sys
from l4q_export.training import trainer
orig = trainer.lr_at
def lr_at(step, total, base):
    if step == 2:
        raise SystemExit(3)  # the process dies right after the step-2 checkpoint
    return orig(step, total, base)
trainer.lr_at = lr_at
from l4q_export.cli import train_cmd
sys.argv[0] = "l4q-train"
train_cmd()
"""


def _torchrun(args: list[str], port: int, script: str | None = None) -> subprocess.CompletedProcess:
    entry = script or str(Path(sys.executable).parent / "l4q-train")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), entry, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_two_process_gloo_matches_one_process_and_resumes(tmp_path, tiny_base):
    """--fsdp (FSDP2 on CPU/gloo), batch 2 on each of 2 ranks == one process accumulating 2 micro-batches of 2:
    the same adapter and the same codes (measured: bit-identical), a checkpoint the fold reads unchanged, and a
    --resume from the sharded run's step-2 state that ends where the uninterrupted run ends."""
    from safetensors.torch import load_file

    from l4q_export.demo import instruction_records
    from l4q_export.fold import fold
    from l4q_export.quant import QuantizedTensor
    from l4q_export.verify import verify_fold

    data = tmp_path / "d.json"
    data.write_text(json.dumps(instruction_records(120)))
    common = ["--model", str(tiny_base), "--data", str(data), "--bits", "4", "--group-size", "32", "--steps", "4",
              "--batch-size", "2", "--seq-len", "96", "--lr", "3e-3", "--eval-examples", "4", "--kernel", "eager"]
    single, fsdp, crashed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "crashed"
    subprocess.run([str(Path(sys.executable).parent / "l4q-train"), *common, "--grad-accum", "2", "--save-every", "0",
                    "--out", str(single)], check=True, capture_output=True)
    res = _torchrun([*common, "--grad-accum", "1", "--save-every", "0", "--fsdp", "--out", str(fsdp)], 29561)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((fsdp / "train_report.json").read_text())
    assert rep["world_size"] == 2 and rep["parallel"] == "fsdp2"
    a, b = load_file(str(single / "l4q_adapter.safetensors")), load_file(str(fsdp / "l4q_adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    fa = {n: t.codes for n, t in fold(single) if isinstance(t, QuantizedTensor)}
    fb = {n: t.codes for n, t in fold(fsdp) if isinstance(t, QuantizedTensor)}
    differing = sum(int((fa[n] != fb[n]).sum()) for n in fa)
    assert differing <= 1e-4 * sum(c.numel() for c in fa.values()), differing  # measured 0
    assert verify_fold(fsdp)["passed"]

    script = tmp_path / "crash.py"
    script.write_text(_CRASH_AT_STEP_2)
    res = _torchrun([*common, "--grad-accum", "1", "--save-every", "2", "--fsdp", "--out", str(crashed)], 29562,
                    str(script))
    assert res.returncode != 0 and json.loads((crashed / "l4q_config.json").read_text())["training"]["steps_done"] == 2
    res = _torchrun([*common, "--grad-accum", "1", "--save-every", "2", "--fsdp", "--resume", "--out", str(crashed)], 29563)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((crashed / "train_report.json").read_text())["resumed_from"] == 2
    c = load_file(str(crashed / "l4q_adapter.safetensors"))
    for k in b:
        assert torch.equal(c[k], b[k]), k


def test_fsdp_without_torchrun_is_refused(tmp_path, tiny_base):
    from l4q_export.errors import L4QInputError
    from l4q_export.training.trainer import TrainArgs, train

    data = tmp_path / "d.json"
    data.write_text("[]")
    with pytest.raises(L4QInputError, match="--fsdp shards across processes"):
        train(TrainArgs(model=tiny_base, data=data, out=tmp_path / "o", fsdp=True))
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the compiled kernel and the int8 base trained on "
                    "CUDA, folded on CPU; no CUDA device here (run on a GPU machine, see docs/results/gpu.md)")
def test_cuda_compiled_int8_run_folds_on_cpu_to_the_same_codes(tmp_path, tiny_base):
    res, rep = _cross_device(tmp_path, tiny_base, "--kernel", "compiled", "--base-dtype", "int8")
    assert rep["train_device"].startswith("cuda")
    assert rep["train_report"]["kernel"]["used"] == "compiled" and rep["train_report"]["base_dtype"] == "int8"
    assert rep["codes_identical"] == rep["layers"] > 0, rep
    assert rep["dequant_bit_identical"] == rep["layers"], rep
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: compiled (inductor/Triton) kernel on CUDA vs the "
                    "CPU fold's codes; no CUDA device here")
def test_cuda_compiled_kernel_codes_equal_cpu_fold():
    """The compiled forward piece on CUDA gives the very codes quant.quantize gives on CPU (what every export writes)."""
    from l4q_export.quant import QuantSpec, effective_params
    from l4q_export.training import fused
    from l4q_export.training.layer import L4QLinear

    torch.manual_seed(0)
    for spec, base_dtype in ((QuantSpec(4, 128, "float"), "stored"), (QuantSpec(4, 64, "integer"), "int8")):
        m = L4QLinear(torch.nn.Linear(512, 384, bias=False).to(torch.bfloat16), spec, 4, 8.0, init="minmax",
                      fp16_grid=True, base_dtype=base_dtype)
        with torch.no_grad():
            m.lora_B.normal_(0, 0.05)
        cpu_codes = m.quantized().codes
        m = m.cuda()
        p = effective_params(spec, m.scale, m.offset, True)
        W0, w0s = (m.weight_int8, m.weight_int8_scale) if base_dtype == "int8" else (m.weight, None)
        codes, _ = fused.compiled("forward")(W0, w0s, m.lora_A, m.lora_B, p.scale, p.minimum, p.zero, spec, m.cfg.lora_scale)
        assert torch.equal(codes.cpu(), cpu_codes)
