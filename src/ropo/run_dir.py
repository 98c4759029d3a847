"""One run per directory: the lock, the run's identity, and what a resume checks before it trusts
anything on disk.

A run directory holds exactly one run. Its identity is a run id, written into run.json and into
the manifest of every checkpoint, so a resume can refuse a checkpoint some other run wrote (a
copied or reused directory). Beside it run.json records a sha256 of every input (model weights,
tokenizer, data file, a separate reference model); a resume recomputes them and refuses when one
changed in between.
While a run is alive rank 0 holds an exclusive `flock` on <out>/ropo.lock: a second run into the
same directory fails at once, and the OS drops the lock when the process dies, even by kill -9.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = "ropo.lock"
# Files that describe the tokenizer; whichever of them the model directory has are fingerprinted.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class RunIdentity:
    """Which run a directory holds: its id and input fingerprints; when resuming, also the
    run.json found there and the checkpoint to continue from (None: start over)."""

    run_id: str
    inputs: dict[str, Any]
    resumed_info: dict[str, Any] | None = None
    checkpoint: Path | None = None


def new_run_id() -> str:
    """A run id that sorts by start time and is unique: 20261201-185500-3f9a1c2e."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def check_writable_dir(path: Path, key: str) -> None:
    """ValueError unless directory `path` (config key `key`) exists or can be made, writable."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: {key}= names an existing file; it must be a directory")
    parent = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not parent.is_dir():
        raise ValueError(f"{parent}: is a file, so the {key}= directory {path} cannot be made")
    if not os.access(parent, os.W_OK) or _read_only_mount(parent):
        raise ValueError(f"{parent}: not writable, so nothing can be written to {key}={path}")


def _read_only_mount(path: Path) -> bool:
    # os.access says yes to root on a read-only mount: ask the file system itself.
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on run directory `out` (created if needed) for the block.

    A block that fails before anything but the lock is written (a run that stops on a missing
    tokenizer or too little memory) leaves nothing behind: the lock file and the directories made
    for it are removed. Under torchrun only rank 0 (RANK=0) locks: the other ranks of the same run
    write nothing.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    made = [p for p in [out.absolute(), *out.absolute().parents] if not p.exists()]
    lock_was_there = (out / LOCK_FILE).exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(
            f"{out}: another ropo run (pid {holder}) is using this run directory; wait for it "
            f"to end, or pick another out="
        ) from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    except BaseException:
        if not lock_was_there and not leftovers(out):
            _remove_unused(out, made)  # still holding the lock, so no other run is in there
        raise
    finally:
        handle.close()  # closing the last descriptor releases the flock


def _remove_unused(out: Path, made: list[Path]) -> None:
    """Remove the lock file of `out` and the directories `made` for it (innermost first), as long
    as each is empty; one that something else has written into stays."""
    (out / LOCK_FILE).unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()
        except OSError:
            return


def leftovers(out: Path) -> list[str]:
    """What is in `out` besides the lock file: anything there belongs to an earlier run."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def check_fresh(out: Path, overwrite: bool, command: str = "ropo train") -> None:
    """A fresh run needs an empty directory; ValueError offering resume= or overwrite= if not.
    `command` is the one that resumes a run (ropo train, ropo sft)."""
    found = leftovers(out)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(
            f"{out}: the run directory is not empty ({shown}). Continue the run in it with "
            f"`{command} resume={out}`, start over there with overwrite=true (its contents are "
            f"deleted), or pick another out="
        )


def clear(out: Path) -> None:
    """Delete everything in `out` but the lock file (overwrite=true, once the new run is valid)."""
    for name in leftovers(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def input_fingerprints(
    model_dir: Path, data_file: Path, reference_dir: Path | None = None
) -> dict[str, dict[str, str]]:
    """sha256 of each input a run reads: model weights and config, tokenizer files, data file,
    and the reference model's weights and config when it is not the model directory itself."""
    # Imported here: the CLI reads run.json through this module before torch is loaded.
    from ropo.fingerprints import file_sha256, fingerprint_model_dir

    tokenizer = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    inputs = {
        "model": {"path": str(model_dir), "sha256": fingerprint_model_dir(model_dir)},
        "tokenizer": {
            "path": ", ".join(str(p) for p in tokenizer),
            "sha256": _files_sha256(tokenizer),
        },
        "data": {"path": str(data_file), "sha256": file_sha256(data_file)},
    }
    if reference_dir is not None and reference_dir.resolve() != model_dir.resolve():
        reference = {"path": str(reference_dir), "sha256": fingerprint_model_dir(reference_dir)}
        inputs["reference"] = reference
    return inputs


def _files_sha256(paths: list[Path]) -> str:
    from ropo.fingerprints import file_sha256

    listing = "".join(f"{path.name}:{file_sha256(path)}\n" for path in paths)
    return hashlib.sha256(listing.encode()).hexdigest()


def check_inputs_unchanged(run_json: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """ValueError naming each input whose fingerprint differs from the one run.json recorded."""
    changed = []
    for name, current in now.items():
        before = recorded.get(name, {})
        if before.get("sha256") != current["sha256"]:
            changed.append(
                f"the {name} ({current['path']}) changed since the run started: sha256 "
                f"{str(before.get('sha256'))[:12]} in run.json, {current['sha256'][:12]} now"
            )
    if changed:
        raise ValueError(
            f"{run_json}: resume refused: {'; '.join(changed)}. Put the original back, or start "
            f"a new run with these inputs (another out=, or overwrite=true)"
        )


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json of `run_dir`, checked for the fields a resume relies on."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; resume= takes a ropo run directory")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    for field, kind in (("config", dict), ("run_id", str), ("inputs", dict)):
        if not isinstance(info.get(field), kind):
            got = "missing" if field not in info else f"a {type(info[field]).__name__}"
            hint = "" if field == "config" else " (written by a ropo without run ids: start anew)"
            raise ValueError(f"{path}: field '{field}' is {got}, expected a {kind.__name__}{hint}")
    return info


def resume_hint(out: Path, command: str = "ropo train") -> str:
    """Where a stopped run can continue from: its last checkpoint and the resume command."""
    if not (out / "run.json").is_file():
        return "nothing was written yet; run the same command again"
    pointer = out / "checkpoints" / "LATEST"
    last = (
        f"last checkpoint {out / 'checkpoints' / pointer.read_text().strip()}"
        if pointer.is_file()
        else "no checkpoint yet (a resume starts the training over)"
    )
    return f"{last}; continue with `{command} resume={out}`"
