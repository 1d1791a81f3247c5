"""`python -m l4q_export.verify TARGET [--model MODEL_DIR] [--json report.json]`

TARGET is either an L4Q checkpoint directory (fold check: the fold reproduces the training forward's
W_q bit for bit) or an exported artifact, which is handed to the export target that recognises it.
Exit codes: 0 pass, 1 fidelity failure, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import torch

from .checkpoint import CONFIG_FILE, load_checkpoint
from .errors import FidelityError, L4QInputError, guarded_command
from .fold import fold_checkpoint
from .guard import check_output
from .quant import QuantizedTensor
from .training.methods import LOSSY_BY_DESIGN, build_layer

IDENTITY_ROWS = 1024


def training_forward_weight(layer: torch.nn.Module, in_features: int) -> torch.Tensor:
    """Extract W_q from the *actual* training forward: x = I gives y = I @ W_q^T = W_q^T exactly.

    Each output is one product 1*w plus exact zeros, so no rounding can hide a difference.
    """
    cols = []
    with torch.no_grad():
        for r0 in range(0, in_features, IDENTITY_ROWS):
            eye = torch.eye(in_features, dtype=torch.float32)[r0 : r0 + IDENTITY_ROWS]
            cols.append(layer.quantized_matmul(eye))
    return torch.cat(cols, 0).T


def verify_fold(model_dir: Path) -> dict[str, Any]:
    """Per quantized layer: codes(fold) == codes(training layer) and dequant(fold) == W_q bit for bit."""
    ck = load_checkpoint(model_dir)
    base = ck.base()
    rows = []
    for name, t in fold_checkpoint(ck):
        if not isinstance(t, QuantizedTensor):
            continue
        module = name[: -len(".weight")]
        W0 = base.get(name)
        layer = build_layer(ck, W0, ck.adapter(module))  # the method's own training layer
        ref = layer.quantized(name)
        deq = t.dequantize()
        wq = training_forward_weight(layer, W0.shape[1])
        codes_equal = torch.equal(ref.codes, t.codes)
        bit_equal = torch.equal(deq.view(torch.int32), ref.dequantize().view(torch.int32))
        fwd_equal = torch.equal(deq, wq)
        rows.append(
            {
                "tensor": name,
                "shape": list(t.shape),
                "codes_identical": codes_equal,
                "bit_identical": bit_equal,
                "forward_identical": fwd_equal,
                "max_abs_diff": float((deq - wq).abs().max()),
            }
        )
    # lora / qat-lora export a re-quantized merge by definition: the fold must match that reference exactly,
    # and its distance from the training forward is reported, never hidden (max_abs_diff per layer).
    lossy = ck.method in LOSSY_BY_DESIGN
    passed = bool(rows) and all(r["codes_identical"] and r["bit_identical"] and (r["forward_identical"] or lossy) for r in rows)
    n_exact = sum(r["bit_identical"] and r["forward_identical"] for r in rows)
    worst = max((r["max_abs_diff"] for r in rows), default=0.0)
    summary = f"fold[{ck.method}]: {n_exact}/{len(rows)} layers bit-identical to the training forward" + (
        f"; lossy by design (re-quantized merge), max|W_export - W_train| = {worst:.3e}" if lossy else ""
    )
    return {
        "check": "fold",
        "model_dir": str(model_dir),
        "method": ck.method,
        "spec": ck.spec.to_dict(),
        "layers": rows,
        "n_layers": len(rows),
        "n_bit_identical": n_exact,
        "lossy_by_design": lossy,
        "passed": passed,
        "summary": summary,
    }


def run_verify(target: Path, model_dir: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    from .formats import available, get_format

    if target.is_dir() and (target / CONFIG_FILE).is_file():
        return verify_fold(target)
    if not target.exists():
        raise L4QInputError(f"verify target not found: {target}")
    for name in available():
        fmt = get_format(name)
        if fmt.detect(target):
            if model_dir is None:
                raise L4QInputError(f"verifying a {name} artifact needs --model MODEL_DIR (the L4Q checkpoint it came from)")
            return fmt.verify(target, model_dir, **options)
    raise L4QInputError(f"{target} is neither an L4Q checkpoint nor an artifact of a known format ({', '.join(available())})")


def print_report(report: dict[str, Any]) -> None:
    """A readable summary; the JSON report has everything."""
    click.echo(f"check: {report.get('check')}  ->  {'PASS' if report.get('passed') else 'FAIL'}")
    for row in report.get("layers", [])[:200]:
        flags = " ".join(f"{k}={v}" for k, v in row.items() if k != "tensor")
        click.echo(f"  {row['tensor']:<48} {flags}")
    for k, v in report.items():
        if k not in ("layers", "check", "passed") and not isinstance(v, (list, dict)):
            click.echo(f"  {k}: {v}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The L4Q checkpoint directory the artifact was exported from (needed for artifacts).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the full machine-readable report to this file.",
)
@click.option("--quiet", is_flag=True, help="Print only the PASS/FAIL line.")
@guarded_command
def main(target: Path, model_dir: Path | None, json_path: Path | None, quiet: bool) -> None:
    """Prove that TARGET reproduces what training used.

    TARGET is an L4Q checkpoint directory (checks fold == training forward, bit for bit) or an exported
    artifact (.gguf, ONNX model, packed safetensors directory) checked against --model.
    Exit code 0 = pass, 1 = fidelity failure, 2 = bad input.
    """
    try:
        if json_path:
            check_output(json_path, "--json", "file", inputs=(target, *([model_dir] if model_dir else [])))
        report = run_verify(target, model_dir, {})
    except L4QInputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except FidelityError as e:
        click.echo(f"FAIL: {e}", err=True)
        sys.exit(1)
    if json_path:
        from .checkpoint import AtomicFile

        with AtomicFile(json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if quiet:
        click.echo("PASS" if report["passed"] else "FAIL")
    else:
        print_report(report)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
