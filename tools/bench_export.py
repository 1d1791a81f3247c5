"""Export and verify speed at LLaMA-2-7B layer shapes: ours vs llama.cpp's converter vs the disk floor, in one run.

For each layer count N (default 2 and 4) the script builds, once, under --work:
  base/N     a random fp16 LLaMA-2-7B-shaped HF checkpoint with N decoder layers (hidden 4096, MLP 11008, 32 heads,
             vocab 32000, the Llama-2 SentencePiece tokenizer from ../shared), one safetensors shard per layer
  l4q-float/N, l4q-integer/N  synthetic L4Q adapter checkpoints (4-bit, group 128, fp16 scale grid, rank 16, every
             linear quantized) written through the project's own `write_checkpoint` and re-opened with
             `load_checkpoint`, so they are valid: float offsets (GGUF, ONNX) and integer zero points (packed
             safetensors, which refuse float offsets)
and then measures, each as its own process (wall seconds, the process's own peak RSS = VmHWM):
  floor      `cat` of the base shards into one file + `sync` (what reading and writing the bytes costs here)
  peer       llama.cpp's convert_hf_to_gguf.py --outtype q8_0 of the base (from the llama-cpp-python sdist)
  ours       l4q-export for every target (gguf, onnx matmulnbits, onnx qdq, compressed-tensors, gptq)
  verify     levels (a)+(b) of `verify` (stored fields and decoded weights vs the fold) on each artifact
  whole verify (--full-verify) every level, the runtime's logits against the PyTorch reference included
plus the sha256 of every output file, so a second run with --expect FIRST.json proves a change kept every byte.

    python tools/bench_export.py --work /tmp/bench_export --layers 2,4 --json before.json
    python tools/bench_export.py --work /tmp/bench_export --layers 2,4,8 --json after.json --expect before.json

Inputs are read from the page cache (the machine has RAM for them; no cache is dropped), for the floor as for
every converter.  Artifacts are deleted after they are hashed and verified unless --keep.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf_vs_llamacpp import bin_, find_converter, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
SHAPE = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RANK, ALPHA, BITS, GROUP = 16, 32.0, 4, 128

# label -> (checkpoint zero point, l4q-export arguments after MODEL_DIR, output is a directory)
TARGETS: dict[str, tuple[str, list[str], bool]] = {
    "gguf": ("float", ["--to", "gguf"], False),
    "onnx-matmulnbits": ("float", ["--to", "onnx", "--onnx-form", "matmulnbits"], True),
    "onnx-qdq": ("float", ["--to", "onnx", "--onnx-form", "qdq"], True),
    "compressed-tensors": ("integer", ["--to", "safetensors", "--flavor", "compressed-tensors"], True),
    "gptq": ("integer", ["--to", "safetensors", "--flavor", "gptq"], True),
}
VERIFY_TARGET = {"gguf": "gguf", "onnx-matmulnbits": "onnx", "onnx-qdq": "onnx", "compressed-tensors": "safetensors",
                 "gptq": "safetensors"}


# ------------------------------------------------------------------------------------------------ fixtures

def llama_config(layers: int) -> dict[str, Any]:
    h, heads = SHAPE["hidden"], SHAPE["heads"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "head_dim": h // heads, "vocab_size": SHAPE["vocab"], "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "attention_bias": False, "mlp_bias": False}


def make_base(out: Path, layers: int, seed: int = 0) -> Path:
    """Random fp16 weights (std 0.02, norms ~1) in HF layout, one shard per decoder layer (plus embeddings, head)."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, m, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).half()

    def norm() -> torch.Tensor:
        return (1 + 0.05 * torch.randn(h, generator=g)).half()

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rnd(v, h)}]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
    n = layers + 2
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i == 0:
            t = shards[0]
        elif i <= layers:
            p = f"model.layers.{i - 1}."
            t = {p + k + ".weight": rnd(*s) for k, s in shapes.items()}
            t[p + "input_layernorm.weight"] = norm()
            t[p + "post_attention_layernorm.weight"] = norm()
        else:
            t = {"model.norm.weight": norm(), "lm_head.weight": rnd(v, h)}
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    shutil.copyfile(TOKENIZER, tmp / "tokenizer.model")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096, "legacy": True}, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tmp.rename(out)
    return out


