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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..api import prepare
from ..checkpoint import ADAPTER_FILE, AtomicFile, BaseWeights, check_architecture, write_checkpoint
from ..errors import L4QInputError
from ..quant import QuantSpec
from . import methods
from .data import collate, load_examples, load_tokenizer
from .surgery import adapter_state, load_adapter_state, load_base_model
from .telemetry import Telemetry, summary_table

STATE_FILE = "trainer_state.pt"
REPORT_FILE = "train_report.json"


@dataclass
class TrainArgs:
    """Every `l4q-train` option (the CLI maps 1:1 onto this)."""

    model: Path
    data: Path
    out: Path
    method: str = "l4q"
    bits: int = 4
    group_size: int = 128
    zero_point: str = "float"
    rank: int = 4
    alpha: float = 8.0
    lr: float = 2e-4
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 16
    seq_len: int = 2048
    seed: int = 0
    resume: bool = False
    init: str = "l4q"
    scale_grid: str = "fp32"
    lsq_grad_scale: bool = True
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    save_every: int = 100
    eval_examples: int = 32
    copy_base: bool = False
    device: str | None = None
    data_format: str = "auto"
    packing: bool = False
    report_to: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.zero_point)  # type: ignore[arg-type]


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


def train(args: TrainArgs) -> dict[str, Any]:
    """Run training and write the L4Q checkpoint to args.out; returns the report dict."""
    import contextlib

    world, rank, local_rank = _dist()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
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
    prepare(model, method=args.method, bits=args.bits, group_size=args.group_size, zero_point=args.zero_point,
            rank=args.rank, alpha=args.alpha, scale_grid=args.scale_grid, init=args.init,
            lsq_grad_scale=args.lsq_grad_scale, seed=args.seed, **args.extra)
    modules = model.l4q_settings.modules
    model.to(device)
    model.config.use_cache = False
    out = Path(args.out)
    telemetry = Telemetry(out, args.report_to, enabled=rank == 0)
    start = 0
    decay, no_decay = methods.optimizer_groups(model, args.method)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    state_path = out / STATE_FILE
    if args.resume:
        if not state_path.is_file():
            raise L4QInputError(f"--resume: no {STATE_FILE} in {out}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["spec"] != spec.to_dict() or state["rank"] != args.rank or state.get("method", "l4q") != args.method:
            raise L4QInputError("--resume: the saved run used a different quantizer or rank")
        load_adapter_state(model, load_file(str(out / ADAPTER_FILE)))
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])

    trained_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    use_bf16 = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    base_hashes = base.shard_hashes()
    stream = _Stream(len(train_set), args.seed)
    eval_before = _eval_loss(trained_model, eval_set, pad_id, device, args.batch_size, autocast) if start == 0 else None

    health: list[dict[str, Any]] = []

    def save(step: int, final: bool) -> None:
        nonlocal health
        if rank != 0:
            return
        health = telemetry.log_health(step, trained_model)
        write_checkpoint(
            out,
            method=args.method,
            spec=spec,
            rank=methods.checkpoint_rank(args),
            lora_alpha=args.alpha,
            fp16_grid=args.scale_grid == "fp16",
            lsq_grad_scale=args.lsq_grad_scale,
            adapter=adapter_state(trained_model),
            modules=modules,
            base_dir=base_dir,
            base_hashes=base_hashes,
            architecture=hf_cfg["architectures"][0],
            copy_base=args.copy_base and final,
            extra={
                "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()} | {"steps_done": step},
                **methods.checkpoint_extra(args),
            },
        )
        with AtomicFile(state_path) as tmp:
            torch.save(
                {"optimizer": opt.state_dict(), "step": step, "spec": spec.to_dict(), "rank": args.rank, "method": args.method},
                tmp,
            )

    model.train()
    losses: list[float] = []
    tokens = 0
    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc="l4q-train", disable=rank != 0, dynamic_ncols=True)
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr)
        step_loss = 0.0
        for j in range(args.grad_accum):
            p0 = ((step * args.grad_accum + j) * world + rank) * args.batch_size
            batch = collate([train_set[stream[p]] for p in range(p0, p0 + args.batch_size)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if (world == 1 or j == args.grad_accum - 1) else model.no_sync()
            with sync:
                with autocast():
                    loss = model(**batch).loss / args.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
            mask = batch.get("attention_mask")
            step_tokens = int(mask.sum()) if mask is not None else int((batch["labels"] != -100).sum())
            tokens += step_tokens  # packed blocks have no attention_mask: count the learned tokens
        clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(decay + no_decay, clip)) if decay + no_decay else 0.0
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
        "world_size": world,
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
