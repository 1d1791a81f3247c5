"""Packed safetensors export (compressed-tensors pack-quantized, GPTQ v2 / v1): golden values from the real libraries.

Independent sides: compressed-tensors' own `pack_to_int32` / `unpack_from_int32` / decompressor and pydantic
config model, transformers' `from_pretrained` + `CompressedTensorsConfig` / `GPTQConfig`, the safetensors
library, published GPTQ qzeros constants, and the fold (the training forward's integers, checked bit-identical
to the training model by the core tests).  GPTQModel itself is checked outside CI with tools/bench_safetensors.py
(it pins another torch); see docs/safetensors.md for those numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from conftest import require_shared
from safetensors import safe_open

from l4q_export.errors import FidelityError, L4QInputError
from l4q_export.fold import fold
from l4q_export.formats import get_target
from l4q_export.formats.safetensors import layout as L
from l4q_export.formats.safetensors import writer as W
from l4q_export.quant import SUPPORTED_BITS, QuantizedTensor, QuantSpec
from l4q_export.verify import verify_artifact

TARGET = get_target("safetensors")
# The loaded model and the reference are both PyTorch fp32 with the same weights; they differ only where the training
# layer's forward orders its sums differently from a dense Linear (measured 2.4e-7 on the tiny models).
DLOGIT = 1e-5
# stories260K's logits reach 19.5, and the same fp32 reordering noise grows with them: 1.14e-5 measured (fp16 grid).
DLOGIT_STORIES = 5e-5


class ST:
    """The target's API under one short name."""

    _encode = staticmethod(W._encode)
    detect = staticmethod(TARGET.detect)

    @staticmethod
    def export(model_dir: Path, out: Path, **kw) -> dict:
        return TARGET.write(model_dir, out, **kw).to_dict()

    @staticmethod
    def verify(artifact: Path, model_dir: Path) -> dict:
        return verify_artifact(TARGET, Path(artifact), Path(model_dir))

pytestmark = pytest.mark.runtime
CT_BITS = SUPPORTED_BITS  # every width training produces


