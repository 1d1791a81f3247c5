"""Quality per byte on a real model: L4Q's exact GGUF export vs the peer path a user would take instead.

Model: SmolLM2-135M-Instruct as built by tools/fetch_smollm2.py (bf16 HF dir; its weights lie on a Q4_1 g32 grid,
so the comparisons use g128 / g64 and 3-2 bits).  For every (bits, group) config and method, the same Alpaca data
and steps:
  ours:  l4q-train --method M -> l4q-export --to gguf (auto type: the trained codes, exactly)
  peer:  float LoRA (same steps) -> W0 + alpha*B@A in fp32 -> llama.cpp convert_hf_to_gguf.py --outtype f32
         -> llama-quantize to Q4_0 / Q4_1 / Q4_K_M / Q3_K_M / Q2_K, each without and (when llama-imatrix is
         built) with an importance matrix computed on 200 Alpaca records
Configs are uniform `bits:group[:zero-point]` or K-quant grids: `--configs q4_k_m,q3_k_m` trains llama.cpp's own
per-tensor recipe for that file type, so our file and the peer's have the same tensor types and bytes.
Every file is scored in llama.cpp by l4q-eval: WikiText-2 perplexity on the first N tokens, ARC-easy and PIQA
accuracy with stderr.  Bytes: the whole file, and the quantized linears alone (the blk.*.attn_*/ffn_* matrices),
which is the x axis of the plot -- embeddings are f16 in ours and re-quantized by llama-quantize, so the file size
alone would mix the two.

    python tools/bench_real.py --quick          # this 2-core CPU box: 8 steps x 2 x 128, 40 items, 2k tokens
    python tools/bench_real.py                  # the full grid (issue 11): 80 steps x 4 x 256, 300 items, 16k tokens

Writes WORK/results.json after every row (a partial grid survives an interrupt) and, at the end or with
--report-only, docs/results/smollm2.md and docs/results/smollm2.png.  llama-quantize: pass --quantize-bin; when
the binary is missing the peer rows are skipped with a message.  Build it from the llama-cpp-python sdist:
    tar xzf llama_cpp_python-0.3.36.tar.gz && cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/build-kquant
      -DLLAMA_CURL=OFF -DGGML_NATIVE=ON && cmake --build /tmp/build-kquant --target llama-quantize llama-imatrix -j2
(both targets: ~20 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_gguf_vs_llamacpp import find_converter, merge_to_float  # noqa: E402

from l4q_export.quant.kplan import RECIPE_GRIDS  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "l4q-export" / "smollm2-135m-instruct"
PEER_TYPES = ("Q4_0", "Q4_1", "Q4_K_M", "Q3_K_M", "Q2_K")
METHODS_ALL = ("l4q", "qalora", "dlqat", "qat-lora", "lora", "rtn")
PRESETS = {
    "quick": {"steps": 8, "batch": 2, "seq": 128, "limit": 40, "max_tokens": 2048,
              "configs": "4:128,3:64", "methods": "l4q,lora,rtn"},
    "full": {"steps": 80, "batch": 4, "seq": 256, "limit": 300, "max_tokens": 16384,
             "configs": "4:128,3:64,2:64", "methods": ",".join(METHODS_ALL)},
}


def shared_data() -> Path:
    for p in (REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data"):
        if p.is_dir():
            return p
    return REPO.parent / "shared" / "data"


def bin_(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(cmd: list[str], log: Path) -> None:
    """Run one step of the pipeline with its output in LOG; a failure names the log and shows its tail."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}\n  log {log}:\n{log.read_text()[-1500:]}")


def linear_bytes(gguf_path: Path) -> dict[str, Any]:
    """Bytes of the file and of its quantized linears (blk.* 2-D weights), and the tensor types used there."""
    from gguf import GGUFReader

    rd = GGUFReader(str(gguf_path))
    lin = [t for t in rd.tensors if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2]
    types: dict[str, int] = {}
    for t in lin:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_bytes": gguf_path.stat().st_size, "linear_bytes": int(sum(int(t.n_bytes) for t in lin)),
            "n_linears": len(lin), "linear_types": types}