def make_checkpoint(base: Path, out: Path, zero_point: str, seed: int = 1) -> Path:
    """A synthetic L4Q checkpoint as l4q-train writes it: minmax-initialised (scale, offset) perturbed as training
    moves them, non-zero LoRA A and B, 4-bit g128 on the fp16 scale grid; validated by re-opening it."""
    import torch

    from l4q_export.checkpoint import BaseWeights, load_checkpoint, write_checkpoint
    from l4q_export.quant import QuantSpec
    from l4q_export.quant.core import init_params

    if (out / "l4q_config.json").is_file():
        return out
    spec = QuantSpec(BITS, GROUP, zero_point)
    bw = BaseWeights(base)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    modules = []
    for i in range(layers):
        for lin in LINEARS:
            mod = f"model.layers.{i}.{lin}"
            w = bw.get(mod + ".weight").float()
            s, off = init_params(w, spec, "minmax")
            s = s * (1 + 0.05 * torch.rand(s.shape, generator=g))
            adapter[mod + ".scale"] = s
            if zero_point == "float":
                adapter[mod + ".offset"] = off + 0.1 * s * torch.randn(off.shape, generator=g)
            else:
                adapter[mod + ".offset"] = off
            out_f, in_f = w.shape
            adapter[mod + ".lora_A"] = torch.randn(RANK, in_f, generator=g) / in_f**0.5
            adapter[mod + ".lora_B"] = torch.randn(out_f, RANK, generator=g) * 2e-3
            modules.append(mod)
            del w
    write_checkpoint(out, method="l4q", spec=spec, rank=RANK, lora_alpha=ALPHA, fp16_grid=True, lsq_grad_scale=True,
                     adapter=adapter, modules=modules, base_dir=base, base_hashes=bw.shard_hashes(),
                     architecture="LlamaForCausalLM", copy_base=False)
    load_checkpoint(out)  # refuses anything l4q-export would refuse
    return out


# ------------------------------------------------------------------------------------------------ measurements

