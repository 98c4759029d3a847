"""Command line: `ropo train [--config FILE.yaml] key=value ...`, `ropo builtin`, `ropo keys`.

`ropo train resume=<run dir>` continues a run from its last checkpoint with the config saved in
<run dir>/run.json. `ropo train` alone runs the built-in task; `ropo builtin key=value ...`
runs it with settings (tokenizer, SFT, pairs, DPO vs ROPO, report; e.g. noise=0.2 seed=1
out=runs/x sweep=true).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ropo.config import describe_keys
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
    try:
        cfg = load_config(args.config, args.overrides, base=_resumed_config(args.overrides))
        from ropo.train import train  # heavy imports only once the config is valid

        train(cfg)
    except (ValueError, FileNotFoundError, MemoryError, FloatingPointError) as err:
        print(f"ropo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _resumed_config(overrides: list[str]) -> dict | None:
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), "")
    if not resume:
        return None
    info = Path(resume) / "run.json"
    if not info.is_file():
        raise FileNotFoundError(f"resume={resume}: {info} not found; is this a ropo run directory?")
    return json.loads(info.read_text())["config"]


def _run_builtin(settings: list[str]) -> int:
    from ropo.task.pipeline import main as builtin_main  # matplotlib etc. only when needed

    return builtin_main(settings)
