"""The export-target protocol: a new target is its own code plus one registry entry.

`raw-npz` below is a complete target written against `l4q_export.formats.base` only: it stores the fold's codes and
parameters in an .npz beside the model's config and tokenizer, reads them back with numpy, and runs the PyTorch
model on the decoded weights.  Registered from the test, it is picked up unchanged by `l4q-export` (its option
appears), `verify` (all three levels and the near-tie greedy rule) and `l4q-eval` (dispatch by `detect`).
Also here: the registry's shape (every built-in target satisfies the Protocol) and the near-tie rule on
hand-made logits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_checkpoint

from l4q_export import formats
from l4q_export.checkpoint import AtomicDir, Checkpoint, load_checkpoint
from l4q_export.fold import fold_checkpoint
from l4q_export.formats.base import Decoded, Exact, ExportReport, Target, Tolerance, max_abs_diff
from l4q_export.formats.runtime import ModuleBackend
from l4q_export.quant import QuantizedTensor, QuantSpec
from l4q_export.verify import near_tie_greedy

MARKER = "raw_npz.json"


class RawNpzReader:
    def __init__(self, artifact: Path) -> None:
        self.meta = json.loads((artifact / MARKER).read_text())
        self.npz = np.load(artifact / "weights.npz", allow_pickle=False)

    def names(self) -> Iterator[str]:
        return iter(self.meta["tensors"])

    def get(self, name: str) -> Decoded | torch.Tensor | None:
        kind = self.meta["tensors"].get(name)
        if kind is None:
            return None
        if kind == "float":
            return torch.from_numpy(self.npz[f"{name}|float"])
        fields = {k: self.npz[f"{name}|{k}"] for k in ("codes", "scale", "minimum")}
        return Decoded(name, fields, lambda qt: {"codes": qt.codes.numpy(), "scale": qt.scale.numpy(),
                                                 "minimum": qt.minimum.numpy()})

    def weight(self, name: str) -> torch.Tensor:
        d = self.get(name)
        if isinstance(d, torch.Tensor):
            return d
        f = {k: torch.from_numpy(v) for k, v in d.fields.items()}
        return QuantizedTensor(name, QuantSpec.from_dict(self.meta["spec"]), f["codes"], f["scale"], f["minimum"]).dequantize()


class RawNpzTarget:
    name = "raw-npz"
    lossy = None

    @property
    def options(self) -> list[click.Option]:
        return [click.Option(["--npz-compress/--no-npz-compress", "npz_compress"], default=False,
                             help="raw-npz: deflate the .npz.")]

    def capability(self, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> Exact:
        return Exact()

    def write(self, model_dir: Path, output: Path | None, allow_lossy: bool = False, npz_compress: bool = False
              ) -> ExportReport:
        ck = load_checkpoint(model_dir)
        arrays: dict[str, np.ndarray] = {}
        kinds: dict[str, str] = {}
        for name, t in fold_checkpoint(ck):
            if isinstance(t, QuantizedTensor):
                arrays.update({f"{name}|codes": t.codes.numpy(), f"{name}|scale": t.scale.numpy(),
                               f"{name}|minimum": t.minimum.numpy()})
                kinds[name] = "quantized"
            else:
                arrays[f"{name}|float"] = t.float().numpy()
                kinds[name] = "float"
        out = Path(output)
        with AtomicDir(out) as tmp:
            (np.savez_compressed if npz_compress else np.savez)(tmp / "weights.npz", **arrays)
            (tmp / MARKER).write_text(json.dumps({"spec": ck.spec.to_dict(), "tensors": kinds}))
            shutil.copyfile(ck.base_dir / "config.json", tmp / "config.json")
            for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
                if (ck.dir / f).is_file():
                    shutil.copyfile(ck.dir / f, tmp / f)
        n_q = sum(k == "quantized" for k in kinds.values())
        return ExportReport(target=self.name, artifact=str(out), n_quantized=n_q, n_exact=n_q, n_dense=0,
                            max_abs_error=0.0, bytes=(out / "weights.npz").stat().st_size)

    def detect(self, artifact: Path) -> bool:
        return (Path(artifact) / MARKER).is_file()

    def read_back(self, artifact: Path) -> RawNpzReader:
        return RawNpzReader(Path(artifact))

    def runtime(self, artifact: Path, threads: int | None = None, n_ctx: int | None = None) -> ModuleBackend:
        from transformers import AutoConfig, AutoModelForCausalLM

        artifact = Path(artifact)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(artifact)), dtype=torch.float32)
        reader = self.read_back(artifact)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if name in reader.meta["tensors"]:
                    p.copy_(reader.weight(name))
        return ModuleBackend(model, artifact, "torch[raw-npz]")

    def tolerance(self, artifact: Path) -> Tolerance:
        return Tolerance(min_top1=0.99, max_mean_kl=1e-6, max_abs_dlogit=1e-5, tie_margin=2e-5)

    def checks(self, artifact: Path, ck: Checkpoint, backend: Any) -> dict[str, dict[str, Any]]:
        return {}


@pytest.fixture
def raw_npz():
    formats.register(RawNpzTarget())
    yield formats.get_target("raw-npz")
    formats.unregister("raw-npz")


@pytest.fixture(scope="module")
def ck(tiny_base, tmp_path_factory) -> Path:
    return make_checkpoint(tiny_base, tmp_path_factory.mktemp("npz") / "ck", bits=4, group_size=32)


def test_every_registered_target_satisfies_the_protocol():
    for name in formats.available():
        t = formats.get_target(name)
        assert isinstance(t, Target) and t.name == name
        assert all(isinstance(o, click.Option) for o in t.options)


def test_example_target_through_export_verify_and_eval(raw_npz, ck, tmp_path):
    from l4q_export.cli import _export_command
    from l4q_export.eval.cli import main as eval_main
    from l4q_export.verify import main as verify_main

    out = tmp_path / "npz"
    res = CliRunner().invoke(_export_command(), ["--to", "raw-npz", str(ck), "-o", str(out), "--npz-compress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n_quantized"] == 14
    import zipfile

    with zipfile.ZipFile(out / "weights.npz") as z:  # the target's own option reached its writer
        assert z.getinfo("model.layers.0.mlp.up_proj.weight|codes.npy").compress_type == zipfile.ZIP_DEFLATED

    res = CliRunner().invoke(verify_main, [str(out), "--model", str(ck), "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["check"] == "raw-npz" and v["n_exact"] == v["n_quantized"] == 14 and v["runtime"] == "torch[raw-npz]"
    assert v["greedy"]["matched"] == v["greedy"]["required"] and v["logits"]["max_abs_dlogit"] < 1e-5

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little rabbit in the garden. " * 8)
    res = CliRunner().invoke(eval_main, [str(out), "--tasks", "ppl", "--text", str(text), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["backend"] == "torch[raw-npz]"


def test_example_target_tampering_is_caught(raw_npz, ck, tmp_path):
    from l4q_export.verify import run_verify

    out = tmp_path / "npz"
    raw_npz.write(ck, out)
    arrays = dict(np.load(out / "weights.npz"))
    arrays["model.layers.1.self_attn.v_proj.weight|codes"][0, :4] ^= 1
    np.savez(out / "weights.npz", **arrays)
    v = run_verify(out, ck, {})
    assert not v["passed"] and v["n_codes_identical"] == 13
    bad = [r for r in v["layers"] if not r["codes_identical"]]
    assert [r["tensor"] for r in bad] == ["model.layers.1.self_attn.v_proj.weight"] and bad[0]["fields_differing"] == ["codes"]


def test_unregistered_target_is_gone(ck, tmp_path):
    formats.register(RawNpzTarget())
    formats.get_target("raw-npz").write(ck, tmp_path / "npz")
    formats.unregister("raw-npz")
    assert "raw-npz" not in formats.available() and formats.detect_target(tmp_path / "npz") is None


def test_near_tie_rule():
    """Tokens must agree only before the reference's first top-2 margin below tie_margin; the rest is reported."""
    ref = np.array([[0.0, 1.0, 0.2], [0.5, 0.0, 2.0], [1.0, 1.0001, 0.0], [3.0, 0.0, 0.0]])  # margins .8, 1.5, 1e-4, 3
    ok = near_tie_greedy(ref, [1, 2, 0, 0], tie_margin=1e-2)  # takes the other side of the tie at 2
    assert ok["passed"] and (ok["tie_position"], ok["matched"], ok["required"]) == (2, 2, 2)
    assert (ok["after_tie_agreeing"], ok["after_tie_total"]) == (1, 2)
    bad = near_tie_greedy(ref, [1, 0, 1, 0], tie_margin=1e-2)  # differs at 1, where the margin is 1.5: a real error
    assert not bad["passed"] and bad["matched"] == 1 and bad["first_difference"] == 1
    clean = near_tie_greedy(ref[[0, 1, 3]], [1, 2, 0], tie_margin=1e-2)
    assert clean["passed"] and clean["tie_position"] is None and clean["matched"] == clean["required"] == 3


