"""Read the files of a user's dataset into tables of records (plain dicts), each record named by the file and line
it came from (JSON lines, CSV) or its number there, counted from 1 as editors count lines, for data/formats.py to
check.

Inputs: a text file or a folder of them (one {"text"} record per file), .jsonl/.json (array, one object per line, or
the records under one key of an object: {"data": [...]}), .parquet, .csv, a folder of such data files, or a
`datasets.save_to_disk` folder.

Every problem with the input raises `DataError` with one line naming the file, the line or record, and the fix.
User files are only ever opened for reading.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import sys
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from fasttune.data.folders import DATA_SUFFIXES, TEXT_SUFFIXES, folder_files, is_saved_dataset
from fasttune.errors import DataError, one_line

log = logging.getLogger("fasttune")

MAX_RECORD_MB = 8
"""Most text in one record of a data file (JSON line, JSON/CSV/Parquet row), in MB of characters: a 50 MB JSON
line peaked at 6.7 GB of RAM on its way to tokens, and 8 MB (~2M tokens) is far beyond any context a sample is
trained at. Longer texts: split them into several records, or use a text file."""
RECORD_KEYS = frozenset({"text", "messages", "instruction", "output", "prompt", "completion", "conversations"})
"""Keys data/records.py tells a record's format by: a top-level JSON object holding one is a record, not a
container of records (a chat record's one key, messages, holds a list of objects too)."""


@dataclass(frozen=True)
class JsonField:
    """The key of a top-level JSON object that holds the records (`datasets`' load_dataset("json", field=...)), and
    the option that names it in messages (--data.field; eval's --field). `name` None: found when only one key holds
    a list of records."""

    name: str | None = None
    option: str = "--data.field"


@dataclass
class Table:
    """Records read from one file, with where each came from so errors can point at the right line."""

    file: Path
    records: list[dict]
    lines: list[int] | None = None
    """1-based line of each record (JSON lines, CSV); None: records are named by their number, counted from 1."""
    is_text_file: bool = False
    """A plain text file read as one {"text"} record."""
    key: str | None = None
    """The key of the JSON object the records were read from ({"data": [...]}); None: the file's own records."""

    def where(self, i: int) -> str:
        return _where(self.file, i, self.key, None if self.lines is None else self.lines[i])

    def place(self) -> Place:
        """Where the records came from, kept past the table at a few numbers per file."""
        if self.lines is None:
            return Place(self.file, len(self.records), self.key)
        at = [i for i in range(len(self.lines)) if i == 0 or self.lines[i] != self.lines[i - 1] + 1]
        return Place(self.file, len(self.records), self.key, (array("q", at), array("q", [self.lines[i] for i in at])))


@dataclass(frozen=True)
class Place:
    """A table's file, record count and how its records are named (Table.where's names), without its records: a
    record's line is found from the runs of records on consecutive lines (one run for a file of JSON lines without
    blank lines)."""

    file: Path
    size: int
    key: str | None = None
    runs: tuple[array, array] | None = None
    """(the index of each run's first record, its line); None: records are named by their number (index + 1)."""

    def where(self, i: int) -> str:
        if self.runs is None:
            return _where(self.file, i, self.key, None)
        at, line = self.runs
        k = bisect_right(at, i) - 1
        return _where(self.file, i, self.key, line[k] + i - at[k])


def _where(file: Path, i: int, key: str | None, line: int | None) -> str:
    """How errors name record i (its 0-based index) of `file`: by its line when it has one, else its number counted
    from 1, as the line of a JSON lines file is ("record 8" is the 8th record), and the key it sits under."""
    if line is not None:
        return f"{file} line {line}"
    return f"{file} record {i + 1}" + (f" of {key!r}" if key is not None else "")


def check_data_path(path: str, flag: str = "--data") -> None:
    """Refuse what would hang (a FIFO blocks in open) or silently mean something else ('' is the current folder);
    `flag`: the option that names the path in messages."""
    if not path.strip():
        fix = "leave the option out to train on the embedded corpus" if flag == "--data" else "drop the option"
        raise DataError(f"{flag} is empty; pass a data file or folder, or {fix}")
    p = Path(path)
    if p.exists() and not (p.is_file() or p.is_dir()):
        raise DataError(
            f"{flag} {path}: not a regular file or folder (a FIFO, socket or device); save the data to a file "
            "and pass that"
        )


def read_tables(root: Path, split: str | None, field: JsonField = JsonField(), flag: str = "--data") -> list[Table]:
    """The tables at `root`: one file, every data or text file of a folder, or a save_to_disk folder's `split`;
    `field`: the key of .json files' top-level objects that holds the records; `flag`: the option that names `root`
    in messages (--data.val-path for a validation file)."""
    try:
        if root.is_dir():
            os.scandir(root).close()  # a folder that cannot be listed is named as such, not by a file in it
            if is_saved_dataset(root):
                _no_field(root, field, "a save_to_disk folder")
                return [_read_saved_dataset(root, split, flag)]
        files = folder_files(root, split, flag) if root.is_dir() else [root]
    except OSError as e:  # Path.is_file raises on a folder it may not look into (Python 3.11)
        raise unreadable(e, root, flag) from e
    return [_read_readable(f, field, root, flag) for f in files]


def _read_readable(path: Path, field: JsonField, root: Path, flag: str) -> Table:
    """`path` read; one it may not read (a file of a --data folder) is named as a permission problem with the fix,
    never as a file to re-export."""
    try:
        return _read_file(path, field)
    except PermissionError as e:
        e.filename = e.filename or str(path)  # pyarrow's does not name the file
        raise unreadable(e, root, flag) from e


def unreadable(error: OSError, root: Path, flag: str = "--data") -> DataError:
    """One line for a file or folder of the data at `root` (given as `flag`) that cannot be read or listed, naming
    it and the fix."""
    name = error.filename or root
    if isinstance(error, PermissionError):
        return DataError(f"{name}: permission denied, so the data cannot be read in full; make it readable "
                         f"(chmod -R u+rX {root}) or point {flag} elsewhere")  # fmt: skip
    return DataError(f"{name}: cannot read the data ({error.strerror or _one_line(error)}); check that it exists "
                     "and is readable")  # fmt: skip


def _read_file(path: Path, field: JsonField) -> Table:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, field)
    _no_field(path, field, f"a {suffix} file" if suffix in DATA_SUFFIXES else "a text file")
    if suffix in TEXT_SUFFIXES:
        text = _read_utf8(path)
        # Whitespace-only files carry nothing to learn; skipping them keeps a folder of sources usable.
        return Table(path, [{"text": text}] if text.strip() else [], is_text_file=True)
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path, _read_utf8(path))
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; use .jsonl, .json, .parquet, .csv, "
        "a save_to_disk folder, or a text file (.txt, .md, .py, ...)"
    )


