"""One record of a data set: the format its keys say it is in (detect_format), its checks against a format
(validate_record), other tools' layouts read as chat, and the fields of it no sample holds (say_unrendered).

    text               {"text": str}
    alpaca             {"instruction": str, "input": str (optional, may be empty), "output": str}
    prompt_completion  {"prompt": str, "completion": str}
    chat               {"messages": [{"role": str, "content": str}, ...]} with at least one assistant turn

TRL's conversational prompt/completion, {"prompt": [messages], "completion": [messages]}, is read as chat:
{"messages": prompt + completion}, the number of prompt messages kept under PROMPT_TURNS; only the completion's
assistant turns are trained (data/sft.py), as TRL trains the completion only. ShareGPT's {"conversations": [{"from",
"value"}, ...]} is read as chat too (human -> user, gpt -> assistant: sharegpt_to_chat). A message's
`training`/`weight` and a record's `chat_template_kwargs` are checked here: data/chat_fields.py. data/formats.py
reads the files and applies these to each record.

Every problem raises `DataError` with one line naming the record (its file and line, from the caller) and the fix.
"""

from __future__ import annotations

import difflib
import logging

from fasttune.data.chat_fields import KWARGS, check_message_flags, check_prompt_flags, record_kwargs
from fasttune.data.field_hints import rename_hint, typo_hint
from fasttune.data.readers import type_name
from fasttune.errors import DataError

FORMAT_KEYS = {
    "text": '{"text"}',
    "alpaca": '{"instruction", "input", "output"}',
    "prompt_completion": '{"prompt", "completion"}',
    "chat": '{"messages": [{"role", "content"}]}',
}
# Fields each format needs, and optional ones; all must be strings except chat's message list.
_REQUIRED = {
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
_OPTIONAL = {"alpaca": ("input",)}
_FIELDS = sorted({f for names in (*_REQUIRED.values(), *_OPTIONAL.values()) for f in names})
_UNRENDERED = {"alpaca": ("system", "history")}
"""Fields of other tools' Alpaca variants (LLaMA-Factory's system and history, Axolotl's alpaca_w_system) that the
Alpaca prompt has no place for."""

ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function", "tool_results", "tool_response",
         "observation", "environment")  # fmt: skip
"""Message roles chat data may use: the usual four, and those real chat templates know for tool output and the like
(OpenAI's developer and function, Llama 3.1's ipython, Mistral v0.3's tool_results, Granite 3's tool_response,
GLM-4's observation, InternLM2's environment: context, never trained). Any other (a typo such as "usr", ShareGPT's
human/gpt) is refused: templates render a role they do not know as is, and the run would train on turns labelled
with it."""
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
"""ShareGPT's speakers that are not chat roles; its other `from` values (system, tool, ...) are roles as they are."""
PROMPT_TURNS = "_prompt_turns"
"""A chat record converted from a conversational prompt/completion one: how many of its leading messages were the
prompt (their assistant turns are context, never trained)."""
_FORMAT_HINT = "; ".join(f"{name} {keys}" for name, keys in FORMAT_KEYS.items())
log = logging.getLogger("fasttune")


def is_conversational(record: dict) -> bool:
    """TRL's conversational prompt/completion: prompt and completion are both lists (of {role, content} messages)."""
    return isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list)


def conversation_to_chat(record: dict, where: str, first: str) -> dict:
    """{"prompt": [...], "completion": [...]} -> {"messages": prompt + completion, PROMPT_TURNS: len(prompt)} (its
    other fields kept); the completion must hold an assistant turn: it is what is trained."""
    if not is_conversational(record):
        raise DataError(
            f"{where}: prompt and completion are not both lists of messages, as in {first} (TRL's conversational "
            "prompt/completion); make every record one kind"
        )
    prompt, completion = record["prompt"], record["completion"]
    validate_messages(prompt, where, "prompt", need_reply=False)
    validate_messages(completion, where, "completion")
    check_prompt_flags(prompt, where)
    rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    return {**rest, "messages": [*prompt, *completion], PROMPT_TURNS: len(prompt)}


