"""Read a user's dataset into records (plain dicts) and work out which of the four formats it is in.

The files are read by data/readers.py (text, JSON lines, JSON, CSV, Parquet, save_to_disk folders); the formats
(text, alpaca, prompt_completion, chat), how a record's keys tell its format and the checks of each record against it
are data/records.py's. Each file's format is its own (detected from its first record unless given), and the files
of one run, or of one folder, must train as one.

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
    unreadable,
)
from fasttune.data.records import (
    conversation_to_chat,
    detect_format,
    is_conversational,
    sharegpt_to_chat,
    validate_record,
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
log = logging.getLogger("fasttune")


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
            record = conversation_to_chat(record, table.where(i), table.where(0))
        elif fmt == "chat" and (converted := sharegpt_to_chat(record, table.where(i))) is not record:
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
