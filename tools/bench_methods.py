"""Compare every training method on the real stories260K model with the same data, seed and step budget.

    .venv/bin/python tools/bench_methods.py                       # 4/3/2 bits x group 32/64, writes docs/results/methods.md
    .venv/bin/python tools/bench_methods.py --bits 4 --groups 32 --steps 20 --out /tmp/m.md   # quick look

Each (method, bits, group) trains in its own child process, so its peak RSS is its own (it includes the ~0.4 GB
of the Python/torch runtime, identical for every method).  Perplexity is measured on the first --ppl-tokens tokens
of WikiText-2 test with strided windows (l4q-eval's code) on:
  - the folded checkpoint in PyTorch (the weights every exporter writes),
  - the method's training forward where it differs (lora: float; qat-lora: 4+16 mixed precision),
  - the exported GGUF in llama.cpp (the file a user ships; llama.cpp quantizes activations to Q8_1 for Q4_x dots).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
METHODS = ("l4q", "qalora", "dlqat", "qat-lora", "lora", "rtn")


def one(a: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration and evaluate it (runs in a child process)."""
    import torch

    from l4q_export.eval.cli import run_eval
    from l4q_export.training.trainer import TrainArgs, train

    torch.set_num_threads(a.threads)
    out = Path(a.work) / f"{a.method}_b{a.bits}_g{a.group}"
    t0 = time.time()
    rep = train(TrainArgs(model=SHARED / "models" / "stories260K", data=SHARED / "instruct" / "alpaca_en_demo.json", out=out,
                          method=a.method, bits=a.bits, group_size=a.group, rank=a.rank, alpha=a.alpha, lr=a.lr, steps=a.steps,
                          batch_size=a.batch_size, grad_accum=1, seq_len=a.seq_len, seed=a.seed, save_every=0, eval_examples=32,
                          extra={"qat_lora_export": "merge"}))
    row: dict[str, Any] = {"method": a.method, "bits": a.bits, "group": a.group, "train_s": time.time() - t0,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "first_loss": rep["first_loss"], "last_loss": rep["last_loss"], "eval_loss_after": rep["eval_loss_after"]}
    text = SHARED / "text" / "wikitext2_test.txt"

    def ppl(target: Path, forward: str = "fold") -> float:
        r = run_eval(target, ["ppl"], text=text, max_tokens=a.ppl_tokens, forward=forward, threads=a.threads)
        return r["results"]["ppl"]["ppl"]

    row["ppl_fold"] = ppl(out)
    if a.method in ("lora", "qat-lora"):
        row["ppl_train"] = ppl(out, "train")
    if not a.no_gguf:
        from l4q_export.formats import gguf

        try:
            exp = gguf.export(out, out / "model.gguf")
            row["gguf_types"] = sorted({r.get("type", "?") for r in exp.get("tensors", exp.get("layers", [])) if isinstance(r, dict)})
            row["ppl_gguf"] = ppl(Path(exp["artifact"]))
        except Exception as e:  # report, never hide, why the shipped file could not be scored
            row["gguf_error"] = f"{type(e).__name__}: {e}"
    return row


def float_ppl(a: argparse.Namespace) -> float:
    from l4q_export.eval.cli import run_eval

    r = run_eval(SHARED / "models" / "stories260K", ["ppl"], text=SHARED / "text" / "wikitext2_test.txt",
                 max_tokens=a.ppl_tokens, threads=a.threads)
    return r["results"]["ppl"]["ppl"]