def sharegpt_to_chat(record: dict, where: str) -> dict:
    """ShareGPT's {"conversations": [{"from", "value"}, ...]} (Axolotl's and LLaMA-Factory's sharegpt type; also
    role/content turns under "conversations", or from/value turns under "messages") as a chat record: "messages",
    from -> role (human -> user, gpt -> assistant, another as it is: checked as a role), value -> content, each turn's
    other keys (weight, training) and the record's kept. The record itself when there is nothing to convert."""
    key = "messages" if "messages" in record else "conversations"
    if key not in record:  # neither: validate_record names the missing field
        return record
    turns = record[key]
    shared = isinstance(turns, list) and any(isinstance(t, dict) and "role" not in t and "from" in t for t in turns)
    if (key == "messages" and not shared) or key not in record:  # nothing to convert: chat's checks name what is not
        return record
    if shared:
        turns = [_sharegpt_turn(t, f"{where}: {key}[{j}]") for j, t in enumerate(turns)]
    rest = {k: v for k, v in record.items() if k != key}
    return {**rest, "messages": turns}


def _sharegpt_turn(turn: object, where: str) -> object:
    """One ShareGPT turn as a chat message (see sharegpt_to_chat); a role/content one as it is."""
    if not isinstance(turn, dict) or "role" in turn:
        return turn
    speaker, value = turn.get("from"), turn.get("value")
    if not isinstance(speaker, str) or not isinstance(value, str):
        bad = "from" if not isinstance(speaker, str) else "value"
        raise DataError(f"{where}.{bad} must be a string, got {type_name(turn.get(bad))} (ShareGPT turns are "
                        "{\"from\": speaker, \"value\": text}); fix the record")  # fmt: skip
    role = _SHAREGPT_ROLES.get(speaker, speaker)
    if role not in ROLES:
        raise DataError(f"{where}.from is {speaker!r}, neither ShareGPT's human/gpt nor a chat role "
                        f"({', '.join(ROLES)}); rename it")  # fmt: skip
    rest = {k: v for k, v in turn.items() if k not in ("from", "value")}
    return {"role": role, "content": value, **rest}


