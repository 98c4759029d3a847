"""Files checked before they are read (regular files, JSON named by file:line, safetensors files
whose size matches their header), and files written so that no reader ever sees half of one.

config.py, load.py and tokenizer.py read through these, and fingerprints.py checks the weights
before it hashes them: a FIFO or a link to /dev/zero would make a read hang or never end, and a
damaged file would otherwise fail deep inside json or safetensors without saying which file it was.
Every file ropo writes for later reading (weights, run.json, audit files, caches) goes through
`write_atomic`; this module comes first in the data flow, so every stage can.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its header's length, u64 little-endian
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers as well
SPECIAL_FILES = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def require_regular_file(path: Path, missing: str) -> int:
    """The size of `path` in bytes. FileNotFoundError(`missing`) if it does not exist; ValueError
    naming it if it is a directory, a FIFO or a device, even behind a symlink."""
    try:
        info = os.stat(path)  # follows symlinks: a link to /dev/zero is a device
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None
    if not stat.S_ISREG(info.st_mode):
        mode = info.st_mode
        kind = next((name for test, name in SPECIAL_FILES.items() if test(mode)), "a special file")
        raise ValueError(
            f"{path}: is {kind}, not a regular file; point it at the file itself "
            "(reading it could hang or never end)"
        )
    return info.st_size


def read_json(path: Path, missing: str) -> Any:
    """The JSON value in `path`; bad JSON raises ValueError("file:line: ...")."""
    require_regular_file(path, missing)
    try:
        return json.loads(path.read_bytes())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})"
        ) from None


def check_safetensors(path: Path) -> None:
    """ValueError naming `path` unless it is a regular file exactly as long as its header says:
    the 8-byte header length, the JSON header, and the tensor bytes up to the largest data offset.
    Catches empty, truncated and overwritten files before anything reads or hashes them."""
    size = require_regular_file(path, f"{path} does not exist")
    damaged = f"{path}: damaged safetensors file (download or save it again)"
    if size < HEADER_LENGTH_BYTES:
        raise ValueError(f"{damaged}: {size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as handle:
        header_bytes = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
        if header_bytes > min(size - HEADER_LENGTH_BYTES, MAX_HEADER_BYTES):
            raise ValueError(
                f"{damaged}: the header length says {header_bytes} bytes, "
                f"but the file has only {size} bytes"
            )
        header_text = handle.read(header_bytes)
    try:
        header = json.loads(header_text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{damaged}: its header is not valid JSON") from None
    expected = HEADER_LENGTH_BYTES + header_bytes + _data_end(header, damaged)
    if size != expected:
        raise ValueError(f"{damaged}: {size} bytes, but its header describes {expected} bytes")


def _data_end(header: Any, damaged: str) -> int:
    """Where the last tensor's bytes end, counted from the end of the header."""
    if not isinstance(header, dict):
        raise ValueError(f"{damaged}: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        )
        if not valid:
            raise ValueError(f"{damaged}: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    return end


def save_safetensors(
    tensors: dict, path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' save_file, then the permissions every other file we write gets (0666 minus
    the umask): safetensors 0.8 creates its files 0600, which would make a model directory in a
    shared $MODELS_DIR, or a run's final/, unreadable to everyone but its owner."""
    save_file(tensors, str(path), metadata)
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(
    path: Path, content: str | bytes | Callable[[Path], object], sync: bool = False
) -> None:
    """Write `content` to `path` through a temporary file beside it, renamed into place last: a
    reader, or a run resumed after a crash, finds the old file or the whole new one, never a
    cut-short one. `content` is text (UTF-8), bytes, or a function that writes the file at the
    path it is given; if it raises, the temporary file is removed. `sync` puts the bytes on disk
    before the rename (for a pointer such as a checkpoint's LATEST, which must not outlive them).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        if sync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