def test_capability_answers_and_the_demo_follows_them():
    """Each target answers for itself; demo's choice of checkpoint per target is that answer (no table of its own)."""
    from l4q_export.demo import zero_point_for
    from l4q_export.formats.base import Bounded, Refused

    gguf, onnx, st = (formats.get_target(n) for n in ("gguf", "onnx", "safetensors"))
    float4 = QuantSpec(4, 32, "float")
    assert isinstance(gguf.capability(float4, (64, 64), torch.float16), Exact)
    assert isinstance(gguf.capability(float4, (64, 64), torch.float32), Bounded)  # d, m stored as fp16
    assert isinstance(onnx.capability(float4, (64, 64), torch.float32), Exact)
    refused = onnx.capability(QuantSpec(4, 24, "float"), (64, 96), torch.float32)  # no power-of-two block >= 16
    assert isinstance(refused, Refused) and "--onnx-form qdq" in refused.fix
    assert isinstance(st.capability(float4, (64, 64), torch.float16), Bounded)
    assert isinstance(st.capability(QuantSpec(4, 32, "integer"), (64, 64), torch.float16), Exact)
    assert isinstance(st.capability(QuantSpec(5, 32, "integer"), (64, 64), torch.float16, flavor="gptq"), Refused)
    assert [zero_point_for(t, 4) for t in ("gguf", "onnx", "safetensors")] == ["float", "float", "integer"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, (1 << 20) + 3, 3 << 18])
