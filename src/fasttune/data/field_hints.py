"""What the keys of a record no format fits may have meant, for the line that refuses it (data/formats.py): a
format's field misspelt (`ouput`), or another data set's name for it (GSM8K's question/answer)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

OTHER_FIELDS = {
    "alpaca": {"response": "output", "answer": "output", "context": "input"},  # Dolly's instruction/context/response
    "prompt_completion": {
        "question": "prompt",
        "query": "prompt",
        "input": "prompt",
        "answer": "completion",
        "response": "completion",
        "output": "completion",
    },  # fmt: skip
}
"""Other data sets' names for a format's fields (GSM8K's question/answer, MetaMathQA's query/response), by the format
they are fields of: Alpaca's when the record has an `instruction`, else prompt_completion's."""


def typo_hint(keys: set, fields: Sequence[str]) -> str:
    """'; 'ouput' looks like 'output'' for keys a letter or two off one of the formats' `fields`, else ""."""
    pairs = [(k, close[0]) for k in sorted(map(str, keys)) if k not in fields
             and (close := difflib.get_close_matches(k.strip().lower(), fields, n=1, cutoff=0.8))]  # fmt: skip
    return "".join(f"; {k!r} looks like {f!r}" for k, f in pairs)


def rename_hint(keys: set, required: Mapping[str, Sequence[str]]) -> str:
    """'; as prompt_completion records: rename answer to completion, question to prompt (datasets: ...)' when
    renaming the keys of other data sets' names gives the record the `required` fields of a format, else ""."""
    fmt = "alpaca" if "instruction" in keys else "prompt_completion"
    renames = {k: new for k in sorted(map(str, keys)) if (new := OTHER_FIELDS[fmt].get(k)) and new not in keys}
    if len(set(renames.values())) < len(renames) or not set(required[fmt]) <= set(keys) | set(renames.values()):
        return ""  # two keys for one field (question and query): which one is the user's to say
    said = ", ".join(f"{k} to {new}" for k, new in renames.items())
    return f"; as {fmt} records: rename {said} (datasets: ds.rename_columns({renames}))"
