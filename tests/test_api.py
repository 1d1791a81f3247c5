"""The Python API (prepare -> any loop -> save_checkpoint -> l4q-export -> verify) and its refusals, plus the
HF Trainer and TRL SFTTrainer examples in examples/."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import l4q_export
from l4q_export.checkpoint import ADAPTER_FILE, CONFIG_FILE
from l4q_export.cli import _export_command
from l4q_export.errors import L4QInputError
from l4q_export.verify import run_verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _load(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)


def _batches(base: Path, n: int, bs: int = 4):
    from l4q_export.demo import instruction_records
    from l4q_export.training.data import collate, instruction_examples, load_tokenizer

    tok = load_tokenizer(base)
    p = base.parent / f"{base.name}_data.json"
    p.write_text(json.dumps(instruction_records(n * bs)))
    ex = instruction_examples(p, tok, 96)
    return [collate(ex[i : i + bs], tok.pad_token_id or 0) for i in range(0, len(ex) - bs + 1, bs)]


def export_and_verify(ck: Path, tmp: Path) -> dict:
    """`l4q-export --to gguf` through the real CLI, then verify the artifact in llama.cpp."""
    gguf = tmp / "m.gguf"
    res = CliRunner().invoke(_export_command(), ["--to", "gguf", str(ck), "-o", str(gguf)])
    assert res.exit_code == 0, res.output
    rep = run_verify(gguf, ck, {})
    assert rep["passed"], rep["summary"]
    assert rep["max_abs_error"] == 0.0 and rep["n_codes_identical"] == 14
    return rep


def test_prepare_trains_only_quantizer_and_adapter(tiny_base):
    model = l4q_export.prepare(_load(tiny_base), bits=4, group_size=32)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "scale", "offset"}
    assert len(model.l4q_settings.modules) == 14 and model.l4q_settings.scale_grid == "fp16"
    with pytest.raises(L4QInputError, match="already prepared"):
        l4q_export.prepare(model)


def test_plain_loop_round_trip_export_verify_and_reload(tiny_base, tmp_path):
    torch.manual_seed(0)
    model = l4q_export.prepare(_load(tiny_base), bits=4, group_size=32, rank=4, alpha=8)
    decay, no_decay = l4q_export.api.trainable_parameters(model)
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    before = {k: v.clone() for k, v in l4q_export.api.adapter_tensors(model).items()}
    losses = []
    for b in _batches(tiny_base, 6):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        l4q_export.api.project_(model)
        losses.append(float(loss.detach()))
    after = l4q_export.api.adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("lora_B"))
    ck = l4q_export.save_checkpoint(model, tmp_path / "ck", base_dir=tiny_base)
    cfg = json.loads((ck / CONFIG_FILE).read_text())
    assert cfg["method"] == "l4q" and cfg["scale_grid"] == "fp16" and cfg["training"]["trainer"] == "python-api"
    saved = load_file(str(ck / ADAPTER_FILE))
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)
    export_and_verify(ck, tmp_path)

    back = l4q_export.load_checkpoint(ck)
    assert all(torch.equal(v, after[k]) for k, v in l4q_export.api.adapter_tensors(back).items())
    def names(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    assert names(back) == names(model)
    model.eval()
    back.eval()
    x = _batches(tiny_base, 1)[0]
    with torch.no_grad():
        assert torch.equal(model(**x).logits, back(**x).logits)


def test_save_refuses_a_base_that_differs(tiny_base, tmp_path):
    model = l4q_export.prepare(_load(tiny_base), bits=4, group_size=32)
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    w = load_file(str(other / "model.safetensors"))
    w["model.embed_tokens.weight"][0, 0] += 1.0
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(L4QInputError, match="embed_tokens.weight in memory differs"):
        l4q_export.save_checkpoint(model, tmp_path / "ck", base_dir=other)
    assert not (tmp_path / "ck").exists()

    from transformers import AutoModelForCausalLM

    f32 = l4q_export.prepare(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float16), group_size=32)
    with pytest.raises(L4QInputError, match="dtype torch.float16"):
        l4q_export.save_checkpoint(f32, tmp_path / "ck2", base_dir=tiny_base)

    l4q_export.save_checkpoint(model, tmp_path / "ck3", base_dir=tiny_base)  # records the shard hashes
    moved = tmp_path / "moved"
    shutil.copytree(tiny_base, moved)
    model.l4q_settings.base_hashes = {"model.safetensors": "0" * 64}
    with pytest.raises(L4QInputError, match="sha256"):
        l4q_export.save_checkpoint(model, tmp_path / "ck4", base_dir=moved)


def test_save_refuses_an_unprepared_model(tiny_base, tmp_path):
    with pytest.raises(L4QInputError, match="not prepared"):
        l4q_export.save_checkpoint(_load(tiny_base), tmp_path / "ck", base_dir=tiny_base)


@pytest.mark.slow
def test_hf_trainer_example_grad_accum_and_its_checkpoints(tiny_base, tmp_path):
    import hf_trainer

    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install 'l4q-export[train]')")
    ck, trainer_dir = hf_trainer.run(tiny_base, tmp_path / "ck", tmp_path / "hf", steps=4, grad_accum=2, save_steps=2,
                                     group_size=32, data=_demo_data(tmp_path))
    export_and_verify(ck, tmp_path)
    # the Trainer's own last checkpoint holds exactly the adapter we saved (its checkpointing loses nothing)
    theirs = load_file(str(trainer_dir / "checkpoint-4" / "model.safetensors"))
    ours = load_file(str(ck / ADAPTER_FILE))
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    resumed, _ = hf_trainer.run(tiny_base, tmp_path / "ck_resumed", tmp_path / "hf", steps=4, grad_accum=2, save_steps=2,
                                group_size=32, data=_demo_data(tmp_path), resume=str(trainer_dir / "checkpoint-2"))
    again = load_file(str(resumed / ADAPTER_FILE))
    assert all(torch.equal(again[k], v) for k, v in ours.items()), "resuming from the Trainer checkpoint diverged"


@pytest.mark.slow
def test_trl_sft_trainer_example(tiny_base, tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'l4q-export[train]')")
    import trl_sft

    base = tmp_path / "chat_base"  # tiny_base + a chat template in tokens its vocabulary has
    shutil.copytree(tiny_base, base)
    (base / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ck = trl_sft.run(base, tmp_path / "ck", tmp_path / "trl", steps=4, group_size=32, data=_chat_data(tmp_path))
    assert (tmp_path / "trl" / "checkpoint-2").is_dir()  # TRL's own checkpointing ran mid-way
    assert any(v.abs().max() > 0 for k, v in load_file(str(ck / ADAPTER_FILE)).items() if k.endswith("lora_B"))  # it trained
    export_and_verify(ck, tmp_path)


def _demo_data(tmp: Path) -> Path:
    from l4q_export.demo import instruction_records

    p = tmp / "alpaca.json"
    p.write_text(json.dumps(instruction_records(64)))
    return p


def _chat_data(tmp: Path) -> Path:
    from l4q_export.demo import instruction_records

    p = tmp / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                  {"role": "assistant", "content": r["output"]}]}) + "\n"
                         for r in instruction_records(48)))
    return p
