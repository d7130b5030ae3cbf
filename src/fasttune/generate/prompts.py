"""Prompt files for `fasttune generate --prompts FILE`: one JSON value per line in (a .txt file: one plain prompt per
line; a .parquet or .csv file: one record per row, read as `--data` reads it), one JSON object per line out.

Each line is a JSON string (the prompt), or an object with "prompt", "instruction" (+ optional "input", Alpaca),
"messages" (chat; a trailing assistant turn is dropped; through an Alpaca or prompt/completion run's format, user and
assistant turns only: template.check_roles), a "prompt" list of messages (TRL's conversational prompt/completion) or
"text". Completions are written beside the input record's own fields, in the input order, to a new file (never over
an existing one unless asked).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path

from fasttune.data.readers import RECORD_KEYS, json_error, record_lists
from fasttune.data.records import validate_messages
from fasttune.errors import DataError, FasttuneError

PROMPT_KEYS = '"prompt", "instruction" (+ "input"), "messages" or "text"'
TABLES = (".parquet", ".csv")
"""Prompt files read by data/readers.py, as `--data` reads them: their rows are the records."""
TEXTS = (".jsonl", ".ndjson", ".json", ".txt")
FILE_TYPES = "JSON lines, a .json file, a .txt file of prompts (one per line), .parquet or .csv"
WHERE = "_where"
"""The key read_prompts adds to each record: its place in the file, for errors (dropped from the output)."""


def read_prompts(path: str | Path) -> list[dict]:
    """Records of a JSONL prompt file (or a JSON array of them, as a .json data file holds), each as a dict (a bare
    string becomes {"prompt": ...}) with WHERE, its place in the file ("line 3", "record 2": counted from 1, as data
    errors count). Errors about `-` name it as typed and standard input, not the /dev/stdin it is read through."""
    try:
        return _read_prompts(prompts_path(path))
    except DataError as e:
        if str(path) != "-":
            raise
        said = str(e).replace("--prompts /dev/stdin", "--prompts -").replace("/dev/stdin", "standard input")
        raise DataError(said) from None


def _read_prompts(file: Path) -> list[dict]:
    if not file.exists():
        raise DataError(f"--prompts {file}: no such file; pass a JSONL file with one prompt per line")
    if not file.is_file() and not is_stream(file):  # a pipe, /dev/stdin (`--prompts -`) is read as it is
        raise DataError(f"--prompts {file} is not a regular file; pass a JSONL file with one prompt per line")
    records = []
    for where, value in _table_values(file) if file.suffix.lower() in TABLES else _values(file, _read_text(file)):
        record = {"prompt": value} if isinstance(value, str) else value
        if not isinstance(record, dict) or not _has_prompt(record):
            raise DataError(f"{file} {where}: {_no_prompt(record)}")
        _check_fields(record, f"{file} {where}")
        record[WHERE] = where
        records.append(record)
    if not records:
        raise DataError(f"--prompts {file}: no prompts (the file is empty); write one JSON prompt per line, e.g. "
                        '{"prompt": "What is 2 + 3?"}')  # fmt: skip
    return records


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fix = "save it as UTF-8" if file.suffix.lower() in TEXTS else f"--prompts reads {FILE_TYPES}"
        raise DataError(f"--prompts {file}: not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except PermissionError:
        raise DataError(f"--prompts {file}: permission denied; make it readable (chmod u+r {file})") from None
    except OSError as e:
        raise DataError(f"--prompts {file}: cannot read it ({e.strerror or e}); check the file") from None


def _table_values(file: Path) -> list[tuple[str, object]]:
    """(place, record) of each row of a Parquet or CSV file, read as `--data` reads it (a CSV cell stays a string)."""
    from fasttune.data.readers import read_tables

    [table] = read_tables(file, None, flag="--prompts")  # one file: one table; its errors name it and the fix
    return [(f"line {table.lines[i]}" if table.lines else f"record {i + 1}", r) for i, r in enumerate(table.records)]


def prompts_path(path: str | Path) -> Path:
    """--prompts as a path: `-` is standard input."""
    return Path("/dev/stdin") if str(path) == "-" else Path(path)


def _values(file: Path, text: str) -> list[tuple[str, object]]:
    """(place, JSON value) of each prompt: a .txt file's lines that are not blank, as text; else one per line, or each
    item of a JSON array (an Alpaca .json test set, as `eval --data` reads it), pretty-printed or not, or of the one
    list of records in a JSON object ({"data": [...]}, as training and `eval --data` read it)."""
    if file.suffix.lower() == ".txt":  # plain text: each line that is not blank is one prompt, as written
        return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = _under_one_key(file, text)
    if records is not None:
        return records
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except ValueError as e:  # one line of JSON lines that is itself an array is read below
            if "\n" in text.strip() and isinstance(e, json.JSONDecodeError) and e.msg != "Extra data":
                raise DataError(f"{file} line {e.lineno}: invalid JSON ({json_error(e)}); fix the file") from None
            values = None
        if isinstance(values, list) and all(isinstance(v, (dict, str)) for v in values):
            return [(f"record {i + 1}", v) for i, v in enumerate(values)]
    values = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((f"line {n}", json.loads(line)))
        except ValueError as e:
            raise DataError(f"{file} line {n}: invalid JSON ({json_error(e)}); {_json_lines_fix(file)}") from None
    return values


def _json_lines_fix(file: Path) -> str:
    """How to write prompts that are not JSON: in a .txt file; piped ones (no file name to say .txt) as JSON strings."""
    if is_stream(file):
        return 'pipe one JSON value per line: a plain prompt as a JSON string ("What is 2 + 3?")'
    return "write one JSON value per line (or plain prompts, one per line, in a .txt file)"


def _under_one_key(file: Path, text: str) -> list[tuple[str, object]] | None:
    """The records of a JSON object whose one key holding a list of records holds the prompts ({"version": ..,
    "data": [...]}), or the object itself when it is one record (holds a key of RECORD_KEYS, as training tells them:
    its messages are not prompts) pretty-printed over several lines; None: the text is something else (JSON lines,
    an array, one record on one line)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None  # JSON lines (or a syntax error, named line by line below)
    if not isinstance(data, dict):
        return None
    if _has_prompt(data) or data.keys() & RECORD_KEYS:
        return [("record 1", data)] if "\n" in text.strip() else None
    lists = record_lists(data)
    if len(lists) > 1:
        raise DataError(
            f"--prompts {file}: the top-level JSON object has several keys holding lists "
            f"({', '.join(map(repr, lists))}); keep the prompts' list alone, or write one prompt per line"
        )
    return [(f"record {i + 1} of {lists[0]!r}", v) for i, v in enumerate(data[lists[0]])] if lists else None


