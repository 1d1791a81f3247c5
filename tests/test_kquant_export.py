"""l4q-train --grid end to end: train on exact GGUF K-quant grids -> fold bit-exact -> GGUF -> verify.

The tiny LLaMA has hidden 256 (every q/k/v/o/gate/up row is whole super-blocks) and MLP width 320, so ffn_down
(rows of 320) takes llama.cpp's legacy fallback (Q5_0 / Q5_1 / Q4_0 / Q8_0), trained on that type's exact grid.
Expected tensor types come from quant.krecipe (checked against llama-quantize in test_krecipe / tools) and, when
L4Q_LLAMA_QUANTIZE points at a built llama-quantize, from the real tool on the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import pytest

from l4q_export.formats import get_target
from l4q_export.quant.kplan import tensor_type
from l4q_export.verify import verify_artifact, verify_fold

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

LEGACY_DOWN = {"q4_k": "Q5_0", "q5_k": "Q5_1", "q3_k": "Q4_0", "q2_k": "Q4_0", "q6_k": "Q8_0"}


@pytest.fixture(scope="module")
def kbase(tmp_path_factory) -> Path:
    from l4q_export.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("kbase"), hidden=256, intermediate=320, layers=2, heads=4, kv_heads=2)


def _train(base: Path, out: Path, grid: str) -> Path:
    from l4q_export.demo import instruction_records
    from l4q_export.training.trainer import TrainArgs, train

    data = out.parent / f"{out.name}.json"
    data.write_text(json.dumps(instruction_records(24)))
    train(TrainArgs(model=base, data=data, out=out, steps=2, batch_size=2, grad_accum=1, seq_len=48, rank=4,
                    eval_examples=0, save_every=0, extra={"grid": grid}))
    return out


def _types(path: Path) -> dict[str, str]:
    return {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("grid", ["q4_k", "q5_k", "q3_k", "q2_k", "q6_k", "q4_k_m", "q3_k_m"])
def test_grid_trains_folds_and_ships_bit_exact(tmp_path, kbase, grid):
    ck = _train(kbase, tmp_path / "ck", grid)
    cfg = json.loads((ck / "l4q_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["grid"] == grid
    fold = verify_fold(ck)
    assert fold["passed"] and fold["n_bit_identical"] == fold["n_layers"] == 14
    target = get_target("gguf")
    out = tmp_path / "m.gguf"
    target.write(ck, out)
    rep = verify_artifact(target, out, ck)
    assert rep["n_codes_identical"] == rep["n_quantized"] == 14
    assert rep["n_exact"] == 14 and rep["max_abs_error"] == 0.0
    for row in rep["layers"]:
        assert row["fields_differing"] == [] and row["max_abs_error"] == 0.0, row
    assert rep["logits"]["passed"] and rep["greedy"]["passed"], rep["summary"]
    # every tensor's type is the one llama.cpp's rule gives it (uniform grids: embeddings stay F16)
    base_cfg = json.loads((kbase / "config.json").read_text())
    types = _types(out)
    for t in gguf.GGUFReader(str(out)).tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        want = tensor_type(grid, t.name, shape, base_cfg)
        if t.name in ("token_embd.weight", "output.weight") and "_m" not in grid:
            want = gguf.GGMLQuantizationType.F16
        assert types[t.name] == (want.name if want is not None else "F32"), t.name
    if grid in LEGACY_DOWN:
        assert types["blk.0.ffn_down.weight"] == LEGACY_DOWN[grid]
    ft = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M}.get(grid)
    if ft is not None:
        field = gguf.GGUFReader(str(out)).fields["general.file_type"]
        assert int(field.contents()) == int(ft)


def test_q4_k_m_types_equal_llama_quantize(tmp_path, kbase):
    tool = os.environ.get("L4Q_LLAMA_QUANTIZE")
    if not tool or not Path(tool).is_file():
        pytest.skip("set L4Q_LLAMA_QUANTIZE to a built llama-quantize to compare with the real tool")
    ck = _train(kbase, tmp_path / "ck", "q4_k_m")
    ours = tmp_path / "ours.gguf"
    get_target("gguf").write(ck, ours)
    # llama-quantize types tensors by name, shape and layer only, so re-quantizing our own file gives its choice
    peer = tmp_path / "peer.gguf"
    subprocess.run([tool, "--allow-requantize", str(ours), str(peer), "Q4_K_M"], check=True, capture_output=True)
    assert _types(ours) == _types(peer)


def test_changed_subscale_in_file_fails_verify(tmp_path, kbase):
    ck = _train(kbase, tmp_path / "ck", "q4_k")
    target = get_target("gguf")
    out = tmp_path / "m.gguf"
    target.write(ck, out)
    reader = gguf.GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    off = int(t.data_offset) + 4  # block 0: d (2 bytes), dmin (2 bytes), then the 12 packed scale bytes
    data = bytearray(out.read_bytes())
    data[off] ^= 0x01  # sub-scale 0 of super-block 0 changes by one
    out.write_bytes(bytes(data))
    rep = verify_artifact(target, out, ck)
    bad = [r for r in rep["layers"] if r["fields_differing"]]
    assert not rep["passed"] and len(bad) == 1 and "sc" in bad[0]["fields_differing"]
    assert bad[0]["max_abs_error"] > 0


def test_k_grid_checkpoint_refused_by_onnx(tmp_path, kbase):
    from l4q_export.errors import FidelityError

    ck = _train(kbase, tmp_path / "ck", "q4_k")
    with pytest.raises(FidelityError, match="K-quant grid"):
        get_target("onnx").write(ck, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
