"""`make demo`: the whole job end to end on a tiny model the project builds itself (no downloads).

1. build a small LLaMA (random weights) and a SentencePiece tokenizer trained on text written here;
2. `l4q-train` it for a few dozen steps on a built-in instruction set;
3. prove the fold is bit-exact (`python -m l4q_export.verify MODEL_DIR`);
4. export to every available target with its defaults and verify each artifact in its real runtime;
5. print a summary table.

`build_tiny_model` is also what the test-suite uses for its fixtures.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

WORDS = (
    "apple river stone cloud garden window yellow quiet rabbit summer silver forest candle ocean button "
    "pencil winter orange castle dragon little happy brave gentle bright friend story music planet"
).split()


def instruction_records(n: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """Small deterministic tasks with checkable answers (reverse, next number, capitals, count)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        k = rng.randint(1, 98)
        kind = i % 4
        if kind == 0:
            out.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            out.append({"instruction": f"What number comes after {k}?", "input": "", "output": str(k + 1)})
        elif kind == 2:
            out.append({"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()})
        else:
            ws = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            out.append({"instruction": "How many words are in the text?", "input": ws, "output": str(len(ws.split()))})
    return out


def _corpus(records: list[dict[str, str]]) -> str:
    from .training.prompts import PROMPT_INPUT, PROMPT_NO_INPUT

    lines = []
    for r in records:
        lines.append((PROMPT_INPUT if r["input"] else PROMPT_NO_INPUT).format(**r) + r["output"])
    lines += [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return "\n".join(lines)


def build_spm_tokenizer(out_dir: Path, text: str, vocab_size: int = 512) -> None:
    """Train a byte-fallback SentencePiece BPE model like LLaMA's and save HF tokenizer files."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "_corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        normalization_rule_name="identity",
        num_threads=1,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
                "model_max_length": 512,
            },
            indent=2,
        )
    )
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    hidden: int = 64,
    intermediate: int = 192,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie_embeddings: bool = False,
    tokenizer_text: str | None = None,
) -> Path:
    """A small random LLaMA/Mistral/Qwen2 in HF format (safetensors) with a real SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    build_spm_tokenizer(out_dir, tokenizer_text or _corpus(instruction_records()))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(out_dir)))
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_embeddings,
        rope_theta=10000.0,
    )
    cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common))
    model.save_pretrained(str(out_dir))
    return out_dir


def bin_(name: str) -> str:
    """A console script installed beside this interpreter (the project's .venv)."""
    return str(Path(sys.executable).with_name(name))


def _run(cmd: list[str], log: list[dict[str, Any]], what: str) -> subprocess.CompletedProcess:
    t0 = time.time()
    click.echo(f"\n$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, text=True)
    log.append({"step": what, "exit": proc.returncode, "seconds": round(time.time() - t0, 1)})
    if proc.returncode != 0:
        click.echo(f"demo step failed: {what} (exit {proc.returncode})", err=True)
        sys.exit(proc.returncode)
    return proc


# (label, target, extra l4q-export options).  Which checkpoint each run exports is the target's answer to
# `capability`: L4Q's float offsets where it holds them exactly, else the integer-zero-point checkpoint.
EXPORT_RUNS: list[tuple[str, str, list[str]]] = [
    ("gguf", "gguf", []),
    ("onnx-matmulnbits", "onnx", ["--onnx-form", "matmulnbits"]),
    ("onnx-qdq", "onnx", ["--onnx-form", "qdq"]),
    ("safetensors-ct", "safetensors", ["--flavor", "compressed-tensors"]),
    ("safetensors-gptq", "safetensors", ["--flavor", "gptq"]),
]
GROUP_SIZE = 32


def zero_point_for(target: str, bits: int, shape: tuple[int, int] = (64, 64)) -> str:
    """The demo's L4Q float offsets if `target` holds them exactly (fp16 scale grid), else integer zero points."""
    import torch

    from .formats import get_target
    from .formats.base import Exact
    from .quant import QuantSpec

    cap = get_target(target).capability(QuantSpec(bits, GROUP_SIZE, "float"), shape, torch.float16)
    return "float" if isinstance(cap, Exact) else "integer"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--work", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True, help="Working directory (rebuilt)."
)
@click.option("--steps", type=int, default=40, show_default=True, help="Training steps per run.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits.")
def main(work: Path, steps: int, bits: int) -> None:
    """Build a tiny model, train it with L4Q, export it to every target and verify each artifact."""
    from .formats import available

    py = sys.executable
    log: list[dict[str, Any]] = []
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    click.echo(f"building tiny LLaMA + SentencePiece tokenizer in {base}")
    build_tiny_model(base)
    data = work / "instruct.json"
    data.write_text(json.dumps(instruction_records(), indent=1))
    results = []
    runs = [(label, t, zero_point_for(t, bits), extra) for label, t, extra in EXPORT_RUNS if t in available()]
    for zp in sorted({r[2] for r in runs} | {"float"}):
        ck = work / f"l4q_{zp}"
        _run(
            [
                bin_("l4q-train"),
                "--model",
                str(base),
                "--data",
                str(data),
                "--out",
                str(ck),
                "--bits",
                str(bits),
                "--group-size",
                str(GROUP_SIZE),
                "--zero-point",
                zp,
                "--steps",
                str(steps),
                "--batch-size",
                "8",
                "--grad-accum",
                "1",
                "--seq-len",
                "128",
                "--lr",
                "3e-3",
                "--scale-grid",
                "fp16",
                "--save-every",
                "0",
            ],
            log,
            f"train ({zp} zero point)",
        )
        rep = json.loads((ck / "train_report.json").read_text())
        _run(
            [py, "-m", "l4q_export.verify", str(ck), "--json", str(work / f"fold_{zp}.json"), "--quiet"],
            log,
            f"fold check ({zp})",
        )
        fold = json.loads((work / f"fold_{zp}.json").read_text())
        results.append(
            (
                f"train+fold ({zp})",
                f"eval loss {rep['eval_loss_before']:.3f} -> {rep['eval_loss_after']:.3f}; "
                f"{fold['n_bit_identical']}/{fold['n_layers']} layers bit-identical",
            )
        )
        for label, t, _, extra in [r for r in runs if r[2] == zp]:
            out = work / f"export_{label}" / ("model.gguf" if t == "gguf" else "")
            report = work / f"export_{label}.json"
            cmd = [bin_("l4q-export"), "--to", t, str(ck), "-o", str(out), "--json", str(report), *extra]
            _run(cmd, log, f"export {label}")
            artifact = json.loads(report.read_text())["artifact"]
            verdict = work / f"verify_{label}.json"
            _run(
                [py, "-m", "l4q_export.verify", artifact, "--model", str(ck), "--json", str(verdict), "--quiet"],
                log,
                f"verify {label}",
            )
            v = json.loads(verdict.read_text())
            results.append((label, v.get("summary", "PASS" if v.get("passed") else "FAIL")))
    click.echo("\n" + "=" * 100 + "\nl4q-export demo summary\n" + "=" * 100)
    for what, res in results:
        click.echo(f"{what:<24} {res}")
    click.echo("-" * 100)
    click.echo(f"total {sum(x['seconds'] for x in log):.0f} s over {len(log)} steps; everything under {work}/")


if __name__ == "__main__":
    main()
