"""Which files of a --data folder are read (data/readers.py reads them): its text or data files, hidden entries,
fasttune run folders and a dataset card beside the data skipped; a save_to_disk folder; a model or run folder given as
data, or a folder of several splits, refused with the options that read it. data_files: the files a digest covers."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fasttune.errors import DataError

log = logging.getLogger("fasttune")

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .cuh .rs .go .java .kt .scala .js .ts "
    ".jsx .tsx .rb .php .lua .sh .bash .sql .html .css .xml .yaml .yml .toml .ini .cfg".split()
)
DATA_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json", ".parquet", ".csv"})
_SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval", "evaluation"},
}
"""Words that name a split in a data file's path (datasets' data_files.SPLIT_KEYWORDS)."""


def folder_files(root: Path, split: str | None, flag: str) -> list[Path]:
    """Text or data files under `root` (sorted, hidden and __pycache__ entries skipped; other types ignored); `split`:
    the split wanted, as read_tables takes it (a folder of several is refused: _check_one_split)."""
    _refuse_model_or_run(root, flag)
    files = [p for p in _walk(root) if p.suffix.lower() in TEXT_SUFFIXES | DATA_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(
            f"{root}: folder has no text (.txt, .md, .py, ...) or data (.jsonl, .json, .parquet, .csv) files"
        )
    data = [p for p in files if p.suffix.lower() in DATA_SUFFIXES]
    if data:  # a dataset card beside the data (a Hugging Face dataset repository's README.md) is not data
        files = [p for p in files if p in data or p.name.lower() != "readme.md"]
    _check_one_split(root, data, split, flag)
    if data and len(data) < len(files):
        text = next(p for p in files if p.suffix.lower() not in DATA_SUFFIXES)
        raise DataError(
            f"{root}: folder mixes data files ({data[0].name}) and text files ({text.name}); "
            f"point {flag} at one file or keep one kind per folder"
        )
    return files


def _refuse_model_or_run(root: Path, flag: str) -> None:
    """A model folder or a fasttune run folder given as data: its config.json and tokenizer.json were read as records
    and refused for keys of no data format, with the fix to rename them."""
    from fasttune.train.run_dir import MARKER

    if (root / MARKER).is_file():
        raise DataError(f"{root} is a fasttune run folder, not data; point {flag} at your data file or folder (its "
                        f"{root / 'config.json'} names the data the run trained on)")  # fmt: skip
    weights = next((p.name for p in sorted(root.glob("*")) if p.suffix in (".safetensors", ".bin")), None)
    configs = [n for n in ("config.json", "adapter_config.json") if (root / n).is_file()]
    if configs and weights:
        raise DataError(f"{root} is a model folder ({configs[0]} and weights: {weights}), not data; point {flag} at "
                        "your data file or folder")  # fmt: skip


def data_files(path: Path) -> list[Path]:
    """The files the data at `path` may be read from (a folder's text and data files, every file of a save_to_disk
    folder): what a digest of the data covers (data/pipeline.py input_digest). A file of another type in a folder
    (model weights beside the data) is never read, so not hashed either."""
    if not path.is_dir():
        return [path]
    files = [f for f in _walk(path, say=False) if f.is_file()]  # a FIFO is not read (its read waits for a writer)
    return files if is_saved_dataset(path) else [f for f in files if f.suffix.lower() in TEXT_SUFFIXES | DATA_SUFFIXES]


def _walk(root: Path, say: bool = True) -> list[Path]:
    """Every file under `root`, sorted, hidden and __pycache__ entries skipped, and fasttune run folders (a run's
    --output-dir in the --data folder: its config.json, metrics.jsonl and checkpoints are no data, and read as data
    they stopped every later run on that folder, its --resume too), logged when `say` (the reader's walk says it; the
    digest's walk before it does not). A folder that cannot be listed raises (Path.rglob skips it in silence, and the
    run would train on part of the data)."""
    from fasttune.train.run_dir import MARKER

    def refuse(error: OSError) -> None:
        raise error

    found = []
    for folder, subfolders, names in os.walk(root, onerror=refuse):
        subfolders[:] = [d for d in subfolders if not _hidden(d)]
        runs = [d for d in subfolders if _is_run(Path(folder, d), MARKER)]
        if runs and say:
            log.info(
                "%s: not read as data: %s (fasttune run folders)", root, ", ".join(str(Path(folder, d)) for d in runs)
            )
        subfolders[:] = [d for d in subfolders if d not in runs]
        found += [Path(folder, name) for name in names if not _hidden(name)]
    return sorted(found)


def _is_run(folder: Path, marker: str) -> bool:
    """Whether `folder` holds a fasttune run's marker (one that cannot be looked into is walked, and named, as data)."""
    try:
        return (folder / marker).is_file()
    except OSError:
        return False


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _split_of(path: Path) -> str:
    """The split a data file's path names as a word (train-00000.parquet, my_test.jsonl, dev/a.jsonl), by the
    keywords `datasets` sorts data files into splits with; "" when none."""
    words = set(re.split(r"[^a-z]+", str(path.with_suffix("")).lower()))
    return next((split for split, names in _SPLIT_WORDS.items() if words & names), "")


