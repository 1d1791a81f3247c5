"""Hostile inputs (issue 9): each is refused with one line naming the culprit, no traceback, and nothing changed.

Every case runs in a fresh workspace (base model, checkpoint, data); the whole workspace is hashed before and
after, so "inputs untouched" and "nothing partial left at or beside the output" are one assertion.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import REPO, make_checkpoint
from safetensors.torch import load_file, save_file

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@dataclass
class W:
    """One case's workspace."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def ck(self) -> Path:
        return self.root / "ck"

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def adapter(self) -> Path:
        return self.ck / "l4q_adapter.safetensors"

    def edit_json(self, path: Path, fn: Callable[[dict], None]) -> None:
        d = json.loads(path.read_text())
        fn(d)
        path.write_text(json.dumps(d))

    def edit_adapter(self, fn: Callable[[dict], None]) -> None:
        t = load_file(str(self.adapter))
        fn(t)
        save_file(t, str(self.adapter))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_base) -> Path:
    from l4q_export.demo import instruction_records

    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(tiny_base, root / "base")
    make_checkpoint(root / "base", root / "ck")
    (root / "data.json").write_text(json.dumps(instruction_records(24)))
    return root


@pytest.fixture
def w(tmp_path, pristine) -> W:
    ws = W(tmp_path / "ws")
    shutil.copytree(pristine, ws.root)
    ws.edit_json(ws.ck / "l4q_config.json", lambda c: c["base_model"].update(path=str(ws.base)))
    return ws


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


TRAIN = ["--steps", "1", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "64", "--group-size", "32"]


