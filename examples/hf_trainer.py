"""L4Q inside the Hugging Face `Trainer`: prepare -> Trainer.train() -> save_checkpoint -> l4q-export.

    python examples/hf_trainer.py BASE_DIR DATA OUT_CK [--steps 20]
    l4q-export --to gguf OUT_CK -o model.gguf && l4q-verify model.gguf --model OUT_CK

Two things the Trainer does not know about and this example adds: the AdamW groups l4q-train uses (no weight
decay on the learned scales/offsets) and the scale projection after every optimizer step (a callback).
Gradient accumulation, the Trainer's own checkpoints and `resume_from_checkpoint` work unchanged: the
quantizer and LoRA tensors are ordinary parameters in its state_dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import l4q_export
from l4q_export.training.data import collate, load_examples, load_tokenizer


class ProjectScales(TrainerCallback):
    """Keep learned scales above the floor after each optimizer step, as l4q-train does."""

    def on_step_end(self, args, state, control, model=None, **kw):
        l4q_export.api.project_(model)


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def run(base: Path, ck_out: Path, work: Path, data: Path, steps: int = 20, grad_accum: int = 2, save_steps: int = 10,
        group_size: int = 128, bits: int = 4, batch_size: int = 4, lr: float = 3e-3, seq_len: int = 128,
        resume: str | None = None) -> tuple[Path, Path]:
    """Train with the HF Trainer; returns (L4Q checkpoint dir, Trainer output dir)."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
    model = l4q_export.prepare(model, method="l4q", bits=bits, group_size=group_size, rank=4, alpha=8)
    tok = load_tokenizer(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decay, no_decay = l4q_export.api.trainable_parameters(model)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, save_strategy="steps", save_steps=save_steps,
        logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, data_seed=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Examples(load_examples(data, tok, seq_len)),
                      data_collator=lambda batch: collate(batch, pad), optimizers=(opt, None), callbacks=[ProjectScales()])
    trainer.train(resume_from_checkpoint=resume)
    return l4q_export.save_checkpoint(model, ck_out, base_dir=base), Path(work)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    ck, _ = run(a.base, a.out, a.out.with_name(a.out.name + "_trainer"), a.data, steps=a.steps, group_size=a.group_size)
    print(ck)
