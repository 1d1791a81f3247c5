"""`python -m l4q_export.verify TARGET [--model MODEL_DIR] [--json report.json]`

TARGET is either an L4Q checkpoint directory (fold check: the fold reproduces the training forward's
W_q bit for bit) or an exported artifact, which is handed to the export target that recognises it.
Exit codes: 0 pass, 1 fidelity failure, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from .boundary import guarded_command
from .checkpoint import CONFIG_FILE, Checkpoint, load_checkpoint
from .errors import FidelityError, L4QInputError
from .fold import QUANTIZED, fold_checkpoint, one_ahead
from .formats.base import Decoded, Target, Tolerance, VerifyReport, max_abs_diff, same_bits
from .formats.runtime import Backend, HFTokenizer, log_softmax
from .guard import check_output
from .quant import QuantizedTensor
from .quant.kquant import KQuantized
from .training.methods import build_layer, checkpoint_method

IDENTITY_ROWS = 1024
ROW_SLICE_ELEMENTS = 1 << 18  # per slice of a row-wise Decoded: the fastest of 2^16..2^20 at 7B shapes (performance.md)


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
        if not isinstance(t, QUANTIZED):
            continue
        module = name[: -len(".weight")]
        W0 = base.get(name)
        layer = build_layer(ck, W0, ck.adapter(module), module)  # the method's own training layer
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
                **({"grid": t.spec.name} if isinstance(t, KQuantized) else {}),
                "codes_identical": codes_equal,
                "bit_identical": bit_equal,
                "forward_identical": fwd_equal,
                "max_abs_diff": float((deq - wq).abs().max()),
            }
        )
    # lora / qat-lora export a re-quantized merge by definition: the fold must match that reference exactly,
    # and its distance from the training forward is reported, never hidden (max_abs_diff per layer).
    lossy = checkpoint_method(ck).lossy
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


# ------------------------------------------------------------------------------------------------ artifacts
#
# One driver for every export target: (a) the stored fields of each quantized linear, decoded by the format's own
# library (`Target.read_back`), equal the fold's; (b) the decoded weights are within the bound the target declared
# of the training W_q; (c) the target's runtime (`Target.runtime`, the backend l4q-eval scores with) against the
# PyTorch reference (`training.methods.reference_model`) on fixed prompts and a greedy continuation, with one
# metric set and the target's declared `Tolerance`; then the target's own `checks` (tokenizer parity, op counts,
# loaders).

PROMPTS = (
    "Once upon a time",
    "The little girl went to the park and saw a big dog. She",
    "Tom had a red ball. He liked to play with it every day, but one day",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
)
GREEDY_PROMPT = "Once upon a time"
GREEDY_TOKENS = 24
MAX_PROMPT_TOKENS = 256


def compare_tensor(qt: QuantizedTensor | KQuantized, got: Decoded | torch.Tensor | None) -> dict[str, Any]:
    """Levels (a) and (b) for one quantized linear."""
    row: dict[str, Any] = {"tensor": qt.name, "shape": list(qt.shape)}
    if got is None:
        return {**row, "stored": "missing", "codes_identical": False, "within_bound": False, "max_abs_error": float("inf")}
    if isinstance(got, torch.Tensor):  # stored dense: must be the fold's W_q itself
        wq = qt.dequantize()
        ok = same_bits(got.float(), wq)
        err = max_abs_diff(got.float(), wq)
        return {**row, "stored": "dense", "codes_identical": ok, "within_bound": ok, "max_abs_error": err, "declared_bound": 0.0}
    keys: set[str] = set()
    differ: set[str] = set()
    errs: list[float] = []
    for fields, weight, part, wq in pieces(qt, got):
        want = got.expect(part)
        here = set(fields) | set(want)  # a field missing on either side is a difference
        keys |= here
        differ |= {k for k in here if k not in fields or k not in want or not same_bits(fields[k], want[k])}
        if weight is not None:  # the library computes in the artifact's dtype: compare with W_q rounded to it
            errs.append(max_abs_diff(weight, wq, part.shape))
    if errs:
        err = float(np.max(errs))  # np.max, not max(): a NaN slice stays NaN
    else:  # the fields define the weight exactly
        err = 0.0 if not differ else float("inf")
    row.update(stored="quantized", **got.info, fields=sorted(keys), fields_differing=sorted(differ),
               codes_identical=not differ, max_abs_error=err, declared_bound=got.bound, within_bound=err <= got.bound)
    return row


def pieces(qt: QuantizedTensor | KQuantized, got: Decoded) -> Iterator[tuple[
        dict[str, np.ndarray], torch.Tensor | None, QuantizedTensor | KQuantized,
        torch.Tensor | Callable[[int, int], torch.Tensor]]]:
    """(stored fields, decoded weight, the fold's matching part, its W_q) for each piece `compare_tensor` holds to
    the fold: the whole tensor, or a row-wise `Decoded`'s slices of rows, each decoded and compared while in cache
    (an odd pairing -- a K-grid fold, a shape mismatch -- is compared whole)."""
    if got.rows is None:
        yield got.fields, got.weight, qt, wq_rows(qt)
        return
    if not isinstance(qt, QuantizedTensor) or tuple(got.shape) != tuple(qt.shape):
        yield *got.rows(0, got.shape[0]), qt, wq_rows(qt)
        return
    n_rows, n_cols = qt.shape
    step = max(1, ROW_SLICE_ELEMENTS // max(n_cols, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        part = qt.rows(r0, r1)
        yield *got.rows(r0, r1), part, part.dequantize()


def wq_rows(qt: QuantizedTensor | KQuantized) -> Callable[[int, int], torch.Tensor]:
    """Rows r0:r1 of the fold's W_q: computed per slice where the tensor can (`QuantizedTensor.rows`, the same bits
    as slicing the whole), so comparing a decoded weight never holds a second fp32 copy of it."""
    if isinstance(qt, QuantizedTensor):
        return lambda r0, r1: qt.rows(r0, r1).dequantize()
    wq = qt.dequantize()
    return lambda r0, r1: wq[r0:r1]


def _margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def near_tie_greedy(ref_logits: np.ndarray, tokens: list[int], tie_margin: float) -> dict[str, Any]:
    """Greedy agreement with a near-tie cut-off.

    `tokens` is the runtime's greedy continuation; `ref_logits[i]` the reference's logits on the same context (the
    runtime's own trajectory, teacher-forced), so position i compares like with like.  Where the reference's top-2
    margin is below `tie_margin` the runtime may legitimately take either token (its logits differ from the
    reference's by up to the declared tolerance, and which side a SIMD kernel lands on differs between CPUs); from
    the first such position on, agreement is reported, not required.  Passes when no token differs before it.
    """
    ref_next = ref_logits.argmax(-1)
    margins = _margins(ref_logits)
    n = len(tokens)
    tie = next((i for i in range(n) if margins[i] < tie_margin), None)
    first_diff = next((i for i in range(n) if int(ref_next[i]) != tokens[i]), None)
    upto = n if tie is None else tie
    matched = upto if first_diff is None or first_diff >= upto else first_diff
    rest = [int(ref_next[i]) == tokens[i] for i in range(upto, n)]
    return {"tokens": n, "tie_margin": tie_margin, "tie_position": tie, "matched": matched, "first_difference": first_diff,
            "required": upto, "after_tie_agreeing": int(sum(rest)), "after_tie_total": len(rest),
            "min_margin_before_tie": float(margins[:upto].min()) if upto else None, "passed": matched == upto}


def reference_logits(model: torch.nn.Module, seqs: list[list[int]]) -> list[np.ndarray]:
    """The reference's logits (float64 [len, vocab]) of several token sequences, in one forward.

    Right-padded with an attention mask: causal attention never looks right, so no real position sees the
    padding.  One batch because every training layer recomputes its W_q (LoRA delta, quantizer) on each call --
    that, not the matmul, is the reference's cost (~2.7 s per call at 2 layers of 7B shapes) -- so all sequences
    share one recompute."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[i, : len(s)].double().numpy() for i, s in enumerate(seqs)]


@dataclass(frozen=True)
class RuntimeOutputs:
    """What level (c) takes from the runtime: its logits of each sequence in `seqs` (the prompts, then the greedy
    prompt with its continuation minus the last token) and the greedy tokens it chose."""

    seqs: list[list[int]]
    logits: list[np.ndarray]
    greedy_prompt: list[int]
    greedy_tokens: list[int]


def runtime_outputs(backend: Backend, ck: Checkpoint, prompts: tuple[str, ...] = PROMPTS,
                    greedy_tokens: int = GREEDY_TOKENS) -> RuntimeOutputs:
    """The runtime's half of level (c): logits on `prompts` (tokenized by the checkpoint's own tokenizer) and a
    greedy continuation through the runtime's decode path."""
    from .formats.runtime import tokenizer_truth

    _, truth = tokenizer_truth(ck.dir)
    seqs, gots = [], []
    for text in prompts:
        ids = truth(text)[:MAX_PROMPT_TOKENS]
        seqs.append(ids)
        gots.append(np.asarray(backend.logits(ids), dtype=np.float64))
    gids = truth(GREEDY_PROMPT)
    tokens, rows = backend.greedy(gids, greedy_tokens)
    seqs.append(gids + tokens[:-1])
    gots.append(np.asarray(rows, dtype=np.float64))
    return RuntimeOutputs(seqs, gots, gids, tokens)


def compare_runtime(backend: Backend, ck: Checkpoint, tol: Tolerance, prompts: tuple[str, ...] = PROMPTS,
                    greedy_tokens: int = GREEDY_TOKENS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Level (c): logits on `prompts` and on the runtime's greedy continuation vs the PyTorch reference."""
    return compare_outputs(runtime_outputs(backend, ck, prompts, greedy_tokens), ck, tol)


def compare_outputs(out: RuntimeOutputs, ck: Checkpoint, tol: Tolerance) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reference's half of level (c): the same sequences through the PyTorch reference, and the verdicts.

    Separate from `runtime_outputs` so that a caller can let the runtime go first: the reference is then built
    while no runtime is alive, and level (c) peaks at the larger of the two models instead of their sum."""
    from .training.methods import reference_model

    refs = reference_logits(reference_model(ck), out.seqs)
    gots, gids, tokens = out.logits, out.greedy_prompt, out.greedy_tokens
    refs[-1] = refs[-1][len(gids) - 1 :]  # the greedy rows: from the prompt's last position on
    g_ref = refs[-1]
    r, g = np.concatenate(refs), np.concatenate(gots)
    lp, lq = log_softmax(r), log_softmax(g)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    scale = max(1.0, float(np.abs(r).max())) if tol.relative else 1.0
    rc, gc = r - r.mean(-1, keepdims=True), g - g.mean(-1, keepdims=True)
    rel = float(np.linalg.norm(gc - rc) / max(np.linalg.norm(rc), 1e-30))  # scale-free: tiny random models, tiny logits
    logits = {"positions": int(r.shape[0]), "top1_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()),
              "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "max_abs_dlogit": float(np.abs(r - g).max()),
              "max_abs_logit": float(np.abs(r).max()), "rel_l2": rel,
              "dlogit_limit": None if tol.max_abs_dlogit is None else tol.max_abs_dlogit * scale}
    logits["passed"] = (logits["top1_agreement"] >= tol.min_top1 and logits["mean_kl"] <= tol.max_mean_kl
                        and (logits["dlogit_limit"] is None or logits["max_abs_dlogit"] <= logits["dlogit_limit"]))
    greedy = near_tie_greedy(g_ref, tokens, tol.tie_margin * scale)
    hf = HFTokenizer(ck.dir).tok
    ref_tokens = [int(t) for t in g_ref.argmax(-1)]
    greedy.update(prompt=GREEDY_PROMPT, runtime_text=hf.decode(tokens),
                  reference_text=hf.decode(ref_tokens[: greedy["matched"] + 1]))
    return logits, greedy


def verify_tensors(target: Target, artifact: Path, model_dir: Path) -> dict[str, Any]:
    """Levels (a) and (b) only (no runtime): per quantized linear of the fold, the artifact's decoded copy.

    Three things run at once (numpy, torch and the format libraries release the GIL): the base shards are hashed
    beside the fold and the verdict is awaited after the last tensor (`fold_checkpoint`), before any row is
    returned; the artifact is opened (library imports, header parsing) on one worker, and each tensor's copy
    decoded on another (`one_ahead`) while the previous one is compared and the next fold runs on the fold's own
    worker (a row-wise `Decoded` -- GGUF's, the packed safetensors' -- is decoded slice by slice inside the
    comparison instead).  At most two
    decoded tensors are alive; same rows, same order; an error surfaces at its own tensor."""
    ck = load_checkpoint(model_dir, overlap_hashes=True)
    with ThreadPoolExecutor(1, thread_name_prefix="l4q-open") as opener:
        opened = opener.submit(target.read_back, artifact)
        quantized = ((name, t) for name, t in fold_checkpoint(ck) if isinstance(t, QUANTIZED))
        rows = [compare_tensor(t, got) for (_, t), got in one_ahead(lambda item: opened.result().get(item[0]), quantized,
                                                                      "l4q-read")]
        opened.result()  # a fold without quantized linears still opens (and so validates) the artifact
    return {"n_quantized": len(rows), "n_codes_identical": sum(bool(r["codes_identical"]) for r in rows),
            "n_within_bound": sum(bool(r["within_bound"]) for r in rows), "layers": rows}


def verify_artifact(target: Target, artifact: Path, model_dir: Path) -> dict[str, Any]:
    """Every level for one artifact of `target`; the report has the same keys for every target."""
    rows = verify_tensors(target, artifact, model_dir)["layers"]  # hashes the base beside the fold, then confirms
    ck = load_checkpoint(model_dir)  # the shard hashes just computed are remembered: no second pass
    tol = target.tolerance(artifact)
    backend = target.runtime(artifact)
    checks = target.checks(artifact, ck, backend)
    runtime_name, outputs = backend.name, runtime_outputs(backend, ck)
    del backend  # the runtime (llama.cpp, an ORT session, a transformers model) is freed before the reference loads
    logits, greedy = compare_outputs(outputs, ck, tol)
    n_codes = sum(bool(r["codes_identical"]) for r in rows)
    n_bound = sum(bool(r["within_bound"]) for r in rows)
    n_exact = sum(bool(r["codes_identical"]) and r["max_abs_error"] == 0.0 for r in rows)
    worst = max((r["max_abs_error"] for r in rows), default=0.0)
    passed = bool(rows) and n_codes == len(rows) and n_bound == len(rows) and logits["passed"] and greedy["passed"] \
        and all(c.get("passed", True) for c in checks.values())
    tie = "" if greedy["tie_position"] is None else f" (near-tie at {greedy['tie_position']})"
    lossy = max((r.get("declared_bound", 0.0) for r in rows), default=0.0)
    summary = (f"{n_codes}/{len(rows)} quantized linears stored identically, {n_bound}/{len(rows)} within the declared bound "
               f"(max err {worst:.3g}, {n_exact} exact); {runtime_name}: top1 {logits['top1_agreement']:.3f}, "
               f"KL {logits['mean_kl']:.2e}, max|dlogit| {logits['max_abs_dlogit']:.3g}; greedy {greedy['matched']}/"
               f"{greedy['required']} required tokens{tie}")
    if lossy > 0:
        summary += f" [LOSSY export: declared bounds up to {lossy:.3g}]"
    for name, c in checks.items():
        summary += f"; {name} {'ok' if c.get('passed', True) else 'FAILED'}" + (f" ({c['summary']})" if "summary" in c else "")
    return VerifyReport(
        check=target.name, artifact=str(artifact), model_dir=str(model_dir), passed=passed, summary=summary,
        runtime=runtime_name, n_quantized=len(rows), n_exact=n_exact, n_codes_identical=n_codes, n_within_bound=n_bound,
        n_dense=sum(r.get("stored") == "dense" for r in rows), max_abs_error=worst, logits=logits, greedy=greedy,
        tolerance=asdict(tol), checks=checks, layers=rows,
    ).to_dict()


def run_verify(target: Path, model_dir: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    from .formats import available, detect_target

    if target.is_dir() and (target / CONFIG_FILE).is_file():
        return verify_fold(target)
    if not target.exists():
        raise L4QInputError(f"verify target not found: {target}")
    fmt = detect_target(target)
    if fmt is None:
        raise L4QInputError(f"{target} is neither an L4Q checkpoint nor an artifact of a known format ({', '.join(available())})")
    if model_dir is None:
        raise L4QInputError(f"verifying a {fmt.name} artifact needs --model MODEL_DIR (the L4Q checkpoint it came from)")
    return verify_artifact(fmt, target, model_dir)


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
