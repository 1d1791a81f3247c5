"""Compare every training method on the real stories260K model with the same data, seed and step budget.

    .venv/bin/python tools/bench_methods.py                    # 4/3/2 bits x group 32/64, seed 0 -> docs/results/methods.md
    .venv/bin/python tools/bench_methods.py --seeds 1 --bits 4,3 --groups 32     # add a second seed to the same table
    .venv/bin/python tools/bench_methods.py --bits 4 --groups 32 --steps 20 --work /tmp/q --out /tmp/m.md   # quick look

Data: the first 899 records of `alpaca_en_demo.json` train every method (loss on responses); the last 100 are held
out and never seen.  Each (seed, method, bits, group) trains in its own single-threaded child process (--jobs of
them at once), so its peak RSS is its own.  Rows are cached as JSON under --work/rows and the table is rebuilt from
every cached row with the same hyper-parameters, so a grid can be extended (another seed) or resumed.

Measured per row:
  - fold exactness: `l4q_export.verify.verify_fold` (codes and dequant of the fold vs the method's training forward);
  - held-out Alpaca response perplexity (exp of the token-mean response NLL, the training loss's definition) and
    WikiText-2 test perplexity (first --ppl-tokens tokens, strided windows: l4q-eval's code), both on the folded
    checkpoint in PyTorch (the weights every exporter writes) and on the exported GGUF in llama.cpp (the file a
    user ships); for lora / qat-lora also on the training forward (float LoRA / 4+16 mixed precision);
  - the GGUF export's verify (`l4q_export.formats.gguf.verify`) pass/fail.
The float model's perplexities are measured the same way.  The table is in-domain-honest: stories260K is a
TinyStories model, so WikiText-2 and Alpaca perplexities are large for every variant, the float one included.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = SHARED / "models" / "stories260K"
ALPACA = SHARED / "instruct" / "alpaca_en_demo.json"
WIKI = SHARED / "text" / "wikitext2_test.txt"
METHODS = ("l4q", "qalora", "dlqat", "qat-lora", "lora", "rtn")
HELD_OUT = 100
HPARAMS = ("steps", "batch_size", "seq_len", "lr", "rank", "alpha", "ppl_tokens")


def split_data(work: Path) -> tuple[Path, Path]:
    """train.json = all but the last HELD_OUT records; heldout.json = those (same Alpaca template)."""
    recs = json.loads(ALPACA.read_text())
    train, held = work / "train.json", work / "heldout.json"
    if not train.is_file():
        train.write_text(json.dumps(recs[:-HELD_OUT]))
        held.write_text(json.dumps(recs[-HELD_OUT:]))
    return train, held


def response_ppl(backend: Any, examples: list[tuple[list[int], list[int]]]) -> float:
    """exp(mean NLL of the response tokens) -- the training loss on unseen examples, in any runtime."""
    import numpy as np

    from l4q_export.training.data import IGNORE

    nll, n = 0.0, 0
    for ids, labels in examples:
        lp = backend.logprobs(ids)
        pos = np.array([j for j in range(1, len(ids)) if labels[j] != IGNORE])
        nll -= float(lp[pos - 1, np.asarray(ids)[pos]].sum())
        n += len(pos)
    return math.exp(nll / n)


def score(target: Path, held: Path, a: argparse.Namespace, forward: str = "fold") -> dict[str, float]:
    """Held-out Alpaca and WikiText-2 perplexity of one target (checkpoint / HF dir / .gguf) in its runtime."""
    from l4q_export.eval.backends import open_backend
    from l4q_export.eval.perplexity import perplexity
    from l4q_export.training.data import instruction_examples, load_tokenizer

    b = open_backend(target, forward=forward, threads=1)
    examples = instruction_examples(held, load_tokenizer(MODEL), a.seq_len)  # the same ids for every runtime
    return {"alpaca": response_ppl(b, examples), "wiki": perplexity(b, WIKI, max_tokens=a.ppl_tokens)["ppl"]}


def one(a: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration and evaluate it (runs in a child process)."""
    import torch

    from l4q_export.training.trainer import TrainArgs, train
    from l4q_export.verify import verify_fold

    torch.set_num_threads(1)
    work = Path(a.work)
    train_json, held = split_data(work)
    out = work / f"s{a.seed}_{a.method}_b{a.bits}_g{a.group}"
    t0 = time.time()
    rep = train(TrainArgs(model=MODEL, data=train_json, out=out, method=a.method, bits=a.bits, group_size=a.group, rank=a.rank,
                          alpha=a.alpha, lr=a.lr, steps=a.steps, batch_size=a.batch_size, grad_accum=1, seq_len=a.seq_len,
                          seed=a.seed, save_every=0, eval_examples=0, extra={"qat_lora_export": "merge"}))
    row: dict[str, Any] = {"seed": a.seed, "method": a.method, "bits": a.bits, "group": a.group,
                           **{k: getattr(a, k) for k in HPARAMS},
                           "train_s": rep["seconds"], "wall_train_s": time.time() - t0,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "first_loss": rep["first_loss"], "last_loss": rep["last_loss"]}
    vf = verify_fold(out)
    row["fold"] = {"passed": vf["passed"], "bit_identical": vf["n_bit_identical"], "layers": vf["n_layers"],
                   "lossy_by_design": vf["lossy_by_design"], "max_abs_diff": max(r["max_abs_diff"] for r in vf["layers"])}
    row["ppl_fold"] = score(out, held, a)
    if a.method in ("lora", "qat-lora"):
        row["ppl_train"] = score(out, held, a, "train")
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_artifact, verify_tensors

    gguf = get_target("gguf")
    try:
        exp = gguf.write(out, out / "model.gguf").to_dict()
    except Exception as e:  # report, never hide, why the shipped file could not be written
        row["gguf_error"] = f"{type(e).__name__}: {e}"
        return row
    gg = Path(exp["artifact"])
    row["gguf_types"] = sorted({r["type"] for r in exp.get("layers", []) if isinstance(r, dict) and "type" in r})
    row["ppl_gguf"] = score(gg, held, a)
    try:
        if a.group in a.full_verify_groups and a.seed == 0:
            v = verify_artifact(gguf, gg, out)
            row["gguf_verify"] = {"passed": v["passed"], "summary": v["summary"], "level": "full"}
        else:  # levels (a) codes and (b) bound only: llama.cpp's runtime check costs ~30 s a run on the shared CPU
            v = verify_tensors(gguf, gg, out)
            row["gguf_verify"] = {"passed": v["n_codes_identical"] == v["n_within_bound"] == v["n_quantized"] > 0,
                                  "level": "tensors",
                                  "summary": f"{v['n_codes_identical']}/{v['n_quantized']} codes identical, "
                                             f"{v['n_within_bound']}/{v['n_quantized']} within bound"}
    except Exception as e:
        row["gguf_verify"] = {"passed": False, "level": "error", "summary": f"{type(e).__name__}: {e}"}
    return row


