"""Check quant/krecipe.py against the real `llama-quantize`: same ggml type for every tensor of tiny LLaMA models.

Writes tiny random LLaMA GGUFs (F16) with gguf-py -- one with 256-wide rows and a 640-wide ffn_down, untied, GQA 4;
one SmolLM2-like with 576-wide rows (not a multiple of 256), tied embeddings, GQA 3, 16 layers -- quantizes each to
the K file types with llama-quantize, reads the tensor types back with gguf.GGUFReader and compares with recipe();
and checks that every K-quant tensor's bytes round-trip quant.kquant's unpack_blocks -> pack_blocks unchanged.

    python tools/check_krecipe.py --llama-quantize /path/to/llama-quantize
    python tools/check_krecipe.py --build-from SDIST/vendor/llama.cpp --build-dir /tmp/build   # builds it first

Getting the source: `pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>` and unpack;
llama.cpp is under vendor/llama.cpp.  The build (target llama-quantize only) takes ~15-20 min on 2 cores.
Prints a JSON report; exit 1 on any mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import gguf
import numpy as np

from l4q_export.quant.kquant import KQUANT_SPECS, unpack_blocks
from l4q_export.quant.krecipe import FILE_TYPES, ArchInfo, recipe


@dataclass(frozen=True)
class TinyLlama:
    name: str
    hidden: int
    ffn: int
    n_layers: int
    n_head: int
    n_head_kv: int
    vocab: int
    tied: bool

    @property
    def arch(self) -> ArchInfo:
        return ArchInfo(n_head=self.n_head, n_head_kv=self.n_head_kv, tied_embeddings=self.tied)


MODELS = (
    TinyLlama("w256_ffn640_untied", hidden=256, ffn=640, n_layers=8, n_head=4, n_head_kv=1, vocab=512, tied=False),
    TinyLlama("w576_smollm2_like_tied", hidden=576, ffn=512, n_layers=16, n_head=9, n_head_kv=3, vocab=256, tied=True),
)


def tensor_shapes(m: TinyLlama) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> PyTorch-order shapes, as convert_hf_to_gguf names a LLaMA model."""
    kv = m.hidden // m.n_head * m.n_head_kv
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (m.vocab, m.hidden), "output_norm.weight": (m.hidden,)}
    if not m.tied:
        out["output.weight"] = (m.vocab, m.hidden)
    for i in range(m.n_layers):
        p = f"blk.{i}."
        out |= {
            p + "attn_norm.weight": (m.hidden,),
            p + "attn_q.weight": (m.hidden, m.hidden),
            p + "attn_k.weight": (kv, m.hidden),
            p + "attn_v.weight": (kv, m.hidden),
            p + "attn_output.weight": (m.hidden, m.hidden),
            p + "ffn_norm.weight": (m.hidden,),
            p + "ffn_gate.weight": (m.ffn, m.hidden),
            p + "ffn_up.weight": (m.ffn, m.hidden),
            p + "ffn_down.weight": (m.hidden, m.ffn),
        }
    return out


