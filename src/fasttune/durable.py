"""Folders that survive a power cut once published, with the permissions a plain write gets: checkpoints
(train/checkpoint.py write_folder) and the tokenizer cache (data/tokenizer.py) are written into a temporary folder,
fsync'ed here, then renamed into place; after the rename a power cut leaves the complete folder or none, never a
renamed folder of empty files."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: Path) -> None:
    """Files below `path` as any other file the user creates (0644 under umask 022): safetensors writes its file
    0600."""
    mask = umask()
    for p in path.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then the folder."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """fsync the folder `path` itself (its entries: a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
