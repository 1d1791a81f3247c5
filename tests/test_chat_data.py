"""Chat / prompt-completion data, files read through `datasets`, and packing (training/chat_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l4q_export.errors import L4QInputError
from l4q_export.training.chat_data import IGNORE, pack
from l4q_export.training.data import collate, load_examples, load_tokenizer

SMOLLM2 = Path.home() / ".cache" / "l4q-export" / "smollm2-135m-instruct"
# SmolLM2-135M-Instruct's chat template, verbatim from its tokenizer_config.json
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, and then red."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
]


@pytest.fixture(scope="module")
def chatml_tok_dir(tiny_base, tmp_path_factory) -> Path:
    """tiny_base's SentencePiece tokenizer with ChatML's special tokens and SmolLM2's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    d = tmp_path_factory.mktemp("chatml_tok")
    tok.save_pretrained(str(d))
    return d


def _tokenizers(chatml_tok_dir):
    yield "tiny+chatml", load_tokenizer(chatml_tok_dir)
    if (SMOLLM2 / "tokenizer.json").is_file():
        yield "smollm2", load_tokenizer(SMOLLM2)


def _expected_mask(tok, ids: list[int]) -> list[bool]:
    """Independent of chat_data: learned = from after each '<|im_start|>assistant\\n' header through its <|im_end|>."""
    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    learn, i = [False] * len(ids), 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                learn[j] = True
                j += 1
            learn[j] = True
            i = j
        i += 1
    return learn


def _write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_chatml_assistant_mask_token_by_token(chatml_tok_dir, tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    seen = []
    for name, tok in _tokenizers(chatml_tok_dir):
        seen.append(name)
        examples = load_examples(data, tok, 4096)
        assert len(examples) == 2
        for (ids, labels), msgs in zip(examples, CONVERSATIONS, strict=True):
            rendered = tok.apply_chat_template(msgs, tokenize=False)
            assert ids == tok(rendered, add_special_tokens=False).input_ids, name
            want = _expected_mask(tok, ids)
            assert sum(want) > 0
            assert [lab != IGNORE for lab in labels] == want, name
            assert all(lab == i for lab, i, w in zip(labels, ids, want, strict=True) if w)
            learned = tok.decode([i for i, w in zip(ids, want, strict=True) if w])
            assert all(m["content"] in learned for m in msgs if m["role"] == "assistant")
            assert "Name a colour" not in learned and "helpful AI assistant" not in learned
    print("tokenizers checked:", seen)


def test_prompt_completion_strings_and_messages(chatml_tok_dir, tmp_path):
    tok = load_tokenizer(chatml_tok_dir)
    data = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi:", "completion": " hi there"}])
    [(ids, labels)] = load_examples(data, tok, 512)
    n_prompt = 1 + len(tok("Say hi:", add_special_tokens=False).input_ids)  # BOS + prompt
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    conv = _write_jsonl(tmp_path / "pc_conv.jsonl", [{"prompt": CONVERSATIONS[1][:1], "completion": CONVERSATIONS[1][1:]}])
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[1]}])
    assert load_examples(conv, tok, 512) == load_examples(chat, tok, 512)


