"""The L4Q checkpoint directory: the `model_dir` every exporter reads.

    l4q_config.json          format version, method, QuantSpec, LoRA settings, quantized modules,
                             base model path and the sha256 of each base shard
    l4q_adapter.safetensors  per module: lora_A, lora_B, scale, offset (whatever the method trains)
    config.json, tokenizer*  copied from the base so the directory describes the model by itself
    base/                    only with --copy-base: the base shards, making the directory self-contained

Base weights are read lazily with `safetensors.safe_open`, one tensor at a time; pickled `.bin`
checkpoints are refused rather than unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import SUPPORTED
from .errors import L4QInputError
from .guard import check_not_input, protect
from .quant import QuantSpec
from .quant.finite import all_finite
from .quant.kplan import ModuleGrid, grid_from_dict
from .quant.kquant import KQuantSpec

FORMAT_NAME = "l4q-checkpoint"
FORMAT_VERSION = 2  # 2: a grid per quantized module (`module_grids`, l4q-train --grid); 1 still reads
CONFIG_FILE = "l4q_config.json"
ADAPTER_FILE = "l4q_adapter.safetensors"
SUPPORTED_ARCHITECTURES = SUPPORTED  # the table in arch.py
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# (path, device, inode, size, mtime_ns, ctime_ns) -> sha256 of the base shards hashed in this process
_SHARD_HASHES: dict[tuple[str, int, int, int, int, int], str] = {}
_RACY_SECONDS = 2.0


def shard_sha256(path: Path) -> str:
    """sha256 of a base shard, read once per process for each version of the file.

    One command opens its checkpoint more than once (verify: every level), and a shard is gigabytes.  The key is the
    file's identity and change times; ctime cannot be set back by any user tool.  A file changed less than
    `_RACY_SECONDS` before it was hashed is not remembered: file timestamps are coarse (jiffies), so a rewrite in the
    same tick could keep the key ("racy" files, as git handles them)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _SHARD_HASHES:
        return _SHARD_HASHES[key]
    started = time.time_ns()
    digest = sha256_file(path)
    if started - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_SECONDS * 1e9:
        _SHARD_HASHES[key] = digest
    return digest


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise L4QInputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise L4QInputError(f"{what} is not valid JSON: {path} ({e})") from None


# Keys each supported architecture's modelling code reads; transformers would fill a missing one with a default
# (e.g. 32 layers), silently building a different model from the one the shards hold.
REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_architecture(base_dir: Path) -> dict[str, Any]:
    """Read the base config.json and refuse architectures we cannot quantize exactly."""
    cfg = read_json(Path(base_dir) / "config.json", "base model config.json")
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise L4QInputError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} in {base_dir}/config.json; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for key in REQUIRED_CONFIG_KEYS:
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise L4QInputError(
                f"{base_dir}/config.json: {key!r} is {'missing' if v is None else repr(v)}; it must be a positive integer "
                "(restore the model's original config.json)"
            )
    return cfg


