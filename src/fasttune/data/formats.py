"""Read a user's dataset into records (plain dicts) and work out which of the four formats it is in.

Inputs: a text file or a folder of them (one {"text"} record per file), .jsonl/.json (array or one object per line),
.parquet, .csv, a folder of such data files, or a `datasets.save_to_disk` folder. Formats:

    text               {"text": str}
    alpaca             {"instruction": str, "input": str (optional, may be empty), "output": str}
    prompt_completion  {"prompt": str, "completion": str}
    chat               {"messages": [{"role": str, "content": str}, ...]} with at least one assistant turn

TRL's conversational prompt/completion, {"prompt": [messages], "completion": [messages]}, is read as chat:
{"messages": prompt + completion}, the number of prompt messages kept under PROMPT_TURNS; only the completion's
assistant turns are trained (data/sft.py), as TRL trains the completion only. A message's `training`/`weight` and a
record's `chat_template_kwargs` are checked here: data/chat_fields.py.

Every problem with the input raises `DataError` with one line naming the file, the line or record, and the fix.
User files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fasttune.data.chat_fields import KWARGS, check_message_flags, check_prompt_flags, record_kwargs
from fasttune.errors import DataError

FORMATS = ("text", "alpaca", "prompt_completion", "chat")
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

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .cuh .rs .go .java .kt .scala .js .ts "
    ".jsx .tsx .rb .php .lua .sh .bash .sql .html .css .xml .yaml .yml .toml .ini .cfg".split()
)
DATA_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json", ".parquet", ".csv"})
MAX_RECORD_MB = 8
"""Most text in one record of a data file (JSON line, JSON/CSV/Parquet row), in MB of characters: a 50 MB JSON
line peaked at 6.7 GB of RAM on its way to tokens, and 8 MB (~2M tokens) is far beyond any context a sample is
trained at. Longer texts: split them into several records, or use a text file."""
_SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval", "evaluation"},
}
"""Words that name a split in a data file's path (datasets' data_files.SPLIT_KEYWORDS)."""
_SHAREGPT_FIX = (
    'convert each record to {"messages": [{"role", "content"}, ...]}: conversations -> messages, from -> role (human '
    "-> user, gpt -> assistant, system stays), value -> content"
)
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function", "tool_results", "tool_response",
         "observation", "environment")  # fmt: skip
"""Message roles chat data may use: the usual four, and those real chat templates know for tool output and the like
(OpenAI's developer and function, Llama 3.1's ipython, Mistral v0.3's tool_results, Granite 3's tool_response,
GLM-4's observation, InternLM2's environment: context, never trained). Any other (a typo such as "usr", ShareGPT's
human/gpt) is refused: templates render a role they do not know as is, and the run would train on turns labelled
with it."""
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
PROMPT_TURNS = "_prompt_turns"
"""A chat record converted from a conversational prompt/completion one: how many of its leading messages were the
prompt (their assistant turns are context, never trained)."""
_FORMAT_HINT = "; ".join(f"{name} {keys}" for name, keys in FORMAT_KEYS.items())


@dataclass
class _Table:
    """Records read from one file, with where each came from so errors can point at the right line."""

    file: Path
    records: list[dict]
    lines: list[int] | None = None
    """1-based line of each record (JSON lines, CSV); None: records are named by their 0-based index."""
    is_text_file: bool = False
    """A plain text file read as one {"text"} record."""

    def where(self, i: int) -> str:
        return f"{self.file} line {self.lines[i]}" if self.lines is not None else f"{self.file} record {i}"


def check_data_path(path: str) -> None:
    """Refuse what would hang (a FIFO blocks in open) or silently mean something else ('' is the current folder)."""
    if not path.strip():
        raise DataError(
            "--data is empty; pass a data file or folder, or leave the option out to train on the embedded corpus"
        )
    p = Path(path)
    if p.exists() and not (p.is_file() or p.is_dir()):
        raise DataError(
            f"--data {path}: not a regular file or folder (a FIFO, socket or device); save the data to a file "
            "and pass that"
        )


def load_records(
    path: str, fmt: str = "auto", option: str = "--data.format", split: str | None = "train"
) -> tuple[list[dict], str]:
    """Read every record of the dataset at `path`, check them against `fmt` (detected from the first record
    when "auto") and return (records, format). Raises DataError on any problem with the input; `option` is the
    format option the messages name (`fasttune eval` calls it --format). `split`: the split of a save_to_disk
    DatasetDict read when it has several (None: refused, naming the split folders: eval must not guess)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not valid; choose one of: auto, {', '.join(FORMATS)}")
    root = Path(path)
    try:
        check_data_path(path)
        exists = root.exists()
    except OSError as e:  # a parent folder that may not be looked into: the fix is its own
        raise unreadable(e, root.parent) from e
    if not exists:
        raise DataError(f"{path}: no such file or folder; check --data")
    tables = _read_path(root, split)
    tables = [t for t in tables if t.records]
    if not tables:
        raise DataError(f"{path}: no records found (empty file or folder); add data or point --data elsewhere")
    if tables[0].is_text_file:
        if fmt not in ("auto", "text"):
            raise DataError(f"{path}: plain text files are read as format 'text', not {fmt!r}; drop {option}")
        fmt = "text"
    if fmt == "auto":
        fmt = detect_format(tables[0].records[0], tables[0].where(0), option)
    first = tables[0].records[0]
    conversational = fmt in ("prompt_completion", "chat") and "messages" not in first and is_conversational(first)
    records: list[dict] = []
    for table in tables:
        for i, record in enumerate(table.records):
            if not table.is_text_file:
                _check_size(_text_size(record), table.where(i))
            if conversational:
                record = _conversation_to_chat(record, table.where(i), tables[0].where(0))
            validate_record(record, "chat" if conversational else fmt, table.where(i), option)
            records.append(record)
    return records, "chat" if conversational else fmt


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