def detect_format(record: dict, where: str = "record 1", option: str = "--data.format") -> str:
    """The format a record's keys say it is in; chat > alpaca > prompt_completion > text when several fit."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "conversations" in keys:  # ShareGPT's, or role/content turns under Axolotl's field_messages name
        return "chat"
    seen = ", ".join(sorted(map(str, keys))[:12]) or "none"
    raise DataError(
        f"{where}: cannot tell the data format from its keys ({seen}){typo_hint(keys, _FIELDS)}"
        f"{rename_hint(keys, _REQUIRED)}; expected {_FORMAT_HINT}; rename the fields or pass {option}"
    )


def validate_record(record: dict, fmt: str, where: str, option: str = "--data.format") -> None:
    """Raise DataError naming the record and the field if `record` does not fit `fmt`."""
    if record.get(KWARGS) is not None and fmt != "chat":
        raise DataError(f"{where}: {KWARGS} are for chat data, and {fmt} records are not rendered by a chat template; "
                        "drop the field or convert the data to chat")  # fmt: skip
    record_kwargs(record, where)
    for name in _REQUIRED[fmt]:
        if name not in record:
            seen = ", ".join(sorted(map(str, record))[:12]) or "none"
            raise DataError(
                f"{where}: missing field {name!r} for format {fmt} {FORMAT_KEYS[fmt]} (keys seen: {seen}); "
                f"add it or pass the right {option}"
            )
    for name in _REQUIRED[fmt] + _OPTIONAL.get(fmt, ()):
        value = record.get(name)
        if name in _OPTIONAL.get(fmt, ()) and value is None:
            continue
        if fmt == "chat":
            validate_messages(value, where)
        elif fmt == "prompt_completion" and is_conversational(record):
            raise DataError(
                f"{where}: prompt and completion are lists of messages (TRL's conversational prompt/completion) but "
                "the data's first record holds strings; make every record one kind"
            )
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type_name(value)}; fix the record")


def validate_messages(messages: object, where: str, field: str = "messages", need_reply: bool = True) -> None:
    """A non-empty list of {role, content} messages (`field` names it in errors); `need_reply`: with an assistant
    turn, the trained part."""
    if isinstance(messages, str):
        raise DataError(
            f"{where}: field {field!r} is a string, not a list of {{role, content}} objects; "
            "store it as a JSON list of messages (JSONL/JSON/Parquet: a CSV cell holds only text)"
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list, got {type_name(messages)}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{j}] must be an object with role and content, got {type_name(message)}")
        for key in ("role", "content"):
            if key == "content" and message.get(key) is None and _calls_tools(message):
                continue  # a tool call as OpenAI and HF's tool-use docs write it: no content (or null)
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"{where}: {field}[{j}].{key} must be a string, got {type_name(message.get(key))}"
                    + _near_key(message, key)
                    + "; "
                    + (_PARTS_FIX if _text_parts(message.get(key)) else "fix the record")
                )
        _check_role(message["role"], f"{where}: {field}[{j}]")
        check_message_flags(message, f"{where}: {field}[{j}]")
    if need_reply and not any(m["role"] == "assistant" for m in messages):
        of = "" if field == "messages" else f" of {field!r}"
        raise DataError(f"{where}: no message{of} has role 'assistant', so there is nothing to train on; add a reply")


def _near_key(message: dict, key: str) -> str:
    """For a message without `key`: ' (the message has 'content ', which looks like it)' for a typo of it."""
    if key in message:
        return ""
    near = [
        k for k in message if isinstance(k, str) and difflib.get_close_matches(k.strip().lower(), [key], cutoff=0.8)
    ]
    return f" (the message has {near[0]!r}, which looks like {key!r})" if near else ""


_PARTS_FIX = (
    "it is a list of content parts (OpenAI's and multimodal templates' layout), and fasttune trains text "
    "models whose chat templates render a string: join the text parts into one string"
)


def _text_parts(content: object) -> bool:
    return isinstance(content, list) and bool(content) and all(isinstance(p, dict) and "type" in p for p in content)


def _calls_tools(message: dict) -> bool:
    """An assistant message with tool calls, whose content may be left out or null: chat templates render its calls."""
    calls = message.get("tool_calls")
    return message.get("role") == "assistant" and isinstance(calls, list) and bool(calls)


def _check_role(role: str, where: str) -> None:
    if role in ROLES:
        return
    hint = f"ShareGPT's {role!r} is {_SHAREGPT_ROLES[role]!r}: " if role in _SHAREGPT_ROLES else ""
    raise DataError(f"{where}.role is {role!r}, not a chat role ({', '.join(ROLES)}); {hint}rename it")


def say_unrendered(records: list[dict], fmt: str, source: str, use: tuple[str, str] = ("trained on", "train")) -> None:
    """Warn for each field of _UNRENDERED that holds text no sample will contain: without it, a system prompt or a
    conversation history in Alpaca records was dropped without a word. `use`: what the samples are for, as the
    warnings say it (training's ("trained on", "train"); eval's ("scored", "evaluate"))."""
    done, do = use
    for key in _UNRENDERED.get(fmt, ()):
        if n := sum(1 for r in records if r.get(key)):
            log.warning("%s: %d of %d records have a %r field, which the Alpaca prompt (### Instruction, ### Input, "
                        "### Response) has no place for: it is not %s; convert the records to chat data "
                        "(messages, with a system turn or the earlier turns) to %s with it", source, n,
                        len(records), key, done, do)  # fmt: skip
    for key, field, n in _misspelt(records, fmt):
        log.warning("%s: %d of %d records have a %r field and no %r: it is not read (a misspelt %r?); rename it to "
                    "%s with its text", source, n, len(records), key, field, field, do)  # fmt: skip


def _misspelt(records: list[dict], fmt: str) -> list[tuple[str, str, int]]:
    """(key, the field it looks like a misspelling of, how many records hold text there without that field) for keys
    close to a field of `fmt` ("inptu", "Input": Alpaca's optional input, whose text was dropped without a word; a
    misspelt required field stops the run instead)."""
    fields = _REQUIRED[fmt] + _OPTIONAL.get(fmt, ())
    found = []
    for key in sorted({k for r in records for k in r if isinstance(k, str) and k not in fields}):
        close = difflib.get_close_matches(key.strip().lower(), fields, n=1, cutoff=0.8)
        if close and (n := sum(1 for r in records if isinstance(r.get(key), str) and r[key].strip()
                               and not r.get(close[0]))):  # fmt: skip
            found.append((key, close[0], n))
    return found
