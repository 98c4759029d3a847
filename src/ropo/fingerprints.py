"""sha256 fingerprints of what a run reads: files, model directories and tokenised pairs.

Bookkeeping behind the reference cache and resuming, not part of the method: ref_cache_files.py
names its cache files by them, run.json records them (run_dir.py) so that a resume can refuse a
changed input, and checkpoints check their files with them. Sits after the data stage (pairs
are hashed by their token ids).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ropo.data import TokenizedPair
from ropo.models.files import check_safetensors, require_regular_file


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_pairs(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 over the ids and token ids of every pair, in order."""
    return fingerprint_rows([p.id, p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs)


def fingerprint_rows(rows: Iterable[list]) -> str:
    """sha256 over the JSON of every row (ids and token ids of a pair or an SFT example)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, separators=(",", ":")).encode())
    return digest.hexdigest()


def fingerprint_model_dir(model_dir: str | Path) -> str:
    """sha256 over config.json and every safetensors file of a checkpoint directory.

    Reading every byte is deliberate: a size/mtime shortcut would miss a checkpoint rewritten in
    place. For a 7B checkpoint this costs about a minute once per run, against hours of training.
    """
    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    for path in weights:  # a FIFO or /dev/zero would hang the hash; a damaged file gets named
        check_safetensors(path)
    require_regular_file(model_dir / "config.json", f"no config.json in {model_dir}")
    files = weights + [model_dir / "config.json"]
    # Within a process, files that keep their inode, size and mtime are hashed once (a LoRA run
    # asks twice: cache key, base check); one written since, e.g. by an earlier stage of the
    # built-in task, is read again.
    return _files_digest(tuple((p, *_identity(p.stat())) for p in files))


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.cache
def _files_digest(files: tuple[tuple[Path, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, *_ in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
