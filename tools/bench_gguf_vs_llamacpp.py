"""Our GGUF export vs the peer path (merge LoRA to float -> llama.cpp's convert_hf_to_gguf.py -> llama-quantize).

For stories260K L4Q-trained at 4 and 3 bits (fp16 scale grid, group 32):
  ours:  l4q-export --to gguf (auto: the trained codes in Q4_1 blocks)
  peer:  W0 + alpha*B@A in fp32 (what a PEFT merge gives) saved as an HF dir -> convert_hf_to_gguf.py --outtype f32
         -> llama_cpp.llama_model_quantize to Q4_1 (the same block type, re-rounded from the merged floats)
Both files run in llama.cpp; we report KL(trained fake-quant reference || file) and top-1 agreement on fixed
prompts -- ours must be lower -- plus export wall time and peak RSS of each converter (one process each, measured
with wait4), and our peak RSS for tiny models with 2 and 8 layers (it must not grow with the layer count).

The peer converter comes from the llama-cpp-python sdist (vendor/llama.cpp/convert_hf_to_gguf.py); the tool
downloads it with `pip download --no-binary :all:` into --sdist-dir when it is not there yet.

    python tools/bench_gguf_vs_llamacpp.py --work /tmp/bench_gguf [--json out.json]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K"
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
SDIST = "llama-cpp-python==0.3.36"
EVAL_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "Tom and his dog went to the park. They saw a big tree and a small bird.",
    "One day, a boy found a shiny red ball in the garden. He was very happy and wanted to show his mom.",
    "The cat was sad because it could not find its toy. It looked under the bed and behind the door.",
)


def bin_(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


# Runs a Python script in a fresh interpreter and reports that process's own high-water RSS (VmHWM of its
# address space).  getrusage/wait4 would not do: Linux carries the parent's high-water mark across fork+exec.
_HWM = ("import atexit, os, runpy, sys\n"
        "atexit.register(lambda: sys.stderr.write(''.join(\n"
        "    l for l in open('/proc/self/status') if l.startswith(('VmHWM', 'Rss')))))\n"
        "path = sys.argv[1]; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(os.path.abspath(path)))\n"
        "runpy.run_path(path, run_name='__main__')\n")


def run_measured(script: str, args: list[str], cwd: Path | None = None) -> dict[str, float]:
    """Run one Python script as its own process: wall seconds and its peak RSS (MiB)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", _HWM, script, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"command failed ({r.returncode}): {script} {' '.join(args)}\n{r.stderr[-3000:]}")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("VmHWM", "RssAnon", "RssFile"))]
    st = {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in lines}
    # RssFile at exit = pages of mmap'ed input files (safetensors), reclaimable page cache rather than allocations.
    return {"seconds": round(time.time() - t0, 2), "peak_rss_mib": round(st["VmHWM"], 1),
            "exit_rss_anon_mib": round(st["RssAnon"], 1), "exit_rss_file_mib": round(st["RssFile"], 1)}


