"""`l4q-export --to mlx`: an mlx-lm model directory (Apple MLX affine quantization).

MLX stores per group a scale and a float *bias* (``w = scales*q + biases``) -- the canonical ``W = d*u + m`` --
so L4Q's learned float offsets, which integer-zero-point formats cannot hold, are exact here.  See docs/mlx.md.

Pieces, one per part of the target protocol:
    capability(spec, shape)   layout.py   exact / bounded / dense / refused, with the reason
    write(model_dir, out)     export.py   streaming fold -> shards, atomic; returns the report
    read_back(artifact)       check.py    decode with MLX itself (mx.dequantize)
    detect(artifact)          export.py
    MlxBackend(artifact)      runtime.py  eval backend: mlx-lm forward on CPU
    verify(artifact, ck)      check.py    codes, weights vs the fold, mlx-lm vs the PyTorch reference

The module-level NAME / CLI_OPTIONS / export / detect / verify are today's format-module protocol
(formats/__init__.py).  Writing needs no MLX; reading back, verify and eval need `pip install l4q-export[mlx]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .export import detect, write
from .layout import Capability, capability

NAME = "mlx"

CLI_OPTIONS: list[click.Option] = [
    click.Option(["--mlx-shard-size", "mlx_shard_size"], default="5GB", show_default=True,
                 help="mlx: maximum safetensors shard size (e.g. 5GB, 500MB); also bounds the exporter's memory."),
]


def export(model_dir: Path, output: Path | None, mlx_shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write the mlx-lm directory (default: MODEL_DIR-mlx beside the checkpoint)."""
    return write(Path(model_dir), output, shard_size=mlx_shard_size)


def verify(artifact: Path, model_dir: Path, **options: Any) -> dict[str, Any]:
    from .check import verify as _verify

    return _verify(Path(artifact), Path(model_dir), **options)


def read_back(artifact: Path) -> dict[str, dict[str, Any]]:
    from .check import read_back as _read_back

    return _read_back(Path(artifact))


__all__ = ["CLI_OPTIONS", "NAME", "Capability", "capability", "detect", "export", "read_back", "verify", "write"]
