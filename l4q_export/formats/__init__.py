"""Export targets.  Each target is one module exposing the same small protocol, so the CLI and
`verify` treat every format alike and a new target is one new module:

    NAME: str                         the `--to` name
    CLI_OPTIONS: list[click.Option]   target-specific `l4q-export` options (parameter names unique)
    def export(model_dir: Path, output: Path | None, **options) -> dict   writes atomically, returns a report
    def detect(artifact: Path) -> bool                                      is this file/dir one of ours?
    def verify(artifact: Path, model_dir: Path, **options) -> dict          report with "passed": bool
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ..errors import L4QInputError

FORMATS: dict[str, str] = {
    "gguf": "l4q_export.formats.gguf",
    "onnx": "l4q_export.formats.onnx",
    "safetensors": "l4q_export.formats.safetensors",
    "mlx": "l4q_export.formats.mlx",
}


def available() -> list[str]:
    """Targets whose module exists in this installation."""
    return [name for name, mod in FORMATS.items() if importlib.util.find_spec(mod) is not None]


def get_format(name: str) -> ModuleType:
    if name not in FORMATS or name not in available():
        raise L4QInputError(f"unknown export target {name!r}; available: {', '.join(available()) or 'none'}")
    return importlib.import_module(FORMATS[name])
