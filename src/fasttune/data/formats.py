"""Read a user's dataset into records (plain dicts) and work out which of the four formats it is in.

The files are read by data/readers.py (text, JSON lines, JSON, CSV, Parquet, save_to_disk folders). Formats:

    text               {"text": str}
    alpaca             {"instruction": str, "input": str (optional, may be empty), "output": str}
    prompt_completion  {"prompt": str, "completion": str}
    chat               {"messages": [{"role": str, "content": str}, ...]} with at least one assistant turn

TRL's conversational prompt/completion, {"prompt": [messages], "completion": [messages]}, is read as chat:
{"messages": prompt + completion}, the number of prompt messages kept under PROMPT_TURNS; only the completion's
assistant turns are trained (data/sft.py), as TRL trains the completion only. ShareGPT's {"conversations": [{"from",
"value"}, ...]} is read as chat too (human -> user, gpt -> assistant: _sharegpt_to_chat). A message's
`training`/`weight` and a record's `chat_template_kwargs` are checked here: data/chat_fields.py.

Every problem with the input raises `DataError` with one line naming the file, the line or record, and the fix.
User files are only ever opened for reading.
"""

from __future__ import annotations

import difflib
import glob
import itertools
import logging
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path

from fasttune.data.chat_fields import KWARGS, check_message_flags, check_prompt_flags, record_kwargs
from fasttune.data.field_hints import rename_hint, typo_hint
from fasttune.data.folders import data_files
from fasttune.data.readers import (
    JsonField,
    Place,
    Table,
    check_data_path,
    check_size,
    read_tables,
    say_read,
    text_size,
    type_name,
    unreadable,
)
from fasttune.errors import DataError, hub_id_hint

FORMATS = ("text", "alpaca", "prompt_completion", "chat")
"""The formats records are trained as (data/sft.py renders each)."""
FORMAT_NAMES = {**{f: f for f in FORMATS}, "sharegpt": "chat", "conversational": "chat", "chat_template": "chat"}
"""Every name --data.format (eval's --format) takes beside auto, and the format it reads the records as: the other
tools' names of chat read what chat reads (a conversation of ShareGPT's from/value turns or of role/content messages,
TRL's conversational prompt/completion): ShareGPT's (Axolotl's and LLaMA-Factory's sharegpt type, whose OpenAI-style
data is role/content messages), TRL's conversational and Axolotl's chat_template."""
_NOT_FORMATS = {
    "completion": "Axolotl's completion (records of one text field) is text here, and prompt/completion records are "
    "prompt_completion",
    "messages": "records of messages are chat",
    "openai": "OpenAI's records of messages are chat",
    "alpaca_chat": "Axolotl's alpaca_chat renders Alpaca records as a chat; alpaca trains them with the Alpaca prompt, "
    "and records converted to messages train as chat",
    "pretrain": "plain text (records of a text field, or text files) is text",
}
"""Names other tools give a format that could mean two of fasttune's: the error says which reads the records."""
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
log = logging.getLogger("fasttune")

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


def load_paths(
    paths: Sequence[str],
    fmt: str = "auto",
    option: str = "--data.format",
    split: str | None = "train",
    field: str | None = None,
    flag: str = "--data",
    places: list[Place] | None = None,
) -> tuple[list[dict], str]:
    """The records of the data sets at `paths` (--data a.jsonl b.parquet) as one list, in their order, and their
    format: each path read by load_records, its format detected (or checked against `fmt`) on its own, and all must
    train as one (ShareGPT beside role/content messages: chat; Alpaca beside chat is refused, naming both). `field`
    names the key of .json files' objects: given several paths, it is not passed to another type of file among them
    (it names a key of the .json ones). A string is one path (never its characters). `places`, when given, gets where
    the records came from, file by file (record_names names a record of the list by them)."""
    paths = (paths,) if isinstance(paths, str) else paths
    _refuse_overlap(paths, flag)
    keyed = [len(paths) == 1 or Path(p).is_dir() or Path(p).suffix.lower() == ".json" for p in paths]
    if field is not None and not any(keyed):
        name = option.removesuffix("format") + "field"
        raise DataError(f"{name} {field} names a key of a .json file's top-level object, and none of the paths of "
                        f"{flag} is a .json file or a folder; drop {name}")  # fmt: skip
    records: list[dict] = []
    first: dict[str, str] = {}  # format -> the first path of it
    for path, own in zip(paths, keyed, strict=True):
        got, fmt_got = load_records(path, fmt, option, split, field if own else None, flag, places)
        if first and fmt_got not in first:
            fmt_was, was = next(iter(first.items()))
            raise DataError(mixed_formats(path, fmt_got, f"{was} (given with it as {flag})", fmt_was))
        first.setdefault(fmt_got, path)
        records += got
    return records, next(iter(first))