class BaseWeights:
    """Lazy, read-only access to a base model's safetensors shards (one tensor in memory at a time)."""

    def __init__(self, base_dir: Path) -> None:
        self.dir = Path(base_dir)
        protect(self.dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "safetensors index")["weight_map"]
            self.shards = sorted(set(weight_map.values()))
            self.location = dict(weight_map)
        elif (self.dir / "model.safetensors").is_file():
            self.shards = ["model.safetensors"]
            self.location = {}
        else:
            pickles = list(self.dir.glob("*.bin")) + list(self.dir.glob("*.pt"))
            hint = " (found pickled weights, which are never unpickled: convert them to safetensors first)" if pickles else ""
            raise L4QInputError(f"no safetensors weights in {self.dir}{hint}")
        if not self.location:
            with self._open("model.safetensors") as f:
                self.location = {k: "model.safetensors" for k in f.keys()}

    def _open(self, shard: str):
        """A fresh handle per read: a long-lived mmap keeps every page it touched resident, so peak RSS
        would grow with the model; reopening costs one header parse and keeps memory at one tensor."""
        path = self.dir / shard
        if not path.is_file():
            raise L4QInputError(f"base shard missing: {path}")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise L4QInputError(f"corrupt safetensors file {path}: {e}") from None

    def names(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise L4QInputError(f"tensor {name} not found in base model {self.dir}")
        with self._open(self.location[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise L4QInputError(f"cannot read tensor {name} from {self.dir / self.location[name]}: {e}") from None

    def shard_hashes(self) -> dict[str, str]:
        return {s: shard_sha256(self.dir / s) for s in self.shards}


@dataclass
class Checkpoint:
    """A loaded l4q_config.json plus lazy access to its adapter and base."""

    dir: Path
    config: dict[str, Any]
    base_dir: Path
    _base_check: Future[None] | None = field(default=None, repr=False)

    def confirm_base(self) -> None:
        """Wait for a base-shard hash check started by `load_checkpoint(..., overlap_hashes=True)`; raises its
        L4QInputError.  Exporters call it (through `fold_checkpoint`) after the last tensor and before committing
        their output, so a changed base still produces no file -- the hashing just ran beside the fold."""
        if self._base_check is not None:
            check, self._base_check = self._base_check, None
            check.result()

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.from_dict(self.config["quant"])

    @property
    def module_grids(self) -> dict[str, ModuleGrid] | None:
        """Per-module grids of a format-version-2 checkpoint (None: every module uses `spec`)."""
        raw = self.config.get("module_grids")
        if raw is None:
            return None
        return {m: grid_from_dict(g, f"{self.dir / CONFIG_FILE} module_grids[{m!r}]") for m, g in raw.items()}

    @property
    def kspec(self) -> KQuantSpec | None:
        """The K-quant grid of a per-module view (`for_module`); None for uniform-grid modules."""
        g = self.config.get("module_grid")
        return None if g is None or g.get("grid") != "kquant" else grid_from_dict(g, str(self.dir / CONFIG_FILE))

    def for_module(self, module: str) -> Checkpoint:
        """The checkpoint as one module sees it: `spec` is that module's uniform spec, `kspec` its K grid.

        Methods read `ck.spec` / `ck.kspec`, so per-module grids reach every fold and rebuild without new
        signatures; a version-1 checkpoint (one spec for all) is returned unchanged."""
        grids = self.config.get("module_grids")
        if grids is None:
            return self
        g = grids.get(module)
        if g is None:
            raise L4QInputError(f"{self.dir / CONFIG_FILE}: module_grids has no entry for {module}")
        quant = self.config["quant"] if g["grid"] == "kquant" else {k: g[k] for k in ("bits", "group_size", "zero_point")}
        return Checkpoint(dir=self.dir, config={**self.config, "quant": quant, "module_grid": g}, base_dir=self.base_dir)

    @property
    def modules(self) -> list[str]:
        return list(self.config["modules"])

    @property
    def lora_scale(self) -> float:
        """The LoRA scaling alpha/r (l4q_config.json lora.scaling), not lora_alpha itself."""
        return float(self.config["lora"]["scaling"])

    @property
    def fp16_grid(self) -> bool:
        return self.config.get("scale_grid", "fp32") == "fp16"

    @property
    def architecture(self) -> str:
        return self.config["base_model"]["architecture"]

    def model_config(self) -> dict[str, Any]:
        return read_json(self.dir / "config.json", "model config.json")

    def adapter(self, module: str) -> dict[str, torch.Tensor]:
        """The trained tensors of one module, read from l4q_adapter.safetensors through a fresh handle per module
        (as `BaseWeights` reads the base): a handle kept open keeps every page it touched resident, so a fold's peak
        RSS grew by the adapter's size, ~17 MB per 7B layer at rank 16.  Reopening costs one header parse."""
        path = self.dir / ADAPTER_FILE
        if not path.is_file():
            raise L4QInputError(f"adapter file missing: {path}")
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:
            raise L4QInputError(f"corrupt adapter file {path}: {e}") from None
        prefix = module + "."
        with f:
            out = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        if "scale" not in out and "d" not in out:  # d: a K-grid module (KQuantLinear)
            raise L4QInputError(f"adapter has no tensors for module {module} ({self.dir / ADAPTER_FILE})")
        for k, t in out.items():
            if not all_finite(t):
                raise L4QInputError(f"adapter tensor {module}.{k} contains NaN/Inf")
        if "scale" in out and (out["scale"] <= 0).any():
            raise L4QInputError(f"adapter tensor {module}.scale has zero or negative scales")
        return out

    def base(self) -> BaseWeights:
        return BaseWeights(self.base_dir)


def _check_shards(base_dir: Path, expected: dict[str, str]) -> None:
    for shard, digest in expected.items():
        path = base_dir / shard
        if shard_sha256(path) != digest:
            raise L4QInputError(
                f"base shard {path} changed since training (sha256 mismatch); "
                "the trained codes would not match -- restore the original base model"
            )


def load_checkpoint(model_dir: str | os.PathLike, check_hashes: bool = True, overlap_hashes: bool = False) -> Checkpoint:
    """Open an L4Q checkpoint, resolve its base model and (by default) verify the base shard hashes.

    overlap_hashes: hash on a background thread instead (a 7B base is ~13 GB of sha256, seconds of CPU) and leave
    the verdict to `Checkpoint.confirm_base`; only for callers that confirm before any result leaves them
    (`fold_checkpoint` does, after its last tensor)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise L4QInputError(f"model directory not found: {d}")
    cfg = read_json(d / CONFIG_FILE, "L4Q checkpoint config")
    if cfg.get("format") != FORMAT_NAME:
        raise L4QInputError(f"{d / CONFIG_FILE} is not an L4Q checkpoint config")
    from .schema import validate_config

    validate_config(cfg, d / CONFIG_FILE)
    if cfg["format_version"] > FORMAT_VERSION:
        raise L4QInputError(
            f"checkpoint format version {cfg['format_version']} is newer than this l4q-export supports ({FORMAT_VERSION})"
        )
    base_path = Path(cfg["base_model"]["path"])
    base_dir = base_path if base_path.is_absolute() else (d / base_path)
    if not base_dir.is_dir():
        raise L4QInputError(
            f"base model directory {base_dir} (recorded in {d / CONFIG_FILE}) does not exist; "
            "re-train with --copy-base for a self-contained checkpoint"
        )
    protect(d)
    protect(base_dir)
    ck = Checkpoint(dir=d, config=cfg, base_dir=base_dir)
    if check_hashes:
        expected = cfg["base_model"].get("shards", {})
        for shard in expected:
            if not (base_dir / shard).is_file():
                raise L4QInputError(f"base shard {base_dir / shard} is missing")
        if overlap_hashes:
            pool = ThreadPoolExecutor(1, thread_name_prefix="l4q-sha256")  # hashlib releases the GIL
            ck._base_check = pool.submit(_check_shards, base_dir, expected)
            pool.shutdown(wait=False)
        else:
            _check_shards(base_dir, expected)
    from .schema import validate_checkpoint

    validate_checkpoint(ck, d / ADAPTER_FILE, check_architecture(base_dir))
    return ck


MARKER = ".l4q-export"  # written into every directory AtomicDir creates: only such directories are replaced


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare(final: Path) -> list[Path]:
    """Refuse inputs as destinations; create the parent; remove our stale siblings left by a killed run.

    Returns the directories it created (deepest first) so a failed write can remove them again."""
    check_not_input(final, "output")
    parent = final.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise L4QInputError(f"output {final}: {probe} is a file, not a directory")
    created = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{glob_escape(final.name)}.{kind}-*"):
            pid = stale.name[len(final.name) + len(kind) + 3 :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return created


def _unmake(created: list[Path]) -> None:
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class AtomicDir:
    """Build a directory under a temporary name beside `final` and rename it into place on success.

    On any exception the temporary directory is removed and `final` is left as it was.  An existing `final`
    is replaced only if it is a directory this tool made (it holds MARKER) or is empty; a file is never
    turned into a directory, and a protected input is never a destination.
    """

    def __init__(self, final: Path, overwrite: bool = True) -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        f = self.final
        if f.exists() and not f.is_dir():
            raise L4QInputError(f"output {f} exists and is not a directory; remove it or choose another path")
        if f.is_dir() and any(f.iterdir()) and not (f / MARKER).exists():
            raise L4QInputError(
                f"output directory {f} exists and was not written by l4q-export; remove it or choose another path"
            )
        self.created = _prepare(f)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{f.name}.tmp-{os.getpid()}-", dir=f.parent))
        (self.tmp / MARKER).write_text("written by l4q-export; this directory may be replaced by the next export\n")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _unmake(self.created)
            return
        if self.final.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise L4QInputError(f"{self.final} exists")
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


class AtomicFile:
    """Write a file under a temporary name in the same directory; rename over `final` only on success.

    A directory is never replaced by a file, and a protected input is never a destination.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.final.is_dir():
            raise L4QInputError(f"output {self.final} is a directory; give a file path")
        self.created = _prepare(self.final)
        fd, name = tempfile.mkstemp(prefix=f".{self.final.name}.tmp-{os.getpid()}-", dir=self.final.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            _unmake(self.created)
            return
        os.replace(self.tmp, self.final)


def write_checkpoint(
    out_dir: Path,
    *,
    method: str,
    spec: QuantSpec,
    rank: int,
    lora_alpha: float,
    fp16_grid: bool,
    lsq_grad_scale: bool,
    adapter: dict[str, torch.Tensor],
    modules: list[str],
    base_dir: Path,
    base_hashes: dict[str, str],
    architecture: str,
    copy_base: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint files into `out_dir` (each file atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = Path(base_dir).resolve()
    if copy_base:
        dst = out_dir / "base"
        dst.mkdir(exist_ok=True)
        for shard in base_hashes:
            with AtomicFile(dst / shard) as tmp:
                shutil.copyfile(base_dir / shard, tmp)
        idx = base_dir / "model.safetensors.index.json"
        if idx.is_file():
            shutil.copyfile(idx, dst / idx.name)
        shutil.copyfile(base_dir / "config.json", dst / "config.json")
        base_ref = "base"
    else:
        base_ref = str(base_dir)
    shutil.copyfile(base_dir / "config.json", out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    with AtomicFile(out_dir / ADAPTER_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp), metadata={"format": FORMAT_NAME})
    cfg = {
        "format": FORMAT_NAME,
        "format_version": 2 if extra and "module_grids" in extra else 1,  # v1 bytes unchanged for one-spec runs
        "method": method,
        "quant": spec.to_dict(),
        "scale_grid": "fp16" if fp16_grid else "fp32",
        "lsq_grad_scale": lsq_grad_scale,
        "lora": {"rank": rank, "alpha": lora_alpha, "scaling": (lora_alpha / rank) if rank > 0 else 0.0},
        "modules": modules,
        "base_model": {"path": base_ref, "architecture": architecture, "shards": base_hashes},
        **(extra or {}),
    }
    with AtomicFile(out_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
