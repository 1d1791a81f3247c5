"""Training step time and peak memory of a whole model: L4Q (eager and compiled kernels, stored or int8 base)
against plain LoRA (PEFT's when `peft` imports, else this project's float-LoRA method), same dtype policy.

Issue 17's training goal: L4Q <= 1.3x LoRA's step time and <= 1.05x its peak memory.  Every variant runs in a
fresh subprocess on the same model, batch and random tokens; the model is loaded in its stored dtype and cast
with the trainer's CPU policy (`surgery.compute_dtype`: bf16 stays bf16 where the CPU has bf16 dot products).
A step is forward + backward + AdamW step + zero_grad, like l4q-train's.  After one warm-up step (which also
compiles the compiled kernel) the process's peak-RSS counter is reset (Linux /proc/self/clear_refs), so the
peak is that of the timed steps: weights, adapter, optimizer state and activations, above the RSS of the process with
its libraries loaded before the model was built (CUDA: max_memory_allocated).

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
VARIANTS = ("lora", "l4q", "l4q+compiled", "l4q+int8", "l4q+int8+compiled")


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
    rec = select_kernel(model, "compiled" if "compiled" in parts else "eager")
    return f"l4q_export:{parts[0]}", rec["used"]


def process_baseline() -> int:
    """RSS once the libraries every variant may use are imported (inductor included): what is not the model's."""
    import torch._inductor.compile_fx  # noqa: F401 -- the compiled kernel's compiler, loaded by every variant alike
    import transformers  # noqa: F401

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(variant: str, model_name: str, layers: int, seq: int, batch: int, steps: int, device: str) -> dict:
    base_rss = process_baseline() if device == "cpu" else 0
    model = build(model_name, layers, seq, device)
    impl, kernel = setup(model, variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss() if not cuda else True
    times = [step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"variant": variant, "impl": impl, "kernel": kernel, "dtype": str(model.dtype).removeprefix("torch."),
            "warmup_s": warm, "step_s": statistics.median(times), "tokens_per_s": batch * seq / statistics.median(times),
            "peak_bytes": int(peak - base_rss), "peak_is_steady_state": reset}


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
        print(json.dumps(measure(one, model_name, layers, seq, batch, steps, device)))
        return
    rows = []
    for v in variants.split(","):
        cmd = [sys.executable, __file__, "--model", model_name, "--layers", str(layers), "--seq", str(seq), "--batch",
               str(batch), "--steps", str(steps), "--device", device, "--one", v]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"variant": v, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    shape = model_name if model_name == "smollm2" else f"{model_name} x{layers} layers"
    print(f"model={shape} seq={seq} batch={batch} device={device} steps={steps} (median)")
    print(f"{'variant':<20} {'impl':<18} {'kernel':<9} {'dtype':<9} {'step s':>8} {'tok/s':>8} {'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20} failed: {r['error']}")
            continue
        print(f"{r['variant']:<20} {r['impl']:<18} {r['kernel']:<9} {r['dtype']:<9} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>8.0f} {r['peak_bytes'] / 2**20:>10.1f}")
    by = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    if "lora" in by:
        for v, r in by.items():
            if v != "lora":
                ratios[f"time {v} / lora"] = r["step_s"] / by["lora"]["step_s"]
                ratios[f"peak {v} / lora"] = r["peak_bytes"] / by["lora"]["peak_bytes"]
    for k, val in ratios.items():
        print(f"{k:<36} {val:6.3f}")
    print("goal (issue 17): time l4q / lora <= 1.3, peak l4q / lora <= 1.05")
    if json_path:
        json_path.write_text(json.dumps({"model": model_name, "layers": layers, "seq": seq, "batch": batch,
                                         "device": device, "rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