def _qt(bits: int, n: int, k: int, g: int, zero_point: str = "integer", seed: int = 0, zero=None) -> QuantizedTensor:
    """A QuantizedTensor with random codes/zeros and fp16-representable scales."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, g, zero_point)
    groups = -(-k // spec.group_len(k))
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).half().float()
    if zero is None:
        zero = (torch.full((n, groups), float(1 << (bits - 1))) if zero_point == "symmetric"
                else torch.randint(0, 1 << bits, (n, groups), generator=gen).float())
    return QuantizedTensor("model.layers.0.mlp.up_proj.weight", spec, codes, scale, -(scale * zero), zero)


def _signed(u: torch.Tensor, bits: int) -> torch.Tensor:
    return (u.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)


# ---------------------------------------------------------------- packing vectors (libraries' own packers)

@pytest.mark.parametrize("bits", CT_BITS)
@pytest.mark.parametrize("k", [64, 172])  # 172: the stories260K MLP width, not a whole number of 32-value runs
def test_ct_packing_equals_compressed_tensors(bits, k):
    qt = _qt(bits, 24, k, -1, seed=bits)
    out = L.ct_tensors(qt, qt.zero, torch.float16)
    assert torch.equal(out["weight_packed"], pack_to_int32(_signed(qt.codes, bits), bits))
    assert torch.equal(out["weight_zero_point"], pack_to_int32(_signed(qt.zero, bits), bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(out["weight_packed"], bits, torch.Size([24, k])), _signed(qt.codes, bits))
    assert out["weight_shape"].tolist() == [24, k] and out["weight_scale"].dtype == torch.float16


@pytest.mark.parametrize("bits", L.GPTQ_BITS)
def test_gptq_packing_is_the_dense_bitstream_along_k_and_n(bits):
    """qweight [K*b/32, N] packed along K, qzeros [G, N*b/32] along N: the same LSB-first stream compressed-tensors
    packs (its packer, applied on the GPTQ axes, is the independent side)."""
    qt = _qt(bits, 64, 128, 32, seed=bits)
    out = L.gptq_tensors(qt, qt.zero, v1=False)
    assert torch.equal(out["qweight"], pack_to_int32(_signed(qt.codes, bits).T.contiguous(), bits, packed_dim=0))
    assert torch.equal(out["qzeros"], pack_to_int32(_signed(qt.zero, bits).T.contiguous(), bits, packed_dim=1))
    assert out["scales"].dtype == torch.float16 and torch.equal(out["scales"].float(), qt.scale.T)
    assert out["g_idx"].tolist() == [i // 32 for i in range(128)]


def _u32(words: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in words.flatten()]


@pytest.mark.parametrize(("bits", "v1", "words"), [
    # symmetric zero points 2^(b-1) in every field: v2 stores z, v1 stores z - 1 (0x77777777 is the well-known
    # 4-bit symmetric GPTQ qzeros word; GPTQModel's v1<->v2 converters add/subtract 0x55555555, 0x11111111,
    # 0x01010101 = "1 in every field" for 2/4/8 bits)
    (4, False, [0x88888888]), (4, True, [0x77777777]),
    (8, False, [0x80808080]), (8, True, [0x7F7F7F7F]),
    (2, False, [0xAAAAAAAA]), (2, True, [0x55555555]),
    # 3-bit, GPTQ's 10 | 1 straddling | 10 | 1 | 10 layout: z - 1 = 3 in all 32 fields
    (3, True, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]),
])
def test_gptq_symmetric_qzeros_words(bits, v1, words):
    qt = _qt(bits, 32, 64, 32, zero_point="symmetric")
    qz = L.gptq_tensors(qt, qt.zero, v1=v1)["qzeros"]
    n_words = len(words)
    assert _u32(qz[:, :n_words]) == words * qz.shape[0]


def test_gptq_3bit_straddling_fields():
    """Values 0..7 repeated: v10 is split over words 0/1 (low 2 bits at 30-31), v21 over words 1/2."""
    vals = torch.tensor([i % 8 for i in range(32)], dtype=torch.uint8)
    qt = QuantizedTensor("x.weight", QuantSpec(3, -1, "integer"), vals.repeat(32, 1), torch.ones(32, 1),
                         torch.zeros(32, 1), torch.zeros(32, 1))
    w = _u32(L.gptq_tensors(qt, qt.zero, v1=False)["qweight"][:, 0])  # the 3 words of output row 0
    v = vals.tolist()
    assert (w[0] >> 30) & 3 == v[10] & 3 and w[1] & 1 == v[10] >> 2
    assert (w[1] >> 31) & 1 == v[21] & 1 and w[2] & 3 == v[21] >> 1
    assert [(w[0] >> 3 * i) & 7 for i in range(10)] == v[:10]
    assert [(w[1] >> (1 + 3 * i)) & 7 for i in range(10)] == v[11:21]
    assert [(w[2] >> (2 + 3 * i)) & 7 for i in range(10)] == v[22:]


# ---------------------------------------------------------------- zero points: v1 / v2, z = 0

def test_zero_point_zero_survives_v2_and_ct_and_is_refused_by_v1():
    zero = torch.zeros(64, 4)
    zero[1::2] = 15  # z = 0 next to z = 15: a v1 borrow would corrupt the neighbour
    qt = _qt(4, 64, 128, 32, zero=zero)
    qz = L.gptq_tensors(qt, qt.zero, v1=False)["qzeros"]
    got = unpack_from_int32(qz, 4, torch.Size([4, 64]), packed_dim=1).to(torch.int32) + 8
    assert torch.equal(got, zero.T.to(torch.int32))
    zp = L.ct_tensors(qt, qt.zero, torch.float32)["weight_zero_point"]
    assert torch.equal(unpack_from_int32(zp, 4, torch.Size([64, 4]), packed_dim=0).to(torch.int32) + 8, zero.to(torch.int32))
    with pytest.raises(FidelityError, match="zero point 0"):
        ST._encode("gptq-v1", qt, False, torch.float32)


def test_v1_asymmetric_with_all_zero_points_at_least_one_is_exact():
    qt = _qt(4, 64, 128, 32, zero=torch.randint(1, 16, (64, 4)).float())
    qz = L.gptq_tensors(qt, qt.zero, v1=True)["qzeros"]
    got = unpack_from_int32(qz, 4, torch.Size([4, 64]), packed_dim=1).to(torch.int32) + 8 + 1  # loaders add 1 back
    assert torch.equal(got, qt.zero.T.to(torch.int32))


# ---------------------------------------------------------------- configs validate against the real schemas

@pytest.fixture(scope="module")
def int4_ck(tmp_path_factory, tiny_base):
    from conftest import make_checkpoint

    return make_checkpoint(tiny_base, tmp_path_factory.mktemp("st") / "ck", bits=4, group_size=32, zero_point="integer",
                           fp16_grid=True)


@pytest.mark.parametrize(("bits", "zp", "g"), [(4, "integer", 32), (8, "integer", -1), (3, "symmetric", 64)])
def test_ct_config_validates_against_compressed_tensors_and_transformers(bits, zp, g):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    cfg = L.ct_quantization_config(QuantSpec(bits, g, zp), ["model.layers.0.mlp.down_proj"])
    parsed = QuantizationConfig.model_validate(cfg)
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric, w.group_size) == (bits, zp == "symmetric", None if g == -1 else g)
    assert str(getattr(w.strategy, "value", w.strategy)) == ("channel" if g == -1 else "group")
    assert str(getattr(parsed.quantization_status, "value", parsed.quantization_status)) == "compressed"
    assert CompressedTensorsConfig.from_dict(cfg).quantization_config.format == "pack-quantized"


@pytest.mark.parametrize("v1", [False, True])
def test_gptq_config_validates_against_transformers(v1):
    from transformers import GPTQConfig

    cfg = L.gptq_quantization_config(QuantSpec(3, 32, "symmetric"), v1, [], ["model.layers.0.mlp.up_proj"], "0")
    parsed = GPTQConfig.from_dict(cfg)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (3, 32, False, True)
    assert parsed.to_dict()["checkpoint_format"] == ("gptq" if v1 else "gptq_v2")


def test_gptq_config_excludes_dense_layers_for_both_loaders():
    dense = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    packed = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    cfg = L.gptq_quantization_config(QuantSpec(4, 32, "integer"), False, dense, packed, "0")
    assert cfg["modules_in_block_to_quantize"] == [["self_attn.q_proj", "mlp.up_proj"]]
    assert set(cfg["dynamic"]) == {"-:^model[.]layers[.]0[.]mlp[.]down_proj$", "-:^model[.]layers[.]1[.]mlp[.]down_proj$"}
    with pytest.raises(FidelityError, match="packed in some blocks"):
        L.gptq_quantization_config(QuantSpec(4, 32, "integer"), False, dense[:1], [*packed, dense[1]], "0")


# ---------------------------------------------------------------- end to end on the tiny model (transformers CPU)

def _fold_weights(ck: Path) -> dict[str, torch.Tensor]:
    return {n: t.dequantize() for n, t in fold(ck) if isinstance(t, QuantizedTensor)}


def test_ct_round_trip_through_transformers_is_bit_exact(int4_ck, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rep = ST.export(int4_ck, tmp_path / "ct")
    assert rep["exact"] and rep["n_packed"] == rep["n_quantized"] == 14 and rep["n_dense"] == 0
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32, local_files_only=True,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
    params = dict(m.named_parameters())
    for name, w in _fold_weights(int4_ck).items():
        assert torch.equal(params[name].detach(), w), name
    v = ST.verify(tmp_path / "ct", int4_ck)
    assert v["passed"] and v["n_exact"] == 14 and v["logits"]["max_abs_dlogit"] < DLOGIT, v["summary"]
    assert v["checks"]["loader"]["passed"] and v["greedy"]["matched"] == v["greedy"]["required"]
    assert ST.detect(tmp_path / "ct") and not ST.detect(tmp_path)


@pytest.mark.parametrize(("bits", "zp"), [(4, "integer"), (3, "symmetric")])
def test_read_back_decodes_as_the_library_decompressor(tiny_base, checkpoint_factory, tmp_path, bits, zp):
    """verify's compressed-tensors read-back calls the decompressor's steps one by one (each field unpacked once):
    its weight must be `PackedQuantizationCompressor.decompress`'s, bit for bit, and its codes the library's unpack."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from l4q_export.formats.safetensors.check import ct_rows, decode_ct

    ck = checkpoint_factory(tiny_base, bits=bits, group_size=32, zero_point=zp, fp16_grid=True)
    ST.export(ck, tmp_path / "ct")
    art = TARGET.read_back(tmp_path / "ct")
    modules = sorted(n.removesuffix(".weight_packed") for n in art.reader.names() if n.endswith(".weight_packed"))
    assert len(modules) == 14
    for m in modules:
        sd = {k: art.reader.get(f"{m}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
              if f"{m}.{k}" in art.reader}
        got = decode_ct(art.reader, m, art.scheme, bits)
        assert torch.equal(got["weight"], PackedQuantizationCompressor.decompress(sd, art.scheme)["weight"]), m
        shape = torch.Size(sd["weight_shape"].tolist())
        assert torch.equal(got["codes"], unpack_from_int32(sd["weight_packed"], bits, shape).to(torch.int16) + (1 << (bits - 1)))
        _shape, _dtype, rows = ct_rows(art.reader, m, art.scheme, bits)  # verify's slices: any cut, the same bits
        parts = [rows(r0, min(r0 + 5, shape[0])) for r0 in range(0, shape[0], 5)]
        for key in ("codes", "zero", "weight"):
            assert torch.equal(torch.cat([d[key] for d in parts]), got[key]), (m, key)


@pytest.mark.parametrize("flavor", ["compressed-tensors", "gptq"])
def test_row_slices_catch_a_changed_last_row(tiny_base, checkpoint_factory, tmp_path, monkeypatch, flavor):
    """verify walks packed tensors in slices of rows (`Decoded.rows`), one slice at these tiny sizes.  With one row
    per slice, codes changed in the last output row of one linear must fail that linear alone, with the report
    one whole slice gives."""
    from safetensors.torch import load_file, save_file

    from l4q_export import verify as V

    ck = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="integer", fp16_grid=True)
    out = Path(ST.export(ck, tmp_path / "out", flavor=flavor)["artifact"])
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    module = "model.layers.1.mlp.down_proj"
    if flavor == "gptq":  # qweight [K/8, N]: output row n is column n
        tensors[f"{module}.qweight"][-1, -1] ^= 0x11
    else:  # weight_packed [N, K/8]
        tensors[f"{module}.weight_packed"][-1, -1] ^= 0x11
    save_file(tensors, str(shard), metadata={"format": "pt"})
    whole = V.verify_tensors(TARGET, out, ck)["layers"]
    monkeypatch.setattr(V, "ROW_SLICE_ELEMENTS", 1)
    sliced = V.verify_tensors(TARGET, out, ck)["layers"]
    assert [r["tensor"] for r in sliced if not r["codes_identical"]] == [module + ".weight"]
    bad = next(r for r in sliced if r["tensor"] == module + ".weight")
    assert bad["fields_differing"] == ["codes"] and not bad["within_bound"]
    assert all(r["max_abs_error"] == 0.0 for r in sliced if r["tensor"] != module + ".weight")
    assert sliced == whole