def _f(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict[str, Any]], base_ppl: float, a: argparse.Namespace, cmd: str, wall: float) -> str:
    lines = [
        "# Training methods on stories260K", "",
        f"Command: `{cmd}`  ", f"Machine: {platform.machine()}, {a.threads} CPU threads, no GPU; total wall time {wall / 60:.1f} min.  ",
        f"Every method: same data (`alpaca_en_demo.json`, loss on responses), seed {a.seed}, {a.steps} optimizer steps of batch "
        f"{a.batch_size} x seq {a.seq_len}, AdamW lr {a.lr} (cosine, 10% warm-up), LoRA rank {a.rank} alpha {a.alpha}; "
        "`rtn` trains nothing.  Perplexity: WikiText-2 test, first "
        f"{a.ppl_tokens} tokens, windows of 512 with stride 256 (`l4q-eval --tasks ppl --max-tokens {a.ppl_tokens}`).  ",
        f"Float (unquantized) stories260K: **ppl {base_ppl:.2f}**.", "",
        "Columns: *ppl export* = the folded checkpoint in PyTorch (the weights the exporters write); *ppl train* = the "
        "training forward where it is not the exported one (lora: float LoRA; qat-lora: 4+16 mixed precision); *ppl GGUF* = "
        "the exported .gguf in llama.cpp; peak RSS = the whole training process (includes ~0.4 GB of runtime).", "",
        "| bits | group | method | ppl export | ppl train | ppl GGUF (llama.cpp) | train s | peak RSS MB | final train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = _f(r.get("ppl_gguf")) if "gguf_error" not in r else "error"
        lines.append(f"| {r['bits']} | {r['group']} | {r['method']} | {_f(r['ppl_fold'])} | {_f(r.get('ppl_train'))} | {g} | "
                     f"{r['train_s']:.1f} | {r['peak_rss_mb']:.0f} | {_f(r['last_loss'], 3)} |")
    lines += ["", "## Does L4Q <= QA-LoRA and <= LoRA->RTN hold? (ppl export, lower is better)", ""]
    by = {(r["bits"], r["group"], r["method"]): r for r in rows}
    for bits in a.bits:
        for g in a.groups:
            l4q = by.get((bits, g, "l4q"))
            if not l4q:
                continue
            parts = []
            for other in ("qalora", "lora", "dlqat", "qat-lora", "rtn"):
                o = by.get((bits, g, other))
                if o:
                    holds = l4q["ppl_fold"] <= o["ppl_fold"]
                    parts.append(f"vs {other}: {'holds' if holds else '**does not hold**'} ({l4q['ppl_fold']:.2f} vs {o['ppl_fold']:.2f})")
            lines.append(f"- {bits}-bit g{g}: " + "; ".join(parts))
    errs = [r for r in rows if "gguf_error" in r]
    if errs:
        lines += ["", "GGUF export errors:", ""] + [f"- {r['method']} b{r['bits']} g{r['group']}: {r['gguf_error']}" for r in errs]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--groups", default="32,64")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--work", default="/tmp/bench_methods")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "methods.md"))
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "BITS", "GROUP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.method, a.bits, a.group = a.one[0], int(a.one[1]), int(a.one[2])
        print("BENCH_ROW " + json.dumps(one(a)))
        return
    if not (SHARED / "models" / "stories260K").is_dir():
        sys.exit(f"needs ../shared/data beside the repo ({SHARED} not found)")
    a.bits = [int(x) for x in a.bits.split(",")]
    a.groups = [int(x) for x in a.groups.split(",")]
    cmd = "python tools/bench_methods.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    base = float_ppl(a)
    rows = []
    passthrough = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--lr", str(a.lr),
                   "--rank", str(a.rank), "--alpha", str(a.alpha), "--seed", str(a.seed), "--ppl-tokens", str(a.ppl_tokens),
                   "--threads", str(a.threads), "--work", a.work] + (["--no-gguf"] if a.no_gguf else [])
    for bits in a.bits:
        for g in a.groups:
            for m in a.methods.split(","):
                p = subprocess.run([sys.executable, __file__, "--one", m, str(bits), str(g), *passthrough],
                                   capture_output=True, text=True, cwd=REPO)
                line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH_ROW ")), None)
                if line is None:
                    print(p.stderr[-3000:], file=sys.stderr)
                    sys.exit(f"{m} b{bits} g{g} failed")
                rows.append(json.loads(line[len("BENCH_ROW "):]))
                r = rows[-1]
                print(f"{m:9s} b{bits} g{g}: ppl {r['ppl_fold']:.2f} gguf {r.get('ppl_gguf', r.get('gguf_error'))} "
                      f"train {r['train_s']:.1f}s rss {r['peak_rss_mb']:.0f}MB", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, base, a, cmd, time.time() - t0))
    (out.with_suffix(".json")).write_text(json.dumps({"float_ppl": base, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
