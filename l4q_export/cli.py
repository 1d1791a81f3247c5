"""Console entry points: `l4q-train`, `l4q-export` (and `l4q-verify`, see verify.py).

Every bad-input condition becomes one `error: ...` line and exit code 2; nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .arch import SUPPORTED
from .boundary import boundary, debug_option
from .errors import FidelityError, L4QInputError
from .guard import check_not_input, check_output
from .quant.kplan import GRIDS
from .training.methods import QAT_LORA_EXPORT
from .training.trainer import TrainArgs

# Local paths only: never reach for a hub, never run repository code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


_CLICK_TYPES: dict[str, Any] = {"Path": click.Path(path_type=Path), "int": int, "int | None": int, "float": float}

# Method-owned options (TrainArgs.extra), listed right after --method.
_METHOD_OPTIONS = [
    click.Option(
        ["--qat-lora-export"],
        type=click.Choice(QAT_LORA_EXPORT),
        default="refuse",
        show_default=True,
        help="qat-lora only: its float LoRA branch cannot be folded into integers; 'merge' accepts re-quantizing "
        "W0 + alpha*B@A on the learned grid at export (lossy, reported by verify).",
    ),
    click.Option(
        ["--grid"],
        type=click.Choice(GRIDS),
        default=None,
        help="l4q only: train on exact GGUF K-quant grids. q2_k..q6_k: one K type for every linear; q2_k_m (llama.cpp's "
        "Q2_K), q3_k_m, q4_k_s, q4_k_m, q5_k_m: llama.cpp's own per-tensor recipe for that file type. Rows that are not "
        "a multiple of 256 (or that the recipe gives a legacy type) train on the exactly matching Q4_0/Q5_0/Q5_1/Q8_0 "
        "grid. Implies --scale-grid fp16; --bits/--group-size/--zero-point do not apply. See docs/gguf.md.",
    ),
    click.Option(
        ["--qalora-base"],
        type=click.Path(path_type=Path),
        default=None,
        help="qalora only: HF GPTQ directory (safetensors; desc_act=false; same --bits/--group-size) whose codes, "
        "integer zeros and scales are the frozen base instead of RTN of --model; every target layer must be "
        "GPTQ-quantized there. --model still supplies the float model.",
    ),
]


def _train_options() -> list[click.Option]:
    """One click option per TrainArgs field, from its metadata (help, choices, flag) and default."""
    opts: list[click.Option] = []
    for f in dataclasses.fields(TrainArgs):
        if "help" not in f.metadata:
            continue
        meta, name = f.metadata, "--" + f.name.replace("_", "-")
        if f.type == "bool":
            flag = meta.get("flag", name)
            opts.append(click.Option([flag, f.name], is_flag=True, default=False, help=meta["help"]))
        else:
            required = f.default is dataclasses.MISSING and not meta.get("unless_plan")
            choices = meta.get("choices")
            kind = click.Choice([str(c) for c in choices]) if choices else _CLICK_TYPES.get(str(f.type))
            default = f.default if f.default is not dataclasses.MISSING else None
            default = str(default) if choices and default is not None else default
            opts.append(click.Option([name, f.name], type=kind, required=required, default=default,
                                     show_default=f.default not in (None, dataclasses.MISSING), help=meta["help"]))
        if f.name == "method":
            opts += _METHOD_OPTIONS
    return opts


def _train_args(kw: dict[str, Any]) -> TrainArgs:
    """Parsed options -> TrainArgs: choices back to the field's type, inverted flags, method options into extra."""
    for f in dataclasses.fields(TrainArgs):
        if f.name in kw and f.type == "bool" and "flag" in f.metadata:
            kw[f.name] = not kw[f.name]  # --no-X given -> X False
        elif f.name in kw and f.metadata.get("choices") and kw[f.name] is not None:
            kw[f.name] = type(f.metadata["choices"][0])(kw[f.name])
    qalora_base, grid = kw.pop("qalora_base"), kw.pop("grid")
    kw["extra"] = {"qat_lora_export": kw.pop("qat_lora_export"), **({"qalora_base": str(qalora_base)} if qalora_base else {}),
                   **({"grid": grid} if grid else {})}
    return TrainArgs(**kw)


