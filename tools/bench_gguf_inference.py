"""llama.cpp prompt and generation speed of our GGUF vs the peer's GGUF of the same types on the same model.

    ours   l4q-export --to gguf of an L4Q checkpoint: the trained codes in Q4_1 blocks, F16 embeddings and head
    peer   llama.cpp's convert_hf_to_gguf.py --outtype f16 of the checkpoint's base, then llama_model_quantize to
           Q4_1 with token_embedding_type and output_tensor_type F16 -- every tensor the same ggml type as ours, so the
           comparison is of the files, not of the kernels (the weights differ by the LoRA merge; speed does not
           depend on the values)

Both files are loaded once in llama-cpp-python and timed round-robin (--rounds, median reported): prompt processing
of --prompt fixed token ids in one batch, then --gen single-token decode steps with the KV cache.  Expect 1.0x.

    python tools/bench_gguf_inference.py --ck /tmp/bench_export/l4q-float/L2 --work /tmp/bench_infer --json out.json

The default checkpoint is the 2-layer LLaMA-2-7B-shaped fixture of tools/bench_export.py (run that first).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf_vs_llamacpp import bin_, find_converter, run_measured  # noqa: E402


def peer_q4_1(converter: Path, base: Path, work: Path, threads: int) -> Path:
    import llama_cpp

    out = work / "peer-q4_1.gguf"
    if out.is_file():
        return out
    f16 = work / "peer-f16.gguf"
    run_measured(str(converter), [str(base), "--outtype", "f16", "--outfile", str(f16)], cwd=work)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise click.ClickException("llama_model_quantize failed")
    f16.unlink()
    return out


def ours_gguf(ck: Path, work: Path) -> Path:
    out = work / "ours.gguf"
    if not out.is_file():
        run_measured(bin_("l4q-export"), [str(ck), "--to", "gguf", "-o", str(out)])
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """ggml type name -> number of tensors (the two files must agree)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def time_model(llm: Any, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one round: a fresh KV cache, the prompt in one batch, then `gen`
    single-token steps (fixed ids: the speed of a decode step does not depend on which token it is)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for i in range(gen):
        llm.eval([prompt[i % len(prompt)]])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


@click.command()
@click.option("--ck", type=click.Path(path_type=Path), default=Path("/tmp/bench_export/l4q-float/L2"), show_default=True,
              help="An L4Q checkpoint with float offsets (exported to Q4_1 by auto).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bench_infer"), show_default=True)
@click.option("--sdist-dir", type=click.Path(path_type=Path), default=Path.home() / ".cache/l4q-export/sdist",
              show_default=True, help="Where the llama-cpp-python sdist (llama.cpp's converter) is or is fetched to.")
@click.option("--prompt", "n_prompt", type=int, default=128, show_default=True, help="Prompt tokens (one batch).")
@click.option("--gen", type=int, default=32, show_default=True, help="Single-token decode steps timed.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Round-robin repetitions (median reported).")
@click.option("--threads", type=int, default=2, show_default=True, help="llama.cpp threads.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results here.")
def main(ck: Path, work: Path, sdist_dir: Path, n_prompt: int, gen: int, rounds: int, threads: int,
         json_path: Path | None) -> None:
    """Time our GGUF and the peer's, same types, same model, in one process."""
    import llama_cpp

    from l4q_export.checkpoint import load_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    base = load_checkpoint(ck, check_hashes=False).base_dir
    files = {"ours": ours_gguf(ck, work), "peer": peer_q4_1(find_converter(sdist_dir), base, work, threads)}
    types = {k: tensor_types(p) for k, p in files.items()}
    if types["ours"] != types["peer"]:
        click.echo(f"warning: tensor types differ: {types}", err=True)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompt = [(1 + 7919 * i) % vocab for i in range(n_prompt)]
    llms = {k: llama_cpp.Llama(model_path=str(p), n_ctx=n_prompt + gen + 8, n_batch=n_prompt, n_threads=threads,
                               n_threads_batch=threads, verbose=False) for k, p in files.items()}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in files}
    for k in files:  # warm-up (page in the weights)
        time_model(llms[k], prompt[:8], 2)
    for _ in range(rounds):
        for k in files:
            samples[k].append(time_model(llms[k], prompt, gen))
    res: dict[str, Any] = {"checkpoint": str(ck), "prompt_tokens": n_prompt, "gen_tokens": gen, "threads": threads,
                           "rounds": rounds, "types": types}
    for k, p in files.items():
        res[k] = {"bytes": p.stat().st_size, "prompt_tok_s": statistics.median(s[0] for s in samples[k]),
                  "gen_tok_s": statistics.median(s[1] for s in samples[k]), "samples": samples[k]}
    res["prompt_ratio_ours_over_peer"] = res["ours"]["prompt_tok_s"] / res["peer"]["prompt_tok_s"]
    res["gen_ratio_ours_over_peer"] = res["ours"]["gen_tok_s"] / res["peer"]["gen_tok_s"]
    click.echo(f"\nllama.cpp {llama_cpp.__version__}, {threads} threads, {ck.name}: prompt {n_prompt} tokens, {gen} decode steps")
    click.echo(f"{'':<6} {'file MB':>8} {'prompt tok/s':>12} {'gen tok/s':>10}")
    for k in files:
        r = res[k]
        click.echo(f"{k:<6} {r['bytes'] / 1e6:>8.1f} {r['prompt_tok_s']:>12.1f} {r['gen_tok_s']:>10.2f}")
    click.echo(f"ours/peer: prompt {res['prompt_ratio_ours_over_peer']:.3f}x, generation {res['gen_ratio_ours_over_peer']:.3f}x")
    if json_path:
        json_path.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
