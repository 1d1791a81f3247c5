"""The streaming ShardWriter writes what `safetensors.torch.save_file` writes, byte for byte, holding no tensors.

Independent side: the safetensors library's own `save_file`, called on the dict of each shard, and a greedy
shard split recomputed here from the tensors' sizes (flush before a tensor that would overflow a non-empty
shard -- the rule the exporter has always used).
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from l4q_export.formats.safetensors import io as IO

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.float64, torch.int16]


def _random(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _random_set(seed: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes, names inserted out of lexical order (layers.10 before layers.2), 0-d, empty, non-contiguous."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in torch.randperm(24, generator=g).tolist():  # every dtype; layers 2, 12, 22 share one
        dtype = DTYPES[(layer + seed) % len(DTYPES)]
        shape = tuple(torch.randint(1, 9, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
        out[f"model.layers.{layer}.w"] = _random(dtype, shape, g)
    out["model.scalar"] = _random(torch.float32, (), g)
    out["model.empty"] = torch.empty(0, 3, dtype=torch.bfloat16)
    out["model.transposed"] = _random(torch.float16, (5, 7), g).T  # non-contiguous: the writer packs it
    out["model.sliced"] = _random(torch.int32, (6, 8), g)[:, ::2]
    return out


def _write(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int, metadata: dict[str, str] | None) -> dict:
    out.mkdir()
    w = IO.ShardWriter(out, max_bytes, metadata=metadata)
    for k, v in tensors.items():
        w.add(k, v)
    return w.finish()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("metadata", [None, {"format": "mlx"}, {"format": "ünïcode \"quoted\"\n\t\\ é\x7f\x01"}])
def test_single_shard_is_byte_identical_to_save_file(tmp_path, seed, metadata):
    tensors = _random_set(seed)
    tensors["odd \"näme\"\\\n"] = torch.ones(3, dtype=torch.float16)  # JSON escapes in a tensor name
    index = _write(tensors, tmp_path / "new", 10**9, metadata)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"format": "pt", **(metadata or {})})
    got = tmp_path / "new" / "model-00001-of-00001.safetensors"
    assert got.read_bytes() == ref.read_bytes()
    assert got.stat().st_mode == ref.stat().st_mode
    assert index["weight_map"] == {k: got.name for k in tensors}
    assert {p.name for p in (tmp_path / "new").iterdir()} == {IO.INDEX_FILE, got.name}  # scratch removed


def _split(path: Path) -> tuple[dict, bytes, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:], n


def test_multi_key_metadata_matches_save_file_up_to_key_order(tmp_path):
    """safetensors keeps `__metadata__` in a randomly seeded hash map, so save_file itself orders several keys
    differently from call to call (the exporter writes one key); everything else must still be identical."""
    tensors = _random_set(5)
    metadata = {"format": "pt", "note": "x", "z": "y"}
    _write(tensors, tmp_path / "new", 10**9, metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata=metadata)
    got, ref = _split(tmp_path / "new" / "model-00001-of-00001.safetensors"), _split(tmp_path / "ref.safetensors")
    assert got == ref
    assert list(got[0]) == list(ref[0])  # tensor order in the header too


def test_shard_split_and_index_follow_the_greedy_rule(tmp_path):
    tensors = _random_set(7)
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    max_bytes = 96
    groups: list[list[str]] = [[]]
    used = 0
    for k, n in sizes.items():
        if groups[-1] and used + n > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += n
    assert len(groups) >= 4  # the set really is split
    index = _write(tensors, tmp_path / "new", max_bytes, None)
    total = len(groups)
    expect_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        ref = tmp_path / f"ref-{i}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(ref), metadata={"format": "pt"})
        assert (tmp_path / "new" / shard).read_bytes() == ref.read_bytes(), shard
        expect_map.update({k: shard for k in names})
    assert index == {"metadata": {"total_size": sum(sizes.values())}, "weight_map": expect_map}
    assert json.loads((tmp_path / "new" / IO.INDEX_FILE).read_text()) == index
    assert list(index["weight_map"]) == list(tensors)  # insertion order, as before


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard(tmp_path):
    big = torch.arange(64, dtype=torch.float32)
    index = _write({"a": torch.ones(2), "big": big, "c": torch.ones(2)}, tmp_path / "o", 16, None)
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "big": "model-00002-of-00003.safetensors",
                                   "c": "model-00003-of-00003.safetensors"}
    assert torch.equal(load_file(str(tmp_path / "o" / "model-00002-of-00003.safetensors"))["big"], big)


def test_no_tensors_gives_the_library_empty_file(tmp_path):
    _write({}, tmp_path / "o", 100, None)
    save_file({}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "o" / "model-00001-of-00001.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_duplicate_names_are_refused_across_shards(tmp_path):
    w = IO.ShardWriter(tmp_path, 4)
    w.add("a", torch.ones(1))
    w.add("b", torch.ones(1))  # flushes "a"
    with pytest.raises(ValueError, match="duplicate tensor name a"):
        w.add("a", torch.ones(1))


def test_the_writer_keeps_no_reference_to_added_tensors(tmp_path):
    w = IO.ShardWriter(tmp_path, 10**9)
    t = torch.randn(256, 256)
    ref = weakref.ref(t)
    w.add("t", t)
    del t
    gc.collect()
    assert ref() is None  # the old writer held every tensor of the shard until it flushed
    w.finish()


def test_adding_allocates_far_less_than_the_tensors(tmp_path):
    """No Python-side copy of the data (bytes, numpy buffers -- what tracemalloc sees), on add or on flush."""
    import tracemalloc

    w = IO.ShardWriter(tmp_path, 10**9)
    tensors = [torch.randn(512, 512) for _ in range(8)]  # 1 MiB each, already allocated before tracing
    tracemalloc.start()
    for i, t in enumerate(tensors):
        w.add(f"t{i}", t)
    w.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20 // 4, peak


def test_chunked_copy_without_copy_file_range_gives_the_same_bytes(tmp_path, monkeypatch):
    tensors = _random_set(3)
    _write(tensors, tmp_path / "kernel", 10**9, None)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(IO, "_COPY_CHUNK", 5)  # many short reads, crossing tensor boundaries
    _write(tensors, tmp_path / "chunked", 10**9, None)
    name = "model-00001-of-00001.safetensors"
    assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "kernel" / name).read_bytes()


def test_header_serialization_change_is_refused(monkeypatch):
    """If safetensors ever writes a header the re-rendering cannot reproduce, fail instead of writing another file."""
    monkeypatch.setattr(IO, "_render", lambda header: json.dumps(header).encode())  # spaces after separators
    entry = IO._Entry("w", torch.float16, (2, 2), 0, 8)
    with pytest.raises(RuntimeError, match="cannot reproduce"):
        IO.shard_header([entry], {"format": "pt"})