def _f(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _p(r: dict[str, Any], key: str, metric: str) -> float | None:
    return (r.get(key) or {}).get(metric)


def comparison(rows: list[dict[str, Any]], bits_list: list[int], groups: list[int], metric: str) -> list[str]:
    """L4Q vs each other method on one perplexity of the exported weights, per seed."""
    lines = []
    by: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["bits"], r["group"], r["method"]), []).append(r)
    for bits in bits_list:
        for g in groups:
            l4q = {r["seed"]: r for r in by.get((bits, g, "l4q"), [])}
            if not l4q:
                continue
            parts = []
            for other in ("qalora", "lora", "dlqat", "qat-lora", "rtn"):
                o = {r["seed"]: r for r in by.get((bits, g, other), [])}
                seeds = sorted(set(l4q) & set(o))
                if not seeds:
                    continue
                mine = [l4q[s]["ppl_fold"][metric] for s in seeds]
                theirs = [o[s]["ppl_fold"][metric] for s in seeds]
                wins = sum(x <= y for x, y in zip(mine, theirs, strict=True))
                verdict = "holds" if wins == len(seeds) else "**does not hold**" if wins == 0 else "**mixed**"
                vals = ", ".join(f"{x:.2f} vs {y:.2f}" for x, y in zip(mine, theirs, strict=True))
                parts.append(f"vs {other}: {verdict} ({vals}{'; seeds ' + ','.join(map(str, seeds)) if len(seeds) > 1 else ''})")
            lines.append(f"- {bits}-bit g{g}: " + "; ".join(parts))
    return lines


