"""How the built-in task skips work it has done: each stage records a hash of its inputs and of
the source of ropo and of this package in <out>/stages/<name>.json, and is skipped when a rerun
finds the same hash and its outputs in place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import ropo
import ropo_builtin
from ropo.interrupt import Interrupted

# The code whose source is part of every stage's key: the library and this task.
SOURCE_PACKAGES = (ropo, ropo_builtin)


@dataclass(frozen=True)
class StageResult:
    key: str  # hash of the stage's inputs, upstream keys included
    result: dict[str, Any]
    seconds: float
    cached: bool


def run_stage(
    out: Path, name: str, inputs: dict[str, Any], outputs: list[Path], work: Callable[[], dict]
) -> StageResult:
    """Run `work` unless <out>/stages/<name>.json holds the same inputs and `outputs` all exist."""
    done = cached_stage(out, name, inputs, outputs)
    if done is not None:
        return done
    print(f"[{name}] running")
    forget_stage(out, name)
    start = time.perf_counter()
    try:
        result = work()
    except Interrupted as stop:
        stop.where = f"in stage [{name}]" + (f", {stop.where}" if stop.where else "")
        raise
    return record_stage(out, name, inputs, result, time.perf_counter() - start)


def cached_stage(
    out: Path, name: str, inputs: dict[str, Any], outputs: list[Path]
) -> StageResult | None:
    """The recorded result of stage `name` if its marker holds the same inputs and `outputs` all
    exist (saying so on stdout); else None: the stage must run."""
    _, key = _keyed(inputs)
    marker = out / "stages" / f"{name}.json"
    if marker.is_file() and all(p.exists() for p in outputs):
        done = json.loads(marker.read_text())
        if done["key"] == key:
            print(f"[{name}] up to date, skipped ({done['seconds']:.0f} s when it ran)")
            return StageResult(key, done["result"], done["seconds"], cached=True)
    return None


def forget_stage(out: Path, name: str) -> None:
    """Delete the marker of a stage about to run: an interrupted stage must not look done."""
    (out / "stages" / f"{name}.json").unlink(missing_ok=True)


def record_stage(
    out: Path, name: str, inputs: dict[str, Any], result: dict[str, Any], seconds: float
) -> StageResult:
    """Write the marker of a stage that has run: its key, inputs, time and result."""
    inputs, key = _keyed(inputs)
    marker = out / "stages" / f"{name}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "inputs": inputs, "seconds": seconds, "result": result}
    marker.write_text(json.dumps(record, indent=1, default=str))
    return StageResult(key, result, seconds, cached=False)


def _keyed(inputs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`inputs` with the source fingerprint added, and their hash: the stage's key."""
    inputs = {**inputs, "source": source_fingerprint()}
    return inputs, hashlib.sha256(
        json.dumps(inputs, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


@functools.cache
def source_fingerprint() -> str:
    """Hash of every .py file of the ropo and ropo_builtin packages that are running.

    Part of every stage's key: a stage computed by other code is rerun, never reused. Even a
    change of floating-point rounding moves a training run (README), so stale results would
    silently be another build's numbers.
    """
    return fingerprint_of(SOURCE_PACKAGES)


def fingerprint_of(packages: tuple[ModuleType, ...]) -> str:
    """Hash of the names and bytes of every .py file under each of `packages`."""
    digest = hashlib.sha256()
    for package in packages:
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            name = f"{package.__name__}/{path.relative_to(root)}"
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def stage_seconds(out: Path) -> dict[str, float]:
    """How long each stage took when it last ran (a cached stage keeps its time)."""
    markers = sorted((out / "stages").rglob("*.json"))
    root = out / "stages"
    return {
        str(m.relative_to(root).with_suffix("")): json.loads(m.read_text())["seconds"]
        for m in markers
    }