def measured(script: str, args: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """`run_measured` plus the child's CPU seconds (user + sys): on a shared machine wall time depends on the
    neighbours, CPU time much less.  Callers pass cwd=--work: a `python -c` child puts its working directory first
    on sys.path, so started inside a checkout it would import that checkout's l4q_export, not PYTHONPATH's."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = run_measured(script, args, cwd=cwd)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**m, "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2)}


def output_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of an artifact (the directory marker and verbatim tokenizer copies included)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    res = {}
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        res[p.name if path.is_file() else str(p.relative_to(path))] = h.hexdigest()
    return res


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_floor(base: Path, work: Path) -> dict[str, Any]:
    shards = sorted(str(p) for p in base.glob("*.safetensors"))
    dst = work / "floor.bin"
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run(["bash", "-c", 'cat "$@" > "$0" && sync', str(dst), *shards], check=True)
    sec = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = dst.stat().st_size
    dst.unlink()
    return {"seconds": round(sec, 2), "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2), "bytes": n}


def peer(converter: Path, base: Path, work: Path) -> dict[str, Any]:
    out = work / "peer-q8_0.gguf"
    m = measured(str(converter), [str(base), "--outtype", "q8_0", "--outfile", str(out)], cwd=work)
    res = {**m, "bytes": out.stat().st_size}
    out.unlink()
    return res


def ours(label: str, ck: Path, work: Path) -> tuple[dict[str, Any], Path]:
    _zp, args, is_dir = TARGETS[label]
    out = work / (label if is_dir else f"{label}.gguf")
    rep = work / f"{label}.report.json"
    m = measured(bin_("l4q-export"), [str(ck), *args, "-o", str(out), "--json", str(rep)], cwd=work)
    r = json.loads(rep.read_text())
    rep.unlink()
    return {**m, "bytes": size_of(out), "n_exact": r["n_exact"], "n_quantized": r["n_quantized"]}, out


def verify_ab(label: str, artifact: Path, ck: Path, work: Path) -> dict[str, Any]:
    return measured(__file__, ["verify-ab", VERIFY_TARGET[label], str(artifact), str(ck)], cwd=work)


def verify_full(label: str, artifact: Path, ck: Path, work: Path) -> dict[str, Any]:
    """The whole verify (every level and the target's checks) as its own process, with its verdict and the level
    (c) numbers: what a user's `python -m l4q_export.verify ARTIFACT --model CK` costs."""
    rep = work / f"{label}.verify.json"
    m = measured(__file__, ["verify-all", VERIFY_TARGET[label], str(artifact), str(ck), str(rep)], cwd=work)
    r = json.loads(rep.read_text())
    rep.unlink()
    return {**m, "passed": r["passed"], "runtime": r["runtime"], "max_abs_dlogit": r["logits"]["max_abs_dlogit"],
            "dlogit_limit": r["logits"]["dlogit_limit"], "mean_kl": r["logits"]["mean_kl"], "summary": r["summary"]}


# ------------------------------------------------------------------------------------------------ CLI

@click.group()
def cli() -> None:
    """Export/verify speed at 7B layer shapes (see the module docstring)."""


@cli.command("verify-ab")
@click.argument("target")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("model_dir", type=click.Path(path_type=Path))
def verify_ab_cmd(target: str, artifact: Path, model_dir: Path) -> None:
    """Child process: verify levels (a)+(b) of ARTIFACT (a TARGET export) against MODEL_DIR; exit 1 on failure."""
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_tensors

    r = verify_tensors(get_target(target), artifact, model_dir)
    ok = r["n_codes_identical"] == r["n_quantized"] == r["n_within_bound"] and r["n_quantized"] > 0
    click.echo(f"verify (a)+(b): {r['n_codes_identical']}/{r['n_quantized']} identical, "
               f"{r['n_within_bound']}/{r['n_quantized']} within bound")
    sys.exit(0 if ok else 1)


@cli.command("verify-all")
@click.argument("target")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("json_path", type=click.Path(path_type=Path))
def verify_all_cmd(target: str, artifact: Path, model_dir: Path, json_path: Path) -> None:
    """Child process: the whole verify of ARTIFACT (a TARGET export) against MODEL_DIR, its report to JSON_PATH
    (exit 0 whatever the verdict: a failing run's numbers are measured too)."""
    from l4q_export.formats import get_target
    from l4q_export.verify import verify_artifact

    json_path.write_text(json.dumps(verify_artifact(get_target(target), artifact, model_dir)))


@cli.command("run")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bench_export"), show_default=True,
              help="Where the base models, checkpoints and (briefly) the artifacts live.")
@click.option("--layers", default="2,4", show_default=True, help="Comma-separated decoder layer counts.")
@click.option("--targets", default=",".join(TARGETS), show_default=True, help="Comma-separated export targets.")
@click.option("--sdist-dir", type=click.Path(path_type=Path), default=Path.home() / ".cache/l4q-export/sdist",
              show_default=True, help="Where the llama-cpp-python sdist (llama.cpp's converter) is or is fetched to.")
@click.option("--peer/--no-peer", "peer_on", default=True, show_default=True, help="Also time llama.cpp's converter.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Also time verify levels (a)+(b).")
@click.option("--full-verify", is_flag=True,
              help="Also time the whole verify (levels (a)-(c) and the target's checks) of each artifact.")
@click.option("--keep", is_flag=True, help="Keep the artifacts (default: delete each once hashed and verified).")
@click.option("--expect", type=click.Path(path_type=Path, exists=True), default=None,
              help="A previous --json: fail unless every output's sha256 equals it (same fixtures, same paths).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write all results here.")
def run(work: Path, layers: str, targets: str, sdist_dir: Path, peer_on: bool, verify: bool, full_verify: bool,
        keep: bool, expect: Path | None, json_path: Path | None) -> None:
    """Build the fixtures (once) and measure floor, peer, every target and verify, per layer count."""
    if not TOKENIZER.is_file():
        raise click.ClickException(f"shared data not found ({TOKENIZER}); clone ../shared beside the repo")
    labels = [t for t in targets.split(",") if t]
    bad = [t for t in labels if t not in TARGETS]
    if bad:
        raise click.ClickException(f"unknown target {bad[0]}; choose from {', '.join(TARGETS)}")
    work.mkdir(parents=True, exist_ok=True)
    converter = find_converter(sdist_dir) if peer_on else None
    before = json.loads(expect.read_text()) if expect else None
    import l4q_export

    results: dict[str, Any] = {"python": sys.version.split()[0], "l4q_export": str(Path(l4q_export.__file__).parent),
                               "runs": []}
    for n in [int(x) for x in layers.split(",")]:
        base = make_base(work / "base" / f"L{n}", n)
        cks = {zp: make_checkpoint(base, work / f"l4q-{zp}" / f"L{n}", zp)
               for zp in sorted({TARGETS[t][0] for t in labels})}
        row: dict[str, Any] = {"layers": n, "base_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors"))}
        row["floor"] = disk_floor(base, work)
        click.echo(f"[{n} layers] floor {row['floor']['seconds']} s")
        if converter is not None:
            row["peer"] = peer(converter, base, work)
            click.echo(f"[{n} layers] peer {row['peer']['seconds']} s, {row['peer']['peak_rss_mib']} MiB")
        row["targets"] = {}
        for label in labels:
            ck = cks[TARGETS[label][0]]
            res, out = ours(label, ck, work)
            res["sha256"] = output_hashes(out)
            if verify:
                res["verify"] = verify_ab(label, out, ck, work)
            if full_verify:
                res["verify_full"] = verify_full(label, out, ck, work)
            if not keep:
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            if before is not None:
                prev = next((r for r in before["runs"] if r["layers"] == n), {}).get("targets", {}).get(label)
                res["identical_to_expect"] = None if prev is None else prev["sha256"] == res["sha256"]
            row["targets"][label] = res
            click.echo(f"[{n} layers] {label}: {res['seconds']} s, {res['peak_rss_mib']} MiB"
                       + (f"; verify {res['verify']['seconds']} s" if verify else ""))
        results["runs"].append(row)
    print_tables(results)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    differ = [(r["layers"], k) for r in results["runs"] for k, v in r["targets"].items()
              if v.get("identical_to_expect") is False]
    if differ:
        raise click.ClickException(f"output bytes differ from {expect}: {differ}")