def train(w: W, out: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    return ["train", "--model", str(w.base), "--data", str(data or w.data), "--out", str(out or w.root / "o"), *TRAIN, *extra]


def export(w: W, to: str, out: Path, *extra: str) -> list[str]:
    return ["export", "--to", to, str(w.ck), "-o", str(out), *extra]


def _cmd(name: str):
    if name == "train":
        from l4q_export.cli import train_cmd

        return train_cmd
    if name == "export":
        from l4q_export.cli import _export_command

        return _export_command()
    if name == "verify":
        from l4q_export.verify import main

        return main
    from l4q_export.eval.cli import main

    return main


def _bad_pickle(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    path.write_bytes(pickle.dumps({"spec": Evil()}))


def _resume_dir(w: W, content: Callable[[Path], None]) -> None:
    o = w.root / "o"
    shutil.copytree(w.ck, o)
    content(o / "trainer_state.pt")


def _drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def _set(key: str, value) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        t[key] = value

    return fn


def _readonly(p: Path) -> None:
    p.mkdir(parents=True, exist_ok=True)
    p.chmod(0o555)


L0 = "model.layers.0.self_attn.q_proj"
Case = Any  # (name, prepare, argv, exit code, needle) or a pytest.param of it
NOP: Callable[[W], None] = lambda w: None

CASES: list[Case] = [
    # ---- critical: an export into its own checkpoint
    ("export-safetensors-into-ck", NOP, lambda w: export(w, "safetensors", w.ck, "--allow-lossy"), 2, "input"),
    ("export-onnx-into-ck", NOP, lambda w: export(w, "onnx", w.ck), 2, "input"),
    ("export-gguf-over-adapter", NOP, lambda w: export(w, "gguf", w.adapter), 2, "input"),
    ("export-gguf-into-ck-subdir", NOP, lambda w: export(w, "gguf", w.ck / "x" / "m.gguf"), 2, "input"),
    ("export-onnx-into-base", NOP, lambda w: export(w, "onnx", w.base / "onnx"), 2, "input"),
    # ---- high: damaged adapter / base config
    ("export-missing-lora_B", lambda w: w.edit_adapter(_drop(f"{L0}.lora_B")), lambda w: export(w, "gguf", w.root / "m.gguf"),
     2, "lora_B"),
    ("verify-missing-lora_B", lambda w: w.edit_adapter(_drop(f"{L0}.lora_B")), lambda w: ["verify", str(w.ck)], 2, "lora_B"),
    ("verify-missing-scale", lambda w: w.edit_adapter(_drop(f"{L0}.scale")), lambda w: ["verify", str(w.ck)], 2, "scale"),
    ("train-no-num_hidden_layers", lambda w: w.edit_json(w.base / "config.json", _drop("num_hidden_layers")),
     lambda w: train(w), 2, "num_hidden_layers"),
    ("train-wrong-num_hidden_layers", lambda w: w.edit_json(w.base / "config.json", _set("num_hidden_layers", 32)),
     lambda w: train(w), 2, "num_hidden_layers"),
    ("train-no-hidden_size", lambda w: w.edit_json(w.base / "config.json", _drop("hidden_size")), lambda w: train(w), 2,
     "hidden_size"),
    ("export-base-no-num_hidden_layers", lambda w: w.edit_json(w.base / "config.json", _drop("num_hidden_layers")),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "num_hidden_layers"),
    # ---- high: --out found bad only at save time
    ("train-out-existing-file", lambda w: (w.root / "o").write_text("x"), lambda w: train(w), 2, "not a directory"),
    ("train-out-equals-model", NOP, lambda w: train(w, w.base), 2, "input"),
    ("train-out-inside-model", NOP, lambda w: train(w, w.base / "run"), 2, "input"),
    ("train-out-equals-data", NOP, lambda w: train(w, w.data), 2, "input"),
    ("train-out-foreign-dir", lambda w: (w.root / "o").mkdir() or (w.root / "o" / "notes.txt").write_text("mine"),
     lambda w: train(w), 2, "not an L4Q checkpoint"),
    ("train-out-under-a-file", lambda w: (w.root / "f").write_text("x"), lambda w: train(w, w.root / "f" / "o"), 2, "is a file"),
    # ---- medium: wrong kind / --json collisions
    ("export-safetensors-over-file", lambda w: (w.root / "st").write_text("x"),
     lambda w: export(w, "safetensors", w.root / "st", "--allow-lossy"), 2, "not a directory"),
    ("export-onnx-over-file", lambda w: (w.root / "ox").write_text("x"), lambda w: export(w, "onnx", w.root / "ox"), 2,
     "directory"),
    ("export-gguf-under-a-file", lambda w: (w.root / "f").write_text("x"), lambda w: export(w, "gguf", w.root / "f" / "m.gguf"),
     2, "is a file"),
    ("export-onnx-over-foreign-dir", lambda w: (w.root / "od").mkdir() or (w.root / "od" / "keep.txt").write_text("k"),
     lambda w: export(w, "onnx", w.root / "od"), 2, "not written by l4q-export"),
    ("export-json-equals-output", NOP,
     lambda w: export(w, "gguf", w.root / "m.gguf", "--json", str(w.root / "m.gguf")), 2, "--json"),
    ("export-json-inside-output", NOP,
     lambda w: export(w, "onnx", w.root / "od", "--json", str(w.root / "od" / "r.json")), 2, "--json"),
    ("export-json-into-ck", NOP, lambda w: export(w, "gguf", w.root / "m.gguf", "--json", str(w.ck / "r.json")), 2, "input"),
    ("export-json-under-a-file", lambda w: (w.root / "f").write_text("x"),
     lambda w: export(w, "gguf", w.root / "m.gguf", "--json", str(w.root / "f" / "r.json")), 2, "is a file"),
    ("verify-json-into-ck", NOP, lambda w: ["verify", str(w.ck), "--json", str(w.ck / "r.json")], 2, "input"),
    ("eval-json-is-dir", lambda w: (w.root / "jd").mkdir(),
     lambda w: ["eval", str(w.ck), "--text", str(w.data), "--json", str(w.root / "jd")], 2, "is a directory"),
    # ---- medium: bad values / files that used to give a traceback
    ("train-non-utf8-data", lambda w: (w.root / "d.json").write_bytes(b'[{"instruction": "\xff\xfe", "output": "x"}]'),
     lambda w: train(w, data=w.root / "d.json"), 2, "UTF-8"),
    ("train-lr-nan", NOP, lambda w: train(w, None, None, "--lr", "nan"), 2, "--lr"),
    ("train-lr-negative", NOP, lambda w: train(w, None, None, "--lr", "-1"), 2, "--lr"),
    ("train-alpha-nan", NOP, lambda w: train(w, None, None, "--alpha", "nan"), 2, "--alpha"),
    ("train-batch-size-0", NOP, lambda w: train(w, None, None, "--batch-size", "0"), 2, "--batch-size"),
    ("train-seq-len-0", NOP, lambda w: train(w, None, None, "--seq-len", "0"), 2, "--seq-len"),
    ("train-weight-decay-inf", NOP, lambda w: train(w, None, None, "--weight-decay", "inf"), 2, "--weight-decay"),
    ("train-resume-random-state", lambda w: _resume_dir(w, lambda p: p.write_bytes(os.urandom(512))),
     lambda w: train(w, None, None, "--resume"), 2, "trainer_state.pt"),
    ("train-resume-malicious-state", lambda w: _resume_dir(w, _bad_pickle), lambda w: train(w, None, None, "--resume"), 2,
     "trainer_state.pt"),
    ("train-resume-without-state", lambda w: _resume_dir(w, lambda p: None), lambda w: train(w, None, None, "--resume"), 2,
     "trainer_state.pt"),
    ("export-wrong-shape-lora_A", lambda w: w.edit_adapter(lambda t: t.update({f"{L0}.lora_A": t[f"{L0}.lora_A"][:2]})),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "lora_A"),
    ("export-wrong-shape-scale",
     lambda w: w.edit_adapter(lambda t: t.update({f"{L0}.scale": t[f"{L0}.scale"][:, :1].contiguous()})),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "scale"),
    ("export-nan-offset", lambda w: w.edit_adapter(lambda t: t[f"{L0}.offset"].fill_(float("nan"))),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "NaN"),
    ("export-negative-scale", lambda w: w.edit_adapter(lambda t: t[f"{L0}.scale"].neg_()),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "scale"),
    ("export-int-dtype-lora_B", lambda w: w.edit_adapter(lambda t: t.update({f"{L0}.lora_B": t[f"{L0}.lora_B"].int()})),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "dtype"),
    ("export-stray-adapter-tensor", lambda w: w.edit_adapter(lambda t: t.update({"model.x.lora_A": t[f"{L0}.lora_A"].clone()})),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "model.x.lora_A"),
    ("export-format-version-abc", lambda w: w.edit_json(w.ck / "l4q_config.json", _set("format_version", "abc")),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "format_version"),
    ("verify-format-version-abc", lambda w: w.edit_json(w.ck / "l4q_config.json", _set("format_version", "abc")),
     lambda w: ["verify", str(w.ck)], 2, "format_version"),
    ("export-missing-base_model", lambda w: w.edit_json(w.ck / "l4q_config.json", _drop("base_model")),
     lambda w: export(w, "onnx", w.root / "od"), 2, "base_model"),
    ("export-empty-modules", lambda w: w.edit_json(w.ck / "l4q_config.json", _set("modules", [])),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "modules"),
    ("export-unknown-module", lambda w: w.edit_json(w.ck / "l4q_config.json", lambda c: c["modules"].append("model.nope")),
     lambda w: export(w, "gguf", w.root / "m.gguf"), 2, "model.nope"),
    # gguf.GGUFReader raises a bare ValueError on a truncated file: the gguf target names the file instead
    ("verify-truncated-gguf", lambda w: (w.root / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01"),
     lambda w: ["verify", str(w.root / "t.gguf"), "--model", str(w.ck)], 2, "t.gguf is not a complete GGUF file"),
    ("eval-truncated-gguf", lambda w: (w.root / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01"),
     lambda w: ["eval", str(w.root / "t.gguf"), "--text", str(w.data)], 2, "t.gguf is not a complete GGUF file"),
    ("eval-bad-jsonl-rows", lambda w: (w.root / "ev").mkdir() or (w.root / "ev" / "piqa.jsonl").write_text('{"q": 1}\n'),
     lambda w: ["eval", str(w.ck), "--tasks", "piqa", "--data-dir", str(w.root / "ev")], 2, "piqa.jsonl"),
    ("export-refused-leaves-no-parent-dirs", NOP,
     lambda w: export(w, "safetensors", w.root / "new" / "sub" / "st"), 1, "--allow-lossy"),
    ("export-gguf-refused-leaves-no-parent-dirs", NOP,
     lambda w: export(w, "gguf", w.root / "new" / "sub" / "m.gguf", "--gguf-type", "q4_k"), 1, "--allow-lossy"),
    # ---- low: values that used to be accepted silently
    ("train-steps-negative", NOP, lambda w: train(w, None, None, "--steps", "-3"), 2, "--steps"),
    ("train-epochs-negative", NOP, lambda w: [*train(w)[:7], "--epochs", "-2"], 2, "--epochs"),
    ("train-grad-accum-0", NOP, lambda w: train(w, None, None, "--grad-accum", "0"), 2, "--grad-accum"),
    ("train-null-output", lambda w: (w.root / "d.json").write_text('[{"instruction": "a", "output": null}]'),
     lambda w: train(w, data=w.root / "d.json"), 2, "'output'"),
    ("train-list-instruction", lambda w: (w.root / "d.json").write_text('[{"instruction": ["a"], "output": "b"}]'),
     lambda w: train(w, data=w.root / "d.json"), 2, "'instruction'"),
    ("train-dict-input", lambda w: (w.root / "d.json").write_text('[{"instruction": "a", "input": {}, "output": "b"}]'),
     lambda w: train(w, data=w.root / "d.json"), 2, "'input'"),
    ("train-bad-jsonl-line-3", lambda w: (w.root / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{oops\n'),
     lambda w: train(w, data=w.root / "d.jsonl"), 2, "line 3"),
    ("eval-max-tokens-negative", NOP, lambda w: ["eval", str(w.ck), "--text", str(w.data), "--max-tokens", "-5"], 2,
     "--max-tokens"),
    ("eval-ctx-0", NOP, lambda w: ["eval", str(w.ck), "--text", str(w.data), "--ctx", "0"], 2, "--ctx"),
    ("eval-stride-0", NOP, lambda w: ["eval", str(w.ck), "--text", str(w.data), "--stride", "0"], 2, "--stride"),
]
if not ROOT:  # root ignores permission bits, so these only mean something for a normal user
    CASES += [
        ("train-out-read-only", lambda w: _readonly(w.root / "ro"), lambda w: train(w, w.root / "ro" / "o"), 2, "not writable"),
        ("export-read-only-dir", lambda w: _readonly(w.root / "ro"), lambda w: export(w, "gguf", w.root / "ro" / "m.gguf"), 2,
         "not writable"),
    ]


def run_case(w: W, argv: list[str]):
    res = CliRunner().invoke(_cmd(argv[0]), argv[1:])
    return res.exit_code, res.stderr, res.output


def assert_clean(code: int, stderr: str, output: str, want: int, needle: str) -> None:
    # progress bars (tqdm, transformers' "Loading weights") are not messages
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "it/s]" not in ln and "%|" not in ln]
    assert code == want, (code, output)
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith(("error:", "refused:")), stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "weights_only" not in output, "never suggest unsafe loading"


IDS = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]


@pytest.mark.parametrize("name,prepare,argv,want,needle", CASES, ids=IDS)
def test_bad_input(w, name, prepare, argv, want, needle):
    prepare(w)
    before = tree_hash(w.root)
    code, stderr, output = run_case(w, argv(w))
    assert_clean(code, stderr, output, want, needle)
    assert tree_hash(w.root) == before, "inputs changed or something partial was left behind"
    assert not (w.root / "o" / "PWNED").exists()


def test_case_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv", [
    lambda w: ["-c", "from l4q_export.cli import export_main; export_main()", "--to", "onnx", str(w.ck), "-o", str(w.ck)],
    lambda w: ["-c", "from l4q_export.cli import train_cmd; train_cmd()", *train(w, w.base)[1:]],
], ids=["export-into-ck", "train-out-equals-model"])
def test_bad_input_subprocess(w, argv):
    """The real console path (no CliRunner): same one line, exit 2, nothing changed."""
    before = tree_hash(w.root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, *argv(w)], capture_output=True, text=True, env=env, timeout=300)
    assert_clean(p.returncode, p.stderr, p.stdout + p.stderr, 2, "input")
    assert tree_hash(w.root) == before


def test_debug_shows_traceback(w):
    res = CliRunner().invoke(_cmd("export"), [*export(w, "onnx", w.ck)[1:], "--debug"])
    assert res.exit_code != 0 and res.exception is not None and not isinstance(res.exception, SystemExit)


def test_stale_tmp_of_a_killed_run_is_removed(tmp_path):
    """A killed run leaves `.NAME.tmp-PID-*`; the next write to NAME removes it (only when that PID is gone)."""
    from l4q_export.checkpoint import AtomicFile

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".r.json.tmp-{pid}-abc"
    stale.write_text("partial")
    live = tmp_path / f".r.json.tmp-{os.getpid()}-xyz"  # a concurrent writer's file: not ours to remove
    live.write_text("busy")
    with AtomicFile(tmp_path / "r.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and live.exists() and (tmp_path / "r.json").read_text() == "{}"


def test_huge_record_is_cut_before_tokenizing(tmp_path):
    """A 51 MB record must not be tokenized whole (it cost 5 GB of RAM): the tokenizer sees a bounded string."""
    from l4q_export.training.data import instruction_examples

    seen: list[int] = []

    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, s, add_special_tokens=False):
            seen.append(len(s))
            return type("E", (), {"input_ids": [5, 5]})()

    p = tmp_path / "big.json"
    p.write_text(json.dumps([{"instruction": "x", "output": "y" * 51_000_000}]))
    instruction_examples(p, Tok(), 64)
    assert max(seen) <= 64 * 16 + 1000


def test_json_into_missing_dir_is_created_after_a_good_export(w):
    """Documented behaviour: --json into a directory that does not exist yet creates it (atomically, after the artifact)."""
    res = CliRunner().invoke(_cmd("export"), export(w, "gguf", w.root / "m.gguf", "--json", str(w.root / "new" / "r.json"))[1:])
    assert res.exit_code == 0, res.output
    assert json.loads((w.root / "new" / "r.json").read_text())