def detect_format(record: dict, where: str = "record 0", option: str = "--data.format") -> str:
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
    if "conversations" in keys:
        raise DataError(f"{where}: ShareGPT data ('conversations' of from/value turns) is not read as is; "
                        f"{_SHAREGPT_FIX}")  # fmt: skip
    seen = ", ".join(sorted(map(str, keys))[:12]) or "none"
    raise DataError(
        f"{where}: cannot tell the data format from its keys ({seen}); expected {_FORMAT_HINT}; "
        f"rename the fields or pass {option}"
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
            raise DataError(f"{where}: field {name!r} must be a string, got {_type_name(value)}; fix the record")


def _validate_messages(messages: object, where: str, field: str = "messages", need_reply: bool = True) -> None:
    """A non-empty list of {role, content} messages (`field` names it in errors); `need_reply`: with an assistant
    turn, the trained part."""
    if isinstance(messages, str):
        raise DataError(
            f"{where}: field {field!r} is a string, not a list of {{role, content}} objects; "
            "store chat data as JSONL/JSON/Parquet, not CSV"
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list, got {_type_name(messages)}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{j}] must be an object with role and content, got {_type_name(message)}")
        if "role" not in message and {"from", "value"} <= set(message):
            raise DataError(f"{where}: {field}[{j}] uses ShareGPT keys from/value; {_SHAREGPT_FIX}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"{where}: {field}[{j}].{key} must be a string, got {_type_name(message.get(key))}; fix the record"
                )
        _check_role(message["role"], f"{where}: {field}[{j}]")
        check_message_flags(message, f"{where}: {field}[{j}]")
    if need_reply and not any(m["role"] == "assistant" for m in messages):
        of = "" if field == "messages" else f" of {field!r}"
        raise DataError(f"{where}: no message{of} has role 'assistant', so there is nothing to train on; add a reply")


def _check_role(role: str, where: str) -> None:
    if role in ROLES:
        return
    hint = f"ShareGPT's {role!r} is {_SHAREGPT_ROLES[role]!r}: " if role in _SHAREGPT_ROLES else ""
    raise DataError(f"{where}.role is {role!r}, not a chat role ({', '.join(ROLES)}); {hint}rename it")


def _type_name(value: object) -> str:
    if value is None:
        return "null (missing value)"
    text = repr(value)
    return f"{type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"


# ---- reading files -------------------------------------------------------------------------------------------------


def _read_path(root: Path, split: str | None) -> list[_Table]:
    try:
        if root.is_dir():
            os.scandir(root).close()  # a folder that cannot be listed is named as such, not by a file in it
            if _is_saved_dataset(root):
                return [_read_saved_dataset(root, split)]
        files = _folder_files(root) if root.is_dir() else [root]
    except OSError as e:  # Path.is_file raises on a folder it may not look into (Python 3.11)
        raise unreadable(e, root) from e
    return [_read_file(f) for f in files]


def unreadable(error: OSError, root: Path) -> DataError:
    """One line for a file or folder of the data at `root` that cannot be read or listed, naming it and the fix."""
    name = error.filename or root
    if isinstance(error, PermissionError):
        return DataError(f"{name}: permission denied, so the data cannot be read in full; make it readable "
                         f"(chmod -R u+rX {root}) or point --data elsewhere")  # fmt: skip
    return DataError(f"{name}: cannot read the data ({error.strerror or _one_line(error)}); check that it exists "
                     "and is readable")  # fmt: skip


def _read_file(path: Path) -> _Table:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _read_utf8(path)
        # Whitespace-only files carry nothing to learn; skipping them keeps a folder of sources usable.
        return _Table(path, [{"text": text}] if text.strip() else [], is_text_file=True)
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path, _read_utf8(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; use .jsonl, .json, .parquet, .csv, "
        "a save_to_disk folder, or a text file (.txt, .md, .py, ...)"
    )


def _folder_files(root: Path) -> list[Path]:
    """Text or data files under `root` (sorted, hidden and __pycache__ entries skipped; other types ignored)."""
    files = [p for p in _walk(root) if p.suffix.lower() in TEXT_SUFFIXES | DATA_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(
            f"{root}: folder has no text (.txt, .md, .py, ...) or data (.jsonl, .json, .parquet, .csv) files"
        )
    data = [p for p in files if p.suffix.lower() in DATA_SUFFIXES]
    _check_one_split(root, data)
    if data and len(data) < len(files):
        text = next(p for p in files if p.suffix.lower() not in DATA_SUFFIXES)
        raise DataError(
            f"{root}: folder mixes data files ({data[0].name}) and text files ({text.name}); "
            "point --data at one file or keep one kind per folder"
        )
    return files


def _walk(root: Path) -> list[Path]:
    """Every file under `root`, sorted, hidden and __pycache__ entries skipped. A folder that cannot be listed raises
    (Path.rglob skips it in silence, and the run would train on part of the data)."""

    def refuse(error: OSError) -> None:
        raise error

    found = []
    for folder, subfolders, names in os.walk(root, onerror=refuse):
        subfolders[:] = [d for d in subfolders if not _hidden(d)]
        found += [Path(folder, name) for name in names if not _hidden(name)]
    return sorted(found)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _split_of(path: Path) -> str:
    """The split a data file's path names as a word (train-00000.parquet, my_test.jsonl, dev/a.jsonl), by the
    keywords `datasets` sorts data files into splits with; "" when none."""
    words = set(re.split(r"[^a-z]+", str(path.with_suffix("")).lower()))
    return next((split for split, names in _SPLIT_WORDS.items() if words & names), "")


def _check_one_split(root: Path, files: list[Path]) -> None:
    """A folder of data files that name a held-out split (test.jsonl beside train.jsonl) would be read as one data
    set, the held-out records trained (or evaluated) with the rest: refused, naming the files."""
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(_split_of(f.relative_to(root)), []).append(f)
    if len(splits) > 1 and splits.keys() & {"validation", "test"}:
        named = ", ".join(f"{split or 'no split'} ({_files(root, fs)})" for split, fs in splits.items())
        wanted = splits.get("train") or splits.get("") or next(iter(splits.values()))
        fix = "move each split's files into a folder of their own and point --data at it"
        if len(wanted) == 1:
            fix = f"point --data at one split's file (e.g. {wanted[0]}) or keep each split in its own folder"
        raise DataError(f"{root}: the folder holds the files of several splits: {named}, which would be read as one "
                        f"data set; {fix}")  # fmt: skip


def _files(root: Path, files: list[Path]) -> str:
    return (
        str(files[0].relative_to(root)) if len(files) == 1 else f"{len(files)} files: {files[0].relative_to(root)}, ..."
    )


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check that the file exists and is readable") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}, line {line}); "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from e
    return text.removeprefix("\ufeff")


def _read_json(path: Path) -> _Table:
    """A .json file holds an array of records, one object, or (like .jsonl) one object per line."""
    text = _read_utf8(path)
    if not text.strip():
        return _Table(path, [])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value means JSON lines; anything else is a real syntax error.
        if e.msg == "Extra data" and not text.lstrip().startswith("["):
            return _read_json_lines(path, text)
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({json_error(e)}); fix the file") from e
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON ({_one_line(e)}); fix the file") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {_type_name(data)}; wrap the records in [...]")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {_type_name(record)}")
    return _Table(path, data)


def _read_json_lines(path: Path, text: str) -> _Table:
    records: list[dict] = []
    lines: list[int] = []
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may contain raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        _check_size(len(line), f"{path} line {lineno}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: invalid JSON ({json_error(e)}); each line must be one JSON object"
            ) from e
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({_one_line(e)}); fix the line") from e
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {_type_name(record)}")
        records.append(record)
        lines.append(lineno)
    return _Table(path, records, lines)


def _read_csv(path: Path) -> _Table:
    """The csv module rather than pandas/pyarrow: cells stay strings (an answer "72" must not become an int)."""
    # The 128 KiB default cell limit is a guard against runaway quoting; a long document in one cell is legitimate.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""), strict=True)
    records: list[dict] = []
    lines: list[int] = []
    start = 2
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {start}: more values than the {len(reader.fieldnames)} header columns")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise DataError(f"{path} line {start}: no value for column {missing[0]!r}; fix the row")
            records.append(row)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({_one_line(e)}); fix the quoting") from e
    return _Table(path, records, lines)


def _read_parquet(path: Path) -> _Table:
    """pyarrow directly (a dependency of datasets): nothing is written to the HF cache for a one-off read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)}); re-export it") from e
    return _Table(path, records)


def _is_saved_dataset(root: Path) -> bool:
    return root.is_dir() and (
        (root / "dataset_dict.json").is_file()
        or ((root / "state.json").is_file() and (root / "dataset_info.json").is_file())
    )


def _read_saved_dataset(root: Path, split: str | None) -> _Table:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a damaged folder; all mean the same to the user
        raise DataError(f"{root}: cannot load this save_to_disk folder ({_one_line(e)}); re-save it") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds and len(ds) != 1:
            held = next((name for name in ds if name != "train"), next(iter(ds)))
            none = f" and none is {split!r}" if split else ""
            raise DataError(f"{root}: dataset has splits {', '.join(ds)}{none}; pass the folder of the one to use, "
                            f"e.g. --data {root / held}")  # fmt: skip
        ds = ds[split] if split in ds else next(iter(ds.values()))
    return _Table(root, ds.to_list())


def json_error(e: json.JSONDecodeError) -> str:
    """json's message with the column: 'Unterminated string starting at column 24', 'Expecting value at column 1'."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _text_size(value: object) -> int:
    """Characters of text in a record (strings of nested lists and dicts included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_size(v) for v in value)
    return 0


def _check_size(chars: int, where: str) -> None:
    if chars > MAX_RECORD_MB * 1_000_000:
        raise DataError(
            f"{where}: a record of {chars / 1e6:.1f} MB of text; the limit is {MAX_RECORD_MB} MB per record (longer "
            "ones take GBs of memory to tokenize): split the text into several records"
        )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] or type(error).__name__