def print_tables(results: dict[str, Any]) -> None:
    """One table per layer count: wall and CPU seconds, peak RSS, bytes, and the ratios against peer and floor."""
    nan = float("nan")
    for r in results["runs"]:
        gb = r["base_bytes"] / 1e9
        fl = r["floor"]
        p = r.get("peer") or {}
        click.echo(f"\n{r['layers']} layers of LLaMA-2-7B shapes, base {gb:.2f} GB fp16 (L4Q 4-bit g128, fp16 grid)")
        click.echo(f"{'':<22} {'wall s':>7} {'cpu s':>7} {'RSS MiB':>8} {'out MB':>7} {'wall/peer':>9} {'cpu/peer':>8} "
                   f"{'wall/floor':>10} {'RSS/peer':>8} {'verify s':>8} {'vfy cpu':>7} {'vfy GB/s':>8} {'same':>5}")
        click.echo(f"{'disk floor (cat+sync)':<22} {fl['seconds']:>7.2f} {fl['cpu_s']:>7.2f} {'-':>8} {fl['bytes'] / 1e6:>7.0f}")
        if p:
            click.echo(f"{'llama.cpp q8_0 (peer)':<22} {p['seconds']:>7.2f} {p['cpu_s']:>7.2f} {p['peak_rss_mib']:>8.0f} "
                       f"{p['bytes'] / 1e6:>7.0f} {1:>9.2f} {1:>8.2f} {p['seconds'] / fl['seconds']:>10.2f}")
        for label, t in r["targets"].items():
            v = t.get("verify") or {}
            same = {None: "-", True: "yes", False: "NO"}[t.get("identical_to_expect")]
            click.echo(f"{label:<22} {t['seconds']:>7.2f} {t['cpu_s']:>7.2f} {t['peak_rss_mib']:>8.0f} {t['bytes'] / 1e6:>7.0f} "
                       f"{t['seconds'] / p['seconds'] if p else nan:>9.2f} {t['cpu_s'] / p['cpu_s'] if p else nan:>8.2f} "
                       f"{t['seconds'] / fl['seconds']:>10.2f} {t['peak_rss_mib'] / p['peak_rss_mib'] if p else nan:>8.2f} "
                       f"{v.get('seconds', nan):>8.2f} {v.get('cpu_s', nan):>7.2f} {gb / v['seconds'] if v else nan:>8.2f} "
                       f"{same:>5}")
        full = {label: t["verify_full"] for label, t in r["targets"].items() if "verify_full" in t}
        if full:
            click.echo(f"\nwhole verify, {r['layers']} layers: {'wall s':>7} {'cpu s':>7} {'RSS MiB':>8} {'passed':>6} "
                       f"{'max|dlogit|':>11} {'limit':>9} {'mean KL':>9}")
            for label, v in full.items():
                limit = "-" if v["dlogit_limit"] is None else f"{v['dlogit_limit']:.3g}"
                click.echo(f"{label:<29} {v['seconds']:>7.2f} {v['cpu_s']:>7.2f} {v['peak_rss_mib']:>8.0f} "
                           f"{'yes' if v['passed'] else 'NO':>6} {v['max_abs_dlogit']:>11.3g} {limit:>9} {v['mean_kl']:>9.2e}")


