"""The `Method` record and the registry: the only place that knows which training methods exist.

Everything method-specific -- the layer class, how a layer is built for training and rebuilt from a checkpoint,
the fold, the checkpoint's spec/rank/extra keys, whether the export is exact or lossy by design, whether the
method trains at all, and which run-time options it owns -- is a field of its `Method`.  Trainer, fold,
verify, eval and the CLI ask the registry (`get_method`, `method_names`) instead of testing method names.
Adding a method = one `MethodLinear` subclass + one `register(Method(...))` call (see builtin.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...checkpoint import Checkpoint
from ...errors import L4QInputError
from ...quant import QuantizedTensor, QuantSpec
from ...quant.base_int8 import INT8_SCHEME, int8_absmax, int8_dequant, int8_digest
from ...quant.finite import all_finite
from ...quant.kplan import gguf_tensor_name, quantize_untrained, recipe_embedding_type
from ..layer import MethodLinear
from ..surgery import load_base_model, quantized_layers, swap_linears

# (checkpoint, module name, base weight W0, the module's adapter tensors) -> the folded weight
ModuleFolder = Callable[[Checkpoint, str, torch.Tensor, dict], QuantizedTensor]
# (target linear, its name, generator, TrainArgs, the method's per-run context) -> the training layer
LayerMaker = Callable[[nn.Linear, str, torch.Generator, Any, Any], MethodLinear]
# (meta linear holding W0, checkpoint, rank, lora_alpha, adapter tensors) -> the layer, before load_tensors
LayerRebuilder = Callable[[nn.Linear, Checkpoint, int, float, dict], MethodLinear]


def _same_spec(spec: QuantSpec) -> QuantSpec:
    return spec


def _no_extra(args: Any) -> dict[str, Any]:
    return {}


def _no_check(args: Any) -> None:
    return None


def _no_context(args: Any) -> Any:
    return None


@dataclass(frozen=True)
class Method:
    """One training method, complete.

    name:            `l4q-train --method` value and l4q_config.json's "method"
    layer:           its MethodLinear class
    summary:         one line for `--help`
    make_layer:      a fresh training layer for one target linear
    rebuild_layer:   the layer of a saved checkpoint (verify, l4q-eval --forward train); tensors go in by load_tensors
    fold:            the exported QuantizedTensor of one module
    lossy:           True when the export is a re-quantization by design (no file can match the training forward):
                     the runtime reference is then the fold, and verify reports the merge's distance
    trains:          False: the checkpoint is the initial grid (no optimizer steps)
    uses_lora:       False: no LoRA matrices (rank 0 in the checkpoint, --rank unchecked)
    checkpoint_spec: the spec of the *folded* tensors, from the training spec
    checkpoint_extra: method keys written into l4q_config.json (read back by the fold)
    options:         TrainArgs.extra keys only this method reads; refused (when set) with any other method
    int8_base:       its layer can hold W0 as int8 (--base-dtype int8; the fold then rebuilds that W0')
    validate:        method-specific option checks (one L4QInputError line each)
    prepare:         per-run context handed to make_layer (e.g. QA-LoRA's GPTQ base), built once
    """

    name: str
    layer: type[MethodLinear]
    summary: str
    make_layer: LayerMaker
    rebuild_layer: LayerRebuilder
    fold: ModuleFolder
    lossy: bool = False
    trains: bool = True
    uses_lora: bool = True
    checkpoint_spec: Callable[[QuantSpec], QuantSpec] = _same_spec
    checkpoint_extra: Callable[[Any], dict[str, Any]] = _no_extra
    options: tuple[str, ...] = ()
    int8_base: bool = False
    validate: Callable[[Any], None] = _no_check
    prepare: Callable[[Any], Any] = _no_context

    @property
    def reference_forward(self) -> str:
        """The forward a runtime artifact is compared with: the training layers, or the fold for lossy methods."""
        return "fold" if self.lossy else "train"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the `--method` choices)."""
    return tuple(_REGISTRY)


def get_method(name: str, what: str = "method") -> Method:
    """The registered method, or one clear L4QInputError line naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise L4QInputError(f"{what} {name!r} is not available; choose one of {', '.join(_REGISTRY)}") from None


def checkpoint_method(ck: Checkpoint) -> Method:
    return get_method(ck.method, "checkpoint method")


# ------------------------------------------------------------------------------------------------
# What trainer.py asks of a method
# ------------------------------------------------------------------------------------------------

def check_args(args: Any) -> None:
    """Refuse option combinations a method cannot honour (one clear line each)."""
    method = get_method(args.method)
    if method.uses_lora and args.rank < 1:
        raise L4QInputError("--rank must be >= 1")
    for other in _REGISTRY.values():
        for key in other.options:
            if other is not method and args.extra.get(key):
                flag = "--" + key.replace("_", "-")
                raise L4QInputError(f"{flag} is a {other.name} option; use it with --method {other.name}")
    if getattr(args, "base_dtype", "stored") != "stored" and not method.int8_base:
        raise L4QInputError(f"--base-dtype {args.base_dtype} is not available with --method {method.name} (l4q only)")
    method.validate(args)


def checkpoint_spec(args: Any) -> QuantSpec:
    """The spec the *folded* tensors have (QA-LoRA's merge makes float minima; DL-QAT keeps integer zeros)."""
    return get_method(args.method).checkpoint_spec(args.spec())


def trains(method: str) -> bool:
    return get_method(method).trains


def checkpoint_rank(args: Any) -> int:
    return args.rank if get_method(args.method).uses_lora else 0


def checkpoint_extra(args: Any) -> dict[str, Any]:
    """Method-specific keys written into l4q_config.json (read back by the fold)."""
    return get_method(args.method).checkpoint_extra(args)


def setup_model(model: nn.Module, args: Any) -> list[str]:
    """Swap the target linears for the method's layers in place; returns the module names."""
    method = get_method(args.method)
    context = method.prepare(args)
    return swap_linears(model, lambda name, lin, gen: method.make_layer(lin, name, gen, args, context), seed=args.seed)


def optimizer_groups(model: nn.Module, method: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weight-decayed LoRA matrices, undecayed quantizer parameters) for AdamW."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    if not trains(method):
        return decay, no_decay
    for _, layer in quantized_layers(model):
        d, n = layer.param_groups()
        decay += d
        no_decay += n
    return decay, no_decay


def lr_param_groups(model: nn.Module, method: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the (decayed LoRA, undecayed quantizer) pair of `optimizer_groups`, then one group per
    parameter set of layers that want their own learning rate (`lr_groups`: KQuantLinear's d ~ 1e-3 and integer
    sub-scales cannot share LoRA's lr).  Each group's `lr_scale` multiplies the schedule's lr."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    own: list[dict[str, Any]] = []
    if trains(method):
        for _, layer in quantized_layers(model):
            if hasattr(layer, "lr_groups"):
                for i, g in enumerate(layer.lr_groups(lr)):
                    own.append({"params": g["params"], "weight_decay": weight_decay if i == 0 else 0.0,
                                "lr_scale": g["lr"] / lr})
                continue
            d, n = layer.param_groups()
            decay += d
            no_decay += n
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *own]


def grid_extra(model: nn.Module) -> dict[str, Any]:
    """`module_grids` for l4q_config.json (format version 2) when layers carry a per-module grid; else nothing."""
    grids = {name: layer.grid for name, layer in quantized_layers(model) if getattr(layer, "grid", None) is not None}
    return {"module_grids": grids} if grids else {}


def base_extra(model: nn.Module) -> dict[str, Any]:
    """`base_dtype` + `base_int8` for l4q_config.json when layers hold W0 as int8: the scheme and, per module, the
    sha256 of the codes and scales training used (the fold recomputes them from the shard and compares)."""
    digests = {name: int8_digest(layer.weight_int8, layer.weight_int8_scale) for name, layer in quantized_layers(model)
               if getattr(layer, "base_dtype", "stored") == "int8"}
    return {"base_dtype": "int8", "base_int8": {"scheme": INT8_SCHEME, "sha256": digests}} if digests else {}


def training_base(ck: Checkpoint, module: str | None, W0: torch.Tensor) -> torch.Tensor:
    """The W0 the module trained on: the stored shard's, or (`base_dtype: int8`) its int8 W0' rebuilt on CPU exactly as
    training built it, refused unless its sha256 is the one the checkpoint recorded."""
    if ck.config.get("base_dtype", "stored") != "int8":
        return W0
    q, s = int8_absmax(W0.cpu())
    want = ck.config["base_int8"]["sha256"].get(module or "")
    if want is None or int8_digest(q, s) != want:
        raise L4QInputError(f"{ck.dir}: the int8 base of {module} rebuilt from {ck.base_dir} does not match the hash "
                            "training recorded; the base shards or the int8 quantizer changed -- restore the original base")
    return int8_dequant(q, s)


@torch.no_grad()
def project_(model: nn.Module) -> None:
    """After each step: learned scales stay above SCALE_FLOOR (each layer's MethodLinear.project_)."""
    for _, layer in quantized_layers(model):
        layer.project_()


# ------------------------------------------------------------------------------------------------
# What fold, verify and eval ask of a checkpoint's method
# ------------------------------------------------------------------------------------------------

def fold_module(ck: Checkpoint, module: str, W0: torch.Tensor) -> QuantizedTensor:
    """The folded weight of one quantized module (refuses a non-finite base weight)."""
    if not all_finite(W0):
        raise L4QInputError(f"base weight {module}.weight contains NaN/Inf")
    W0 = training_base(ck, module, W0)
    return checkpoint_method(ck).fold(ck.for_module(module), module, W0, ck.adapter(module))


def meta_linear(W0: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding W0 (frozen) whose construction allocates nothing else."""
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W0, requires_grad=False)
    return lin


def build_layer(ck: Checkpoint, W0: torch.Tensor, t: dict[str, torch.Tensor], module: str | None = None) -> MethodLinear:
    """Rebuild the module's *training* layer from its base weight and saved tensors (verify and l4q-eval use it).

    `module` selects the module's own grid in a per-module (format version 2) checkpoint."""
    rank, lora_alpha = int(ck.config["lora"]["rank"]), float(ck.config["lora"]["alpha"])
    W0 = training_base(ck, module, W0)
    view = ck if module is None else ck.for_module(module)
    layer = checkpoint_method(ck).rebuild_layer(meta_linear(W0), view, rank, lora_alpha, t)
    layer.load_tensors(t)
    return layer


def apply_checkpoint(model: nn.Module, ck: Checkpoint, forward: str = "fold") -> None:
    """Put a checkpoint into a loaded base model, for evaluation or as a runtime reference.

    forward="fold":  each target linear gets dequant(fold) as its fp32 weight -- exactly the weights every exporter
                     writes (for exact methods this equals the training W_q bit for bit; for lora/qat-lora it is
                     the merge).
    forward="train": each target linear is replaced by the method's training layer (qat-lora's 4+16 mixed
                     precision, lora's float W0 + alpha*B@A, ...), i.e. what the training loss saw.  The layer holds
                     W0 in the shard's stored dtype, as in training: every layer widens W0 to fp32 where it
                     computes, so the numbers are those of an fp32 W0 at half its memory for a 16-bit base.
    The model's other weights keep whatever dtype they were loaded in (`checkpoint_model` widens them).
    """
    if forward not in ("fold", "train"):
        raise L4QInputError(f"forward must be fold or train, not {forward!r}")
    checkpoint_method(ck)
    base = ck.base()
    for module in ck.modules:
        W0 = base.get(module + ".weight")
        if forward == "fold":
            model.get_submodule(module).weight.data = fold_module(ck, module, W0).dequantize().float()
            continue
        orig = model.get_submodule(module)
        layer = build_layer(ck, W0, ck.adapter(module), module)
        layer.bias = orig.bias
        model.set_submodule(module, layer)


def checkpoint_model(ck: Checkpoint, forward: str) -> nn.Module:
    """The base with the checkpoint applied (`apply_checkpoint`), computing in fp32 throughout.

    Loaded in the stored dtype, not as an fp32 model: the training layers keep their frozen W0 as stored (they
    widen it chunk by chunk), and only the rest -- embeddings, norms, the head, the folded weights -- is fp32.
    Widening is exact, so the logits are those of the all-fp32 model, bit for bit; what changes is the memory: a
    7B fp16 base is ~14 GB instead of ~27 (and loading skips the fp16 -> fp32 copy of every linear)."""
    model = load_base_model(ck.base_dir)
    apply_checkpoint(model, ck, forward)
    for mod in model.modules():
        if not isinstance(mod, MethodLinear):
            _widen_module(model, mod)
    return model.eval()


def _widen_module(model: nn.Module, mod: nn.Module) -> None:
    """`mod`'s own parameters and buffers in fp32, with the values an fp32 load gives.

    Loaded tensors widen exactly.  A non-persistent buffer (Gemma's embedding scale sqrt(hidden), RoPE's
    frequencies) is not in the shards: transformers computes it at load in the load dtype, so a bf16 load holds
    bf16(sqrt(640)) = 25.25 where an fp32 load holds 25.298.  Such a buffer is recomputed in fp32 by the model's
    own initializer, which skips every tensor the load marked as loaded."""
    for p in mod.parameters(recurse=False):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()  # in place on the Parameter: tied embeddings stay one tensor
    recompute = False
    for name, b in mod.named_buffers(recurse=False):
        if not b.is_floating_point() or b.dtype == torch.float32:
            continue
        if name in mod._non_persistent_buffers_set:
            setattr(mod, name, torch.empty_like(b, dtype=torch.float32))  # a buffer's name: stays a buffer
            recompute = True
        else:
            setattr(mod, name, b.float())
    if recompute:
        model._init_weights(mod)


def reference_model(ck: Checkpoint) -> nn.Module:
    """The PyTorch model every runtime check (GGUF, ONNX, safetensors) compares an artifact against (fp32 compute).

    Exact methods get their own training layers -- the forward the loss saw, which the export must reproduce.
    Lossy methods (lora / qat-lora) export a re-quantized merge by design, so no file can match their training
    forward; they are compared with the fold (the weights written), and `verify` on the checkpoint reports the
    merge's distance.
    """
    model = checkpoint_model(ck, checkpoint_method(ck).reference_forward)
    _recipe_embeddings(model, ck)
    return model


@torch.no_grad()
def _recipe_embeddings(model: nn.Module, ck: Checkpoint) -> None:
    """A --grid recipe's GGUF quantizes the (untrained) token embeddings and output head as llama-quantize does
    (Q6_K / Q4_K ...); the reference holds those same decoded weights, so the runtime check measures the runtime."""
    grid = ck.config.get("grid")
    cfg = ck.model_config()
    names = set(ck.base().names())
    for hf_name, lin in (("model.embed_tokens.weight", model.get_input_embeddings()),
                         ("lm_head.weight", model.get_output_embeddings())):
        if hf_name not in names:  # tied: the one shared matrix is typed as token_embd (recipe's tied rule)
            continue
        w = lin.weight
        t = recipe_embedding_type(grid, gguf_tensor_name(hf_name, cfg), tuple(w.shape), cfg)
        if t is not None:
            w.copy_(torch.from_numpy(quantize_untrained(t, w)[1]))
