"""`<out>/run.json`: what a run was made from, so that every output it writes can be traced back.

The resolved config, the run id and input fingerprints (run_dir.py), package versions, the git
revision, and the token fingerprint and counts of the data; a resume reads it back and adds its
own command. Written by run_setup.py (`ropo train`) and sft.py (`ropo sft`) before their loops;
bookkeeping beside the audit, not part of the method.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ropo.models.files import write_atomic
from ropo.run_dir import RunIdentity


def write_run_info(
    out: Path,
    identity: RunIdentity,
    resolved_config: dict[str, Any],
    data_fingerprint: str,
    data_report: str,
    eval_ids: Sequence[str] = (),
) -> None:
    """Write `<out>/run.json`: run id, input fingerprints (run_dir.py), config, versions, git
    revision, token fingerprint and counts of the data, and the ids that eval_split held out of
    the data (`eval_ids`). A resume keeps the command that started the run and adds its own to
    `resumes`."""
    versions = {}
    for package in ("ropo", "torch", "sentencepiece", "safetensors", "numpy", "pyyaml", "tqdm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    started = identity.resumed_info or {}
    info = {
        "run_id": identity.run_id,
        "inputs": identity.inputs,
        "config": resolved_config,
        "versions": {"python": sys.version.split()[0], "platform": platform.platform(), **versions},
        "git_revision": _git_revision(),
        "data_fingerprint": data_fingerprint,
        "data_report": data_report,
        "eval_ids": list(eval_ids),
        "command": started.get("command", sys.argv),
        "resumes": started.get("resumes", []) + ([sys.argv] if started else []),
    }
    write_atomic(out / "run.json", json.dumps(info, indent=1))  # a resume reads it


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None