def _has_prompt(record: dict) -> bool:
    for key in ("messages", "prompt"):  # a chat, or TRL's conversational prompt (a list of messages)
        if isinstance(record.get(key), list):
            return any(isinstance(m, dict) and isinstance(m.get("content"), str) for m in record[key])
    return any(isinstance(record.get(k), str) for k in ("prompt", "instruction", "text"))


def _check_fields(record: dict, where: str) -> None:
    """The fields record_messages reads beside the prompt itself, checked as training checks them: each message of the
    list it sends (one that was not an object was dropped, a number as content sent as its digits), or Alpaca's "input"
    beside an instruction (text, or null for none: a number or a list was sent as its JSON)."""
    for key in ("messages", "prompt"):  # the list record_messages sends, in its order
        if isinstance(record.get(key), list):
            return validate_messages(record[key], where, key, need_reply=False)
    extra = record.get("input")
    if isinstance(record.get("instruction"), str) and extra is not None and not isinstance(extra, str):
        raise DataError(f'{where}: "input" must be text (a JSON string) or null, not {json_type(extra)}; write the '
                        'input as a JSON string ("input": "...")')  # fmt: skip
    return None


def _no_prompt(value: object) -> str:
    """Why a value read from a prompt file holds no prompt, and the fix: a prompt field of another type than text
    names that field and the type found (a number was "no prompt", as if the field were missing)."""
    if not isinstance(value, dict):
        return f"a prompt must be a JSON string or an object with {PROMPT_KEYS}, not {json_type(value)}"
    text, fix = "text (a JSON string)", "write the prompt as a JSON string"
    wanted = {"prompt": (f"{text} or a list of messages", f'{fix} ("prompt": "...")'),
              "instruction": (text, f'{fix} ("instruction": "...")'), "text": (text, f'{fix} ("text": "...")'),
              "messages": ("a list of messages with text content",
                           'give each message a "role" and a "content" string')}  # fmt: skip
    for key, (want, how) in wanted.items():
        if key in value:
            return f'"{key}" must be {want}, not {json_type(value[key])}; {how}'
    return f"no prompt; give a JSON string or an object with {PROMPT_KEYS}"