def _preflight(args: TrainArgs) -> None:
    """--plan: print the export plan and exit 0; otherwise refuse (exit 2) a run some chosen target cannot hold
    exactly and packed, before any training work (formats/plan.py asks each target's own capability)."""
    from .formats.plan import parse_targets, plan
    from .training import methods

    if not args.plan:
        for f in dataclasses.fields(TrainArgs):
            if f.metadata.get("unless_plan") and getattr(args, f.name) is None:
                raise L4QInputError(f"missing option '--{f.name.replace('_', '-')}' (only --plan runs without it)")
        args.validate()
    methods.check_args(args)
    p = plan(Path(args.model), methods.checkpoint_spec(args), parse_targets(args.targets), args.scale_grid)
    if args.plan:
        click.echo(p.table())
        sys.exit(0)
    if (msg := p.refusal()) and not args.allow_dense:
        raise L4QInputError(msg)
    for t in p.targets:
        if not t.ok:  # trained anyway under --allow-dense: say what the export will cost
            click.echo(f"note: {t.target}: {p.verdict(t)}", err=True)


def _train(**kw: Any) -> None:
    from .training.trainer import train

    try:
        args = _train_args(kw)
        _preflight(args)
        report = train(args)
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


train_cmd = click.Command(
    "l4q-train",
    callback=boundary(_train),
    params=[*_train_options(), debug_option()],
    context_settings=CTX,
    help=f"""Quantization-aware LoRA fine-tuning (L4Q) of a local HF model: {', '.join(SUPPORTED)}.

    Writes an L4Q checkpoint that `l4q-export` turns into GGUF, ONNX or packed safetensors with the
    trained integers intact. Run under `torchrun --nproc-per-node N` for DDP.
    """,
)


def check_paths(model_dir: Path, output: Path | None, json_path: Path | None) -> None:
    """Before any export work: no output into the checkpoint, and a report path that cannot clobber the artifact."""
    if output is not None:
        check_not_input(output, "-o", inputs=(model_dir,))
    if json_path is not None:
        check_output(json_path, "--json", "file", inputs=(model_dir,))
        j, o = json_path.resolve(), output.resolve() if output is not None else None
        if o is not None and (j == o or j.is_relative_to(o)):
            raise L4QInputError(f"--json {json_path} would overwrite the artifact -o {output}; give the report its own path")


def _base_bytes(model_dir: Path) -> int | None:
    """Bytes of the checkpoint's base-model shards, the yardstick of the export summary (None if unreadable)."""
    from .checkpoint import load_checkpoint
    from .formats.plan import base_bytes

    try:
        return base_bytes(load_checkpoint(model_dir, check_hashes=False).base_dir)
    except (L4QInputError, OSError):
        return None


def _export_command() -> click.Command:
    """Build `l4q-export` from the target registry: each target's own options, `--allow-lossy` where it has a lossy path."""
    from .formats import available, get_target

    targets = available()
    extra: list[click.Option] = []
    owners: dict[str, str] = {}
    for t in targets:
        for opt in get_target(t).options:
            extra.append(opt)
            owners[opt.name] = t  # type: ignore[index]
    lossy = {t: get_target(t).lossy for t in targets if get_target(t).lossy}

    def run(
        to: str, model_dir: Path, output: Path | None, json_path: Path | None, allow_lossy: bool, **options: Any
    ) -> None:
        target = get_target(to)
        ctx = click.get_current_context()
        if allow_lossy and to not in lossy:
            _fail(L4QInputError(f"--allow-lossy does not apply to --to {to}: it has no lossy path"))
        foreign = [
            f"--{k.replace('_', '-')} ({owners[k]})"
            for k in options
            if owners.get(k) not in (to, None) and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
        ]
        if foreign:  # a silently ignored option would export something other than what the user asked for
            _fail(L4QInputError(f"option(s) {', '.join(foreign)} do not apply to --to {to}"))
        check_paths(model_dir, output, json_path)
        mine = {k: v for k, v in options.items() if owners.get(k) == to}
        try:
            result = target.write(model_dir, output, allow_lossy=allow_lossy, **mine)
            report = result.to_dict(_base_bytes(model_dir))
        except L4QInputError as e:
            _fail(e)
        except FidelityError as e:
            click.echo(f"refused: {e}", err=True)
            sys.exit(1)
        if json_path:
            from .checkpoint import AtomicFile

            with AtomicFile(json_path) as tmp:
                tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
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
            help="Accept an encoding that cannot hold the trained grid exactly instead of refusing: "
            + "; ".join(lossy.values())
            + ". The per-tensor error is measured and reported.",
        ),
        *extra,
        debug_option(),
    ]
    return click.Command(
        "l4q-export",
        callback=boundary(run),
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
