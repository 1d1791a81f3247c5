"""Checkpoint validation at load time, so a damaged checkpoint is refused before any fold or export.

A missing `lora_B` used to read as "no LoRA" and export the wrong model with exit 0; a wrong shape crashed deep
inside the fold.  Here every module the config lists must carry every tensor its method's layer loads, with
the shapes the base weight and the LoRA rank imply, finite values and positive scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import L4QInputError
from .quant.finite import all_finite

# The tensors each method's training layer reads back (see the layers' `load_tensors`/`layer_from_tensors`);
# "offset" only when the quantizer has a zero point, "lora_*" only when the rank is > 0.
_METHOD_TENSORS: dict[str, tuple[str, ...]] = {
    "l4q": ("scale", "offset", "lora_A", "lora_B"),
    "rtn": ("scale", "offset"),
    "qat-lora": ("scale", "offset", "lora_A", "lora_B"),
    "lora": ("scale", "offset", "lora_A", "lora_B"),
    "qalora": ("scale", "zero", "lora_A", "lora_B"),
    "dlqat": ("scale", "zero", "magnitude", "lora_A", "lora_B"),
}
_INT_TENSORS = ("base_codes",)
# Extra tensors a method stores when its config section says `"base": "gptq"` (QA-LoRA's frozen GPTQ codes).
_GPTQ_BASE_TENSORS: dict[str, tuple[str, ...]] = {"qalora": ("base_codes",)}


def validate_config(cfg: dict[str, Any], path: Path) -> None:
    """Types of the l4q_config.json fields every reader relies on."""
    v = cfg.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise L4QInputError(f"{path}: format_version must be a positive integer, not {v!r}")
    base = cfg.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str) or not base.get("path"):
        raise L4QInputError(f"{path}: base_model.path is missing; the checkpoint does not say which base it was trained on")
    if not isinstance(base.get("shards", {}), dict):
        raise L4QInputError(f"{path}: base_model.shards must map shard names to sha256 digests")
    method = cfg.get("method")
    if not isinstance(method, str) or not method:  # unknown names are refused by the method registry when resolved
        raise L4QInputError(f"{path}: method must be a method name, not {method!r}")
    mods = cfg.get("modules")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise L4QInputError(f"{path}: modules must be a non-empty list of module names")
    quant = cfg.get("quant")
    if not isinstance(quant, dict):
        raise L4QInputError(f"{path}: quant (the QuantSpec) is missing")
    try:
        from .quant import QuantSpec

        QuantSpec.from_dict(quant)
    except (KeyError, TypeError, ValueError) as e:
        raise L4QInputError(f"{path}: invalid quant spec {quant!r} ({e})") from None
    _validate_base_dtype(cfg, path)
    lora = cfg.get("lora")
    if not isinstance(lora, dict):
        raise L4QInputError(f"{path}: lora settings are missing")
    for key in ("rank", "alpha", "scaling"):
        x = lora.get(key)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or x < 0:
            raise L4QInputError(f"{path}: lora.{key} must be a non-negative number, not {x!r}")


def _validate_base_dtype(cfg: dict[str, Any], path: Path) -> None:
    """`base_dtype` int8 must carry the scheme the fold knows and a sha256 per quantized module."""
    from .quant.base_int8 import BASE_DTYPES, INT8_SCHEME

    bd = cfg.get("base_dtype", "stored")
    if bd not in BASE_DTYPES:
        raise L4QInputError(f"{path}: base_dtype must be one of {', '.join(BASE_DTYPES)}, not {bd!r}")
    if bd != "int8":
        return
    rec = cfg.get("base_int8")
    if not isinstance(rec, dict) or rec.get("scheme") != INT8_SCHEME:
        raise L4QInputError(f"{path}: base_dtype int8 needs base_int8.scheme = {INT8_SCHEME!r} (this l4q-export's int8 base)")
    digests = rec.get("sha256")
    mods = cfg.get("modules") or []
    if not isinstance(digests, dict) or any(not isinstance(digests.get(m), str) for m in mods):
        raise L4QInputError(f"{path}: base_int8.sha256 must give the int8 base's hash of every quantized module")


def _base_shapes(ck) -> dict[str, tuple[int, ...]]:
    base = ck.base()
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in base.shards:
        with base._open(shard) as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def validate_checkpoint(ck, adapter_path: Path, base_config: dict[str, Any]) -> None:
    """Every module present with every tensor its method needs, right shapes and dtypes, finite, scales > 0."""
    # The caller (checkpoint.load_checkpoint) passes what it knows, so this module never imports it back.
    validate_base(ck.base_dir, base_config, ck.base().names())
    path = adapter_path
    if not path.is_file():
        raise L4QInputError(f"adapter file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise L4QInputError(f"corrupt adapter file {path}: {' '.join(str(e).split())}") from None
    cfg = ck.config
    rank = int(cfg["lora"]["rank"])
    grids = ck.module_grids  # format version 2: a grid per module (K-quant or uniform)

    def needed_for(m: str) -> list[str]:
        from .quant.kquant import KQuantSpec

        g = None if grids is None else grids.get(m)
        if g is None and grids is not None:
            raise L4QInputError(f"{ck.dir}/l4q_config.json: module_grids has no entry for module {m}")
        if isinstance(g, KQuantSpec):
            names = ["d", "sc", *(["dmin", "mn"] if g.has_min else []), "lora_A", "lora_B"]
        else:
            zp = (g.zero_point if g is not None else cfg["quant"].get("zero_point", "float"))
            names = [n for n in _METHOD_TENSORS.get(cfg["method"], ()) if not (n == "offset" and zp == "symmetric")]
            if cfg.get(cfg["method"], {}).get("base") == "gptq":
                names += _GPTQ_BASE_TENSORS.get(cfg["method"], ())
        return [n for n in names if not (n.startswith("lora_") and rank == 0)]

    shapes = _base_shapes(ck)
    modules = set(ck.modules)
    for key in tensors:
        if key.rsplit(".", 1)[0] not in modules:
            raise L4QInputError(f"{path}: tensor {key} belongs to no module listed in {ck.dir}/l4q_config.json")
    for m in ck.modules:
        w = shapes.get(m + ".weight")
        if w is None or len(w) != 2:
            raise L4QInputError(f"module {m} (in l4q_config.json) has no 2-D weight {m}.weight in the base model {ck.base_dir}")
        out_f, in_f = w
        needed = needed_for(m)
        for n in needed:
            key = f"{m}.{n}"
            t = tensors.get(key)
            if t is None:
                raise L4QInputError(f"{path}: tensor {key} is missing (method {cfg['method']} needs {', '.join(needed)})")
            if n in _INT_TENSORS:
                continue
            if not t.dtype.is_floating_point:
                raise L4QInputError(f"{path}: tensor {key} has dtype {t.dtype}; expected a float tensor")
            if t.dim() < 1 or t.shape[0] != (rank if n == "lora_A" else out_f):
                want = f"[{rank}, ...]" if n == "lora_A" else f"[{out_f}, ...]"
                raise L4QInputError(
                    f"{path}: tensor {key} has shape {list(t.shape)}; expected {want} (base {m}.weight is {list(w)})"
                )
            if n == "lora_B" and list(t.shape) != [out_f, rank]:
                raise L4QInputError(f"{path}: tensor {key} has shape {list(t.shape)}; expected {[out_f, rank]}")
            if n == "lora_A" and (t.dim() != 2 or t.shape[1] > in_f):
                raise L4QInputError(f"{path}: tensor {key} has shape {list(t.shape)}; expected [{rank}, <= {in_f}]")
            if not all_finite(t):
                raise L4QInputError(f"{path}: tensor {key} contains NaN/Inf")
            if n == "scale" and (t <= 0).any():
                raise L4QInputError(f"{path}: tensor {key} has zero or negative scales")
    # Same base shape => same adapter shapes: catches a wrongly shaped scale/offset that the rules above cannot.
    seen: dict[tuple[tuple[int, ...], str], tuple[str, list[int]]] = {}
    for m in ck.modules:
        for n in needed_for(m):
            sig = (shapes[m + ".weight"], n, str(None if grids is None else grids[m]))
            shape = list(tensors[f"{m}.{n}"].shape)
            other = seen.setdefault(sig, (m, shape))
            if other[1] != shape:
                raise L4QInputError(
                    f"{path}: tensor {m}.{n} has shape {shape} but {other[0]}.{n} (same base shape) has {other[1]}"
                )


def validate_base(base_dir: Path, cfg: dict[str, Any], names: list[str]) -> None:
    """The base's config.json must describe the shards it ships: as many decoder layers as it says."""
    layers = {int(n.split(".layers.", 1)[1].split(".", 1)[0]) for n in names if ".layers." in n}
    want = cfg["num_hidden_layers"]
    if layers != set(range(want)):
        raise L4QInputError(
            f"{base_dir}/config.json says num_hidden_layers={want} but the weights hold layers "
            f"{min(layers, default=0)}..{max(layers, default=-1)} ({len(layers)}); restore the original config.json"
        )
