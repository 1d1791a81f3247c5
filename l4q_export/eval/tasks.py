"""Zero-shot multiple choice and MMLU, scored the way lm-evaluation-harness scores `multiple_choice` tasks.

For each choice the harness asks for loglikelihood(context, target_delimiter + choice):
- trailing spaces of the context move to the continuation; context+continuation is encoded as a whole and the
  continuation tokens are what follows the encoding of the context alone (an empty context is replaced by the
  end-of-text token);
- the model sees (context + continuation)[-(max_length + 1):][:-1] and the continuation tokens' log-probs are summed;
- acc = [argmax_i ll_i == gold], acc_norm = [argmax_i ll_i / len(choice_i in characters) == gold]
  (first maximum wins ties, as numpy's argmax), stderr = sqrt(p (1 - p) / (n - 1)).
No BOS is added (the harness's default for causal HF models).

Prompts follow the harness's task configs, adapted to the local MosaicML-gauntlet files (`query`/`choices`/`gold`):
  arc_easy, arc_challenge  "{query}\\nAnswer:"  + " {choice}"     (query is already "Question: ...")
  boolq                    "{query}\\nAnswer:"  + " no" / " yes" (the file's query starts "Passage: ..."; acc only)
  piqa                     "{query}\\nAnswer:"  + " {choice}"     (query "Question: {goal}")
  openbook_qa              "{query}"           + " {choice}"
  hellaswag                preprocess(ctx)     + " " + preprocess(ending)   (harness's preprocess)
  winogrande               each option's context + " {continuation}" (partial scoring; acc only)
  mmlu_{0,5}shot           "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                           + k dev examples "{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {X}\\n\\n" + the question
                           + "Answer:", choices " A" .. " D"; acc per subject, micro and macro averages.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import L4QInputError
from .backends import Backend

MC_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbook_qa")
MMLU_TASKS = ("mmlu_0shot", "mmlu_5shot")
ACC_ONLY = ("boolq", "winogrande")  # the harness's configs report acc only for these (and for MMLU)
FILES = {"boolq": "boolq.jsonl", "piqa": "piqa.jsonl", "hellaswag": "hellaswag_val.jsonl", "winogrande": "winogrande.jsonl",
         "arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_challenge.jsonl", "openbook_qa": "openbook_qa.jsonl"}


@dataclass
class Doc:
    """One question: a context per choice (winogrande varies it), the continuation per choice, and gold."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # the raw choice texts whose character lengths normalise acc_norm
    gold: int


class Scorer:
    """loglikelihood(context, continuation) with the harness's encoding; caches the last forward pass."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self._key: tuple[int, ...] | None = None
        self._lp: np.ndarray | None = None

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.b.eot_id], self.b.encode(continuation)
        whole = self.b.encode(context + continuation)
        ctx = self.b.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, context: str, continuation: str) -> float:
        ctx, cont = self.encode_pair(context, continuation)
        if not cont:
            raise L4QInputError(f"continuation {continuation!r} encodes to no tokens")
        inp = (ctx + cont)[-(self.b.max_length + 1):][:-1]
        key = tuple(inp)
        if key != self._key:  # choices that are one token after the same context share this forward pass
            self._key, self._lp = key, self.b.logprobs(list(inp))
        lp = self._lp
        start = len(inp) - len(cont)
        return float(sum(lp[start + i, t] for i, t in enumerate(cont)))


def score_docs(backend: Backend, docs: list[Doc], norm: bool = True) -> dict[str, Any]:
    """acc (and acc_norm) over docs, with the harness's sample standard errors."""
    sc = Scorer(backend)
    acc, acc_norm = [], []
    for d in docs:
        lls = np.array([sc.loglikelihood(c, x) for c, x in zip(d.contexts, d.continuations, strict=True)])
        acc.append(float(np.argmax(lls) == d.gold))
        lens = np.array([float(len(c)) for c in d.choices])
        acc_norm.append(float(np.argmax(lls / lens) == d.gold))
    out: dict[str, Any] = {"n": len(docs), **_metric("acc", acc)}
    if norm:
        out.update(_metric("acc_norm", acc_norm))
    return out


