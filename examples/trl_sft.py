"""L4Q inside TRL's `SFTTrainer` on chat (`messages`) data: prepare -> SFTTrainer.train() -> save_checkpoint.

    python examples/trl_sft.py BASE_DIR CHAT.jsonl OUT_CK [--steps 20]
    l4q-export --to gguf OUT_CK -o model.gguf && l4q-verify model.gguf --model OUT_CK

TRL renders `messages` with the tokenizer's chat template itself; the model it trains is the prepared one, so
the quantizer and LoRA it updates are exactly what `save_checkpoint` writes.  Pass the model object (not a
name) and no `peft_config`: prepare already did the adapter surgery.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import l4q_export
from l4q_export.training.data import load_tokenizer


class ProjectScales(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        l4q_export.api.project_(model)


def run(base: Path, ck_out: Path, work: Path, data: Path, steps: int = 20, grad_accum: int = 2, group_size: int = 128,
        bits: int = 4, batch_size: int = 2, lr: float = 3e-3, max_length: int = 128) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
    model = l4q_export.prepare(model, bits=bits, group_size=group_size)
    tok = load_tokenizer(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    decay, no_decay = l4q_export.api.trainable_parameters(model)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    cfg = SFTConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch_size,
                    gradient_accumulation_steps=grad_accum, learning_rate=lr, max_length=max_length, logging_steps=1,
                    save_strategy="steps", save_steps=max(1, steps // 2), report_to=[], seed=0, disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         optimizers=(opt, None), callbacks=[ProjectScales()])
    trainer.train()
    return l4q_export.save_checkpoint(model, ck_out, base_dir=base)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    print(run(a.base, a.out, a.out.with_name(a.out.name + "_trl"), a.data, steps=a.steps, group_size=a.group_size))