@cli.command("report")
@click.option("--before", "before_paths", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="--json files of the runs before the change (repeatable; later files add layer counts/targets).")
@click.option("--after", "after_paths", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="--json files of the runs after the change (repeatable).")
def report_cmd(before_paths: tuple[Path, ...], after_paths: tuple[Path, ...]) -> None:
    """Markdown tables from saved runs: ours vs peer vs floor after, and before/after per target and layer count."""
    before, after = _merge(before_paths), _merge(after_paths)
    click.echo("| layers | base GB | | wall s | CPU s | peak RSS MiB | output MB | wall / peer | CPU / peer | wall / floor "
               "| verify (a)+(b) s | verify GB/s | bytes = before |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sorted(after):
        r = after[n]
        fl, p = r["floor"], r.get("peer")
        gb = r["base_bytes"] / 1e9
        click.echo(f"| {n} | {gb:.2f} | disk floor (cat + sync) | {fl['seconds']:.2f} | {fl['cpu_s']:.2f} | - | "
                   f"{fl['bytes'] / 1e6:.0f} | | | 1.00 | | | |")
        if p:
            click.echo(f"| {n} | | llama.cpp q8_0 (peer) | {p['seconds']:.2f} | {p['cpu_s']:.2f} | {p['peak_rss_mib']:.0f} | "
                       f"{p['bytes'] / 1e6:.0f} | 1.00 | 1.00 | {p['seconds'] / fl['seconds']:.2f} | | | |")
        for label, t in r["targets"].items():
            v = t.get("verify")
            same = {None: "-", True: "yes", False: "**NO**"}[t.get("identical_to_expect")]
            ratios = (f"{t['seconds'] / p['seconds']:.2f} | {t['cpu_s'] / p['cpu_s']:.2f}" if p else " | ")
            vs = f"{v['seconds']:.1f} | {gb / v['seconds']:.3f}" if v else " | "
            click.echo(f"| {n} | | {label} | {t['seconds']:.2f} | {t['cpu_s']:.2f} | {t['peak_rss_mib']:.0f} | "
                       f"{t['bytes'] / 1e6:.0f} | {ratios} | {t['seconds'] / fl['seconds']:.2f} | {vs} | {same} |")
    click.echo("\n| layers | target | wall s before -> after | CPU s before -> after | peak RSS MiB before -> after "
               "| verify s before -> after | CPU speed-up |")
    click.echo("|---|---|---|---|---|---|---|")
    for n in sorted(after):
        for label, t in after[n]["targets"].items():
            b = before.get(n, {}).get("targets", {}).get(label)
            if b is None:
                continue
            bv, av = b.get("verify"), t.get("verify")
            vs = f"{bv['seconds']:.1f} -> {av['seconds']:.1f}" if bv and av else "-"
            click.echo(f"| {n} | {label} | {b['seconds']:.2f} -> {t['seconds']:.2f} | {b['cpu_s']:.2f} -> {t['cpu_s']:.2f} | "
                       f"{b['peak_rss_mib']:.0f} -> {t['peak_rss_mib']:.0f} | {vs} | {b['cpu_s'] / t['cpu_s']:.2f}x |")


def _merge(paths: tuple[Path, ...]) -> dict[int, dict[str, Any]]:
    """layer count -> run, the targets of later files added to (or replacing) earlier ones."""
    runs: dict[int, dict[str, Any]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["runs"]:
            have = runs.setdefault(r["layers"], {**r, "targets": {}})
            have["targets"].update(r["targets"])
            if "peer" in r and "peer" not in have:
                have["peer"] = r["peer"]
    return runs


if __name__ == "__main__":
    cli()
