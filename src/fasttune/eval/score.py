"""Scoring generated answers against references: exact match, and for math data the final number (GSM8K style).

Examples come from tokenized supervised samples (what training reads, data/sft.py): the prompt is every token before
the last trained span (the answer the model must write), the reference is that span's text. So an evaluation prompt
is rendered exactly as the training prompts were, for every data format and template.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fasttune.data.sample import Sample

# GSM8K ends each answer with "#### 72"; models often write "The answer is $1,200." instead: the last number counts.
_MARK = "####"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass
class Example:
    prompt_ids: list[int]
    reference: str
    record: int | None = None
    """Position of the record in the data (a conversation trained turn by turn gives an example per turn)."""


def split_sample(sample: Sample, tokenizer) -> Example | None:
    """The prompt (tokens before the last trained span) and the reference answer (that span as text); None when the
    sample trains no token or has no prompt (see empty_prompt)."""
    if not len(sample.spans):
        return None
    start, end = sample.pairs()[-1]  # the last run of trained tokens
    prompt = sample.ids[:start].tolist()
    if empty_prompt(prompt, tokenizer):
        return None
    reference = tokenizer.decode(sample.ids[start:end].tolist(), skip_special_tokens=True).strip()
    return Example(prompt, reference, sample.record)


def empty_prompt(prompt: list[int], tokenizer) -> bool:
    """Whether prompt ids hold nothing to answer: special tokens alone (plain text after a BOS, train_on_prompt, a
    prompt/completion record's "prompt": "") or blank text ("prompt": "   ")."""
    special = set(tokenizer.all_special_ids)
    if all(t in special for t in prompt):
        return True
    return not tokenizer.decode(prompt, skip_special_tokens=True).strip()


def answer_number(text: str) -> float | None:
    """The final answer as a number: the first number on the line of the first `####` (GSM8K's answer marker, as
    lm-evaluation-harness reads it: what a model writes after its answer, such as a next question it makes up with an
    answer of its own, is not read), else the last number in the text (before a `####` with no number)."""
    head, mark, tail = text.replace("\u2212", "-").partition(_MARK)  # U+2212: the typographic minus sign
    found = _NUMBER.findall(tail.split("\n", 1)[0])[:1] if mark else []
    found = found or _NUMBER.findall(head)[-1:]
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _normalize(text: str) -> str:
    return " ".join(text.split())


def score(prediction: str, reference: str) -> dict:
    """exact_match (whitespace-normalised), numeric_match (None when the reference has no number) and the two numbers
    it compared (None where there is none), for reading a failure."""
    ref_num = answer_number(reference)
    pred_num = answer_number(prediction)
    numeric = None if ref_num is None else pred_num is not None and math.isclose(pred_num, ref_num, abs_tol=1e-6)
    return {"exact_match": _normalize(prediction) == _normalize(reference), "numeric_match": numeric,
            "reference_number": ref_num, "completion_number": pred_num}  # fmt: skip


def summarize_scores(scores: list[dict]) -> dict:
    """Mean exact match; mean numeric match over references with a number, reported when most have one (math)."""
    out = {"exact_match": sum(s["exact_match"] for s in scores) / len(scores) if scores else None}
    numeric = [s["numeric_match"] for s in scores if s["numeric_match"] is not None]
    if numeric and len(numeric) * 2 >= len(scores):
        out["numeric_match"] = sum(numeric) / len(numeric)
        out["numeric_samples"] = len(numeric)
    return out