def test_bad_records_name_the_record_and_field(chatml_tok_dir, tmp_path):
    tok = load_tokenizer(chatml_tok_dir)
    ok = {"messages": CONVERSATIONS[1]}
    cases = [
        ({"messages": [{"role": "user", "content": 3}]}, r"bad\.jsonl:2: messages\[0\] must have string 'role' and 'content'"),
        ({"question": "x"}, r"bad\.jsonl:2: record has fields \['question'\]"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: field 'messages' has no assistant turn"),
        ({"prompt": "a", "completion": 5}, r"bad\.jsonl:2: 'prompt' and 'completion' must both be strings"),
    ]
    for bad, msg in cases:
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(L4QInputError, match=msg):
            load_examples(p, tok, 512)


def test_parquet_and_saved_dataset_dir_read_through_datasets(chatml_tok_dir, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'l4q-export[train]')")
    tok = load_tokenizer(chatml_tok_dir)
    recs = [{"messages": m} for m in CONVERSATIONS]
    want = load_examples(_write_jsonl(tmp_path / "c.jsonl", recs), tok, 4096)
    ds = datasets.Dataset.from_list(recs)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    assert load_examples(tmp_path / "c.parquet", tok, 4096) == want
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved", tok, 4096, data_format="dataset-dir") == want
    alpaca = datasets.Dataset.from_list([{"instruction": "Add 1 and 2.", "input": "", "output": "3"}])
    alpaca.to_parquet(str(tmp_path / "a.parquet"))
    _write_jsonl(tmp_path / "a.jsonl", alpaca.to_list())
    assert load_examples(tmp_path / "a.parquet", tok, 512) == load_examples(tmp_path / "a.jsonl", tok, 512)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(L4QInputError, match="cannot read .*junk.parquet as parquet"):
        load_examples(tmp_path / "junk.parquet", tok, 512)


def test_packing_fills_blocks_and_attention_stays_inside_examples(tiny_base):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    examples = [(ids := torch.randint(3, 200, (int(n),), generator=g).tolist(), list(ids)) for n in (20, 30, 25, 40, 10)]
    blocks = pack(examples, 64)
    assert [len(b[0]) for b in blocks] == [50, 25, 50]  # greedy, order kept: 20+30 | 25 (+40 > 64) | 40+10
    assert sum((b[0] for b in blocks), []) == sum((e[0] for e in examples), [])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    model.config.use_cache = False  # as in training (l4q-train and prepare set it): a KV cache disables packed masks
    batch = collate(blocks[:1], 0)
    assert "attention_mask" not in batch and batch["position_ids"][0, 20].item() == 0
    assert batch["labels"][0, 20].item() == IGNORE  # no loss across the boundary
    with torch.no_grad():
        packed = model(**batch).logits[0, 20:50]
        alone = model(input_ids=torch.tensor([examples[1][0]])).logits[0]
        crossing = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits[0, 20:50]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    assert (crossing - alone).abs().max() > 1e-2  # the check can fail: a plain causal mask does see example 1


PLAIN_TEMPLATE = (  # tokens tiny_base's vocabulary already has, so the model can train on it
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_base(tiny_base, tmp_path_factory) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("chat_base") / "m"
    shutil.copytree(tiny_base, d)
    (d / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    return d


def chat_jsonl(path: Path, n: int = 48) -> Path:
    from l4q_export.demo import instruction_records

    return _write_jsonl(path, [{"messages": [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["output"]}]}
                               for r in instruction_records(n)])


def test_l4q_train_on_chat_with_packing_and_csv_telemetry(chat_base, tmp_path):
    import csv

    from l4q_export.training.trainer import TrainArgs, train
    from l4q_export.verify import verify_fold

    out = tmp_path / "ck"
    rep = train(TrainArgs(model=chat_base, data=chat_jsonl(tmp_path / "chat.jsonl"), out=out, bits=4, group_size=32,
                          steps=3, batch_size=2, grad_accum=2, seq_len=128, lr=3e-3, save_every=0, eval_examples=4,
                          packing=True, report_to="csv"))
    assert rep["steps"] == 3 and rep["max_clipped_frac"] is not None and 0.0 <= rep["max_clipped_frac"] < 1.0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(float(r["grad_norm"]) > 0 and float(r["tokens_per_s"]) > 0 and float(r["lr"]) > 0 for r in rows)
    health = list(csv.DictReader((out / "quantizer_health.csv").open()))
    assert len(health) == 14 and all(0 < float(h["scale_min"]) <= float(h["scale_max"]) for h in health)
    assert verify_fold(out)["passed"]


def test_report_to_tensorboard_writes_events(chat_base, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'l4q-export[train]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from l4q_export.training.trainer import TrainArgs, train

    out = tmp_path / "ck"
    train(TrainArgs(model=chat_base, data=chat_jsonl(tmp_path / "chat.jsonl", 16), out=out, bits=4, group_size=32, steps=2,
                    batch_size=2, grad_accum=1, seq_len=128, save_every=0, eval_examples=0, report_to="tensorboard"))
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= tags
    assert "quant/model.layers.0.self_attn.q_proj/clipped_frac" in tags
    assert [e.step for e in ev.Scalars("train/loss")] == [0, 1]
