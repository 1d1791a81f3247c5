"""The training loop behind `l4q-train`: AdamW, cosine schedule with 10% warm-up, gradient accumulation,
bf16 autocast on CUDA, DDP under torchrun, periodic checkpoints and bit-identical `--resume`.

Determinism is by construction rather than by saving RNG state: the data order of epoch e is
`randperm(N, seed + e)`, each optimizer step t consumes a fixed slice of that stream, the learning rate is
a pure function of t, and LoRA init happens once before step 0.  Resuming therefore needs only the
adapter, the AdamW state and t.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..api import prepare
from ..checkpoint import ADAPTER_FILE, CONFIG_FILE, AtomicFile, BaseWeights, check_architecture, write_checkpoint
from ..errors import L4QInputError
from ..guard import check_output
from ..quant import INIT_METHODS, SUPPORTED_BITS, ZERO_POINT_MODES, QuantSpec
from ..quant.base_int8 import BASE_DTYPES
from ..schema import validate_base
from . import methods
from .data import collate, load_examples, load_tokenizer
from .distributed import full_tensor, load_optimizer_state, optimizer_state, shard_model
from .kernel import KERNELS, agree_kernel, restore_kernel, select_kernel
from .surgery import adapter_state, compute_dtype, load_adapter_state, load_base_model
from .telemetry import Telemetry, summary_table

STATE_FILE = "trainer_state.pt"
REPORT_FILE = "train_report.json"


def _opt(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A TrainArgs field whose metadata documents its `l4q-train` option; cli.py generates the options from it.

    cli keys: choices (values offered), flag (the option name of a bool that defaults to True, e.g.
    --no-lsq-grad-scale, whose presence sets the field to False), unless_plan (required, except with --plan).
    """
    meta = {"help": help, **cli}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def _method_help() -> str:
    return "; ".join(f"{m} ({methods.get_method(m).summary})" for m in methods.method_names()) + ". See docs/methods.md."


