"""The one exception type users see: a clear, one-line message with the fix, printed without a traceback."""

import re
from pathlib import Path


def one_line(error: BaseException, limit: int | None = None, *, line: int | None = None, typed: bool = False) -> str:
    """An exception's message for a one-line error: its whitespace runs one space each, cut at `limit` characters
    (when given), and the exception's type name when the message is empty. `line`: that line of it alone, counting
    the lines that are not blank (0: the first, where transformers puts the cause above its advice; -1: the last,
    where torch's load_state_dict names the size mismatch); `typed`: after its type name ("OSError: message", the
    type name alone when the message is empty), the whole cut at `limit`."""
    text = str(error)
    if line is not None:
        lines = [each for each in text.splitlines() if each.strip()]
        text = lines[line] if -len(lines) <= line < len(lines) else ""
    text = " ".join(text.split())
    if typed and text:
        text = f"{type(error).__name__}: {text}"
    return text[:limit] or type(error).__name__


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".yaml", ".yml", ".toml", ".safetensors")


def looks_like_hub_id(given: str) -> bool:
    """Whether a path that does not exist reads as a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B`, `trl-lib/Capybara`):
    owner/name, no file suffix, and no folder of that owner's name here (runs/nope is a folder of yours)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", given) or given.lower().endswith(FILE_SUFFIXES):
        return False
    return not Path(given).parent.is_dir()


def hub_id_hint(given: str, option: str) -> str:
    """For a path that does not exist and reads as a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B`, `trl-lib/Capybara`,
    as TRL's --model_name_or_path and --dataset_name take them): how to fetch it, as "; ..." ("" otherwise).
    `option`: --data or --data.val-path (a dataset repository) or the model option."""
    if not looks_like_hub_id(given):
        return ""
    folder = given.rpartition("/")[2]
    dataset = option in ("--data", "--data.val-path")
    if dataset and (cached := hub_cache_folder(given, dataset=True)) is not None:  # a repo of splits: never all read
        return (f"; fasttune reads local files only: the Hugging Face cache holds {given} in {cached}: point {option} "
                "at one split's file or folder there")  # fmt: skip
    then = f"point {option} at one split's file or folder in {folder}" if dataset else f"pass {option} {folder}"
    return (
        f"; fasttune reads local files only (it downloads nothing): if {given} is a Hugging Face Hub id, fetch "
        f"it with `hf download {given}{' --repo-type dataset' if dataset else ''} --local-dir {folder}`, then "
        f"{then}"
    )


def hub_cache_folder(given: str, dataset: bool = False) -> Path | None:
    """The snapshot folder of Hub id `given` in the local Hugging Face cache (left there by an earlier
    `from_pretrained`, `load_dataset` or `hf download`), read as it is: nothing is fetched. None when the cache holds
    none, or huggingface_hub cannot say."""
    if not looks_like_hub_id(given):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(given, repo_type="dataset" if dataset else None, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError), or an id the Hub would refuse
        return None
    return Path(folder)


class FasttuneError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with `exit_code` (no traceback
    unless --debug). The message names the file, line or option at fault and what to do about it."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(FasttuneError):
    """A config value is invalid: the message names the option and its valid values."""


class DataError(FasttuneError):
    """A dataset cannot be read or used: the message names the file (and line/record) and the fix."""


class Stopped(FasttuneError):
    """Not a mistake: the run stopped on request (Ctrl-C, SIGTERM) after saving. The CLI prints the message as a
    notice (no `error:` prefix) and exits with `exit_code` (130 / 143)."""


class PeerFailed(FasttuneError):
    """Under torchrun: rank 0 stopped before the run started and printed why; the other ranks exit with its code
    without a message of their own."""
