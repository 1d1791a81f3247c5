"""`l4q-eval TARGET`: score a checkpoint or the exported file you ship, with the runtime that will run it.

TARGET: an L4Q checkpoint dir (PyTorch, folded weights), an HF model dir (float), a .gguf (llama.cpp) or an
ONNX model dir / model.onnx (onnxruntime).  Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..boundary import guarded_command
from ..errors import L4QInputError
from ..guard import check_output
from .backends import open_backend
from .perplexity import perplexity
from .tasks import ACC_ONLY, FILES, MC_TASKS, MMLU_TASKS, mc_docs, mmlu, score_docs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL_TASKS = ("ppl",) + MC_TASKS + MMLU_TASKS


def parse_tasks(spec: str) -> list[str]:
    """Comma list; 'mc' expands to the seven zero-shot sets, 'mmlu' to 0- and 5-shot."""
    out: list[str] = []
    for t in (x.strip() for x in spec.split(",") if x.strip()):
        expanded = MC_TASKS if t == "mc" else MMLU_TASKS if t == "mmlu" else (t,)
        for e in expanded:
            if e not in ALL_TASKS:
                raise L4QInputError(f"unknown task {e!r}; choose from {', '.join(ALL_TASKS)}, mc, mmlu")
            if e not in out:
                out.append(e)
    if not out:
        raise L4QInputError("--tasks is empty")
    return out


def run_eval(target: Path, tasks: list[str], text: Path | None = None, data_dir: Path | None = None, limit: int | None = None,
             max_tokens: int | None = None, ctx: int | None = None, stride: int | None = None, forward: str = "fold",
             tokenizer: Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Evaluate TARGET on `tasks`; returns the JSON report."""
    if "ppl" in tasks and text is None:
        raise L4QInputError("task ppl needs --text FILE (e.g. ../shared/data/text/wikitext2_test.txt)")
    if any(t != "ppl" for t in tasks) and data_dir is None:
        raise L4QInputError("multiple-choice/MMLU tasks need --data-dir DIR (e.g. ../shared/data/eval)")
    backend = open_backend(target, forward=forward, tokenizer=tokenizer, n_ctx=ctx, threads=threads)
    results: dict[str, Any] = {}
    for t in tasks:
        t0 = time.time()
        if t == "ppl":
            r = perplexity(backend, text, max_tokens=max_tokens, ctx=ctx, stride=stride)  # type: ignore[arg-type]
        elif t in MMLU_TASKS:
            r = mmlu(backend, data_dir, shots=0 if t == "mmlu_0shot" else 5, limit=limit)  # type: ignore[arg-type]
        else:
            try:
                docs = mc_docs(t, data_dir, limit)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError, IndexError) as e:  # a row without the set's fields
                raise L4QInputError(f"{Path(data_dir) / FILES[t]}: bad record ({type(e).__name__}: {e}); "  # type: ignore[arg-type]
                                    f"expected rows of the {t} eval set") from None
            r = score_docs(backend, docs, norm=t not in ACC_ONLY)
        r["seconds"] = time.time() - t0
        results[t] = r
    return {"target": str(target), "backend": backend.name, "ctx": backend.max_length, "limit": limit, "results": results}


def format_table(report: dict[str, Any]) -> str:
    """A readable markdown table: one row per task."""
    lines = [f"{report['target']}  ({report['backend']})", "", "| task | n | metric | value | stderr |", "|---|---|---|---|---|"]
    for t, r in report["results"].items():
        if t == "ppl":
            setting = f"ppl (ctx {r['ctx']}, stride {r['stride']})"
            lines.append(f"| perplexity | {r['tokens_scored']} tok | {setting} | {r['ppl']:.4f} | |")
            continue
        for m in ("acc", "acc_norm"):
            if m in r:
                se = r.get(f"{m}_stderr")
                lines.append(f"| {t} | {r['n']} | {m} | {r[m]:.4f} | {'' if se is None else f'{se:.4f}'} |")
        if "acc_macro" in r:
            lines.append(f"| {t} | {r['n']} | acc (macro over subjects) | {r['acc_macro']:.4f} | |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--tasks", default="ppl", show_default=True,
              help=f"Comma list of {', '.join(ALL_TASKS)}; 'mc' = all zero-shot sets, 'mmlu' = 0- and 5-shot.")
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Text file for perplexity.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Directory with the local eval sets (and mmlu/).")
@click.option("--limit", type=int, default=None, help="Score only the first N items per task (per subject for MMLU).")
@click.option("--max-tokens", type=int, default=None, help="Perplexity over the first N tokens only (caps CPU time).")
@click.option("--ctx", type=int, default=None, help="Window length (default: the model's context).")
@click.option("--stride", type=int, default=None, help="Perplexity window stride (default: ctx/2).")
@click.option("--forward", type=click.Choice(["fold", "train"]), default="fold", show_default=True,
              help="Checkpoints only: fold = the exported (dequantized) weights; train = the method's training layers "
                   "(e.g. qat-lora's 4+16 mixed precision, lora's float weights).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer dir to use instead of the target's own (GGUF always uses its embedded vocab).")
@click.option("--threads", type=int, default=None, help="CPU threads for the runtime.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report as JSON.")
@guarded_command
def main(target: Path, tasks: str, text: Path | None, data_dir: Path | None, limit: int | None, max_tokens: int | None,
         ctx: int | None, stride: int | None, forward: str, tokenizer: Path | None, threads: int | None,
         json_path: Path | None) -> None:
    """Perplexity, zero-shot multiple choice and MMLU of TARGET, in the runtime that ships it."""
    try:
        ints = (("--limit", limit), ("--max-tokens", max_tokens), ("--ctx", ctx), ("--stride", stride), ("--threads", threads))
        for name, v in ints:
            if v is not None and v < (2 if name == "--ctx" else 1):
                raise L4QInputError(f"{name} must be >= {2 if name == '--ctx' else 1}, not {v}")
        if json_path:
            check_output(json_path, "--json", "file", inputs=(target,))
        report = run_eval(target, parse_tasks(tasks), text, data_dir, limit, max_tokens, ctx, stride, forward, tokenizer, threads)
    except L4QInputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if json_path:
        from ..checkpoint import AtomicFile

        with AtomicFile(json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(format_table(report))
