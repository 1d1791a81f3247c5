"""The Python API: bring your own trainer (HF `Trainer`, TRL `SFTTrainer`, a plain loop), keep the exact export.

    model = l4q_export.prepare(model, method="l4q", bits=4, group_size=128)   # swap the target linears
    ... train with anything that calls model(**batch).loss.backward() and an optimizer ...
    l4q_export.save_checkpoint(model, "out/ck", base_dir="models/base")     # what l4q-train writes
    model = l4q_export.load_checkpoint("out/ck")                            # trainable again

Why a refusal in `save_checkpoint`: every exporter re-reads the *base shards* and folds the adapter into them.
If the W0 the user trained against is not bit-identical to those files (a different dtype at load time, an
edited embedding, a different revision), the export would silently be a different model.  So the frozen
tensors are compared with the shards, one tensor at a time, before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import ADAPTER_FILE, BaseWeights, check_architecture, write_checkpoint
from .checkpoint import load_checkpoint as open_checkpoint
from .errors import L4QInputError
from .quant import QuantSpec

SETTINGS_ATTR = "l4q_settings"


@dataclass
class Settings:
    """What `prepare` did to a model: the subset of `TrainArgs` that defines the layers (same field names, so
    the methods code and the checkpoint's `training` record read either)."""

    method: str = "l4q"
    bits: int = 4
    group_size: int = 128
    zero_point: str = "float"
    rank: int = 4
    alpha: float = 8.0
    scale_grid: str = "fp16"
    init: str = "l4q"
    lsq_grad_scale: bool = True
    seed: int = 0
    base_dtype: str = "stored"  # "int8": the frozen W0 held as int8 (quant/base_int8.py), recorded in the checkpoint
    extra: dict[str, Any] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    base_hashes: dict[str, str] = field(default_factory=dict)
    base_config: dict[str, Any] = field(default_factory=dict)  # the in-memory model's config (--grid recipes read it)

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.zero_point)  # type: ignore[arg-type]

    def layer_fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("modules", "base_hashes", "base_config")}


def _swap_layers(model: nn.Module, settings: Settings) -> list[str]:
    """The one place the API builds layers: the same code `l4q-train` uses (re-point here when it moves)."""
    from .training import methods

    methods.check_args(settings)
    return methods.setup_model(model, settings)


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP / accelerate / torch.compile wrappers keep the real model in `.module` or `._orig_mod`."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def settings_of(model: nn.Module) -> Settings:
    s = getattr(_unwrap(model), SETTINGS_ATTR, None)
    if not isinstance(s, Settings):
        raise L4QInputError("this model was not prepared with l4q_export.prepare (no L4Q layers to save)")
    return s


def prepare(
    model: nn.Module,
    method: str = "l4q",
    bits: int = 4,
    group_size: int = 128,
    zero_point: str = "float",
    rank: int = 4,
    alpha: float = 8.0,
    scale_grid: str = "fp16",
    init: str = "l4q",
    lsq_grad_scale: bool = True,
    seed: int = 0,
    base_dtype: str = "stored",
    **extra: Any,
) -> nn.Module:
    """Swap the decoder linears of a loaded HF LLaMA/Mistral/Qwen2 for the method's quantization-aware layers.

    Everything else is frozen; only the quantizer (scales, offsets) and adapter (LoRA) parameters train.  The
    settings are recorded on the model so `save_checkpoint` writes them.  Extra keyword arguments are the
    method-specific options of `l4q-train` (`qat_lora_export="merge"`, `qalora_base="path/to/gptq"`).
    Load the model in the dtype its shards are stored in (`dtype="auto"`): the export folds the shards.
    base_dtype="int8" holds each frozen W0 as int8 codes + per-row absmax scales (method l4q; `l4q-train
    --base-dtype`): training then learns on that W0', which the checkpoint records and the fold rebuilds.
    """
    from .quant.base_int8 import BASE_DTYPES

    if base_dtype not in BASE_DTYPES:
        raise L4QInputError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, not {base_dtype!r}")
    if isinstance(getattr(model, SETTINGS_ATTR, None), Settings):
        raise L4QInputError("model is already prepared; call prepare once per model")
    if scale_grid not in ("fp32", "fp16"):
        raise L4QInputError("scale_grid must be fp32 or fp16")
    settings = Settings(method, int(bits), int(group_size), zero_point, int(rank), float(alpha), scale_grid, init,
                        bool(lsq_grad_scale), int(seed), base_dtype, dict(extra))
    if getattr(model, "config", None) is not None:
        settings.base_config = model.config.to_dict()
    settings.modules = _swap_layers(model, settings)
    setattr(model, SETTINGS_ATTR, settings)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


def trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(LoRA matrices: weight decay, quantizer scales/offsets: no weight decay) -- the AdamW groups l4q-train uses."""
    from .training import methods

    return methods.optimizer_groups(_unwrap(model), settings_of(model).method)


@torch.no_grad()
def check_base(model: nn.Module, base: BaseWeights) -> int:
    """Refuse unless every frozen tensor the model holds equals the base shard's (compared in fp32, exact)."""
    n = 0
    for name, p in _unwrap(model).named_parameters():
        if p.requires_grad or name not in base:
            continue
        ref = base.get(name)
        if tuple(ref.shape) != tuple(p.shape) or not torch.equal(ref.float(), p.detach().float().cpu()):
            why = f"dtype {p.dtype} vs {ref.dtype} in the file" if p.dtype != ref.dtype else "values differ"
            raise L4QInputError(
                f"{name} in memory differs from {base.dir} ({why}); the export folds the files, so it would not be "
                "the model you trained -- pass the base_dir the model was loaded from (dtype='auto')"
            )
        n += 1
    n += _check_int8_bases(model, base)
    if n == 0:
        raise L4QInputError(f"no tensor of the model was found in {base.dir}; is it the right base_dir?")
    return n


