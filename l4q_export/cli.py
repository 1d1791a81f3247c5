"""Console entry points: `l4q-train`, `l4q-export` (and `l4q-verify`, see verify.py).

Every bad-input condition becomes one `error: ...` line and exit code 2; nothing is written.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import FidelityError, L4QInputError
from .quant import INIT_METHODS, SUPPORTED_BITS, ZERO_POINT_MODES

# Local paths only: never reach for a hub, never run repository code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.command(context_settings=CTX)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    required=True,
    help="Base model directory (HF format, safetensors; LLaMA/Mistral/Qwen2).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Training data: Alpaca-style .json/.jsonl (instruction/input/output; loss on the response) or plain text (causal LM).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory for the L4Q checkpoint (l4q_config.json + l4q_adapter.safetensors).",
)
@click.option(
    "--method",
    type=click.Choice(["l4q", "qalora", "dlqat", "qat-lora", "lora", "rtn"]),
    default="l4q",
    show_default=True,
    help="l4q; qalora (frozen RTN or --qalora-base GPTQ base + group-pooled LoRA in float zeros); "
    "dlqat (frozen s/z, per-group magnitude, "
    "integer-space LoRA); baselines qat-lora (LSQ+ W0 + float LoRA), lora (float; export = merge then RTN), "
    "rtn (no training). See docs/methods.md.",
)
@click.option(
    "--qat-lora-export",
    type=click.Choice(["refuse", "merge"]),
    default="refuse",
    show_default=True,
    help="qat-lora only: its float LoRA branch cannot be folded into integers; 'merge' accepts re-quantizing "
    "W0 + alpha*B@A on the learned grid at export (lossy, reported by verify).",
)
@click.option(
    "--qalora-base",
    type=click.Path(path_type=Path),
    default=None,
    help="qalora only: HF GPTQ directory (safetensors; desc_act=false; same --bits/--group-size) whose codes, "
    "integer zeros and scales are the frozen base instead of RTN of --model; every target layer must be GPTQ-quantized "
    "there. --model still supplies the float model.",
)
@click.option(
    "--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default="4", show_default=True, help="Weight bit width."
)
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="Quantization group along the input dimension; -1 = per output channel. A partial last group is allowed.",
)
@click.option(
    "--zero-point",
    type=click.Choice(ZERO_POINT_MODES),
    default="float",
    show_default=True,
    help="float: L4Q's learned float offset; integer: learned integer zero point (STE); symmetric: no offset.",
)
@click.option("--rank", type=int, default=4, show_default=True, help="LoRA rank r (paper: 4; 8 for Mistral).")
@click.option("--alpha", type=float, default=8.0, show_default=True, help="LoRA alpha; the LoRA scale is alpha/rank.")
@click.option(
    "--lr", type=float, default=2e-4, show_default=True, help="Peak AdamW learning rate (cosine schedule, 10%% linear warm-up)."
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option(
    "--epochs", type=float, default=1.0, show_default=True, help="Epochs over the training data when --steps is not given."
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Micro-batch size per process.")
@click.option(
    "--grad-accum",
    type=int,
    default=16,
    show_default=True,
    help="Micro-batches per optimizer step (8 x 16 = the paper's batch of 128).",
)
@click.option(
    "--seq-len", type=int, default=2048, show_default=True, help="Maximum tokens per example (capped at the model's context)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for LoRA init and data order.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out bit-identically (same options required).")
@click.option(
    "--init",
    type=click.Choice(INIT_METHODS),
    default="l4q",
    show_default=True,
    help="Scale/offset init: l4q (symmetric, clip-free), minmax (asymmetric), absmax.",
)
@click.option(
    "--scale-grid",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16 keeps scales/offsets on the fp16 grid in the forward (STE) so fp16-scale formats export bit-exactly.",
)
@click.option("--no-lsq-grad-scale", is_flag=True, help="Disable LSQ's 1/sqrt(group*Q_P) gradient scale on s and b.")
@click.option(
    "--weight-decay",
    type=float,
    default=0.01,
    show_default=True,
    help="AdamW weight decay (LoRA matrices only; never on scales).",
)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping norm (0 disables).")
@click.option(
    "--save-every",
    type=int,
    default=100,
    show_default=True,
    help="Write a checkpoint every N optimizer steps (0: only at the end).",
)
@click.option(
    "--eval-examples",
    type=int,
    default=32,
    show_default=True,
    help="Held-out examples (taken from the end of the data, at most 10%%) for the before/after loss.",
)
@click.option("--copy-base", is_flag=True, help="Copy the base shards into OUT/base so the checkpoint is self-contained.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option(
    "--data-format",
    type=click.Choice(["auto", "json", "jsonl", "parquet", "arrow", "csv", "dataset-dir", "text"]),
    default="auto",
    show_default=True,
    help="How to read --data: auto picks by suffix (a directory = a datasets save_to_disk dir); parquet/arrow/csv/"
    "dataset-dir are read with `datasets`. Records: messages (chat template, assistant-only loss), prompt+completion, "
    "instruction+output (Alpaca) or text.",
)
@click.option(
    "--packing",
    is_flag=True,
    help="Pack short examples into --seq-len blocks; position_ids restart per example so attention stays inside it.",
)
@click.option(
    "--report-to",
    type=click.Choice(["none", "tensorboard", "csv"]),
    default="none",
    show_default=True,
    help="Step metrics (loss, lr, tokens/s, grad-norm) and per-layer quantizer health (clipped fraction, scale range) "
    "to OUT/tensorboard or OUT/metrics.csv + OUT/quantizer_health.csv.",
)
def train_cmd(**kw: Any) -> None:
    """Quantization-aware LoRA fine-tuning (L4Q) of a local LLaMA/Mistral/Qwen2 model.

    Writes an L4Q checkpoint that `l4q-export` turns into GGUF, ONNX or packed safetensors with the
    trained integers intact. Run under `torchrun --nproc-per-node N` for DDP.
    """
    from .training.trainer import TrainArgs, train

    kw["bits"] = int(kw["bits"])
    kw["lsq_grad_scale"] = not kw.pop("no_lsq_grad_scale")
    qalora_base = kw.pop("qalora_base")
    kw["extra"] = {"qat_lora_export": kw.pop("qat_lora_export"), **({"qalora_base": str(qalora_base)} if qalora_base else {})}
    try:
        report = train(TrainArgs(**kw))
    except L4QInputError as e:
        _fail(e)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            json.dumps(
                {
                    k: report[k]
                    for k in ("steps", "first_loss", "last_loss", "eval_loss_before", "eval_loss_after", "tokens_per_s")
                },
                indent=2,
            )
        )


def _export_command() -> click.Command:
    """Build `l4q-export` with each target's own options attached."""
    from .formats import available, get_format

    targets = available()
    extra: list[click.Option] = []
    owners: dict[str, str] = {}
    for t in targets:
        for opt in getattr(get_format(t), "CLI_OPTIONS", []):
            extra.append(opt)
            owners[opt.name] = t  # type: ignore[index]

    lossy_targets = [t for t in targets if "allow_lossy" in inspect.signature(get_format(t).export).parameters]

    def run(
        to: str, model_dir: Path, output: Path | None, json_path: Path | None, allow_lossy: bool, **options: Any
    ) -> None:
        fmt = get_format(to)
        ctx = click.get_current_context()
        if allow_lossy and to not in lossy_targets:
            _fail(L4QInputError(f"--allow-lossy does not apply to --to {to}: it has no lossy path"))
        foreign = [
            f"--{k.replace('_', '-')} ({owners[k]})"
            for k in options
            if owners.get(k) not in (to, None) and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
        ]
        if foreign:  # a silently ignored option would export something other than what the user asked for
            _fail(L4QInputError(f"option(s) {', '.join(foreign)} do not apply to --to {to}"))
        mine = {k: v for k, v in options.items() if owners.get(k) == to}
        if to in lossy_targets:
            mine["allow_lossy"] = allow_lossy
        try:
            report = fmt.export(model_dir, output, **mine)
        except L4QInputError as e:
            _fail(e)
        except FidelityError as e:
            click.echo(f"refused: {e}", err=True)
            sys.exit(1)
        if json_path:
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        click.echo(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2, default=str))

    params: list[click.Parameter] = [
        click.Option(["--to", "to"], type=click.Choice(targets), required=True, help="Export target."),
        click.Argument(["model_dir"], type=click.Path(path_type=Path)),
        click.Option(
            ["-o", "--output", "output"],
            type=click.Path(path_type=Path),
            default=None,
            help="Output path (file or directory, per target); default: beside MODEL_DIR.",
        ),
        click.Option(
            ["--json", "json_path"],
            type=click.Path(path_type=Path),
            default=None,
            help="Write the export report (per-tensor types and error bounds) as JSON.",
        ),
        click.Option(
            ["--allow-lossy", "allow_lossy"],
            is_flag=True,
            default=False,
            help="Accept an encoding that cannot hold the trained grid exactly instead of refusing: GGUF K-quants "
            "(re-encoded group scales), safetensors rounding of L4Q float offsets to integer zero points. "
            "The per-tensor error is measured and reported.",
        ),
        *extra,
    ]
    return click.Command(
        "l4q-export",
        callback=run,
        params=params,
        context_settings=CTX,
        help="Fold LoRA into the integers training used and write them, with the learned scales and offsets, "
        "to the chosen format -- never re-quantizing. Lossy cases are refused unless explicitly allowed.",
    )


def export_main() -> None:
    try:
        cmd = _export_command()
    except L4QInputError as e:
        _fail(e)
    cmd(prog_name="l4q-export")


def verify_main() -> None:
    from .verify import main

    main(prog_name="l4q-verify")