def record_names(places: Sequence[Place]) -> Callable[[int], str]:
    """How errors name record i of the list load_paths joined (`places`: where its records came from, file by file),
    as the files were named when read: "a.jsonl line 7" (JSON lines, CSV), "b.parquet record 3" (its third record,
    counted from 1; a folder's record by the file in it)."""
    at = record_places(places)

    def name(i: int) -> str:
        place, j = at(i)
        return place.where(j)

    return name


def record_places(places: Sequence[Place]) -> Callable[[int], tuple[Place, int]]:
    """The file record i of the list load_paths joined came from (`places`: load_paths'), and its index there."""
    starts = list(itertools.accumulate((p.size for p in places[:-1]), initial=0))

    def at(i: int) -> tuple[Place, int]:
        k = bisect_right(starts, i) - 1
        return places[k], i - starts[k]

    return at


def _refuse_overlap(paths: Sequence[str], flag: str) -> None:
    """A file that two of `paths` name (a.jsonl twice; a folder and a file in it) would be read, trained and held out
    twice: refused, naming it."""
    if len(paths) < 2:
        return
    seen: dict[Path, int] = {}
    for i, path in enumerate(paths):
        try:
            files = data_files(Path(path).resolve()) if Path(path).exists() else []
        except OSError:
            continue  # load_records names it
        for f in files:
            if (j := seen.setdefault(f, i)) != i:
                was = paths[j]
                twice = "twice" if Path(was).resolve() == Path(path).resolve() else f"by {was} and by {path}"
                raise DataError(f"{flag}: {f} is named {twice}, so its records would be read twice; give each file "
                                "once")  # fmt: skip


def load_records(
    path: str,
    fmt: str = "auto",
    option: str = "--data.format",
    split: str | None = "train",
    field: str | None = None,
    flag: str = "--data",
    places: list[Place] | None = None,
) -> tuple[list[dict], str]:
    """Read every record of the dataset at `path`, check them against `fmt` (when "auto", each file's detected from
    its first record: a folder's files must train as one, as load_paths' paths must) and return (records, format).
    Raises DataError on any problem with the input; `option` is the format option the messages name (`fasttune eval`
    calls it --format, and --field the option of `field`). `split`: the split of a save_to_disk DatasetDict read when
    it has several (None: refused, naming the split folders: eval must not guess). `field`: the key of a .json file's
    top-level object that holds the records. `flag`: the option that names `path` in messages (--data.val-path for a
    validation file). `places`, when given, gets where the records came from, file by file (record_names)."""
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise DataError(unknown_format(option, fmt))
    fmt = FORMAT_NAMES.get(fmt, fmt)
    root = _existing(path, flag)
    tables = read_tables(root, split, JsonField(field, option.removesuffix("format") + "field"), flag)
    say_read(path, tables)
    tables = [t for t in tables if t.records]
    if not tables:
        raise DataError(f"{path}: no records found (empty file or folder); add data or point {flag} elsewhere")
    records, first, shared = [], {}, 0  # first: format -> the first file of it
    for table in tables:  # a folder's files each in its own format, as load_paths reads several paths
        got, fmt_got, shared_got = _table_records(table, fmt, option)
        if first and fmt_got not in first:
            fmt_was, was = next(iter(first.items()))
            raise DataError(mixed_formats(table.file, fmt_got, f"{was.file} (in the folder {path})", fmt_was))
        first.setdefault(fmt_got, table)
        records += got
        shared += shared_got
    if places is not None:
        places.extend(t.place() for t in tables)
    if shared:
        log.info("%s: %d records read as ShareGPT chat (conversations -> messages; from -> role: human -> user, gpt -> "
                 "assistant; value -> content)", path, shared)  # fmt: skip
    return records, next(iter(first))


def _table_records(table: Table, fmt: str, option: str) -> tuple[list[dict], str, int]:
    """(records, format, how many were ShareGPT) of one file: its format `fmt` (a name of FORMAT_NAMES' values) or,
    "auto", detected from its first record; TRL's conversational prompt/completion and ShareGPT read as chat."""
    if table.is_text_file:
        if fmt not in ("auto", "text"):
            raise DataError(f"{table.file}: plain text files are read as format 'text', not {fmt!r}; drop {option}")
        fmt = "text"
    if fmt == "auto":
        fmt = detect_format(table.records[0], table.where(0), option)
    first = table.records[0]
    conversational = fmt in ("prompt_completion", "chat") and "messages" not in first and is_conversational(first)
    records, shared = [], 0
    for i, record in enumerate(table.records):
        if not table.is_text_file:
            check_size(text_size(record), table.where(i))
        if conversational:
            record = _conversation_to_chat(record, table.where(i), table.where(0))
        elif fmt == "chat" and (converted := _sharegpt_to_chat(record, table.where(i))) is not record:
            record, shared = converted, shared + 1
        validate_record(record, "chat" if conversational else fmt, table.where(i), option)
        records.append(record)
    return records, "chat" if conversational else fmt, shared