def _check_one_split(root: Path, files: list[Path], split: str | None, flag: str) -> None:
    """A folder of data files that name a held-out split (test.jsonl beside train.jsonl) would be read as one data
    set, the held-out records trained (or evaluated) with the rest: refused, naming the files and how to read one
    split (`split`: "train" for training's --data, which can validate on the other as --data.val-path)."""
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(_split_of(f.relative_to(root)), []).append(f)
    if len(splits) > 1 and splits.keys() & {"validation", "test"}:
        named = ", ".join(f"{name or 'no split'} ({_files(root, fs)})" for name, fs in splits.items())
        raise DataError(f"{root}: the folder holds the files of several splits: {named}, which would be read as one "
                        f"data set; {_split_fix(splits, split, flag)}")  # fmt: skip


def _split_fix(splits: dict[str, list[Path]], split: str | None, flag: str) -> str:
    """How to read one split of a folder of several (_check_one_split): training's --data (`split` "train") its
    training split as --data and a held-out one as --data.val-path, which keeps both; another option the split it
    reads (a validation or test split: what --data.val-path and eval's --data score)."""
    name, train = next(((n, splits[n]) for n in ("train", "") if n in splits), next(iter(splits.items())))
    held_name, held = next(((n, splits[n]) for n in ("validation", "test") if n in splits and n != name), (name, train))
    if split == "train" and flag == "--data":
        if len(train) + len(held) > 4:  # shards: named by count, not listed
            return (f"pass the {len(train)} files of the {name or 'unnamed'} split as --data and the {len(held)} of "
                    f"the {held_name} split as --data.val-path (each takes several paths)")  # fmt: skip
        what = (f"{train[0].name} and validate on {held[0].name}" if len(train) == len(held) == 1 else
                f"the {name or 'unnamed'} split and validate on the {held_name} split")  # fmt: skip
        return f"to train on {what}, pass --data {_listed(train)} --data.val-path {_listed(held)}"
    wanted = train if split == "train" else held
    if len(wanted) == 1:
        return f"point {flag} at one split's file (e.g. {wanted[0]}) or keep each split in its own folder"
    return f"pass {flag} the {len(wanted)} files of one split (it takes several paths), or move them into a folder"


def _listed(files: list[Path]) -> str:
    return " ".join(map(str, files))


def _files(root: Path, files: list[Path]) -> str:
    return (
        str(files[0].relative_to(root)) if len(files) == 1 else f"{len(files)} files: {files[0].relative_to(root)}, ..."
    )


def is_saved_dataset(root: Path) -> bool:
    return root.is_dir() and (
        (root / "dataset_dict.json").is_file()
        or ((root / "state.json").is_file() and (root / "dataset_info.json").is_file())
    )
