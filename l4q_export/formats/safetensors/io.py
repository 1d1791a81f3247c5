"""Sharded Hugging Face safetensors I/O for the packed-safetensors target.

`ShardWriter` buffers tensors until a shard reaches `--shard-size`, then writes it with the safetensors
library and drops it from memory, so peak memory is one shard (plus the layer being folded) whatever the
model size.  Shard names need the final shard count (`model-00001-of-00003.safetensors`), which is only
known at the end; shards are therefore written under provisional names and renamed in `finish()`, all
inside the exporter's AtomicDir, so nobody ever sees a half-written model.

`ShardReader` is the inverse, used by verify: lazy, one tensor at a time, index-driven.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


class ShardWriter:
    """Append tensors in order; a shard is flushed to disk as soon as it would exceed `max_bytes`."""

    def __init__(self, out_dir: Path, max_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"duplicate tensor name {name}")
        n = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + n > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += n
        self.total_size += n

    def _provisional(self, i: int) -> Path:
        return self.dir / f".shard-{i:05d}.safetensors"

    def _flush(self) -> None:
        save_file(self._pending, str(self._provisional(len(self._shards))), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

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
