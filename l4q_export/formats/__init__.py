"""Export targets.  `TARGETS` is the only list of them: each entry names one sub-package's `Target` object
(the protocol is in `base.py`).  `l4q-export`'s options, `--allow-lossy`, `demo`, `verify` and `l4q-eval` all read
this registry, so a new target is its own package plus one line here (or one `register` call).

Targets are imported lazily: a missing optional runtime (llama-cpp-python, onnxruntime, mlx) only removes that target.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import L4QInputError
from .base import Target

TARGETS: dict[str, str] = {
    "gguf": "l4q_export.formats.gguf:TARGET",
    "onnx": "l4q_export.formats.onnx:TARGET",
    "safetensors": "l4q_export.formats.safetensors:TARGET",
    "mlx": "l4q_export.formats.mlx:TARGET",
}
_LOADED: dict[str, Target] = {}
# Targets whose package imports a runtime at write time or whose every use but writing needs one: listed only where
# these top-level modules are installed.
REQUIRES: dict[str, tuple[str, ...]] = {"mlx": ("mlx", "mlx_lm")}


def register(target: Target) -> None:
    """Add (or replace) a target object under its `name` -- for plugins and tests."""
    TARGETS[target.name] = f"<registered {type(target).__module__}.{type(target).__name__}>"
    _LOADED[target.name] = target


def unregister(name: str) -> None:
    TARGETS.pop(name, None)
    _LOADED.pop(name, None)


def available() -> list[str]:
    """Targets whose package exists in this installation (and whose runtime, where `REQUIRES` names one)."""
    return [name for name, ref in TARGETS.items()
            if (name in _LOADED or importlib.util.find_spec(ref.split(":")[0]) is not None)
            and all(importlib.util.find_spec(m) is not None for m in REQUIRES.get(name, ()))]


def get_target(name: str) -> Target:
    if name not in available():
        raise L4QInputError(f"unknown export target {name!r}; available: {', '.join(available()) or 'none'}")
    if name not in _LOADED:
        module, attr = TARGETS[name].split(":")
        _LOADED[name] = getattr(importlib.import_module(module), attr)
    return _LOADED[name]


def detect_target(artifact: Path) -> Target | None:
    """The target that recognises `artifact`, or None."""
    for name in available():
        t = get_target(name)
        if t.detect(Path(artifact)):
            return t
    return None