@pytest.mark.parametrize(("bits", "zp", "flavor"), [(8, "integer", "gptq"), (3, "symmetric", "gptq-v1"),
                                                    (2, "integer", "compressed-tensors")])
def test_other_widths_and_flavors_verify(tiny_base, checkpoint_factory, tmp_path, bits, zp, flavor):
    ck = checkpoint_factory(tiny_base, bits=bits, group_size=32, zero_point=zp, fp16_grid=True)
    rep = ST.export(ck, tmp_path / "out", flavor=flavor)
    assert rep["exact"] and rep["n_packed"] == 14, rep
    v = ST.verify(Path(rep["artifact"]), ck)
    assert v["passed"] and v["n_exact"] == 14 and v["logits"]["max_abs_dlogit"] < DLOGIT, v["summary"]
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if flavor.startswith("gptq"):
        assert qcfg["checkpoint_format"] == ("gptq" if flavor == "gptq-v1" else "gptq_v2") and not qcfg["desc_act"]
        assert json.loads((tmp_path / "out" / "quantize_config.json").read_text()) == qcfg


def test_scale_dtype_is_the_model_dtype_only_where_every_product_fits_it():
    """compressed-tensors decodes (q - z) * s in the scale's dtype: a 16-bit scale only where that is exact.  The
    oracle is that formula in fp16 arithmetic, written out here."""
    qt = _qt(4, 64, 128, 32)  # fp16-representable scales with full 11-bit mantissas
    fp16_decode = (qt.codes.half() - qt.zero.repeat_interleave(32, 1).half()) * qt.scale.repeat_interleave(32, 1).half()
    assert not torch.equal(fp16_decode.float(), qt.dequantize())  # an fp16 scale would round W_q
    assert not L.decodes_exactly(qt, qt.zero, torch.float16) and L.decodes_exactly(qt, qt.zero, torch.float32)
    pow2 = torch.exp2(torch.floor(torch.log2(qt.scale)))  # one significant bit: every product fits fp16
    exact = QuantizedTensor(qt.name, qt.spec, qt.codes, pow2, -(pow2 * qt.zero), qt.zero)
    assert L.decodes_exactly(exact, exact.zero, torch.float16)
    assert not L.decodes_exactly(exact, exact.zero, torch.bfloat16) or torch.equal(
        ((exact.codes.bfloat16() - exact.zero.repeat_interleave(32, 1).bfloat16())
         * pow2.repeat_interleave(32, 1).bfloat16()).float(), exact.dequantize())