def json_type(value: object, shown: int = 60) -> str:
    """What a JSON value is, in words, and the value itself (cut at `shown` characters): "a number: 3"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int | float):
        kind = "a number"
    elif isinstance(value, str):
        kind = "text"
    elif isinstance(value, list) and not value:
        return "an empty list"
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        kind = "a list of text"
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        kind = "a list of messages without text"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = "a list"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{kind}: {text if len(text) <= shown else text[: shown - 3] + '...'}"


def record_messages(record: dict, prompt_format: str) -> list[dict]:
    """The conversation to render for a prompt record; Alpaca's input goes where the run's format puts it."""
    if isinstance(record.get("messages"), list):
        messages = [m for m in record["messages"] if isinstance(m, dict)]
        while len(messages) > 1 and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a reference answer: the model writes its own
        return messages
    if isinstance(record.get("prompt"), list):  # conversational prompt/completion: the completion is the reference
        return [m for m in record["prompt"] if isinstance(m, dict)]
    if isinstance(record.get("instruction"), str):
        extra = record.get("input") or ""
        if prompt_format == "alpaca":
            return [{"role": "user", "content": record["instruction"], "input": extra}]
        # one user message, "instruction\ninput": as LLaMA-Factory's Alpaca converter and Axolotl's alpaca_chat
        return [{"role": "user", "content": record["instruction"] + (f"\n{extra}" if extra else "")}]
    text = record["prompt"] if isinstance(record.get("prompt"), str) else record["text"]
    return [{"role": "user", "content": text}]


def check_single(messages: list[dict], where: str) -> None:
    """Without a chat template (--raw, or a model that has none) only the last message's text is sent: refuse a
    record whose other messages (a system prompt, earlier turns) would be dropped silently; blank ones drop nothing."""
    from fasttune.data.chat_render import blank_message

    if (n := len([m for m in messages if not blank_message(m)])) > 1:
        raise DataError(
            f"{where} has {n} messages, and without a chat template (--raw, or a model that has none) only "
            "the last one's text is sent; give one prompt text, or generate with a model whose tokenizer has a chat "
            "template"
        )


def check_output(path: Path, overwrite: bool, option: str = "--output") -> None:
    """Before any work: the output file is new (or --overwrite) and its folder can be created."""
    if path.exists() and path.is_dir():
        raise FasttuneError(f"{option} {path} is a folder; pass a file path")
    if is_stream(path):
        return  # /dev/stdout, a named pipe: written as they are, nothing in them replaced
    from fasttune.train.run_dir import refuse_writing_into_run

    refuse_writing_into_run(path, option, "pass a path outside checkpoints/, adapter/ and merged/")
    if path.exists() and not overwrite:
        raise FasttuneError(f"{option} {path} already exists; choose another path or pass --overwrite to replace it")
    make_folder(path.parent, option)


def refuse_writing_over(out: Path, source: str | Path, option: str, source_option: str) -> None:
    """Before any work: `out` must not be the input file `source` (however spelled: another path, a symlink, a hard
    link), nor in the input folder `source`: --overwrite would replace a file of it with the results, and a new file
    there is read with the data from then on (a folder is read whole, subfolders included)."""
    src = Path(source)
    try:
        same = os.path.samefile(out, src)
    except OSError:  # either one missing (a new output file; an input that is not a path): nothing replaced
        same = False
    if same:
        raise FasttuneError(f"{option} {out} is the {source_option} {src}: writing there would replace what is read; "
                            f"choose another {option}")  # fmt: skip
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise FasttuneError(f"{option} {out} is in the {source_option} {src}: writing there would change the data it "
                            f"reads; choose another {option}")  # fmt: skip


_MADE: list[Path] = []  # the folders make_folder created, outermost first


def make_folder(path: Path, option: str) -> None:
    """Create the output folder and write a file in it now, not after minutes of work (a command that then fails
    removes it again while it is empty: `removing_made_folders`)."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FasttuneError(f"{option}: cannot create {path} ({e.strerror or e}); {write_fix(e)}") from None
    _MADE.extend(missing)
    probe = path / f".fasttune-write-test-{os.getpid()}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        raise FasttuneError(f"{option}: cannot write in {path} ({e.strerror or e}); {write_fix(e)}") from None


@contextlib.contextmanager
def removing_made_folders():
    """Around a command: if it fails, the folders make_folder created for its outputs go again while they are still
    empty, so a mistake (a wrong --checkpoint, bad data) leaves nothing behind."""
    try:
        yield
    except BaseException:
        for folder in reversed(_MADE):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        raise
    finally:
        _MADE.clear()


def write_fix(e: OSError) -> str:
    """What to do about a failed write, by its cause."""
    if isinstance(e, PermissionError):
        return "make the folder writable (chmod u+w) or choose another path"
    if e.errno == errno.EROFS:
        return "that file system is read-only; choose another path"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space or choose another path"
    return "choose another path"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # default=str: a Parquet row's date or bytes cell, kept beside the completion, has no JSON type of its own
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def is_stream(path: Path) -> bool:
    """Whether `path` is a stream: an existing file that is not a regular file or a folder (a named pipe, a terminal),
    or a path in /dev or /proc (/dev/stdout, also when the shell redirected it to a file: `> out.jsonl`). Output goes
    into it as it is: replacing it (a new file moved over it, as write_atomic does) would put a regular file in place
    of the device, the pipe or /dev/stdout itself, and its reader would get nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return os.path.abspath(path).startswith(("/dev/", "/proc/")) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_atomic(path: Path, text: str) -> None:
    """Write atomically: a reader (or a crash) never sees half a file. A stream (is_stream) is written as it is; one
    whose reader went away (`| head`) is left, as stdout is (streams.py)."""
    if is_stream(path):
        try:
            with path.open("w", encoding="utf-8") as f:
                f.write(text)
        except BrokenPipeError:
            pass
        except OSError as e:
            raise FasttuneError(f"could not write {path} ({e.strerror or e}); {write_fix(e)}") from None
        return
    path = path.resolve() if path.is_symlink() else path  # the file it points to is replaced, the link kept
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        msg = f"could not write {path} ({e.strerror or e}); {write_fix(e)}"
        raise FasttuneError(msg) from None