def evaluate(gguf_path: Path, data: Path, limit: int, max_tokens: int, threads: int, tasks: str) -> dict[str, Any]:
    rep = gguf_path.with_suffix(".eval.json")
    if rep.is_file():
        cached = json.loads(rep.read_text())
        if set(tasks.split(",")) <= set(cached["results"]):
            return cached
    run([bin_("l4q-eval"), str(gguf_path), "--tasks", tasks, "--text",
         str(data / "text" / "wikitext2_test.txt"), "--data-dir", str(data / "eval"), "--limit", str(limit),
         "--max-tokens", str(max_tokens), "--threads", str(threads), "--json", str(rep)],
        gguf_path.with_suffix(".eval.log"))
    return json.loads(rep.read_text())


def scores(ev: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one l4q-eval report (l4q_export/eval/cli.py run_eval)."""
    out: dict[str, Any] = {}
    for name, r in ev["results"].items():
        if name == "ppl":
            out.update(ppl=r["ppl"], ppl_tokens=r["tokens_scored"], ppl_ctx=r.get("ctx"))
        else:
            m = "acc_norm" if "acc_norm" in r else "acc"
            out.update({name: r[m], name + "_stderr": r[m + "_stderr"], name + "_n": r["n"], name + "_metric": m})
    out["eval_seconds"] = round(sum(r.get("seconds", 0) for r in ev["results"].values()), 1)
    return out


@dataclass(frozen=True)
class Config:
    """One trained setting: uniform `bits:group[:integer]` or a K-quant grid/recipe name (`q4_k_m`, `q3_k`...)."""

    bits: int = 4
    group: int = 128
    zero_point: str = "float"
    grid: str | None = None

    @classmethod
    def parse(cls, text: str) -> Config:
        if text.startswith("q"):
            return cls(bits=int(text[1]), group=0, grid=text)
        parts = text.split(":")
        return cls(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "float")

    @property
    def tag(self) -> str:
        return self.grid or f"{self.bits}b_g{self.group}" + ("" if self.zero_point == "float" else f"_{self.zero_point}")

    @property
    def label(self) -> str:
        return self.grid.upper() if self.grid else f"{self.bits}b g{self.group}" + (
            "" if self.zero_point == "float" else f" {self.zero_point}")

    def args(self) -> list[str]:
        if self.grid:
            return ["--grid", self.grid]
        return ["--bits", str(self.bits), "--group-size", str(self.group), "--zero-point", self.zero_point]


def train(out: Path, model: Path, data: Path, method: str, cfg: Config, p: dict[str, Any]) -> Path:
    if (out / "l4q_config.json").is_file():
        return out
    extra = ["--qat-lora-export", "merge"] if method == "qat-lora" else []
    t0 = time.time()
    run([bin_("l4q-train"), "--model", str(model), "--data", str(data / "instruct" / "alpaca_en_demo.json"),
         "--out", str(out), "--method", method, *cfg.args(), "--targets", "gguf",
         "--steps", str(p["steps"]), "--batch-size", str(p["batch"]), "--grad-accum", "1", "--seq-len", str(p["seq"]),
         "--lr", "2e-4" if method == "lora" else "1e-3", "--save-every", "0", "--eval-examples", "0", *extra],
        out.with_name(out.name + ".train.log"))
    (out / "bench_train_seconds").write_text(f"{time.time() - t0:.1f}")
    return out


def our_export(ck: Path, out: Path) -> dict[str, Any]:
    rep = out.with_suffix(".export.json")
    if not out.is_file():
        cmd = [bin_("l4q-export"), "--to", "gguf", str(ck), "-o", str(out), "--json", str(rep)]
        try:
            run(cmd, out.with_suffix(".export.log"))
        except RuntimeError:  # lora / qat-lora: merge + re-quantize is lossy by construction; accept and report
            run([*cmd, "--allow-lossy"], out.with_suffix(".export.log"))
    r = json.loads(rep.read_text())
    keep = ("main_type", "n_exact", "n_quantized", "max_abs_error", "lossy")
    return {k: r[k] for k in keep if k in r}


def calibration_text(data: Path, out: Path, n_records: int = 200) -> Path:
    """The importance matrix's calibration text: Alpaca records (instruction, input, output), the training data's
    kind of text, disjoint from the WikiText-2 test text that scores the files."""
    if not out.is_file():
        recs = json.loads((data / "instruct" / "alpaca_en_demo.json").read_text())[:n_records]
        out.write_text("\n\n".join("\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output")
                                               if r.get(k)) for r in recs))
    return out


def peer_files(converter: Path, quantize: Path | None, imatrix_bin: Path | None, merged: Path, work: Path,
               types: tuple[str, ...], calib: Path, tag: str) -> list[tuple[str, Path]]:
    """The peer's files: convert_hf_to_gguf.py F32, then llama-quantize to each type, and (with llama-imatrix) the
    same types again with an importance matrix computed on the calibration text."""
    f32 = work / f"{tag}.f32.gguf"
    if not f32.is_file():
        run([sys.executable, str(converter), str(merged), "--outtype", "f32", "--outfile", str(f32)],
            work / f"{tag}.convert.log")
    files = [("F32", f32)]
    if quantize is None:
        return files
    imat = work / f"{tag}.imatrix.gguf"
    if imatrix_bin is not None and not imat.is_file():
        run([str(imatrix_bin), "-m", str(f32), "-f", str(calib), "-o", str(imat), "-c", "256", "--chunks", "64",
             "-t", "2"], work / f"{tag}.imatrix.log")
    for qt in types:
        for im in ((False, True) if imatrix_bin is not None else (False,)):
            name = qt + ("+imatrix" if im else "")
            out = work / f"{tag}.{name}.gguf"
            if not out.is_file():
                run([str(quantize), *(["--imatrix", str(imat)] if im else []), str(f32), str(out), qt, "2"],
                    work / f"{tag}.{name}.quantize.log")
            files.append((name, out))
    return files


class Results:
    """results.json, rewritten after every row so an interrupted grid keeps what it measured."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.rows: list[dict[str, Any]] = old.get("rows", [])
        self.meta = {**old.get("meta", {}), **meta}

    def has(self, key: str) -> bool:
        return any(r["key"] == key for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["key"] != row["key"]] + [row]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        os.replace(tmp, self.path)
        click.echo(f"[{time.strftime('%H:%M:%S')}] {row['key']}: ppl {row.get('ppl')} "
                   f"linear {row.get('linear_bytes', 0) / 2**20:.1f} MiB")


def frontier(rows: list[dict[str, Any]]) -> set[str]:
    """Keys of the rows no other row beats on both linear bytes and ppl (the Pareto frontier)."""
    pts = [r for r in rows if r.get("ppl") and r.get("linear_bytes")]
    return {r["key"] for r in pts if not any(o["linear_bytes"] <= r["linear_bytes"] and o["ppl"] < r["ppl"] and
                                             o is not r for o in pts)}


def fmt_acc(r: dict[str, Any], task: str) -> str:
    a, s = r.get(task), r.get(task + "_stderr")
    return "-" if a is None else f"{a:.3f} ± {s:.3f}" if s is not None else f"{a:.3f}"


def frontier_lines(rows: list[dict[str, Any]], front: set[str]) -> list[str]:
    """For each of our rows: on the frontier, or which peer files beat it on both linear bytes and ppl."""
    out = []
    peers = [r for r in rows if r["group"] == "peer" and r.get("ppl")]
    for r in rows:
        if r["group"] != "ours" or not r.get("ppl"):
            continue
        beat = [o["label"] for o in peers if o["linear_bytes"] <= r["linear_bytes"] and o["ppl"] < r["ppl"]]
        lo = [o for o in peers if o["linear_bytes"] >= r["linear_bytes"]]
        state = "on the frontier" if r["key"] in front else "not on the frontier"
        out.append(f"- {r['label']} ({r['linear_bytes'] / 2**20:.1f} MiB, ppl {r['ppl']:.2f}): {state}; "
                   + (f"dominated by {', '.join(beat)}" if beat else "no peer file is both smaller and better")
                   + ("; peers at >= its bytes: " + ", ".join(f"{o['label']} {o['ppl']:.2f}" for o in lo) if lo else ""))
    return out


def same_type_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Our K-quant recipe rows (`--grid q4_k_m`, `q3_k_m`, `q2_k_m`...: llama.cpp's per-tensor mix for that file
    type) beside the peer's file of the same type (with and without imatrix): the bytes must agree (same tensor
    types), so the comparison is at equal bytes."""
    peers = {r["label"].removeprefix("LoRA -> "): r for r in rows if r["group"] == "peer" and r.get("ppl")}
    out = ["## Same file type, same bytes: exact QAT vs re-quantization", "",
           "| file type | ours: file MiB | peer: file MiB | bytes ours/peer | ppl ours | ppl peer | ppl peer +imatrix "
           "| PIQA ours | PIQA peer | PIQA peer +imatrix |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for r in rows:
        qt = RECIPE_GRIDS.get(r.get("grid") or "")  # a uniform grid (q2_k...) is no llama.cpp file type's mix
        if r["group"] != "ours" or not qt or not r.get("ppl") or qt not in peers:
            continue
        p, pi = peers[qt], peers.get(qt + "+imatrix", {})
        ppl_i = f"{pi['ppl']:.2f}" if pi.get("ppl") else "-"
        out.append(f"| {qt} | {r['file_bytes'] / 2**20:.1f} | {p['file_bytes'] / 2**20:.1f} | "
                   f"{r['file_bytes'] / p['file_bytes']:.4f} | {r['ppl']:.2f} | {p['ppl']:.2f} | {ppl_i} | "
                   f"{fmt_acc(r, 'piqa')} | {fmt_acc(p, 'piqa')} | {fmt_acc(pi, 'piqa')} |")
        n += 1
    return out + [""] if n else []


def write_report(res: Results, md: Path, png: Path, notes: Path | None = None) -> None:
    rows = sorted(res.rows, key=lambda r: (r["group"] != "reference", r["group"], r.get("linear_bytes", 0)))
    quantized = [r for r in rows if r["group"] != "reference"]
    front = frontier(quantized)
    m = res.meta
    lines = [
        "# SmolLM2-135M-Instruct: quality per byte of the exported GGUF (llama.cpp)",
        "",
        f"Produced by `{m.get('command', 'python tools/bench_real.py --quick')}` on {m.get('host', 'CPU')} "
        f"({m.get('date', '')}). Training: {m['steps']} steps x batch {m['batch']} x seq {m['seq']} of "
        f"`alpaca_en_demo.json`, the same for every method. Scoring: `l4q-eval` on the exported file in llama.cpp: "
        f"WikiText-2 test perplexity on the first {m['max_tokens']} tokens (one window), "
        f"{' and '.join(t for t in m.get('tasks', 'ppl,arc_easy,piqa').split(',') if t != 'ppl') or 'no MC sets'} "
        f"on the first {m['limit']} items (acc_norm ± binomial stderr; ARC-e only where measured). "
        "`linear MiB` = bytes of the 210 blk.* attention/MLP matrices "
        "(the plot's x axis); `file MiB` also counts embeddings (f16 in ours, re-quantized by llama-quantize).",
        "",
        "Peer path = float LoRA (same steps) -> merge W0 + alpha*B@A in fp32 -> llama.cpp `convert_hf_to_gguf.py "
        "--outtype f32` -> `llama-quantize` (`+imatrix`: with `--imatrix` from llama.cpp's `llama-imatrix` on 200 "
        "Alpaca records, the training data's kind of text). `*` = on the Pareto frontier "
        "(linear bytes vs ppl) of all quantized rows.",
        "",
        "| row | export | linear MiB | file MiB | WikiText ppl | ARC-e | PIQA | exact |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        star = " *" if r["key"] in front else ""
        ex = r.get("export", {})
        exact = (f"{ex['n_exact']}/{ex['n_quantized']}" if "n_exact" in ex else "-") if r["group"] == "ours" else "-"
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") else "-"
        lines.append(f"| {r['label']}{star} | {r.get('type', '-')} | {r.get('linear_bytes', 0) / 2**20:.1f} | "
                     f"{r.get('file_bytes', 0) / 2**20:.1f} | {ppl} | {fmt_acc(r, 'arc_easy')} | "
                     f"{fmt_acc(r, 'piqa')} | {exact} |")
    missing = m.get("missing", [])
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    lines += ["", "![ppl vs bytes of the quantized linears](smollm2.png)", ""]
    lines += ["## Frontier (computed from the table)", ""] + frontier_lines(quantized, front) + [""]
    lines += same_type_lines(rows)
    if notes is not None and notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    md.with_suffix(".json").write_text(json.dumps({"meta": m, "rows": res.rows}, indent=1) + "\n")
    plot(rows, front, png)


def plot(rows: list[dict[str, Any]], front: set[str], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        click.echo("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for grp, marker, color in (("ours", "o", "tab:blue"), ("peer", "s", "tab:orange")):
        pts = [r for r in rows if r["group"] == grp and r.get("ppl")]
        ax.scatter([r["linear_bytes"] / 2**20 for r in pts], [r["ppl"] for r in pts], marker=marker, color=color,
                   label={"ours": "l4q-export (trained codes)", "peer": "float LoRA -> llama-quantize"}[grp])
        for r in pts:
            ax.annotate(r["label"], (r["linear_bytes"] / 2**20, r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for r in rows:
        if r["group"] == "reference" and r.get("ppl"):
            ax.axhline(r["ppl"], ls="--", lw=0.8, color="gray")
            ax.annotate(r["label"], (ax.get_xlim()[0], r["ppl"]), fontsize=7, color="gray")
    fr = sorted((r for r in rows if r["key"] in front), key=lambda r: r["linear_bytes"])
    ax.plot([r["linear_bytes"] / 2**20 for r in fr], [r["ppl"] for r in fr], color="k", lw=0.8, alpha=0.5,
            label="Pareto frontier")
    ax.set_xlabel("bytes of the quantized linears (MiB)")
    ax.set_ylabel("WikiText-2 perplexity (llama.cpp)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("SmolLM2-135M-Instruct: exported GGUF, quality per byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--quick", is_flag=True, help="Preset sized for a 2-core CPU box (see PRESETS); else the full grid.")
@click.option("--model", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
              help="SmolLM2 HF dir from tools/fetch_smollm2.py.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Shared data dir (instruct/, text/, eval/); default ../shared/data.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bench_real"), show_default=True)
@click.option("--sdist-dir", type=click.Path(path_type=Path), default=Path("/tmp/sdist"), show_default=True,
              help="Where the llama-cpp-python sdist (convert_hf_to_gguf.py) is or is fetched to.")
@click.option("--imatrix-bin", type=click.Path(path_type=Path), default=Path("/tmp/build-kquant/bin/llama-imatrix"),
              show_default=True, help="llama.cpp's llama-imatrix: adds the peer types again with an importance matrix.")
@click.option("--quantize-bin", type=click.Path(path_type=Path), default=Path("/tmp/build-kquant/bin/llama-quantize"),
              show_default=True, help="llama.cpp's llama-quantize binary (peer rows are skipped without it).")
@click.option("--configs", default=None, help="Comma list of bits:group[:zero-point] (group -1 = per channel) or K-quant "
              "grids/recipes (q4_k_m, q3_k_m, q2_k, q4_k...); preset default.")
@click.option("--methods", default=None, help="Comma list of l4q-train methods; preset default.")
@click.option("--peer-types", default=",".join(PEER_TYPES), show_default=True, help="llama-quantize types.")
@click.option("--steps", type=int, default=None, help="Training steps (preset default).")
@click.option("--limit", type=int, default=None, help="Items per multiple-choice task (preset default).")
@click.option("--max-tokens", type=int, default=None, help="WikiText-2 tokens scored for ppl (preset default).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--tasks", default="ppl,arc_easy,piqa", show_default=True,
              help="l4q-eval tasks per file (ppl alone when the multiple-choice sets cost too much CPU time).")
@click.option("--md", type=click.Path(path_type=Path), default=REPO / "docs" / "results" / "smollm2.md",
              show_default=True)
@click.option("--notes", type=click.Path(path_type=Path), default=None,
              help="Markdown appended to the report (the hand-written verdict on the measured numbers).")
@click.option("--report-only", is_flag=True, help="Only rewrite the markdown and plot from WORK/results.json.")
def main(quick: bool, model: Path, data_dir: Path | None, work: Path, sdist_dir: Path, imatrix_bin: Path,
         quantize_bin: Path,
         configs: str | None, methods: str | None, peer_types: str, steps: int | None, limit: int | None,
         max_tokens: int | None, threads: int, tasks: str, md: Path,
         notes: Path | None, report_only: bool) -> None:
    p = dict(PRESETS["quick" if quick else "full"])
    for k, v in (("steps", steps), ("limit", limit), ("max_tokens", max_tokens)):
        if v:
            p[k] = v
    data = data_dir or shared_data()
    work.mkdir(parents=True, exist_ok=True)
    cmd = "python tools/bench_real.py" + (" --quick" if quick else "") + "".join(
        f" --{k} {v}" for k, v in (("configs", configs), ("methods", methods), ("steps", steps), ("limit", limit),
                                        ("max-tokens", max_tokens),
                                        ("tasks", None if tasks == "ppl,arc_easy,piqa" else tasks)) if v)
    res = Results(work / "results.json", {**p, "command": cmd, "date": time.strftime("%Y-%m-%d"),
                                          "host": f"{os.cpu_count()}-core CPU", "tasks": tasks})
    if report_only:
        write_report(res, md, md.with_suffix(".png"), notes)
        return
    for need in (model / "config.json", data / "instruct" / "alpaca_en_demo.json",
                 data / "text" / "wikitext2_test.txt", data / "eval" / "arc_easy.jsonl"):
        if not need.is_file():
            raise click.ClickException(f"missing {need} (model: python tools/fetch_smollm2.py; data: ../shared)")
    cfgs = [Config.parse(c) for c in (configs or p["configs"]).split(",")]
    meths = (methods or p["methods"]).split(",")
    quantize = quantize_bin if quantize_bin.is_file() else None
    imat = imatrix_bin if quantize is not None and imatrix_bin.is_file() else None
    missing = [] if imat else ["importance-matrix (imatrix) variants of the peer types (llama-imatrix not built)"]
    if quantize is None:
        missing.append(f"peer llama-quantize rows ({quantize_bin} not found; build command in this tool's docstring)")
        click.echo(missing[-1])
    res.meta["missing"] = missing
    converter = find_converter(sdist_dir)

    def ev(key: str, path: Path, row: dict[str, Any]) -> None:
        if res.has(key):
            return
        try:
            row = {**row, "key": key, **linear_bytes(path), **scores(evaluate(path, data, p["limit"],
                                                                               p["max_tokens"], threads, tasks))}
        except RuntimeError as e:
            click.echo(f"{key}: {e}")
            row = {**row, "key": key, "error": str(e)[:500]}
        res.add(row)

    # Priority order, so that a run cut short still has the comparisons that matter most: the float LoRA (the
    # peer's start), then per config our methods beside the peer types of that size, then the references.
    lora_cfg = Config(4, 128)
    lora_ck = train(work / "lora_float", model, data, "lora", lora_cfg, p)
    merged = work / "lora_float_merged"
    if not (merged / "model.safetensors").is_file():
        merge_to_float(lora_ck, merged)
    calib = calibration_text(data, work / "calibration.txt")
    peers = dict(peer_files(converter, quantize, imat, merged, work, tuple(peer_types.split(",")), calib, "peer"))
    near = {4: ("Q4_0", "Q4_K_M", "Q4_1"), 3: ("Q3_K_M",), 2: ("Q2_K",)}
    for cfg, meth in [(cfg, meth) for cfg in cfgs for meth in meths]:
        key = f"ours/{meth}/{cfg.tag}"
        label = f"{meth} {cfg.label}"
        if not res.has(key):
            tag = f"{meth}_{cfg.tag}"
            try:
                ck = lora_ck if (meth, cfg) == ("lora", lora_cfg) else train(work / tag, model, data, meth, cfg, p)
                out = work / f"{tag}.gguf"
                exp = our_export(ck, out)
                ev(key, out, {"group": "ours", "label": label, "type": exp.get("main_type", "?"), "method": meth,
                              "bits": cfg.bits, "group_size": cfg.group, "grid": cfg.grid, "export": exp})
            except RuntimeError as e:
                click.echo(f"{key}: {e}")
                res.add({"key": key, "group": "ours", "label": label, "error": str(e)[:500]})
        if meth == meths[0]:  # the peer types of this size right after our first method
            for qt in ((RECIPE_GRIDS[cfg.grid],) if cfg.grid in RECIPE_GRIDS else near.get(cfg.bits, ())):
                for name in (qt, qt + "+imatrix"):
                    if name in peers:
                        ev(f"peer/{name}", peers[name], {"group": "peer", "label": f"LoRA -> {name}", "type": qt})
        write_report(res, md, md.with_suffix(".png"))
    for name, path in peers.items():
        if name != "F32":
            ev(f"peer/{name}", path, {"group": "peer", "label": f"LoRA -> {name}", "type": name.split("+")[0]})
    src = model / "source" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if src.is_file():
        ev("ref/original-q4_1", src, {"group": "reference", "label": "original Q4_1 g32", "type": "Q4_1"})
    ev("ref/lora-f32", peers["F32"], {"group": "reference", "label": "LoRA merged F32", "type": "F32"})
    write_report(res, md, md.with_suffix(".png"))
    shutil.rmtree(work / "lora_float_merged", ignore_errors=True)


if __name__ == "__main__":
    main()
