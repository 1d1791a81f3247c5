"""Training memory and step time of one layer: plain LoRA vs L4Q (ours) vs a naive autograd QAT-LoRA.

Prints, per variant, the bytes autograd saves for backward (parameters excluded -- they exist anyway) and
the peak memory of one forward+backward above the inputs (CUDA: max_memory_allocated; CPU: peak RSS of a
fresh subprocess per variant), then the ratios the L4Q paper's design promises: L4Q <= 1.1x LoRA and
<= 0.25x naive.  Then the median wall time of --repeats further forward+backward passes: what L4Q's
recompute-in-backward costs against LoRA, and what it saves against the naive graph.

    python tools/bench_train_memory.py                    # 4096x4096, 2048 tokens, CPU
    python tools/bench_train_memory.py --device cuda      # on a GPU machine
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_qat import reference_wq  # noqa: E402

from l4q_export.quant import QuantSpec  # noqa: E402
from l4q_export.training.layer import L4QLinear  # noqa: E402

VARIANTS = ("lora", "l4q", "naive")


class LoRALinear(torch.nn.Module):
    """Plain LoRA: frozen W0 plus alpha * B(A x), the standard unmerged form."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.alpha = alpha / rank

    def forward(self, x):
        return x @ self.weight.T + self.alpha * ((x @ self.lora_A.T) @ self.lora_B.T)


class NaiveQATLoRA(L4QLinear):
    """Same parameters as L4Q, but W_q built with plain autograd ops (every intermediate is saved)."""

    def forward(self, x):
        s = self.spec
        wq = reference_wq(
            self.weight,
            self.lora_A,
            self.lora_B,
            self.scale,
            self.offset,
            bits=s.bits,
            group=s.group_size,
            zero_point=s.zero_point,
            alpha=self.cfg.lora_scale,
            gscale=s.lsq_grad_scale(self.in_features),
        )
        return x @ wq.T


def build(variant: str, n: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, bias=False, device=device)
    spec = QuantSpec(4, 128, "float")
    if variant == "lora":
        return LoRALinear(base, 4, 8.0).to(device)
    return (L4QLinear if variant == "l4q" else NaiveQATLoRA)(base, spec, 4, 8.0).to(device)


def measure(variant: str, n: int, tokens: int, device: str, repeats: int) -> dict:
    layer = build(variant, n, device)
    params = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.untyped_storage().nbytes() if t.data_ptr() != x.data_ptr() else t.numel() * t.element_size())
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(torch.ones_like(y))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {"variant": variant, "saved_bytes": int(sum(saved)), "peak_bytes": int(peak), "step_s": _step_time(layer, x, repeats)}


def _step_time(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward+backward (the memory pass above doubles as warm-up)."""
    times = []
    for _ in range(repeats):
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = layer(x)
        y.backward(torch.ones_like(y))
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@click.command()
@click.option("--n", default=4096, show_default=True, help="Layer width (out = in = n).")
@click.option("--tokens", default=2048, show_default=True, help="Tokens in the batch.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed forward+backward passes per variant (median reported).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--one", type=click.Choice(VARIANTS), default=None, hidden=True)
def main(n: int, tokens: int, device: str, repeats: int, json_path: Path | None, one: str | None) -> None:
    """Measure saved-for-backward bytes, peak memory and step time for LoRA, L4Q and naive QAT-LoRA."""
    if one:
        print(json.dumps(measure(one, n, tokens, device, repeats)))
        return
    rows = []
    for v in VARIANTS:
        if device == "cpu":  # fresh process per variant: ru_maxrss is a process-lifetime high-water mark
            out = subprocess.run(
                [sys.executable, __file__, "--n", str(n), "--tokens", str(tokens), "--repeats", str(repeats), "--one", v],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        else:
            rows.append(measure(v, n, tokens, device, repeats))
    by = {r["variant"]: r for r in rows}
    mib = 2**20
    print(f"one layer {n}x{n}, {tokens} tokens, fp32, device={device}")
    print(f"{'variant':<8} {'saved for backward':>20} {'peak fwd+bwd':>16} {'fwd+bwd time':>14}")
    for r in rows:
        print(
            f"{r['variant']:<8} {r['saved_bytes'] / mib:>17.1f} MiB {r['peak_bytes'] / mib:>12.1f} MiB "
            f"{r['step_s'] * 1e3:>11.0f} ms"
        )
    ratios = {
        "saved_l4q_over_lora": by["l4q"]["saved_bytes"] / by["lora"]["saved_bytes"],
        "saved_l4q_over_naive": by["l4q"]["saved_bytes"] / by["naive"]["saved_bytes"],
        "peak_l4q_over_lora": by["l4q"]["peak_bytes"] / by["lora"]["peak_bytes"],
        "peak_l4q_over_naive": by["l4q"]["peak_bytes"] / by["naive"]["peak_bytes"],
        "time_l4q_over_lora": by["l4q"]["step_s"] / by["lora"]["step_s"],
        "time_l4q_over_naive": by["l4q"]["step_s"] / by["naive"]["step_s"],
    }
    for k, v in ratios.items():
        print(f"{k:<24} {v:6.3f}")
    if json_path:
        json_path.write_text(json.dumps({"n": n, "tokens": tokens, "device": device, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