def write_tiny_llama(path: Path, m: TinyLlama, seed: int = 0) -> None:
    """A loadable F16 LLaMA GGUF with random weights and a byte-level dummy vocabulary."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(m.hidden)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.ffn)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    w.add_rope_dimension_count(m.hidden // m.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(m.vocab)])
    w.add_token_scores([0.0] * m.vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * m.vocab)
    for name, shape in tensor_shapes(m).items():
        a = (rng.standard_normal(shape) * 0.02).astype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(binary: Path | None, src: Path, dst: Path, file_type: str) -> None:
    """Quantize with the llama-quantize binary, or (binary None) with the same llama.cpp code in the libllama that
    llama-cpp-python ships (llama_model_quantize: llama-quantize's own entry point, without the CLI)."""
    if binary is None:
        import ctypes

        import llama_cpp

        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
        p.nthread = 2
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
            raise RuntimeError(f"llama_model_quantize {file_type} failed")
        return
    r = subprocess.run([str(binary), str(src), str(dst), file_type, "2"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {file_type} failed:\n{r.stderr[-2000:]}")


def compare(path: Path, m: TinyLlama, file_type: str) -> list[dict[str, str]]:
    """Tensors whose type in the quantized file differs from recipe() (empty = identical lists)."""
    shapes = tensor_shapes(m)
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    if set(got) != set(shapes):
        raise RuntimeError(f"{path}: unexpected tensor set {sorted(set(got) ^ set(shapes))}")
    bad = []
    for name, shape in shapes.items():
        want = recipe(file_type, name, shape, m.n_layers, m.arch)
        want = want if want is not None else (gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16)
        if got[name] != want:
            bad.append({"tensor": name, "llama_quantize": got[name].name, "recipe": want.name})
    return bad


def layout_mismatches(path: Path) -> list[str]:
    """K-quant tensors whose bytes, as llama.cpp wrote them, do not survive quant.kquant's unpack -> pack."""
    bad = []
    for t in gguf.GGUFReader(str(path)).tensors:
        name = t.tensor_type.name.lower()
        if name not in KQUANT_SPECS:
            continue
        cols, rows = (int(x) for x in t.shape[:2])
        raw = np.asarray(t.data, dtype=np.uint8)
        if not np.array_equal(unpack_blocks(KQUANT_SPECS[name], raw, (rows, cols)).pack().reshape(-1), raw.reshape(-1)):
            bad.append(t.name)
    return bad


def check(binary: Path | None, work: Path, file_types: tuple[str, ...] = tuple(FILE_TYPES)) -> dict:
    """Run every model x file type; the JSON-able report."""
    report: dict = {"quantizer": str(binary) if binary else "libllama (llama-cpp-python)", "results": []}
    for m in MODELS:
        src = work / f"{m.name}.f16.gguf"
        write_tiny_llama(src, m)
        for ft in file_types:
            dst = work / f"{m.name}.{ft}.gguf"
            quantize(binary, src, dst, ft)
            types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
            mism = compare(dst, m, ft)
            used = sorted(set(types.values()))
            row = {"model": m.name, "file_type": ft, "n_tensors": len(types), "types_used": used, "mismatches": mism}
            row["layout_mismatches"] = layout_mismatches(dst)
            report["results"].append(row)
            dst.unlink()
    report["ok"] = all(not r["mismatches"] and not r["layout_mismatches"] for r in report["results"])
    return report


def build(source: Path, build_dir: Path, jobs: int) -> Path:
    """Configure and build only llama-quantize (CPU, no network features); returns the binary."""
    cfg = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
    ]
    subprocess.run(cfg, check=True, capture_output=True)
    make = ["cmake", "--build", str(build_dir), "--target", "llama-quantize", f"-j{jobs}"]
    subprocess.run(make, check=True, capture_output=True)
    return build_dir / "bin" / "llama-quantize"


@click.command(help=__doc__)
@click.option(
    "--llama-quantize",
    "binary",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Path of a built llama-quantize binary (default: llama-cpp-python's libllama).",
)
@click.option(
    "--build-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="llama.cpp source tree (e.g. the llama-cpp-python sdist's vendor/llama.cpp) to build llama-quantize from.",
)
@click.option(
    "--build-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/tmp/build-llama-quantize"),
    show_default=True,
    help="CMake build directory for --build-from.",
)
@click.option("--jobs", default=2, show_default=True, help="Parallel compile jobs for --build-from.")
@click.option(
    "--file-type",
    "file_types",
    multiple=True,
    type=click.Choice(sorted(FILE_TYPES)),
    help="File types to check (repeatable; default: all).",
)
def main(binary: Path | None, build_from: Path | None, build_dir: Path, jobs: int, file_types: tuple[str, ...]) -> None:
    if binary is not None and build_from is not None:
        raise click.UsageError("give at most one of --llama-quantize and --build-from")
    if build_from is not None:
        binary = build(build_from, build_dir, jobs)
    with tempfile.TemporaryDirectory() as tmp:
        report = check(binary, Path(tmp), file_types or tuple(FILE_TYPES))
    click.echo(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
