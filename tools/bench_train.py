"""Training step time and peak memory of a whole model: L4Q (eager and compiled kernels, stored or int8 base)
against plain LoRA (PEFT's when `peft` imports, else this project's float-LoRA method), same dtype policy.

Issue 17's training goal: L4Q <= 1.3x LoRA's step time and <= 1.05x its peak memory.  Same model, batch and random
tokens for every variant; the model is loaded in its stored dtype and cast with the trainer's CPU policy
(`surgery.compute_dtype`: bf16 stays bf16 where the CPU has bf16 dot products).  A step is forward + backward +
AdamW step + zero_grad, like l4q-train's.

Time: ONE process builds every variant's model and runs their steps round-robin (after one warm-up step each,
which also compiles the compiled kernel), so a shared machine's changing load hits all variants alike; the median
per variant is reported.  Memory: a fresh subprocess per variant; after its warm-up step freed heap is returned to
the OS (malloc_trim) and the peak-RSS mark reset (Linux /proc/self/clear_refs), so `peak` is the RSS high-water mark
of the timed steps above the process's RSS with its libraries loaded before the model was built (weights,
adapter, optimizer state, activations; CUDA: max_memory_allocated); `tensor bytes` counts the model's parameters,
buffers and optimizer state exactly (what --base-dtype int8 shrinks).

    python tools/bench_train.py                                   # SmolLM2-135M if fetched (make real-model), else tiny
    python tools/bench_train.py --model tiny --seq 256 --batch 2
    python tools/bench_train.py --model 7b --layers 2 --seq 256 --batch 1   # LLaMA-2-7B-shaped layers, random
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

SMOLLM2 = Path.home() / ".cache" / "l4q-export" / "smollm2-135m-instruct"
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
}
VARIANTS = ("lora", "l4q", "l4q+compiled", "l4q+auto", "l4q+int8", "l4q+int8+compiled")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM in bytes (the peak since start or the last reset_peak_rss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def build(model_name: str, layers: int, seq: int, device: str) -> torch.nn.Module:
    """The base model in the trainer's dtype policy (stored dtype; on CPU fp16 -> fp32, bf16 kept where native)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from l4q_export.training.surgery import compute_dtype, load_base_model

    torch.manual_seed(0)
    if model_name == "smollm2":
        model = load_base_model(SMOLLM2)
        with torch.no_grad():  # own the weights: mmap'd file pages would count in RSS whichever tensors survive
            for p in model.parameters():
                p.data = p.data.clone()
    else:
        cfg = LlamaConfig(**SHAPES[model_name], num_hidden_layers=layers, max_position_embeddings=max(seq, 128),
                          use_cache=False)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # stored like a real checkpoint; then the trainer's policy
    model = model.to(compute_dtype(model.dtype, device)).to(device)
    model.config.use_cache = False
    return model


