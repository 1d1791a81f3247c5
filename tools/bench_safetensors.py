"""Check a GPTQ export with GPTQModel itself (the GPTQ reference loader), outside the project's environment.

gptqmodel is not a project dependency: it pins a newer torch and pulls CUDA wheels.  Install it in a separate
venv that can also see the project (e.g. a .pth file pointing at the project venv's site-packages) and run

    PYTHONPATH=. /tmp/gq/bin/python tools/bench_safetensors.py OUT_DIR --model MODEL_DIR [--transformers] [--json r.json]

For every quantized Linear, GPTQModel's TorchLinear (CPU, torch backend) `dequantize_weight()` must equal the
fold's W_q rounded once to the loader dtype (fp16: an fp16 scale times an integer |q - z| < 256 is exact in
fp32, so one rounding to fp16 is what any correct decoder produces).  `--transformers` also loads the
directory with `AutoModelForCausalLM.from_pretrained` (transformers -> optimum -> gptqmodel on CPU) and
compares its logits and greedy text with the PyTorch training model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from l4q_export.checkpoint import load_checkpoint
from l4q_export.fold import fold_checkpoint
from l4q_export.formats.safetensors_verify import compare_models, reference_model
from l4q_export.quant import QuantizedTensor

DTYPE = torch.float16


def expected_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {n[: -len(".weight")]: t.dequantize() for n, t in fold_checkpoint(load_checkpoint(model_dir))
            if isinstance(t, QuantizedTensor)}


def check_gptqmodel(artifact: Path, expected: dict[str, torch.Tensor]) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    t0 = time.time()
    m = GPTQModel.load(str(artifact), device="cpu", backend=BACKEND.TORCH, dtype=DTYPE)
    rows = []
    dense = dict(m.model.named_parameters())
    for name, mod in m.model.named_modules():
        if name not in expected:
            continue
        want = expected[name].to(DTYPE)
        if hasattr(mod, "dequantize_weight"):
            got, kind = mod.dequantize_weight().T.contiguous(), type(mod).__name__
        else:
            got, kind = dense[name + ".weight"].detach(), "dense"
        rows.append({"module": name, "kernel": kind, "bit_exact": bool(torch.equal(got, want)),
                     "max_abs_diff": float((got.float() - want.float()).abs().max())})
    return {"loader": "GPTQModel.load(backend=TORCH, device=cpu, fp16)", "seconds": round(time.time() - t0, 1),
            "n_layers": len(rows), "n_bit_exact": sum(r["bit_exact"] for r in rows),
            "n_packed": sum(r["kernel"] != "dense" for r in rows), "layers": rows}


def check_transformers(artifact: Path, model_dir: Path, expected: dict[str, torch.Tensor]) -> dict:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=DTYPE, device_map="cpu", local_files_only=True)
    packed = {n: m for n, m in loaded.named_modules() if hasattr(m, "dequantize_weight")}
    params = dict(loaded.named_parameters())
    exact = 0
    for name, want in expected.items():
        got = packed[name].dequantize_weight().T if name in packed else params[name + ".weight"].detach()
        exact += bool(torch.equal(got.contiguous(), want.to(DTYPE)))
    # the quantized model runs in fp16 (transformers refuses .float() on it): logits vs the fp32 training model
    cmp = compare_models(loaded, reference_model(load_checkpoint(model_dir)), artifact)
    return {"loader": "transformers AutoModelForCausalLM (optimum + gptqmodel), CPU fp16",
            "kernels": sorted({type(m).__name__ for m in packed.values()}), "n_packed": len(packed),
            "n_bit_exact": exact, "n_layers": len(expected), **cmp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="the L4Q checkpoint the artifact was exported from")
    ap.add_argument("--transformers", action="store_true", help="also load through transformers' GPTQ integration")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here (GPTQModel logs to stdout)")
    args = ap.parse_args()
    expected = expected_weights(args.model)
    report = {"gptqmodel": check_gptqmodel(args.artifact, expected)}
    if args.transformers:
        try:
            report["transformers"] = check_transformers(args.artifact, args.model, expected)
        except Exception as e:  # noqa: BLE001 -- report whatever the integration raises
            report["transformers"] = {"error": f"{type(e).__name__}: {e}"}
    g = report["gptqmodel"]
    report["summary"] = (f"GPTQModel TorchLinear: {g['n_bit_exact']}/{g['n_layers']} layers bit-exact in fp16 "
                         f"({g['n_packed']} packed)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(report["summary"])


if __name__ == "__main__":
    main()