def test_fp16_base_decodes_to_the_training_weights(tiny_base, checkpoint_factory, tmp_path):
    """An fp16 base with fp16-grid scales: the stored scale is fp32 wherever an fp16 one would make the library's
    decode round W_q, and compressed-tensors' decompressor then gives the fold's W_q bit for bit."""
    import shutil

    from l4q_export.training.surgery import load_base_model

    base = tmp_path / "base16"
    shutil.copytree(tiny_base, base)
    load_base_model(tiny_base).half().save_pretrained(str(base))
    ck = checkpoint_factory(base, bits=4, group_size=32, zero_point="integer", fp16_grid=True)
    rep = ST.export(ck, tmp_path / "ct")
    assert rep["exact"] and {r["scale_dtype"] for r in rep["layers"] if r.get("encoding") == "packed"} == {"float32"}
    art = TARGET.read_back(tmp_path / "ct")
    folded = {n: t for n, t in fold(ck) if isinstance(t, QuantizedTensor)}
    for name, qt in folded.items():
        got = art.get(name).whole_weight()
        assert got.dtype == torch.float32 and torch.equal(got, qt.dequantize()), name
    v = ST.verify(tmp_path / "ct", ck)
    assert v["passed"] and v["checks"]["loader"]["passed"] and v["logits"]["max_abs_dlogit"] < DLOGIT, v["summary"]