def mixed_formats(path: object, fmt: str, was: str, fmt_was: str) -> str:
    """The line refusing data `path` of format `fmt` beside `was` (how that file is named) of format `fmt_was`."""
    return (
        f"{path}: its records are {fmt}, and those of {was} are {fmt_was}; one run trains one format: convert the "
        "files to one (chat also reads ShareGPT and TRL's conversational records) or train on them apart"
    )


def unknown_format(option: str, name: str) -> str:
    """The line refusing format `name` given as `option`: which format reads what it names (_NOT_FORMATS), or the
    closest name, and the names taken."""
    key = name.strip().lower().replace("-", "_")
    close = difflib.get_close_matches(key, ["auto", *FORMAT_NAMES], n=1, cutoff=0.75)
    meant = f" (did you mean {close[0]}?)" if close and key not in _NOT_FORMATS else ""
    hint = f"{_NOT_FORMATS[key]}; " if key in _NOT_FORMATS else ""
    return f"{option}={name!r} is not valid{meant}; {hint}choose one of: auto, {', '.join(FORMAT_NAMES)}"


def check_readable(path: str, flag: str = "--data") -> None:
    """`path`, as given to `flag`, refused in load_records' one line when it cannot be read at all (empty, not there,
    in a folder that cannot be looked into, a file that cannot be opened or a folder that cannot be listed): training
    checks its data so before it loads anything, as it checks --model."""
    root = _existing(path, flag)
    try:
        os.scandir(root).close() if root.is_dir() else root.open("rb").close()
    except OSError as e:
        raise unreadable(e, root, flag) from e


def _existing(path: str, flag: str) -> Path:
    """`path` as a Path, refused unless it names a file or folder (`flag`: the option that names it)."""
    root = Path(path)
    try:
        check_data_path(path, flag)
        exists = root.exists()
    except OSError as e:  # a parent folder that may not be looked into: the fix is its own
        raise unreadable(e, root.parent, flag) from e
    if not exists:
        hint = _several(path, flag) or hub_id_hint(path, flag)
        raise DataError(f"{path}: no such file or folder; check {flag}{hint}")
    return root


def _several(path: str, flag: str = "--data") -> str:
    """For a --data that does not exist: when it reads as several files (a comma list of files, a glob pattern that
    matches files, as HF datasets' data_files takes them), how to give them; "" otherwise (a missing data[1].jsonl
    is a missing file)."""
    parts = [p.strip() for p in path.split(",")]
    if len(parts) > 1 and all(Path(p).exists() for p in parts):
        return f"; {flag} takes several paths one after the other, not joined by commas: {flag} {' '.join(parts)}"
    if glob.glob(os.path.expanduser(path)):
        return (f"; {flag} takes paths, not patterns: leave the pattern unquoted for the shell to expand ({flag} "
                f"{path}), or pass the folder")  # fmt: skip
    return ""


def is_conversational(record: dict) -> bool:
    """TRL's conversational prompt/completion: prompt and completion are both lists (of {role, content} messages)."""
    return isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list)


def _conversation_to_chat(record: dict, where: str, first: str) -> dict:
    """{"prompt": [...], "completion": [...]} -> {"messages": prompt + completion, PROMPT_TURNS: len(prompt)} (its
    other fields kept); the completion must hold an assistant turn: it is what is trained."""
    if not is_conversational(record):
        raise DataError(
            f"{where}: prompt and completion are not both lists of messages, as in {first} (TRL's conversational "
            "prompt/completion); make every record one kind"
        )
    prompt, completion = record["prompt"], record["completion"]
    _validate_messages(prompt, where, "prompt", need_reply=False)
    _validate_messages(completion, where, "completion")
    check_prompt_flags(prompt, where)
    rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    return {**rest, "messages": [*prompt, *completion], PROMPT_TURNS: len(prompt)}


def _sharegpt_to_chat(record: dict, where: str) -> dict:
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
    """One ShareGPT turn as a chat message (see _sharegpt_to_chat); a role/content one as it is."""
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
            _validate_messages(value, where)
        elif fmt == "prompt_completion" and is_conversational(record):
            raise DataError(
                f"{where}: prompt and completion are lists of messages (TRL's conversational prompt/completion) but "
                "the data's first record holds strings; make every record one kind"
            )
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type_name(value)}; fix the record")


def _validate_messages(messages: object, where: str, field: str = "messages", need_reply: bool = True) -> None:
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