def markdown(rows: list[dict[str, Any]], base: dict[str, float], a: argparse.Namespace, commands: list[str]) -> str:
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    groups = sorted({r["group"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Training methods on stories260K", "",
        "Produced by (same --work, rows cached and merged):", "",
        *[f"    {c}" for c in commands], "",
        f"Machine: {platform.machine()} CPU (2 cores shared with other jobs; each run single-threaded, {a.jobs} at a time), "
        "no GPU.  Training times are therefore only comparable within this table.", "",
        f"Every method: same data (the first {999 - HELD_OUT} records of `alpaca_en_demo.json`, loss on responses), "
        f"seeds {', '.join(map(str, seeds))}, {a.steps} optimizer steps of batch {a.batch_size} x seq {a.seq_len} "
        f"(~{a.steps * a.batch_size / (999 - HELD_OUT):.2f} epochs), AdamW lr {a.lr} (cosine, 10% warm-up, wd 0.01 on "
        f"LoRA, grad-norm clip 1.0), LoRA rank {a.rank} alpha {a.alpha}; `rtn` trains nothing (min/max RTN grid).  "
        "Quantized: every decoder linear (q/k/v/o, gate/up/down); embeddings, norms stay float.  "
        "MLP 172 is not a multiple of 32/64: its last group is partial.", "",
        "Metrics (lower is better): **Alpaca** = perplexity of the responses of the last 100 (held-out) records "
        "(exp of the token-mean response NLL, exactly the training loss); **Wiki** = WikiText-2 test perplexity, first "
        f"{a.ppl_tokens} tokens, windows of 512 with stride 256 (`l4q-eval --tasks ppl --max-tokens {a.ppl_tokens}`).  "
        "*export* = the folded checkpoint in PyTorch fp32 (the weights every exporter writes); *train fwd* = the training "
        "forward where it is not the exported one (lora: float LoRA; qat-lora: 4+16 mixed precision); *GGUF* = the "
        "exported .gguf run by llama.cpp (activations go through Q8_1 in its quantized dot products).  "
        "*fold* = layers whose exported weights are bit-identical to the training forward (lora / qat-lora re-quantize "
        "a merge: lossy by design).  *GGUF verify* = `l4q_export.verify` on the GGUF: (a) codes identical to the fold, "
        "(b) decoded weights within the declared bound, (c) llama.cpp logits/greedy/tokenizer vs the "
        "PyTorch reference (the method's training forward; for lora / qat-lora, whose export is a re-quantized merge "
        "by design, the fold); rows marked (a,b) ran (a) and "
        "(b) only (the runtime check (c) is run on the seed-0 group-32 rows).  "
        "Peak RSS = the whole training process (includes ~0.4 GB of Python/torch runtime).", "",
        f"**Float stories260K (no quantization): Alpaca {base['alpaca']:.2f}, Wiki {base['wiki']:.2f}.**", "",
        "| bits | group | method | seed | Alpaca export | Alpaca train fwd | Alpaca GGUF | Wiki export | Wiki GGUF | fold | "
        "GGUF verify | GGUF types | train s | peak RSS MB | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (-r["bits"], r["group"], order[r["method"]], r["seed"])):
        fold = r["fold"]
        fold_s = f"{fold['bit_identical']}/{fold['layers']}" + (" (lossy)" if fold["lossy_by_design"] else "")
        if "gguf_error" in r:
            gv, types = "error", "–"
        else:
            level = {"full": "", "tensors": " (a,b)"}.get(r["gguf_verify"]["level"], " (verify error)")
            gv = ("pass" if r["gguf_verify"]["passed"] else "FAIL") + level
            types = "+".join(r.get("gguf_types", []))
        lines.append(
            f"| {r['bits']} | {r['group']} | {r['method']} | {r['seed']} | {_f(_p(r, 'ppl_fold', 'alpaca'))} | "
            f"{_f(_p(r, 'ppl_train', 'alpaca'))} | {_f(_p(r, 'ppl_gguf', 'alpaca'))} | {_f(_p(r, 'ppl_fold', 'wiki'))} | "
            f"{_f(_p(r, 'ppl_gguf', 'wiki'))} | {fold_s} | {gv} | {types} | {r['train_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{_f(r['last_loss'], 3)} |")
    for metric, title in (("alpaca", "held-out Alpaca ppl"), ("wiki", "WikiText-2 ppl")):
        lines += ["", f"## Does L4Q <= QA-LoRA and <= LoRA->RTN hold? ({title} of the exported weights)", "",
                  *comparison(rows, bits_list, groups, metric)]
    errs = [r for r in rows if "gguf_error" in r]
    fails = [r for r in rows if "gguf_verify" in r and not r["gguf_verify"]["passed"]]
    if errs or fails:
        lines += ["", "## GGUF export errors / verify failures", ""]
        lines += [f"- {r['method']} b{r['bits']} g{r['group']} s{r['seed']}: {r['gguf_error']}" for r in errs]
        lines += [f"- {r['method']} b{r['bits']} g{r['group']} s{r['seed']}: {r['gguf_verify']['summary']}"
                  + (" -- lossy by design: level (c) compares llama.cpp with the training forward (float LoRA / 4+16), "
                     "which the re-quantized merge does not equal; (a) and (b) pass" if r["fold"]["lossy_by_design"] else "")
                  for r in fails]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--groups", default="32,64")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--full-verify-groups", default="32", help="groups whose seed-0 GGUF gets the full verify (with llama.cpp)")
    ap.add_argument("--jobs", type=int, default=2, help="single-threaded runs at once")
    ap.add_argument("--work", default="/tmp/bench_methods")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "methods.md"))
    ap.add_argument("--one", nargs=4, metavar=("SEED", "METHOD", "BITS", "GROUP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.seed, a.method, a.bits, a.group = int(a.one[0]), a.one[1], int(a.one[2]), int(a.one[3])
        a.full_verify_groups = [int(x) for x in a.full_verify_groups.split(",") if x]
        print("BENCH_ROW " + json.dumps(one(a)))
        return
    if not MODEL.is_dir():
        sys.exit(f"needs ../shared/data beside the repo ({SHARED} not found)")
    work = Path(a.work)
    (work / "rows").mkdir(parents=True, exist_ok=True)
    _, held = split_data(work)
    hp = {k: getattr(a, k) for k in HPARAMS}
    cmd = "python tools/bench_methods.py " + " ".join(sys.argv[1:])
    with (work / "commands.txt").open("a") as f:
        f.write(cmd + "\n")
    base_file = work / f"float_{a.seq_len}_{a.ppl_tokens}.json"
    if not base_file.is_file():
        import torch

        torch.set_num_threads(1)
        base_file.write_text(json.dumps(score(MODEL, held, a)))
    base = json.loads(base_file.read_text())
    configs = [(int(s), m, int(b), int(g)) for s in a.seeds.split(",") for b in a.bits.split(",") for g in a.groups.split(",")
               for m in a.methods.split(",")]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in hp.items()] + ["--work", a.work,
                                                                             f"--full-verify-groups={a.full_verify_groups}"]

    def run(cfg: tuple[int, str, int, int]) -> None:
        s, m, b, g = cfg
        path = work / "rows" / f"s{s}_{m}_b{b}_g{g}.json"
        if path.is_file() and {k: json.loads(path.read_text()).get(k) for k in HPARAMS} == hp:
            return
        p = subprocess.run([sys.executable, __file__, "--one", str(s), m, str(b), str(g), *passthrough],
                           capture_output=True, text=True, cwd=REPO)
        line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH_ROW ")), None)
        if line is None:
            print(f"{m} b{b} g{g} s{s} FAILED:\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
            return
        r = json.loads(line[len("BENCH_ROW "):])
        path.write_text(json.dumps(r, indent=1))
        print(f"{m:9s} b{b} g{g} s{s}: alpaca {r['ppl_fold']['alpaca']:.2f} wiki {r['ppl_fold']['wiki']:.2f} "
              f"gguf {r.get('ppl_gguf', r.get('gguf_error'))} fold {r['fold']['bit_identical']}/{r['fold']['layers']} "
              f"train {r['train_s']:.0f}s rss {r['peak_rss_mb']:.0f}MB", flush=True)

    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(run, configs))
    rows = [json.loads(p.read_text()) for p in sorted((work / "rows").glob("*.json"))]
    rows = [r for r in rows if {k: r.get(k) for k in HPARAMS} == hp]
    commands = list(dict.fromkeys((work / "commands.txt").read_text().splitlines()))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, base, a, commands))
    out.with_suffix(".json").write_text(json.dumps({"float": base, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