# ---------------------------------------------------------------- shards, atomicity

def test_small_shard_size_gives_a_consistent_index(int4_ck, tmp_path):
    out = tmp_path / "sharded"
    rep = ST.export(int4_ck, out, shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n == rep["n_shards"] >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert key not in seen, f"{key} in {seen.get(key)} and {shard}"
                seen[key] = shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    assert not list(out.glob(".shard-*"))
    assert ST.verify(out, int4_ck)["passed"]


def test_failure_midway_leaves_nothing(int4_ck, tmp_path, monkeypatch):
    real = W.fold_checkpoint

    def broken(ck):
        for i, item in enumerate(real(ck)):
            if i == 6:
                raise L4QInputError("simulated failure while folding")
            yield item

    monkeypatch.setattr(W, "fold_checkpoint", broken)
    with pytest.raises(L4QInputError, match="simulated"):
        ST.export(int4_ck, tmp_path / "out", shard_size="10KB")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- refusals and bad input (API and CLI)

def _cli(*args: str):
    from l4q_export.cli import _export_command

    return CliRunner().invoke(_export_command(), ["--to", "safetensors", *args])


def test_float_offsets_refused_with_choices_then_lossy_reports_error(tiny_base, checkpoint_factory, tmp_path):
    ck = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="float", fp16_grid=True)
    res = _cli(str(ck), "-o", str(tmp_path / "out"))
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    for choice in ("--zero-point integer", "GGUF or ONNX", "--allow-lossy"):
        assert choice in res.output
    rep = ST.export(ck, tmp_path / "lossy", allow_lossy=True)
    assert not rep["exact"] and rep["zero_point"] == "rounded"
    errors = [r["max_abs_error"] for r in rep["layers"]]
    assert any(e > 0 for e in errors) and rep["max_abs_error"] == max(errors)
    v = ST.verify(tmp_path / "lossy", ck)
    assert "LOSSY" in v["summary"]
    # stored codes and rounded zero points are what the export claims, and the decoded weights stay within d/2
    assert all(r["codes_identical"] and r["within_bound"] and r["declared_bound"] > 0 for r in v["layers"])
    errs = {r["tensor"]: r["max_abs_error"] for r in v["layers"]}
    assert errs == pytest.approx({r["tensor"]: r["max_abs_error"] for r in rep["layers"]})
    assert set(errs) == set(_fold_weights(ck))