NOT_A_RECORD = (
    '; each record is an object of its format\'s fields (e.g. {"text": ...}); for plain text, one document per file, '
    "use .txt files"
)


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check that the file exists and is readable") from e
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows editors, PowerShell's `>`
        raise DataError(f"{path}: UTF-16 text, not UTF-8; re-save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}, line {line}); "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from e
    return text.removeprefix("\ufeff")


def _no_field(path: Path, field: JsonField, what: str) -> None:
    if field.name is not None:
        raise DataError(f"{path}: {field.option} {field.name} names a key of a .json file's top-level object, and "
                        f"this is {what}; drop {field.option}")  # fmt: skip


def _read_json(path: Path, field: JsonField) -> Table:
    """A .json file holds an array of records, one object (a record, or the records under one of its keys), or (like
    .jsonl) one object per line."""
    text = _read_utf8(path)
    if not text.strip():
        _no_field(path, field, "an empty file")
        return Table(path, [])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value means JSON lines; anything else is a real syntax error.
        if e.msg == "Extra data" and not text.lstrip().startswith("["):
            _no_field(path, field, "a file of JSON lines")
            return _read_json_lines(path, text)
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({json_error(e)}); fix the file") from e
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON ({_one_line(e)}); fix the file") from e
    key = _records_key(path, data, field)
    if key is not None:
        data = data[key]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type_name(data)}; wrap the records in [...]")
    table = Table(path, data, key=key)
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{table.where(i)}: expected a JSON object, got {type_name(record)}{NOT_A_RECORD}")
    return table


def _records_key(path: Path, data: object, field: JsonField) -> str | None:
    """The key of a top-level object whose value is the records: `field.name`, else the one key holding a list of
    objects when the object is not itself a record (holds no key of RECORD_KEYS); None: `data` is the records."""
    if not isinstance(data, dict):
        if field.name is not None:
            what = "a JSON array" if isinstance(data, list) else type_name(data)
            raise DataError(f"{path}: {field.option} {field.name} names a key of a top-level JSON object, and the "
                            f"file holds {what}; drop {field.option}")  # fmt: skip
        return None
    if field.name is not None:
        lists = [k for k, v in data.items() if isinstance(v, list) and (not v or isinstance(v[0], dict))]
        _check_field(path, data, field, lists)
        return field.name
    lists = record_lists(data)
    if data.keys() & RECORD_KEYS or not lists:
        return None  # one record (or none of its values is a list of records: records.py names its keys)
    if len(lists) > 1:
        keys = ", ".join(map(repr, lists))
        raise DataError(f"{path}: the top-level JSON object has several keys holding lists of records ({keys}); "
                        f"pass {field.option} KEY to pick one (e.g. {field.option} {lists[0]})")  # fmt: skip
    return lists[0]