def setup(model: torch.nn.Module, variant: str) -> tuple[str, str]:
    """Swap in the variant's layers; returns (impl, kernel record's reason)."""
    parts = variant.split("+")
    if parts[0] == "lora" and _have("peft"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        return "peft", "-"
    from l4q_export.api import prepare, select_kernel

    prepare(model, method=parts[0], bits=4, group_size=128, rank=4, alpha=8.0,
            base_dtype="int8" if "int8" in parts else "stored")
    if parts[0] != "l4q":
        return f"l4q_export:{parts[0]}", "-"
    rec = select_kernel(model, "compiled" if "compiled" in parts else "auto" if "auto" in parts else "eager")
    return f"l4q_export:{parts[0]}", rec["used"]


def process_baseline() -> int:
    """RSS once the libraries every variant may use are imported (inductor included): what is not the model's."""
    import torch._inductor.compile_fx  # noqa: F401 -- the compiled kernel's compiler, loaded by every variant alike
    import transformers  # noqa: F401

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Runner:
    """One variant's model, optimizer and batch; `step()` times one training step."""

    def __init__(self, variant: str, model_name: str, layers: int, seq: int, batch: int, device: str) -> None:
        self.variant, self.device = variant, device
        self.model = build(model_name, layers, seq, device)
        self.impl, self.kernel = setup(self.model, variant)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step(self) -> float:
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def tensor_bytes(self) -> int:
        """Bytes of the model's parameters, buffers and AdamW state (each storage once)."""
        seen, n = set(), 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for st in self.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                n += t.untyped_storage().nbytes()
        return n


def _trim() -> None:
    """Hand freed heap back to the OS (glibc), so the reset peak mark does not include the build's freed weights."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_memory(variant: str, model_name: str, layers: int, seq: int, batch: int, steps: int, device: str) -> dict:
    base_rss = process_baseline() if device == "cpu" else 0
    r = Runner(variant, model_name, layers, seq, batch, device)
    r.step()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _trim()
    reset = reset_peak_rss() if not cuda else True
    for _ in range(steps):
        r.step()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"variant": variant, "impl": r.impl, "kernel": r.kernel, "dtype": str(r.model.dtype).removeprefix("torch."),
            "peak_bytes": int(peak - base_rss), "tensor_bytes": r.tensor_bytes(), "peak_is_steady_state": reset}


def measure_time(variants: list[str], model_name: str, layers: int, seq: int, batch: int, steps: int,
                 device: str) -> dict[str, dict]:
    """Round-robin steps of every variant in this one process; median seconds per variant."""
    runners = [Runner(v, model_name, layers, seq, batch, device) for v in variants]
    warm = {r.variant: r.step() for r in runners}
    times: dict[str, list[float]] = {r.variant: [] for r in runners}
    for _ in range(steps):
        for r in runners:
            times[r.variant].append(r.step())
    return {v: {"warmup_s": warm[v], "step_s": statistics.median(t), "tokens_per_s": batch * seq / statistics.median(t),
                "steps_s": t} for v, t in times.items()}


@click.command()
@click.option("--model", "model_name", type=click.Choice(["auto", "smollm2", "tiny", "7b"]), default="auto",
              show_default=True, help="auto: SmolLM2-135M when fetched (make real-model), else tiny.")
@click.option("--layers", default=2, show_default=True, help="Decoder layers for the tiny / 7b shapes.")
@click.option("--seq", default=128, show_default=True, help="Tokens per sequence.")
@click.option("--batch", default=2, show_default=True, help="Sequences per step.")
@click.option("--steps", default=3, show_default=True, help="Timed steps after one warm-up (median reported).")
@click.option("--variants", default=",".join(VARIANTS[:3]), show_default=True,
              help=f"Comma-separated subset of {','.join(VARIANTS)}.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON.")
@click.option("--one", default=None, hidden=True)
def main(model_name, layers, seq, batch, steps, variants, device, json_path, one) -> None:
    """Step time and peak memory of L4Q vs LoRA on one model; prints the ratios against LoRA."""
    if model_name == "auto":
        model_name = "smollm2" if (SMOLLM2 / "config.json").is_file() else "tiny"
    if one:
        print(json.dumps(measure_memory(one, model_name, layers, seq, batch, steps, device)))
        return
    names = variants.split(",")
    rows = []
    for v in names:
        cmd = [sys.executable, __file__, "--model", model_name, "--layers", str(layers), "--seq", str(seq), "--batch",
               str(batch), "--steps", "1", "--device", device, "--one", v]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"variant": v, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ok = [r["variant"] for r in rows if "error" not in r]
    timed = measure_time(ok, model_name, layers, seq, batch, steps, device)
    for r in rows:
        r.update(timed.get(r["variant"], {}))
    shape = model_name if model_name == "smollm2" else f"{model_name} x{layers} layers"
    print(f"model={shape} seq={seq} batch={batch} device={device} steps={steps} (median)")
    print(f"{'variant':<20} {'impl':<18} {'kernel':<9} {'dtype':<9} {'step s':>8} {'tok/s':>8} {'peak MiB':>10} "
          f"{'tensor MiB':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20} failed: {r['error']}")
            continue
        print(f"{r['variant']:<20} {r['impl']:<18} {r['kernel']:<9} {r['dtype']:<9} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>8.0f} {r['peak_bytes'] / 2**20:>10.1f} {r['tensor_bytes'] / 2**20:>11.1f}")
    by = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    if "lora" in by:
        for v, r in by.items():
            if v != "lora":
                ratios[f"time {v} / lora"] = r["step_s"] / by["lora"]["step_s"]
                ratios[f"peak {v} / lora"] = r["peak_bytes"] / by["lora"]["peak_bytes"]
                ratios[f"tensor bytes {v} / lora"] = r["tensor_bytes"] / by["lora"]["tensor_bytes"]
    for k, val in ratios.items():
        print(f"{k:<36} {val:6.3f}")
    print("goal (issue 17): time l4q / lora <= 1.3, peak l4q / lora <= 1.05")
    if json_path:
        json_path.write_text(json.dumps({"model": model_name, "layers": layers, "seq": seq, "batch": batch,
                                         "device": device, "rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
