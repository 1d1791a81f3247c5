"""Sharded Hugging Face safetensors I/O for the packed-safetensors target.

`ShardWriter` streams: each tensor's bytes go to a per-shard scratch file as soon as it is added, and only
(name, dtype, shape, offset) stay in memory, so peak memory is one tensor (plus the layer being folded)
whatever the model or `--shard-size`.  A shard is closed with the greedy rule the exporter has always used
(flush before a tensor that would push it past `--shard-size`).  Its header is produced by the safetensors
library itself from tiny same-dtype, same-name stand-ins (the library decides tensor order and the metadata
serialization), re-rendered with the real shapes and offsets; the data is then copied from the scratch
file in that order by the kernel (`os.copy_file_range`).  The result is byte-identical to
`safetensors.torch.save_file` of the same tensors (tests/test_shard_stream.py holds that).

Shard names need the final shard count (`model-00001-of-00003.safetensors`), which is only known at the end;
shards are therefore written under provisional names and renamed in `finish()`, all inside the exporter's
AtomicDir, so nobody ever sees a half-written model.

`ShardReader` is the inverse, used by verify: lazy, one tensor at a time, index-driven.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ...errors import L4QInputError

INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1048576 -> bytes (decimal units as in transformers' max_shard_size)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m:
            raise L4QInputError(f"--shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value < 1:
        raise L4QInputError(f"--shard-size must be positive, got {text!r}")
    return value


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class _Entry:
    """Where one added tensor's bytes lie in the shard's scratch file; the tensor itself is not kept."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


_COPY_CHUNK = 16 * 2**20  # bytes per read/write where the kernel cannot copy file to file
# copy_file_range errors that mean "not here" (old kernel, cross-filesystem, unsupported fs), not "disk broken".
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def _write_all(fd: int, data: memoryview) -> None:
    """os.write until done: one write(2) stops at ~2 GiB on Linux, and a tensor can be larger."""
    while data:
        data = data[os.write(fd, data):]


def _copy_range(src: int, offset: int, dst: int, nbytes: int) -> None:
    """Append `nbytes` of `src` from `offset` to `dst`'s position: in the kernel, or in bounded chunks."""
    copy = getattr(os, "copy_file_range", None)
    while nbytes and copy is not None:
        try:
            done = copy(src, dst, nbytes, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            break
        if done == 0:
            raise OSError(errno.EIO, f"scratch file ended {nbytes} bytes early")
        offset, nbytes = offset + done, nbytes - done
    while nbytes:
        chunk = os.pread(src, min(nbytes, _COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, f"scratch file ended {nbytes} bytes early")
        _write_all(dst, memoryview(chunk))
        offset, nbytes = offset + len(chunk), nbytes - len(chunk)


def _render(header: dict[str, Any]) -> bytes:
    """A header dict as safetensors writes it: compact JSON, raw UTF-8, space-padded to a multiple of 8."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)


def shard_header(entries: list[_Entry], metadata: dict[str, str] | None) -> tuple[list[_Entry], bytes]:
    """The data order and header bytes `save_file` would write for these tensors, without their data.

    The library serializes one-element stand-ins of the same names and dtypes: that fixes the order (it sorts
    by dtype, then name) and the `__metadata__` entry.  Re-rendering that very header must give the library's
    bytes back -- checked here, so a serialization change in safetensors fails loudly instead of writing a
    different file -- and only then are the real shapes and data offsets put in."""
    probe = save({e.name: torch.zeros(1, dtype=e.dtype) for e in entries}, metadata=metadata)
    n = int.from_bytes(probe[:8], "little")
    library = json.loads(probe[8:8 + n])
    if _render(library) != probe[8:8 + n]:
        raise RuntimeError("the installed safetensors writes headers this streaming writer cannot reproduce")
    by_name = {e.name: e for e in entries}
    order = [by_name[k] for k in library if k != "__metadata__"]
    offset = 0
    for e in order:
        library[e.name] = {**library[e.name], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header = _render(library)
    return order, len(header).to_bytes(8, "little") + header


class ShardWriter:
    """Append tensors in order; a shard is flushed to disk as soon as it would exceed `max_bytes`.

    Tensors are written out in `add()` and not referenced afterwards, so the caller's memory is freed as it
    goes; files are byte-identical to what `safetensors.torch.save_file` writes for the same shard."""

    def __init__(self, out_dir: Path, max_bytes: int, metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("ShardWriter copies native tensor bytes and safetensors is little-endian")
        self.dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: list[_Entry] = []
        self._pending_bytes = 0
        self._scratch: io.FileIO | None = None  # a file object, so an abandoned writer's scratch fd is closed by GC
        self._names: set[str] = set()
        self._shards: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name}")
        n = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + n > self.max_bytes:
            self._flush()
        t = tensor.detach().contiguous().cpu()
        if self._scratch is None:
            self._scratch = io.FileIO(self._scratch_path(), "w+")
        # reshape(-1) lets a 0-d tensor take the byte view; uint8 sidesteps numpy's missing bfloat16.
        _write_all(self._scratch.fileno(), memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pending.append(_Entry(name, t.dtype, tuple(t.shape), self._pending_bytes, n))
        self._names.add(name)
        self._pending_bytes += n
        self.total_size += n

    def _provisional(self, i: int) -> Path:
        return self.dir / f".shard-{i:05d}.safetensors"

    def _scratch_path(self) -> Path:
        return self.dir / f".shard-{len(self._shards):05d}.scratch"

    def _flush(self) -> None:
        order, header = shard_header(self._pending, self.metadata)
        # 0o600: what safetensors.torch.save_file leaves (it writes a tempfile and renames it into place).
        fd = os.open(self._provisional(len(self._shards)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, memoryview(header))
            if self._scratch is not None:  # None only for the empty shard of a model without tensors
                for e in order:
                    _copy_range(self._scratch.fileno(), e.offset, fd, e.nbytes)
        finally:
            os.close(fd)
        if self._scratch is not None:
            self._scratch.close()
            self._scratch_path().unlink()
            self._scratch = None
        self._shards.append([e.name for e in self._pending])
        self._pending, self._pending_bytes = [], 0

    def finish(self) -> dict[str, Any]:
        """Flush the last shard, give every shard its final name and write the index; returns the index."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._provisional(i).rename(self.dir / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return index


class ShardReader:
    """Lazy access to a sharded (index) or single-file safetensors model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                self.location: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise L4QInputError(f"corrupt safetensors index {index}: {e}") from None
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                self.location = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 -- safe_open handles are not iterable
        else:
            raise L4QInputError(f"no safetensors weights (index or model.safetensors) in {self.dir}")
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise L4QInputError(f"tensor {name} missing from {self.dir}")
        shard = self.location[name]
        if shard not in self._handles:
            path = self.dir / shard
            if not path.is_file():
                raise L4QInputError(f"shard {path} listed in the index is missing")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 -- safetensors raises several types for corrupt headers
                raise L4QInputError(f"corrupt safetensors file {path}: {e}") from None
        return self._handles[shard].get_tensor(name)