def _check_int8_bases(model: nn.Module, base: BaseWeights) -> int:
    """An int8-base layer's codes and scales must be what the fold will rebuild from the shard (sha256 compared)."""
    from .quant.base_int8 import int8_absmax, int8_digest

    n = 0
    for name, m in _unwrap(model).named_modules():
        if getattr(m, "base_dtype", "stored") != "int8" or name + ".weight" not in base:
            continue
        if int8_digest(*int8_absmax(base.get(name + ".weight"))) != int8_digest(m.weight_int8, m.weight_int8_scale):
            raise L4QInputError(f"{name}: the int8 base in memory is not the int8 quantization of {base.dir}'s weight; "
                                "pass the base_dir the model was loaded from")
        n += 1
    return n


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    copy_base: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the L4Q checkpoint `l4q-train` writes (every exporter, `verify` and `l4q-eval` read it).

    base_dir defaults to the directory the model was loaded from (`config._name_or_path`).  Refuses when the
    in-memory frozen weights differ from that directory's shards, or when the shards changed since the first
    save of this model (sha256).
    """
    from .training import methods

    inner = _unwrap(model)
    s = settings_of(inner)
    if base_dir is None:
        base_dir = getattr(getattr(inner, "config", None), "_name_or_path", "") or ""
        if not base_dir or not Path(base_dir).is_dir():
            raise L4QInputError("save_checkpoint needs base_dir= (the local directory the base model was loaded from)")
    base_dir = Path(base_dir)
    hf_cfg = check_architecture(base_dir)
    if hf_cfg["architectures"][0] != type(inner).__name__:
        arch = hf_cfg["architectures"][0]
        raise L4QInputError(f"model is a {type(inner).__name__} but {base_dir}/config.json describes {arch}")
    base = BaseWeights(base_dir)
    hashes = base.shard_hashes()
    if s.base_hashes and hashes != s.base_hashes:
        raise L4QInputError(f"base shards in {base_dir} changed since this model was prepared/saved (sha256 mismatch)")
    check_base(inner, base)
    s.base_hashes = hashes
    adapter = adapter_tensors(inner)
    write_checkpoint(
        Path(out_dir),
        method=s.method,
        spec=methods.checkpoint_spec(s),
        rank=methods.checkpoint_rank(s),
        lora_alpha=s.alpha,
        fp16_grid=s.scale_grid == "fp16",
        lsq_grad_scale=s.lsq_grad_scale,
        adapter=adapter,
        modules=s.modules,
        base_dir=base_dir,
        base_hashes=hashes,
        architecture=hf_cfg["architectures"][0],
        copy_base=copy_base,
        extra={"training": {**s.layer_fields(), "trainer": "python-api", **(extra or {})}, **methods.checkpoint_extra(s),
               **methods.base_extra(inner)},
    )
    return Path(out_dir)


def load_checkpoint(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The trainable model of a checkpoint: base shards + the same layers, adapter copied in exactly."""
    from .training.surgery import load_adapter_state, load_base_model

    ck = open_checkpoint(out_dir)
    rec = ck.config.get("training", {})
    names = {f.name for f in fields(Settings)} - {"modules", "base_hashes", "base_config"}
    if not names - {"extra", "base_dtype"} <= set(rec):  # base_dtype: absent before --base-dtype existed
        raise L4QInputError(f"{out_dir}: checkpoint has no training record; it cannot be rebuilt for training")
    settings = Settings(**{k: rec[k] for k in names if k in rec})
    model = load_base_model(ck.base_dir)
    modules = _swap_layers(model, settings)
    if modules != ck.modules:
        raise L4QInputError(f"{out_dir}: the model's target layers do not match the checkpoint's module list")
    settings.modules = modules
    settings.base_hashes = dict(ck.config["base_model"].get("shards", {}))
    load_adapter_state(model, load_file(str(Path(out_dir) / ADAPTER_FILE)))
    setattr(model, SETTINGS_ATTR, settings)
    model.config.use_cache = False
    return model.to(device)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`module.tensor` -> tensor of everything the checkpoint's adapter file holds (for tests and inspection)."""
    from .training.surgery import adapter_state

    return {k: v.detach().cpu() for k, v in adapter_state(_unwrap(model)).items()}


def select_kernel(model: nn.Module, kernel: str = "auto", tokens: int = 256) -> dict[str, Any]:
    """Pick the L4Q layers' kernel ("auto", "eager", "compiled"; `l4q-train --kernel`) after a start-up self-check of
    compiled vs eager on the model's own layers; returns {used, reason, ...}.  Call after `prepare` (and `.to(device)`)."""
    from .training.kernel import select_kernel as _select

    return _select(_unwrap(model), kernel, tokens=tokens, seed=settings_of(model).seed)


def project_(model: nn.Module) -> None:
    """Call after each optimizer step (l4q-train does): keeps learned scales above the floor so the grid stays valid."""
    from .training import methods

    methods.project_(_unwrap(model))
