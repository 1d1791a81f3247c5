"""Evidence for the packed-safetensors target that CI cannot gather (docs/safetensors.md quotes its output).

    zero-points CKPT      Can a float-offset (L4Q) checkpoint be written with *integer* zero points exactly in any
                          container up to 8 bits?  Runs in the project venv.
    gptqmodel OUT --model CKPT [--transformers] [--json r.json]
                          Check a GPTQ export with GPTQModel itself (the reference GPTQ loader).  gptqmodel is not a
                          project dependency (it pins a newer torch and pulls CUDA wheels): install it in a separate
                          venv that also sees the project, e.g. `PYTHONPATH=. /tmp/gq/bin/python tools/bench_safetensors.py ...`.

zero-points: an exact integer encoding (q', z', s') of a group's weights u*d + m, u = 0..umax, must reproduce the
step d between consecutive codes, so q' = k*u + c and s' = d/k for an integer k >= 1; then z' = c - k*m/d must be
an integer with k*umax + z' <= 255 (8-bit container at most).  For every group the smallest such k is searched with
exact rational arithmetic on the stored floats, and a candidate is accepted only if it reproduces the fold's fp32
weights bit for bit.  A tensor is exportable only if every one of its groups is.

gptqmodel: for every quantized Linear, GPTQModel's TorchLinear (CPU, torch backend) `dequantize_weight()` must
equal the fold's W_q rounded once to fp16 (an fp16 scale times an integer |q - z| < 256 is exact in fp32, so one
rounding to fp16 is what any correct decoder produces).  `--transformers` also loads the directory with
`AutoModelForCausalLM.from_pretrained` (transformers -> optimum -> gptqmodel on CPU), checks its weights the same
way and compares its logits and greedy text with the PyTorch training model.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import torch

from l4q_export.checkpoint import load_checkpoint
from l4q_export.fold import fold_checkpoint
from l4q_export.formats import get_target
from l4q_export.formats.runtime import ModuleBackend
from l4q_export.quant import QuantizedTensor
from l4q_export.verify import compare_runtime

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
    logits, greedy = compare_runtime(ModuleBackend(loaded, artifact, "transformers+gptqmodel"), load_checkpoint(model_dir),
                                     get_target("safetensors").tolerance(artifact))
    cmp = {"logits": logits, "greedy": greedy}
    return {"loader": "transformers AutoModelForCausalLM (optimum + gptqmodel), CPU fp16",
            "kernels": sorted({type(m).__name__ for m in packed.values()}), "n_packed": len(packed),
            "n_bit_exact": exact, "n_layers": len(expected), **cmp}


def zero_point_encodings(model_dir: Path) -> dict:
    groups = exact_groups = 0
    tensors_ok: list[str] = []
    k_hist: dict[int, int] = {}
    n_tensors = 0
    for name, t in fold_checkpoint(load_checkpoint(model_dir)):
        if not isinstance(t, QuantizedTensor) or t.zero is not None:
            continue
        n_tensors += 1
        umax, before = t.spec.umax, exact_groups
        u = torch.arange(umax + 1, dtype=torch.float32)
        for d, m in zip(t.scale.flatten().tolist(), t.minimum.flatten().tolist(), strict=True):
            groups += 1
            z = -Fraction(m) / Fraction(d)  # exact: both are binary floats
            for k in range(1, 255 // umax + 1):
                zk = z * k
                if zk.denominator != 1 or not 0 <= zk <= 255 - k * umax:
                    continue
                s2 = torch.tensor(d / k, dtype=torch.float32)
                ref = u * torch.tensor(d) + torch.tensor(m)
                if float(s2) * k == d and torch.equal((k * u - float(zk)) * s2, ref):
                    exact_groups += 1
                    k_hist[k] = k_hist.get(k, 0) + 1
                break
        if exact_groups - before == t.scale.numel():
            tensors_ok.append(name)
    return {"checkpoint": str(model_dir), "float_offset_tensors": n_tensors, "groups": groups,
            "groups_with_exact_integer_encoding": exact_groups, "smallest_k_histogram": dict(sorted(k_hist.items())),
            "tensors_fully_encodable": tensors_ok,
            "summary": f"{exact_groups}/{groups} groups and {len(tensors_ok)}/{n_tensors} tensors have an exact "
                       f"integer-zero-point encoding in <= 8 bits (k histogram {dict(sorted(k_hist.items()))})"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    zp = sub.add_parser("zero-points", help="exact integer encodings of a float-offset checkpoint")
    zp.add_argument("checkpoint", type=Path)
    gq = sub.add_parser("gptqmodel", help="load a GPTQ export with GPTQModel (and transformers)")
    gq.add_argument("artifact", type=Path)
    gq.add_argument("--model", type=Path, required=True, help="the L4Q checkpoint the artifact was exported from")
    gq.add_argument("--transformers", action="store_true", help="also load through transformers' GPTQ integration")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here (GPTQModel logs to stdout)")
    args = ap.parse_args()
    if args.cmd == "zero-points":
        report = zero_point_encodings(args.checkpoint)
    else:
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
