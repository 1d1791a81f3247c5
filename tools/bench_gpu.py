"""Peak memory and step time of L4Q vs LoRA (vs QLoRA) on LLaMA-2-7B-shaped decoder layers, extrapolated to 32.

One command for a CUDA machine (issue 15); the paper's A100 table is printed beside our numbers:

    python tools/bench_gpu.py --json docs/results/gpu.json          # CUDA: 7B shape, seq 2048, bf16
    python tools/bench_gpu.py --tiny                                 # CPU: same code path, tiny shape (tested)
    python tools/bench_gpu.py --tiny --seq 1024 --variants l4q,l4q+ckpt   # CPU: checkpointing's peak-RSS ratio

Each variant runs in a fresh subprocess (CUDA: max_memory_allocated; CPU: peak RSS of the steps -- the peak mark is
reset once the model is built -- above the RSS before it was built, so weights count on both) with `--layers` and
`--layers + 1` random decoder layers; the difference is one layer's cost, so 32 layers ~= peak(L) + (32 - L) *
(peak(L+1) - peak(L)).  Variants: lora (our float-LoRA method, or PEFT's when `peft` is importable), l4q, and
suffixes `+ckpt` (HF gradient checkpointing), `+int8` (--base-dtype int8: W0 held as int8 + per-row scales),
`+compiled` (--kernel compiled), combinable (l4q+int8+compiled+ckpt); qlora (PEFT + bitsandbytes 4-bit) when both
import.  Random weights: memory and time do not depend on the values.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

PAPER = {  # L4Q paper, A100, LLaMA-2 7B, seq 2048: (GB, hours)
    "lora": (25.1, None),
    "l4q": (25.4, 10.1),
    "qa-lora": (14.8, 11.2),
    "qlora": (7.9, 9.9),
}
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:  # an installed but broken bitsandbytes raises more than ImportError
        return False


def default_variants(device: str) -> list[str]:
    v = ["lora", "lora+ckpt", "l4q", "l4q+ckpt", "l4q+int8+ckpt", "l4q+compiled+ckpt"]
    if device == "cuda" and _have("peft") and _have("bitsandbytes"):
        v.append("qlora+ckpt")
    return v


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Linux: VmHWM := current RSS, so the peak read after the steps is theirs, not the build's fp32 transient."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build(variant: str, shape: str, layers: int, seq: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=seq, use_cache=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    method, flags = variant.split("+")[0], set(variant.split("+")[1:])
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as d:  # bitsandbytes quantizes at load time
            LlamaForCausalLM(cfg).to(dtype).save_pretrained(d)
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_use_double_quant=True)
            model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, dtype=dtype, device_map={"": 0})
    else:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    if method in ("lora", "qlora") and _have("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        model.bench_impl = "peft"
    else:
        from l4q_export.api import prepare, select_kernel

        prepare(model, method=method, bits=4, group_size=128, rank=4, alpha=8.0,
                base_dtype="int8" if "int8" in flags else "stored")
        model.bench_impl = f"l4q_export:{method}"
        if method == "l4q":
            select_kernel(model, "compiled" if "compiled" in flags else "eager")
    if "ckpt" in flags:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device) if method != "qlora" else model


def measure(variant: str, shape: str, layers: int, seq: int, device: str, steps: int) -> dict:
    import torch._inductor.compile_fx  # noqa: F401 -- the compiled kernel's compiler: process baseline for every variant

    before = _rss()
    model = build(variant, shape, layers, seq, device)
    model.train()
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = 0  # absolute: the weights are part of what the paper's GB counts
    else:
        start = before  # absolute like CUDA's: the weights (stored or int8) are part of the peak
        _reset_peak()
    times = []
    for _ in range(steps + 1):  # the first pass is warm-up (and the memory pass)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    timed = sorted(times[1:] or times)
    return {"variant": variant, "impl": model.bench_impl, "layers": layers, "peak_bytes": int(peak - start),
            "step_s": timed[len(timed) // 2]}


def _run_one(variant: str, shape: str, layers: int, seq: int, device: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--shape", shape, "--layers", str(layers), "--seq", str(seq),
           "--device", device, "--steps", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"variant": variant, "layers": layers, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(variants: list[str], shape: str, layers: int, seq: int, device: str, steps: int, total_layers: int) -> list[dict]:
    rows = []
    for v in variants:
        a, b = _run_one(v, shape, layers, seq, device, steps), _run_one(v, shape, layers + 1, seq, device, steps)
        if "error" in a or "error" in b:
            rows.append({"variant": v, "error": a.get("error") or b.get("error")})
            continue
        per_mem, per_t = b["peak_bytes"] - a["peak_bytes"], b["step_s"] - a["step_s"]
        rows.append({
            "variant": v, "impl": a["impl"], f"peak_bytes_{layers}": a["peak_bytes"], f"peak_bytes_{layers + 1}": b["peak_bytes"],
            "step_s": a["step_s"], "peak_bytes_extrapolated": a["peak_bytes"] + (total_layers - layers) * per_mem,
            "step_s_extrapolated": a["step_s"] + (total_layers - layers) * per_t,
        })
    return rows


@click.command()
@click.option("--tiny", is_flag=True, help="Tiny LLaMA shape (hidden 256) on CPU: tests this tool's code path.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None, help="Layer shape (default: 7b, or tiny with --tiny).")
@click.option("--layers", default=2, show_default=True, help="Decoder layers built (and layers+1 for the per-layer slope).")
@click.option("--total-layers", default=32, show_default=True, help="Extrapolate to this many layers (LLaMA-2-7B: 32).")
@click.option("--seq", default=None, type=int, help="Tokens per sequence, micro-batch 1 (default 2048; 256 with --tiny).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available (cpu with --tiny).")
@click.option("--steps", default=3, show_default=True, help="Timed forward+backward steps after a warm-up (median).")
@click.option("--variants", default=None, help="Comma-separated variants: lora, l4q or qlora, each with optional "
              "+int8 (l4q), +compiled (l4q), +ckpt suffixes (default: lora, lora+ckpt, l4q, l4q+ckpt, l4q+int8+ckpt, "
              "l4q+compiled+ckpt, and qlora+ckpt on CUDA when peft and bitsandbytes import).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON.")
@click.option("--one", default=None, hidden=True)
def main(tiny, shape, layers, total_layers, seq, device, steps, variants, json_path, one) -> None:
    """Measure peak memory / step time per variant and print them beside the L4Q paper's A100 table."""
    shape = shape or ("tiny" if tiny else "7b")
    seq = seq or (256 if tiny else 2048)
    device = device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if one:
        print(json.dumps(measure(one, shape, layers, seq, device, steps)))
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device visible")
    names = variants.split(",") if variants else default_variants(device)
    rows = run(names, shape, layers, seq, device, steps, total_layers)
    gib = 1e9 if device == "cuda" else 2**20
    unit = "GB" if device == "cuda" else "MiB"
    print(f"shape={shape} layers={layers}->{total_layers} seq={seq} micro-batch=1 device={device}")
    print(f"{'variant':<12} {'impl':<20} {'peak ' + unit:>10} {'@' + str(total_layers) + ' ' + unit:>10} "
          f"{'step s':>8} {'@' + str(total_layers) + ' s':>8}   paper (A100, 7B): GB / h")
    for r in rows:
        p = PAPER.get(r["variant"].split("+")[0])
        paper = f"{p[0]} / {p[1] if p[1] else '-'}" if p else "-"
        if "error" in r:
            print(f"{r['variant']:<12} failed: {r['error']}")
            continue
        print(f"{r['variant']:<12} {r['impl']:<20} {r[f'peak_bytes_{layers}'] / gib:>10.2f} "
              f"{r['peak_bytes_extrapolated'] / gib:>10.2f} {r['step_s']:>8.3f} {r['step_s_extrapolated']:>8.3f}   {paper}")
    by = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    for a, b in (("l4q+ckpt", "l4q"), ("lora+ckpt", "lora"), ("l4q", "lora"), ("l4q+ckpt", "lora+ckpt"),
                 ("l4q+int8+ckpt", "lora+ckpt"), ("l4q+int8+ckpt", "l4q+ckpt"), ("l4q+compiled+ckpt", "lora+ckpt"),
                 ("l4q+compiled+ckpt", "l4q+ckpt")):
        if a in by and b in by:
            ratios[f"peak {a} / {b}"] = by[a]["peak_bytes_extrapolated"] / by[b]["peak_bytes_extrapolated"]
            ratios[f"time {a} / {b}"] = by[a]["step_s_extrapolated"] / by[b]["step_s_extrapolated"]
    for k, v in ratios.items():
        print(f"{k:<28} {v:6.3f}")
    print("paper: LoRA 25.1 GB; L4Q 25.4 GB / 10.1 h; QA-LoRA 14.8 GB / 11.2 h; QLoRA 7.9 GB / 9.9 h "
          "(hours are a full fine-tune, not comparable to a step time)")
    if json_path:
        json_path.write_text(json.dumps({"shape": shape, "layers": layers, "total_layers": total_layers, "seq": seq,
                                         "device": device, "rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