def test_gptq_refuses_unsupported_bits_and_fp32_scales(tiny_base, checkpoint_factory, tmp_path):
    ck5 = checkpoint_factory(tiny_base, bits=5, group_size=32, zero_point="integer", fp16_grid=True)
    res = _cli(str(ck5), "-o", str(tmp_path / "g5"), "--flavor", "gptq")
    assert res.exit_code == 2 and "GPTQ holds 2/3/4/8-bit" in res.output and not (tmp_path / "g5").exists()
    ck32 = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="integer", fp16_grid=False)
    with pytest.raises(FidelityError, match="fp16 grid"):
        ST.export(ck32, tmp_path / "g4", flavor="gptq")
    assert not (tmp_path / "g4").exists()
    # compressed-tensors keeps fp32 scales exactly instead
    assert ST.export(ck32, tmp_path / "ct", flavor="compressed-tensors")["exact"]


def test_bad_input(int4_ck, tmp_path):
    res = _cli(str(tmp_path / "missing"), "-o", str(tmp_path / "o1"))
    assert res.exit_code == 2 and res.output.startswith("error:") and not (tmp_path / "o1").exists()
    res = _cli(str(int4_ck), "-o", str(tmp_path / "o2"), "--shard-size", "lots")
    assert res.exit_code == 2 and "--shard-size" in res.output and not (tmp_path / "o2").exists()
    ST.export(int4_ck, tmp_path / "ok")
    shard = next((tmp_path / "ok").glob("model-*.safetensors"))
    shard.write_bytes(b"\x00" * 7)
    with pytest.raises(L4QInputError, match="corrupt safetensors"):
        ST.verify(tmp_path / "ok", int4_ck)
    shard.unlink()
    with pytest.raises(L4QInputError, match="missing"):
        ST.verify(tmp_path / "ok", int4_ck)


def test_corrupt_adapter_is_input_error(tiny_base, checkpoint_factory, tmp_path):
    ck = checkpoint_factory(tiny_base, bits=4, group_size=32, zero_point="integer")
    (ck / "l4q_adapter.safetensors").write_bytes(b"not a safetensors file")
    res = _cli(str(ck), "-o", str(tmp_path / "out"))
    assert res.exit_code == 2 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the real stories260K model

@pytest.mark.slow
@pytest.mark.shared
def test_stories260k_integer_zero_points(tmp_path):
    """stories260K really trained with integer zero points: MLP width 172 is not a multiple of group 32, so down_proj
    is stored dense (exact) and excluded in the config; everything else is packed and loads bit-exactly."""
    from l4q_export.training.trainer import TrainArgs, train

    ck = tmp_path / "ck"
    train(TrainArgs(model=require_shared("models", "stories260K"), data=require_shared("instruct", "alpaca_en_demo.json"),
                    out=ck, bits=4, group_size=32, zero_point="integer", steps=6, batch_size=4, grad_accum=1, seq_len=128,
                    lr=2e-3, scale_grid="fp16", save_every=0, eval_examples=8))
    rep = ST.export(ck, tmp_path / "ct")
    assert rep["exact"] and (rep["n_packed"], rep["n_dense"]) == (30, 5)
    v = ST.verify(tmp_path / "ct", ck)
    assert v["passed"] and v["n_exact"] == 35 and v["logits"]["max_abs_dlogit"] < DLOGIT_STORIES, v["summary"]
    assert v["greedy"]["matched"] == v["greedy"]["required"]
    rep = ST.export(ck, tmp_path / "gptq", flavor="gptq")
    assert rep["exact"] and (rep["n_packed"], rep["n_dense"]) == (20, 15)  # 172 x 4 bits is not whole int32 words
    v = ST.verify(tmp_path / "gptq", ck)
    assert v["passed"] and v["n_exact"] == 35 and v["logits"]["max_abs_dlogit"] < DLOGIT_STORIES, v["summary"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 255, 257, 700])
def test_row_sliced_pack_is_the_library_pack(bits, rows):
    """layout._pack (uint8 signed form, row slices) gives compressed-tensors' pack_to_int32 of (u - 2^(b-1)) as int8,
    computed here the plain way, and leaves the caller's codes untouched."""
    from l4q_export.formats.safetensors.layout import _pack

    def plain(v, dim):
        return pack_to_int32((v.to(torch.int32) - (1 << (bits - 1))).to(torch.int8), bits, dim)

    g = torch.Generator().manual_seed(rows * 10 + bits)
    u = torch.randint(0, 1 << bits, (rows, 200), generator=g, dtype=torch.uint8)
    before = u.clone()
    assert torch.equal(_pack(u, bits), plain(u, 1)) and torch.equal(u, before)
    z = u[:, :7].float()  # fp32 zero points [N, G], packed along N
    assert torch.equal(_pack(z, bits, packed_dim=0), plain(z, 0))