def record_lists(data: dict) -> list[str]:
    """The keys of a JSON object that hold a non-empty list of objects: where its records may sit (an empty list
    beside them, "tags": [], holds none)."""
    return [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]


def _check_field(path: Path, data: dict, field: JsonField, lists: list[str]) -> None:
    """`field.name` is a key of `data` holding a list; else one line naming the keys that do."""
    fix = f"pass {field.option} " + (lists[0] if len(lists) == 1 else "with the key that holds the records")
    if field.name not in data:
        keys = ", ".join(map(repr, data)) or "none"
        raise DataError(f"{path}: no key {field.name!r} in the top-level JSON object (keys: {keys}); {fix}")
    if not isinstance(data[field.name], list):
        raise DataError(f"{path}: key {field.name!r} holds {type_name(data[field.name])}, not a list of records; "
                        f"{fix}")  # fmt: skip


def _read_json_lines(path: Path, text: str) -> Table:
    records: list[dict] = []
    lines: list[int] = []
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may contain raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        check_size(len(line), f"{path} line {lineno}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: invalid JSON ({json_error(e)}); each line must be one JSON object"
            ) from e
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({_one_line(e)}); fix the line") from e
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type_name(record)}{NOT_A_RECORD}")
        records.append(record)
        lines.append(lineno)
    return Table(path, records, lines)


def _read_csv(path: Path) -> Table:
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
    return Table(path, records, lines)


def _read_parquet(path: Path) -> Table:
    """pyarrow directly (a dependency of datasets): nothing is written to the HF cache for a one-off read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except PermissionError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)}); re-export it") from e
    return Table(path, records)


def _read_saved_dataset(root: Path, split: str | None, flag: str) -> Table:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except PermissionError:
        raise  # read_tables names it as such
    except Exception as e:  # datasets raises many types for a damaged folder; all mean the same to the user
        raise DataError(f"{root}: cannot load this save_to_disk folder ({_one_line(e)}); re-save it") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds and len(ds) != 1:
            held = next((name for name in ds if name != "train"), next(iter(ds)))
            none = f" and none is {split!r}" if split else ""
            raise DataError(f"{root}: dataset has splits {', '.join(ds)}{none}; pass the folder of the one to use, "
                            f"e.g. {flag} {root / held}")  # fmt: skip
        if split in ds and len(ds) > 1:  # TRL would evaluate on its test split: say that nothing here does
            log.info("%s: a DatasetDict of splits %s: its %r split is read, the others are not (validation holds out "
                     "--data.val-fraction of it, or pass a split's folder as --data.val-path)", root, ", ".join(ds),
                     split)  # fmt: skip
        ds = ds[split] if split in ds else next(iter(ds.values()))
    return Table(root, ds.to_list())


def json_error(e: json.JSONDecodeError) -> str:
    """json's message with the column: 'Unterminated string starting at column 24', 'Expecting value at column 1'."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def text_size(value: object) -> int:
    """Characters of text in a record (strings of nested lists and dicts included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_size(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(text_size(v) for v in value)
    return 0


def check_size(chars: int, where: str) -> None:
    if chars > MAX_RECORD_MB * 1_000_000:
        raise DataError(
            f"{where}: a record of {chars / 1e6:.1f} MB of text; the limit is {MAX_RECORD_MB} MB per record (longer "
            "ones take GBs of memory to tokenize): split the text into several records"
        )


def _one_line(error: BaseException) -> str:
    return one_line(error, 200)  # pyarrow's and datasets' messages can run long


def type_name(value: object) -> str:
    if value is None:
        return "null (missing value)"
    text = repr(value)
    return f"{type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"


def say_read(path: str, tables: list[Table]) -> None:
    """One line naming the JSON key the records were read from ({"data": [...]}), and for how many files; one naming
    a folder's files that hold no records (left out) beside others that do."""
    empty = [str(t.file) for t in tables if not t.records]
    if empty and len(empty) < len(tables):
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        log.info("%s: %d of its %d files %s no records and %s left out: %s%s", path, len(empty), len(tables),
                 *(("holds", "is") if len(empty) == 1 else ("hold", "are")), ", ".join(empty[:3]), more)  # fmt: skip
    keyed = [t for t in tables if t.key is not None]
    if keyed:
        keys = ", ".join(repr(k) for k in dict.fromkeys(t.key for t in keyed))
        files = f" of {len(keyed)} files" if len(keyed) > 1 else ""
        log.info("%s: read the records under the top-level JSON key %s%s (%d records)", path, keys, files,
                 sum(len(t.records) for t in keyed))  # fmt: skip