def _metric(name: str, xs: list[float]) -> dict[str, float]:
    n = len(xs)
    p = sum(xs) / n if n else float("nan")
    return {name: p, f"{name}_stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")}


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleanup: strip, ' [title]' -> '. ', drop [bracketed] tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise L4QInputError(f"eval set not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit and len(out) >= limit:
                    break
    return out


def mc_docs(task: str, data_dir: Path, limit: int | None = None) -> list[Doc]:
    """Docs of one local zero-shot set with the harness's prompt for that task."""
    if task not in FILES:
        raise L4QInputError(f"unknown task {task!r}; choose from {', '.join(MC_TASKS + MMLU_TASKS)}")
    docs = []
    for r in _read_jsonl(Path(data_dir) / FILES[task], limit):
        if task == "hellaswag":
            endings = [hellaswag_preprocess(e) for e in r["endings"]]
            ctx = hellaswag_preprocess(r["ctx"])
            docs.append(Doc([ctx] * len(endings), [" " + e for e in endings], endings, int(r["label"])))
        elif task == "winogrande":
            opts = r["context_options"]
            docs.append(Doc(list(opts), [" " + r["continuation"]] * len(opts), [r["continuation"]] * len(opts), int(r["gold"])))
        else:
            ctx = r["query"] if task == "openbook_qa" else r["query"].rstrip("\n") + "\nAnswer:"
            docs.append(Doc([ctx] * len(r["choices"]), [" " + c for c in r["choices"]], list(r["choices"]), int(r["gold"])))
    return docs


# ---------------------------------------------------------------------------------------------- MMLU

LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [row for row in csv.reader(f) if len(row) == 6]


def mmlu_question(row: list[str]) -> str:
    q = row[0].strip() + "".join(f"\n{L}. {row[i + 1]}" for i, L in enumerate(LETTERS))
    return q + "\nAnswer:"


def mmlu_prompt(subject: str, shots: list[list[str]], row: list[str]) -> str:
    """The harness's MMLU prompt: description, k answered dev examples, then the question."""
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(f"{mmlu_question(s)} {s[5].strip()}\n\n" for s in shots) + mmlu_question(row)


def mmlu(backend: Backend, data_dir: Path, shots: int, limit: int | None = None, split: str = "test") -> dict[str, Any]:
    """MMLU accuracy (limit = questions per subject); dev rows supply the few-shot examples."""
    root = Path(data_dir) / "mmlu"
    files = sorted((root / split).glob(f"*_{split}.csv"))
    if not files:
        raise L4QInputError(f"no MMLU CSVs under {root / split}")
    per_subject: dict[str, dict[str, Any]] = {}
    correct = total = 0
    for f in files:
        key = f.name[: -len(f"_{split}.csv")]
        dev = _mmlu_rows(root / "dev" / f"{key}_dev.csv")[:shots] if shots else []
        rows = _mmlu_rows(f)[:limit] if limit else _mmlu_rows(f)
        docs = []
        for row in rows:
            if row[5].strip() not in LETTERS:
                raise L4QInputError(f"{f}: answer {row[5]!r} is not one of A-D")
            ctx = mmlu_prompt(key.replace("_", " "), dev, row)
            docs.append(Doc([ctx] * 4, [" " + L for L in LETTERS], list(LETTERS), LETTERS.index(row[5].strip())))
        res = score_docs(backend, docs, norm=False)
        per_subject[key] = res
        correct += round(res["acc"] * res["n"])
        total += res["n"]
    macro = sum(r["acc"] for r in per_subject.values()) / len(per_subject)
    # stderr of all questions as one sample; the harness's group stderr pools within-subject variances instead
    # (it leaves out the between-subject spread), so the two differ slightly
    micro = _metric("acc", [1.0] * correct + [0.0] * (total - correct))
    return {"n": total, **micro, "acc_macro": macro, "shots": shots, "subjects": per_subject}
