"""`l4q-train --method ...`: the method registry (registry.py) and the built-in methods (builtin.py).

The public names below are what trainer, fold, verify, eval, the CLI and the export targets use; nothing outside
this package tests a method's name.  METHODS and LOSSY_BY_DESIGN are derived from the registry (kept for
callers that read them as tuples).
"""

from __future__ import annotations

from . import builtin  # noqa: F401 -- registers the built-in methods
from .builtin import QAT_LORA_EXPORT, fold_merged
from .registry import (
    Method,
    ModuleFolder,
    apply_checkpoint,
    base_extra,
    build_layer,
    check_args,
    checkpoint_extra,
    checkpoint_method,
    checkpoint_model,
    checkpoint_rank,
    checkpoint_spec,
    fold_module,
    get_method,
    grid_extra,
    lr_param_groups,
    meta_linear,
    method_names,
    optimizer_groups,
    project_,
    reference_model,
    register,
    setup_model,
    training_base,
    trains,
)

METHODS = method_names()
LOSSY_BY_DESIGN = tuple(m for m in METHODS if get_method(m).lossy)

__all__ = [
    "LOSSY_BY_DESIGN",
    "METHODS",
    "QAT_LORA_EXPORT",
    "Method",
    "ModuleFolder",
    "apply_checkpoint",
    "checkpoint_model",
    "build_layer",
    "check_args",
    "checkpoint_extra",
    "checkpoint_method",
    "checkpoint_rank",
    "checkpoint_spec",
    "fold_merged",
    "fold_module",
    "training_base",
    "get_method",
    "base_extra",
    "grid_extra",
    "lr_param_groups",
    "meta_linear",
    "method_names",
    "optimizer_groups",
    "project_",
    "reference_model",
    "register",
    "setup_model",
    "trains",
]