@dataclass
class TrainArgs:
    """Every `l4q-train` option (the CLI is generated from these fields and maps 1:1 onto them)."""

    model: Path = _opt(help="Base model directory (HF format, safetensors; see docs/architectures.md).")
    data: Path = _opt(unless_plan=True, help="Training data: Alpaca-style .json/.jsonl (instruction/input/output; "
                      "loss on the response) or plain text (causal LM).")
    out: Path = _opt(unless_plan=True,
                     help="Output directory for the L4Q checkpoint (l4q_config.json + l4q_adapter.safetensors).")
    method: str = _opt("l4q", _method_help(), choices=methods.method_names())
    bits: int = _opt(4, "Weight bit width.", choices=SUPPORTED_BITS)
    group_size: int = _opt(128, "Quantization group along the input dimension; -1 = per output channel. "
                           "A partial last group is allowed.")
    zero_point: str = _opt("float", "float: L4Q's learned float offset; integer: learned integer zero point (STE); "
                           "symmetric: no offset.", choices=ZERO_POINT_MODES)
    rank: int = _opt(4, "LoRA rank r (paper: 4; 8 for Mistral).")
    alpha: float = _opt(8.0, "LoRA alpha; the LoRA scale is alpha/rank.")
    lr: float = _opt(2e-4, "Peak AdamW learning rate (cosine schedule, 10% linear warm-up).")
    steps: int | None = _opt(None, "Optimizer steps (overrides --epochs).")
    epochs: float = _opt(1.0, "Epochs over the training data when --steps is not given.")
    batch_size: int = _opt(8, "Micro-batch size per process.")
    grad_accum: int = _opt(16, "Micro-batches per optimizer step (8 x 16 = the paper's batch of 128).")
    seq_len: int = _opt(2048, "Maximum tokens per example (capped at the model's context).")
    seed: int = _opt(0, "Seed for LoRA init and data order.")
    resume: bool = _opt(False, "Continue the run saved in --out bit-identically (same options required).")
    init: str = _opt("l4q", "Scale/offset init: l4q (symmetric, clip-free), minmax (asymmetric), absmax.",
                     choices=INIT_METHODS)
    scale_grid: str = _opt("fp16", "fp16 (default) keeps scales/offsets on the fp16 grid in the forward (STE) so "
                           "fp16-scale formats (GGUF, ONNX fp16, MLX) export bit-exactly; fp32 keeps full-precision scales.",
                           choices=("fp32", "fp16"))
    lsq_grad_scale: bool = _opt(True, "Disable LSQ's 1/sqrt(group*Q_P) gradient scale on s and b.",
                                flag="--no-lsq-grad-scale")
    weight_decay: float = _opt(0.01, "AdamW weight decay (LoRA matrices only; never on scales).")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).")
    save_every: int = _opt(100, "Write a checkpoint every N optimizer steps (0: only at the end).")
    eval_examples: int = _opt(32, "Held-out examples (taken from the end of the data, at most 10%) for the "
                              "before/after loss.")
    copy_base: bool = _opt(False, "Copy the base shards into OUT/base so the checkpoint is self-contained.")
    device: str | None = _opt(None, "torch device (default: cuda if available, else cpu).")
    data_format: str = _opt("auto", "How to read --data: auto picks by suffix (a directory = a datasets save_to_disk dir); "
                            "parquet/arrow/csv/dataset-dir are read with `datasets`. Records: messages (chat template, "
                            "assistant-only loss), prompt+completion, instruction+output (Alpaca) or text.",
                            choices=("auto", "json", "jsonl", "parquet", "arrow", "csv", "dataset-dir", "text"))
    packing: bool = _opt(False, "Pack short examples into --seq-len blocks; position_ids restart per example so "
                         "attention stays inside it.")
    report_to: str = _opt("none", "Step metrics (loss, lr, tokens/s, grad-norm) and per-layer quantizer health (clipped "
                          "fraction, scale range) to OUT/tensorboard or OUT/metrics.csv + OUT/quantizer_health.csv.",
                          choices=("none", "tensorboard", "csv"))
    targets: str | None = _opt(None, "Export targets this run must fit, comma-separated (default: every available "
                               "target). Before step 0 each target's capability is asked about every quantized "
                               "layer shape; a layer a target could only store dense (fp32) or not at all refuses "
                               "the run (see --plan).")
    allow_dense: bool = _opt(False, "Train even if a --targets format would store some layers dense (exact fp32 W_q, "
                             "not compressed) -- the export can then be larger than the base model.")
    plan: bool = _opt(False, "Print the export plan (target x layer shape: exact / dense / lossy / refused, dense "
                      "bytes) and exit without training; --data and --out are not needed.")
    gradient_checkpointing: bool = _opt(False, "Recompute each decoder layer's activations in backward (HF's non-reentrant "
                                        "checkpointing): less activation memory at seq 2048 for ~1 extra forward. "
                                        "Codes and adapter are identical to a run without it.")
    kernel: str = _opt("auto", "L4Q layer kernel: eager (plain PyTorch ops), compiled (torch.compile of the chunked "
                       "forward/backward; refused with exit 2 unless a start-up self-check finds its codes bit-identical "
                       "and gradients within 1e-5 of eager), auto (compiled where the self-check passes and a quick "
                       "timing says it is faster, per layer shape; else eager; the choice and reason go to train_report.json).",
                       choices=KERNELS)
    base_dtype: str = _opt("stored", "Frozen W0 in memory: stored (its dtype in the shards) or int8 (per-output-channel "
                           "absmax codes, ~1/2 of bf16's bytes). int8 changes the base training learns on; it is recorded "
                           "in the checkpoint and the fold rebuilds the same int8 W0 from the shards (hash-checked). "
                           "--method l4q only.", choices=BASE_DTYPES)
    fsdp: bool = _opt(False, "Under torchrun: shard W0, the adapter and the AdamW state across processes with FSDP2 "
                      "(torch.distributed.fsdp.fully_shard, one unit per decoder layer) instead of DDP's full copy per "
                      "process. The checkpoint is the same (rank 0 writes the gathered adapter).")
    extra: dict[str, Any] = field(default_factory=dict)  # method-owned options (Method.options), set by the CLI

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.zero_point)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Every check that can fail without training, run before any work (a bad --out must not cost a run)."""
        for name, v, lo, strict in (
            ("--lr", self.lr, 0.0, True),
            ("--alpha", self.alpha, 0.0, True),
            ("--epochs", self.epochs, 0.0, True),
            ("--weight-decay", self.weight_decay, 0.0, False),
            ("--max-grad-norm", self.max_grad_norm, 0.0, False),
        ):
            if not math.isfinite(v) or v < lo or (strict and v == lo):
                raise L4QInputError(f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, not {v}")
        for name, iv, lo in (
            ("--steps", self.steps, 0),  # 0: write the initial (step-0) checkpoint
            ("--batch-size", self.batch_size, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--seq-len", self.seq_len, 2),
            ("--save-every", self.save_every, 0),
            ("--eval-examples", self.eval_examples, 0),
        ):
            if iv is not None and iv < lo:
                raise L4QInputError(f"{name} must be >= {lo}, not {iv}")
        model, data, out = Path(self.model), Path(self.data), Path(self.out)
        if not data.is_file():
            raise L4QInputError(f"data file not found: {data}")
        cfg = check_architecture(model)
        validate_base(model, cfg, BaseWeights(model).names())
        check_output(out, "--out", "dir", inputs=(model, data))
        if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file() and not (out / STATE_FILE).is_file():
            raise L4QInputError(f"--out {out} is a non-empty directory that is not an L4Q checkpoint; choose a new directory")
        if self.resume and not (out / STATE_FILE).is_file():
            raise L4QInputError(f"--resume: no {STATE_FILE} in {out}")
        if self.resume:
            load_state(out / STATE_FILE)  # a corrupt state is refused before the model is loaded


def load_state(path: Path) -> dict[str, Any]:
    """trainer_state.pt, loaded with weights_only=True; anything else is refused (never unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # UnpicklingError, RuntimeError, EOFError...: torch's message advises unsafe loading
        raise L4QInputError(
            f"{path} is not a trainer state written by l4q-train (corrupt, or holds objects that are never unpickled); "
            "delete it and train again without --resume"
        ) from None
    if not isinstance(state, dict) or not {"spec", "rank", "optimizer", "step"} <= set(state):
        raise L4QInputError(f"{path} is not a trainer state written by l4q-train; delete it and train again without --resume")
    return state


def lr_at(step: int, total: int, base_lr: float) -> float:
    """Cosine decay to 0 after a linear warm-up over the first 10% of steps."""
    warm = max(1, int(0.1 * total))
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Stream:
    """Position p of the training stream -> example index; epoch e is permuted with seed + e."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, p: int) -> int:
        e = p // self.n
        if e not in self._perms:
            self._perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()}
        return self._perms[e][p % self.n]


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


@torch.no_grad()
def _eval_loss(model, examples, pad_id: int, device: str, batch_size: int, autocast) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast():
            out = model(**b)
        k = int((b["labels"][:, 1:] != -100).sum())
        tot += float(out.loss) * k
        n += k
    model.train(was_training)
    return tot / max(n, 1)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """HF's per-decoder-layer checkpointing, non-reentrant.

    Non-reentrant because the base weights are frozen and the embeddings' output does not require grad: the
    reentrant variant would then drop every adapter gradient.  Our quantized layers are safe to recompute --
    L4QFunction's forward is a pure function of (x, W0, A, B, s, b), so the recomputed output and saved x are
    the very tensors of the first forward (tests/test_training.py checks codes/adapter are bit-identical).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise L4QInputError(f"--gradient-checkpointing: {type(model).__name__} does not support it in transformers")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train(args: TrainArgs) -> dict[str, Any]:
    """Run training and write the L4Q checkpoint to args.out; returns the report dict."""
    import contextlib

    world, rank, local_rank = _dist()
    if args.fsdp and world < 2:
        raise L4QInputError("--fsdp shards across processes: run it under torchrun with --nproc-per-node >= 2")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    args.validate()
    methods.check_args(args)
    spec = methods.checkpoint_spec(args)
    if args.scale_grid not in ("fp32", "fp16"):
        raise L4QInputError("--scale-grid must be fp32 or fp16")
    base_dir = Path(args.model)
    hf_cfg = check_architecture(base_dir)
    base = BaseWeights(base_dir)
    tok = load_tokenizer(base_dir)
    max_pos = int(hf_cfg.get("max_position_embeddings", args.seq_len))
    seq_len = min(args.seq_len, max_pos)
    examples = load_examples(args.data, tok, seq_len, args.data_format, args.packing)
    n_eval = min(args.eval_examples, len(examples) // 10)
    eval_set, train_set = examples[len(examples) - n_eval :] if n_eval else [], examples[: len(examples) - n_eval]
    per_step = args.batch_size * args.grad_accum * world
    total = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * len(train_set) / per_step))
    total = total if methods.trains(args.method) else 0  # rtn: the checkpoint is the initial RTN grid

    torch.manual_seed(args.seed)
    model = load_base_model(base_dir)
    model.to(compute_dtype(model.dtype, device))
    prepare(model, method=args.method, bits=args.bits, group_size=args.group_size, zero_point=args.zero_point,
            rank=args.rank, alpha=args.alpha, scale_grid=args.scale_grid, init=args.init,
            lsq_grad_scale=args.lsq_grad_scale, seed=args.seed, base_dtype=args.base_dtype, **args.extra)
    modules = model.l4q_settings.modules
    model.to(device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    out = Path(args.out)
    state_path = out / STATE_FILE
    saved = load_state(state_path) if args.resume and state_path.is_file() else {}
    if args.kernel == "auto" and saved.get("kernel") is not None:
        kernel = restore_kernel(model, saved["kernel"], seed=args.seed)
    else:
        kernel = select_kernel(model, args.kernel, tokens=min(args.batch_size * seq_len, 512), seed=args.seed)
    if world > 1:
        kernel = agree_kernel(model, kernel)
    if rank == 0:
        tqdm.write(f"l4q-train: kernel {kernel['used']} ({kernel['reason']})")
    telemetry = Telemetry(out, args.report_to, enabled=rank == 0)
    start = 0
    if args.resume:
        if not state_path.is_file():
            raise L4QInputError(f"--resume: no {STATE_FILE} in {out}")
        state = saved
        if state["spec"] != spec.to_dict() or state["rank"] != args.rank or state.get("method", "l4q") != args.method:
            raise L4QInputError("--resume: the saved run used a different quantizer or rank")
        if state.get("base_dtype", "stored") != args.base_dtype:
            raise L4QInputError(f"--resume: the saved run used --base-dtype {state.get('base_dtype', 'stored')}")
        if bool(state.get("fsdp", False)) != args.fsdp:
            raise L4QInputError(f"--resume: the saved run was trained {'with' if state.get('fsdp') else 'without'} --fsdp "
                                "(its optimizer state is laid out for that)")
        load_adapter_state(model, load_file(str(out / ADAPTER_FILE)))  # before sharding: plain tensors
        start = int(state["step"])
    if args.fsdp:
        shard_model(model)
    groups = methods.lr_param_groups(model, args.method, args.lr, args.weight_decay)
    opt = torch.optim.AdamW([g for g in groups if g["params"] or "lr_scale" not in g], lr=args.lr)
    trainable = [p for g in groups for p in g["params"]]
    if args.resume:
        if args.fsdp:
            load_optimizer_state(model, opt, saved["optimizer"])
        else:
            opt.load_state_dict(saved["optimizer"])

    trained_model = model
    if world > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers are pure functions of the shards (rotary tables, the int8 base), equal on every rank: no broadcast
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None, broadcast_buffers=False)
    use_bf16 = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    base_hashes = base.shard_hashes()
    stream = _Stream(len(train_set), args.seed)
    eval_before = _eval_loss(trained_model, eval_set, pad_id, device, args.batch_size, autocast) if start == 0 else None

    health: list[dict[str, Any]] = []

    def save(step: int, final: bool) -> None:
        nonlocal health
        if rank != 0 and not args.fsdp:
            return
        adapter = adapter_state(trained_model)  # --fsdp: gathers the shards, so every rank takes part
        opt_state = optimizer_state(trained_model, opt) if args.fsdp else opt.state_dict()
        if rank != 0:
            return
        if not args.fsdp:  # sharded layers hold no whole W0 to measure clipping on
            health = telemetry.log_health(step, trained_model)
        write_checkpoint(
            out,
            method=args.method,
            spec=spec,
            rank=methods.checkpoint_rank(args),
            lora_alpha=args.alpha,
            fp16_grid=args.scale_grid == "fp16",
            lsq_grad_scale=args.lsq_grad_scale,
            adapter=adapter,
            modules=modules,
            base_dir=base_dir,
            base_hashes=base_hashes,
            architecture=hf_cfg["architectures"][0],
            copy_base=args.copy_base and final,
            extra={
                "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()} | {"steps_done": step},
                **methods.checkpoint_extra(args),
                **methods.grid_extra(trained_model),
                **methods.base_extra(trained_model),
            },
        )
        with AtomicFile(state_path) as tmp:
            torch.save(
                {"optimizer": opt_state, "step": step, "fsdp": args.fsdp, "spec": spec.to_dict(), "rank": args.rank,
                 "method": args.method, "kernel": kernel.get("layers") or kernel["used"], "base_dtype": args.base_dtype},
                tmp,
            )

    model.train()
    losses: list[float] = []
    tokens = 0
    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc="l4q-train", disable=rank != 0, dynamic_ncols=True)
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr) * g["lr_scale"] if "lr_scale" in g else lr_at(step, total, args.lr)
        step_loss = 0.0
        for j in range(args.grad_accum):
            p0 = ((step * args.grad_accum + j) * world + rank) * args.batch_size
            batch = collate([train_set[stream[p]] for p in range(p0, p0 + args.batch_size)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            last = j == args.grad_accum - 1
            if args.fsdp:
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if (world == 1 or last or args.fsdp) else model.no_sync()
            with sync:
                with autocast():
                    loss = model(**batch).loss / args.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
            mask = batch.get("attention_mask")
            step_tokens = int(mask.sum()) if mask is not None else int((batch["labels"] != -100).sum())
            tokens += step_tokens  # packed blocks have no attention_mask: count the learned tokens
        clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(trainable, clip))) if trainable else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        methods.project_(trained_model)  # projected step: a scale that crossed zero would make the grid degenerate
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss became {step_loss} at step {step}; lower --lr")
        losses.append(step_loss)
        telemetry.log_step(step, loss=step_loss, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                           tokens_per_s=tokens * world / max(time.time() - t0, 1e-9))
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens * world / max(time.time() - t0, 1e-9):.0f}")
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save(step + 1, final=False)
    bar.close()
    save(total, final=True)
    telemetry.close()
    if rank == 0:
        tqdm.write(summary_table(telemetry.rows, health))
    eval_after = _eval_loss(trained_model, eval_set, pad_id, device, args.batch_size, autocast)
    elapsed = time.time() - t0
    report = {
        "method": args.method,
        "quant": spec.to_dict(),
        "steps": total,
        "resumed_from": start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_examples": len(eval_set),
        "train_examples": len(train_set),
        "tokens": tokens * world,
        "seconds": elapsed,
        "tokens_per_s": tokens * world / max(elapsed, 1e-9),
        "device": device,
        "compute_dtype": str(trained_model.dtype).removeprefix("torch."),
        "world_size": world,
        "parallel": "fsdp2" if args.fsdp else ("ddp" if world > 1 else "none"),
        "kernel": kernel,
        "base_dtype": args.base_dtype,
        "max_clipped_frac": max((h["clipped_frac"] for h in health if h["clipped_frac"] is not None), default=None),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if use_bf16 else None,
    }
    if rank == 0:
        with AtomicFile(out / REPORT_FILE) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report