def find_converter(sdist_dir: Path) -> Path:
    for p in sdist_dir.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"):
        return p
    tars = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tars:
        click.echo(f"fetching the {SDIST} sdist (for llama.cpp's convert_hf_to_gguf.py) into {sdist_dir} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(sdist_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tars = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not tars:
            raise click.ClickException(f"cannot obtain the {SDIST} sdist (needs PyPI access): {r.stderr.strip()[-500:]}; "
                                       f"put llama_cpp_python-0.3.36.tar.gz into {sdist_dir} and re-run")
    with tarfile.open(tars[0]) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and
                   ("/conversion/" in m.name or "/gguf-py/" in m.name or m.name.endswith(".py"))]
        tf.extractall(sdist_dir, members=members, filter="data")
    return next(sdist_dir.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def train(out: Path, base: Path, data: Path, bits: int, steps: int, extra: list[str] = ()) -> Path:
    if not (out / "l4q_config.json").is_file():
        subprocess.run([bin_("l4q-train"), "--model", str(base), "--data", str(data), "--out", str(out), "--bits", str(bits),
                        "--group-size", "32", "--steps", str(steps), "--batch-size", "8", "--grad-accum", "1", "--seq-len", "256",
                        "--lr", "2e-3", "--save-every", "0", "--scale-grid", "fp16", *extra], check=True, capture_output=True)
    return out


def merge_to_float(ck_dir: Path, out: Path) -> Path:
    """The peer's starting point: W0 + alpha*B@A in fp32 for every adapted linear, in a plain HF directory."""
    from safetensors.torch import save_file

    from l4q_export.checkpoint import TOKENIZER_FILES, load_checkpoint
    from l4q_export.quant import combined_weight

    ck = load_checkpoint(ck_dir)
    base = ck.base()
    targets = {m + ".weight": m for m in ck.modules}
    tensors = {}
    for n in base.names():
        w = base.get(n)
        if n in targets:
            a = ck.adapter(targets[n])
            w = combined_weight(w, a.get("lora_A"), a.get("lora_B"), ck.lora_scale)
        tensors[n] = w.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", *TOKENIZER_FILES):
        if (ck.dir / f).is_file():
            shutil.copy(ck.dir / f, out / f)
    return out


def peer_export(converter: Path, merged: Path, out: Path, qtype: str) -> dict[str, Any]:
    import llama_cpp

    f32 = out.with_suffix(".f32.gguf")
    m = run_measured(str(converter), [str(merged), "--outtype", "f32", "--outfile", str(f32)], cwd=out.parent)
    t0 = time.time()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
                    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[qtype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0:
        raise click.ClickException(f"llama_model_quantize failed ({rc})")
    return {**m, "quantize_seconds": round(time.time() - t0, 2), "bytes": out.stat().st_size}


def our_export(ck: Path, out: Path) -> dict[str, Any]:
    rep = out.with_suffix(".json")
    m = run_measured(bin_("l4q-export"), ["--to", "gguf", str(ck), "-o", str(out), "--json", str(rep)])
    r = json.loads(rep.read_text())
    return {**m, "bytes": r["bytes"], "main_type": r["main_type"], "n_exact": r["n_exact"], "n_quantized": r["n_quantized"]}


def fidelity(ck_dir: Path, gguf_path: Path) -> dict[str, float]:
    """KL(trained fake-quant reference || llama.cpp on this file) and top-1 agreement over EVAL_TEXTS."""
    from l4q_export.checkpoint import load_checkpoint
    from l4q_export.formats import get_target
    from l4q_export.verify import compare_runtime

    gguf = get_target("gguf")
    c, _ = compare_runtime(gguf.runtime(gguf_path, threads=2), load_checkpoint(ck_dir), gguf.tolerance(gguf_path),
                           prompts=tuple(EVAL_TEXTS))
    return {"mean_kl": c["mean_kl"], "top1": c["top1_agreement"], "max_abs_diff": c["max_abs_dlogit"]}


def rss_scaling(work: Path, converter: Path) -> list[dict[str, Any]]:
    """Our export's peak RSS (and the peer converter's) for the same tiny architecture with 2 and 8 layers."""
    from l4q_export.demo import build_tiny_model, instruction_records

    data = work / "instruct.json"
    data.write_text(json.dumps(instruction_records()))
    rows = []
    for layers in (2, 8):
        base = work / f"tiny{layers}" / "base"
        if not (base / "config.json").is_file():
            build_tiny_model(base, hidden=512, intermediate=1536, layers=layers, heads=8, kv_heads=4)
        ck = train(work / f"tiny{layers}" / "l4q", base, data, 4, 1)
        ours = our_export(ck, work / f"tiny{layers}" / "ours.gguf")
        peer_out = work / f"tiny{layers}" / "peer.gguf"
        peer = run_measured(str(converter), [str(base), "--outtype", "f16", "--outfile", str(peer_out)], cwd=work)
        rows.append({"layers": layers, "base_mib": round((base / "model.safetensors").stat().st_size / 2**20, 1),
                     "ours_rss_mib": ours["peak_rss_mib"], "ours_s": ours["seconds"],
                     "ours_anon_mib": ours["exit_rss_anon_mib"], "ours_file_mib": ours["exit_rss_file_mib"],
                     "peer_rss_mib": peer["peak_rss_mib"], "peer_s": peer["seconds"]})
    return rows


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bench_gguf"), show_default=True)
@click.option("--sdist-dir", type=click.Path(path_type=Path), default=Path("/tmp/sdist"), show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="L4Q training steps for the stories260K runs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(work: Path, sdist_dir: Path, steps: int, json_path: Path | None) -> None:
    if not STORIES.is_dir() or not ALPACA.is_file():
        raise click.ClickException(f"shared data not found ({STORIES}); clone ../shared beside the repo")
    work.mkdir(parents=True, exist_ok=True)
    sdist_dir.mkdir(parents=True, exist_ok=True)
    converter = find_converter(sdist_dir)
    results: dict[str, Any] = {"models": []}
    for bits in (4, 3):
        ck = train(work / f"stories_{bits}bit", STORIES, ALPACA, bits, steps)
        ours_path = work / f"ours_{bits}bit.gguf"
        ours = our_export(ck, ours_path)
        merged = merge_to_float(ck, work / f"merged_{bits}bit")
        peer_path = work / f"peer_{bits}bit.gguf"
        peer = peer_export(converter, merged, peer_path, ours["main_type"])
        row = {"bits": bits, "type": ours["main_type"], "ours": {**ours, **fidelity(ck, ours_path)},
               "peer": {**peer, **fidelity(ck, peer_path)}}
        row["kl_ratio_peer_over_ours"] = row["peer"]["mean_kl"] / max(row["ours"]["mean_kl"], 1e-30)
        row["time_ratio_ours_over_peer"] = ours["seconds"] / (peer["seconds"] + peer["quantize_seconds"])
        row["rss_ratio_ours_over_peer"] = ours["peak_rss_mib"] / peer["peak_rss_mib"]
        results["models"].append(row)
    results["rss_scaling"] = rss_scaling(work, converter)

    click.echo("\nstories260K (L4Q, group 32, fp16 scale grid): KL to the trained fake-quant reference, llama.cpp F32 KV")
    click.echo(f"{'bits':>4} {'type':>5} | {'ours KL':>10} {'top1':>6} {'s':>6} {'RSS MiB':>8} | "
               f"{'peer KL':>10} {'top1':>6} {'s':>6} {'RSS MiB':>8} | {'KL peer/ours':>12}")
    for r in results["models"]:
        o, p = r["ours"], r["peer"]
        peer_s = p["seconds"] + p["quantize_seconds"]
        click.echo(f"{r['bits']:>4} {r['type']:>5} | {o['mean_kl']:>10.2e} {o['top1']:>6.3f} {o['seconds']:>6.2f} "
                   f"{o['peak_rss_mib']:>8.1f} | {p['mean_kl']:>10.2e} {p['top1']:>6.3f} {peer_s:>6.2f} "
                   f"{p['peak_rss_mib']:>8.1f} | "
                   f"{r['kl_ratio_peer_over_ours']:>12.1f}")
    click.echo("\npeak RSS vs layer count (tiny LLaMA, hidden 512, MLP 1536; peer = convert_hf_to_gguf f16)")
    click.echo(f"{'layers':>6} {'base MiB':>9} {'ours RSS':>9} {'anon@exit':>9} {'file@exit':>9} {'ours s':>7} "
               f"{'peer RSS':>9} {'peer s':>7}")
    for r in results["rss_scaling"]:
        click.echo(f"{r['layers']:>6} {r['base_mib']:>9} {r['ours_rss_mib']:>9} {r['ours_anon_mib']:>9} {r['ours_file_mib']:>9} "
                   f"{r['ours_s']:>7} "
                   f"{r['peer_rss_mib']:>9} {r['peer_s']:>7}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