def test_same_bits_is_byte_equality(dtype, n):
    """same_bits (64-bit words in slices) answers what comparing the raw bytes answers, with the difference in the
    last element, in a sign bit (-0.0 vs 0.0) and in the dtype."""
    from l4q_export.formats.base import same_bits

    a = (np.arange(n) % 97).astype(dtype)
    assert same_bits(a, a.copy()) and a.tobytes() == a.copy().tobytes()
    if n:
        b = a.copy()
        b[-1] = 1 if dtype == np.uint8 and a[-1] == 0 else -a[-1] if dtype != np.uint8 else 0
        assert not same_bits(a, b) and a.tobytes() != b.tobytes()
    if dtype != np.uint8:
        assert not same_bits(np.zeros(max(n, 1), dtype), -np.zeros(max(n, 1), dtype))
    assert not same_bits(a, a.astype(np.int64))


def test_max_abs_diff_in_slices_is_the_plain_max_and_keeps_nan_and_shape():
    """Row slices (300 columns: 873 rows per slice, so 3 slices) against the plain whole-tensor formula; the
    reference is rounded to the decoded weight's dtype; a NaN in the last slice and a shape mismatch are failures."""
    g = torch.Generator().manual_seed(3)
    want = torch.randn(2000, 300, generator=g)
    got = want + 1e-3 * torch.randn(2000, 300, generator=g)
    plain = float((got - want).abs().max())
    assert max_abs_diff(got, want) == plain
    assert max_abs_diff(got, lambda r0, r1: want[r0:r1], tuple(want.shape)) == plain
    half = got.half()
    assert max_abs_diff(half, want) == float((half.float() - want.half().float()).abs().max())
    got[1999, 299] = float("nan")
    assert np.isnan(max_abs_diff(got, want))
    assert max_abs_diff(got[:, :299], want) == float("inf")


def test_reference_logits_in_one_batch_are_each_sequence_alone(tiny_base, checkpoint_factory):
    """verify's one right-padded forward of every sequence (`reference_logits`) gives each sequence's logits as a
    forward of that sequence alone does: padding sits to the right of every real position, so causal attention
    never sees it (float tolerance only: a batched GEMM may block its sums differently)."""
    from l4q_export.training.methods import reference_model
    from l4q_export.verify import reference_logits

    model = reference_model(load_checkpoint(checkpoint_factory(tiny_base)))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 1, 11)]
    got = reference_logits(model, seqs)
    for s, r in zip(seqs, got, strict=True):
        with torch.no_grad():
            alone = model(torch.tensor([s])).logits[0].double().numpy()
        assert r.shape == alone.shape
        np.testing.assert_allclose(r, alone, rtol=0, atol=1e-5 * max(1.0, float(np.abs(alone).max())))


def test_module_backend_greedy_through_the_cache_is_the_full_recompute(tiny_base):
    """ModuleBackend decodes through transformers' KV cache; each row must be the last row of a full forward of the
    sequence so far (an independent, cache-free computation), and each token its argmax."""
    from l4q_export.training.surgery import load_base_model

    backend = ModuleBackend(load_base_model(tiny_base, dtype=torch.float32), tiny_base, "torch")
    prompt = [1, 17, 42, 99, 7]
    tokens, rows = backend.greedy(prompt, 12)
    assert len(tokens) == 12 and rows.shape[0] == 12
    for i, row in enumerate(rows):
        with torch.no_grad():
            full = backend.model(input_ids=torch.tensor([prompt + tokens[:i]])).logits[0, -1].numpy()
        np.testing.assert_allclose(row, full, rtol=0, atol=1e-5 * max(1.0, float(np.abs(full).max())))
        assert tokens[i] == int(np.argmax(row))


def test_one_ahead_keeps_order_a_window_of_two_and_errors_at_their_item():
    """The fold's and verify's read-back pipeline: results in input order, fn of item i + 2 never starts before
    item i is handed over (two results alive at most), and an error surfaces at its own item, after the earlier
    ones."""
    from l4q_export.fold import one_ahead

    events: list[tuple[str, int]] = []

    def fn(x: int) -> int:
        events.append(("start", x))
        if x == 4:
            raise ValueError("item 4")
        return x * 10

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for x, y in one_ahead(fn, range(6), "test"):
            events.append(("got", x))
            got.append((x, y))
    assert got == [(0, 0), (1, 10), (2, 20), (3, 30)]
    for x in range(3):
        assert events.index(("got", x)) < events.index(("start", x + 2))
    assert list(one_ahead(fn, [], "test")) == []
