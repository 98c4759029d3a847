"""Command line: `ropo train [--config FILE.yaml] key=value ...`, `ropo builtin`, `ropo keys`.

`ropo train resume=<run dir>` continues a run from its last checkpoint with the config saved in
<run dir>/run.json. `ropo train` alone runs the built-in task; `ropo builtin key=value ...`
runs it with settings (tokenizer, SFT, pairs, DPO vs ROPO, report; e.g. noise=0.2 seed=1
out=runs/x sweep=true).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from safetensors import SafetensorError

from ropo import interrupt, run_dir
from ropo.config import RunConfig, describe_keys
from ropo.config_load import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ropo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train DPO/ROPO on preference pairs")
    train_parser.add_argument("--config", help="YAML file of key: value settings")
    train_parser.add_argument("overrides", nargs="*", metavar="key=value")
    builtin_parser = commands.add_parser(
        "builtin", help="the whole pipeline on the built-in sorting task (make train's default)"
    )
    builtin_parser.add_argument("settings", nargs="*", metavar="key=value")
    commands.add_parser("keys", help="list every config key with its default and meaning")
    args = parser.parse_args(argv)

    if args.command == "keys":
        print(describe_keys())
        return 0
    if args.command == "builtin":
        return _run_builtin(args.settings)
    if args.config is None and not args.overrides:  # nothing to train on: show the built-in task
        return _run_builtin([])
    return _run_train(args.config, args.overrides)


def _run_train(config_file: str | None, overrides: list[str]) -> int:
    """`ropo train`: exit 0 when done, 2 with one line on a user's error, 128 + N on signal N."""
    cfg = None
    try:
        with interrupt.handled():
            cfg = load_config(config_file, overrides, base=_resumed_config(overrides))
            from ropo.train import train  # heavy imports only once the config is valid

            train(cfg)
    except interrupt.Interrupted as stop:
        out = Path(cfg.run.resume or cfg.run.out) if cfg else None
        hint = run_dir.resume_hint(out) if out else "nothing was written yet"
        where = stop.where or "before training started"
        print(f"ropo: interrupted by {stop} {where}; {hint}", file=sys.stderr)
        return stop.exit_code
    except (ValueError, FileNotFoundError, MemoryError, FloatingPointError) as err:
        print(f"ropo: error: {err}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as err:  # the file system said no: read-only, full, ...
        print(f"ropo: error: {_describe_os_error(err, cfg)}", file=sys.stderr)
        return 2
    return 0


def _describe_os_error(err: OSError | SafetensorError, cfg: RunConfig | None) -> str:
    """One line for a failed read or write; a full disk also says how the run goes on."""
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        what, full = f"{where}{err.strerror or err}", err.errno == errno.ENOSPC
    else:  # safetensors reports the OS error inside its message: "... (os error 28)"
        what, full = f"writing a safetensors file: {err}", f"(os error {errno.ENOSPC})" in str(err)
    if full and cfg is not None:
        out = cfg.run.resume or cfg.run.out
        return f"{what}: free some space, then `ropo train resume={out}` continues"
    return what


def _resumed_config(overrides: list[str]) -> dict | None:
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), "")
    if not resume:
        return None
    return run_dir.read_run_info(Path(resume))["config"]


def _run_builtin(settings: list[str]) -> int:
    try:
        with interrupt.handled():  # the pipeline reports an interrupted stage itself
            from ropo.task.pipeline import main as builtin_main  # matplotlib etc. only when needed

            return builtin_main(settings)
    except interrupt.Interrupted as stop:  # still loading: nothing was written yet
        print(f"ropo builtin: interrupted by {stop} while starting", file=sys.stderr)
        return stop.exit_code
