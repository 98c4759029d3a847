"""Command line: `ropo train [--config FILE.yaml] key=value ...`, `ropo builtin`, `ropo keys`,
`ropo sft model=DIR data=FILE out=DIR ...` (supervised fine-tuning; see `ropo sft --help`),
`ropo generate model=DIR prompts=FILE out=FILE ...` (see `ropo generate --help`),
`ropo eval model=DIR data=FILE ...` (see `ropo eval --help`),
`ropo convert-gguf FILE OUT_DIR` (a llama.cpp GGUF file -> a Hugging Face model directory).

`ropo train resume=<run dir>` (`ropo sft resume=<run dir>`) continues a run from its last
checkpoint with the config saved in <run dir>/run.json; `ropo train` alone says what to pass.
`ropo builtin key=value ...` runs the built-in task (tokenizer, SFT, pairs, DPO vs ROPO,
report; e.g. noise=0.2 seed=1 out=runs/x sweep=true), the package ropo_builtin.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from ropo import interrupt, run_dir
from ropo.allocator import keep_freed_memory
from ropo.config import RunConfig
from ropo.config_fields import SectionedConfig, describe_keys
from ropo.config_load import load_config
from ropo.eval_config import describe_eval_settings
from ropo.generate_config import describe_generate_settings
from ropo.sft_config import SftConfig, describe_sft_settings

# What `ropo train` needs: its --help, and what a bare `ropo train` prints.
TRAIN_USAGE = """\
ropo train needs a model and preference pairs, as key=value words or in a YAML file:
  ropo train model=DIR data=pairs.jsonl out=runs/x [key=value ...]
  ropo train --config configs/llama2-7b.yaml noise=0.4
  ropo train resume=runs/x    (continues a run from its last checkpoint)
`ropo keys` lists every key. The built-in demonstration (a tiny model trained from scratch on
a sorting task, about 10 minutes on a CPU) is `ropo builtin` or `make train`."""


def run() -> int:
    """The `ropo` program (console script, `python -m ropo`): main() in a process whose malloc
    keeps freed memory for reuse (allocator.py; ROPO_KEEP_FREED_MEMORY=0 turns that off)."""
    keep_freed_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser, train_parser = _command_line()
    args = parser.parse_args(argv)
    if args.command == "keys":
        print(describe_keys(RunConfig))
        return 0
    if args.command == "builtin":
        return _run_builtin(args.settings)
    if args.command == "generate":
        return _run_tool("generate", lambda: _generate(args.settings))
    if args.command == "eval":
        return _run_tool("eval", lambda: _eval(args.settings))
    if args.command == "convert-gguf":
        return _run_tool("convert-gguf", lambda: _convert_gguf(args.gguf_file, args.out_dir))
    if args.command == "sft":
        return _run_training(SftConfig, args.config, args.overrides)
    if args.config is None and not args.overrides:  # nothing to train on: say what to pass
        print(f"{train_parser.format_usage()}\n{TRAIN_USAGE}", file=sys.stderr)
        return 2
    return _run_training(RunConfig, args.config, args.overrides)


def _command_line() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser of every subcommand, and that of `ropo train` (whose usage a bare `ropo train`
    prints)."""
    parser = argparse.ArgumentParser(
        prog="ropo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="train DPO/ROPO on preference pairs",
        description=TRAIN_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("--config", help="YAML file of key: value settings")
    train_parser.add_argument("overrides", nargs="*", metavar="key=value")
    builtin_parser = commands.add_parser(
        "builtin",
        help="the whole pipeline on the built-in sorting task (make train's default)",
        add_help=False,  # no options of its own: every word, --help too, goes to ropo_builtin,
        prefix_chars="+",  # which lists its keys
    )
    builtin_parser.add_argument("settings", nargs="*", metavar="key=value")
    commands.add_parser("keys", help="list every config key with its default and meaning")
    sft_parser = commands.add_parser(
        "sft",
        help="supervised fine-tuning on demonstrations (or the chosen responses of pairs)",
        description="ropo sft [--config FILE.yaml] model=DIR data=FILE out=DIR [key=value ...]",
        epilog=describe_sft_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sft_parser.add_argument("--config", help="YAML file of key: value settings")
    sft_parser.add_argument("overrides", nargs="*", metavar="key=value")
    _add_settings_parser(
        commands,
        "generate",
        "responses of a model to a prompts file (JSONL, AlpacaEval or MT-Bench layout)",
        "ropo generate model=DIR prompts=FILE out=FILE [key=value ...]",
        describe_generate_settings(),
    )
    _add_settings_parser(
        commands,
        "eval",
        "preference accuracy, margins and DPO loss of a policy on a file of pairs",
        "ropo eval model=DIR data=FILE [reference=DIR] [key=value ...]",
        describe_eval_settings(),
    )
    convert_parser = commands.add_parser(
        "convert-gguf",
        help="a llama.cpp GGUF file (llama architecture) -> a Hugging Face model directory",
        description="ropo convert-gguf FILE OUT_DIR: float32 weights (quantised tensors are "
        "dequantised, so a Q4 file stays as lossy as it is), config.json and tokenizer files",
    )
    convert_parser.add_argument("gguf_file", metavar="FILE")
    convert_parser.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory")
    return parser, train_parser


def _run_training(
    config: type[SectionedConfig], config_file: str | None, overrides: list[str]
) -> int:
    """`ropo train` (config RunConfig) or `ropo sft` (SftConfig): exit 0 when done, 2 with one
    line on a user's error, 128 + N on signal N."""
    cfg = None
    try:
        with interrupt.handled():
            base = _resumed_config(overrides)
            cfg = load_config(config_file, overrides, base=base, config=config)
            _training_function(config)(cfg)
    except interrupt.Interrupted as stop:
        out = Path(cfg.run.resume or cfg.run.out) if cfg else None
        hint = run_dir.resume_hint(out, config.command) if out else "nothing was written yet"
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


def _training_function(config: type[SectionedConfig]) -> Callable[[SectionedConfig], Path]:
    """train() or sft(), imported only now: torch and the rest once the config is valid."""
    if config is SftConfig:
        from ropo.sft import sft

        return sft
    from ropo.train import train

    return train


def _describe_os_error(err: OSError | SafetensorError, cfg: SectionedConfig | None) -> str:
    """One line for a failed read or write; a full disk also says how the run goes on."""
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        what, full = f"{where}{err.strerror or err}", err.errno == errno.ENOSPC
    else:  # safetensors reports the OS error inside its message: "... (os error 28)"
        what, full = f"writing a safetensors file: {err}", f"(os error {errno.ENOSPC})" in str(err)
    if full and cfg is not None:
        out = cfg.run.resume or cfg.run.out
        return f"{what}: free some space, then `{cfg.command} resume={out}` continues"
    return what


def _resumed_config(overrides: list[str]) -> dict | None:
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), "")
    if not resume:
        return None
    return run_dir.read_run_info(Path(resume))["config"]


def _add_settings_parser(
    commands: argparse._SubParsersAction, name: str, help: str, usage: str, keys: str
) -> None:
    """A subcommand that takes key=value settings, with its keys listed under --help."""
    subparser = commands.add_parser(
        name,
        help=help,
        description=usage,
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparser.add_argument("settings", nargs="*", metavar="key=value")


def _run_tool(name: str, work: Callable[[], None]) -> int:
    """`ropo eval` / `generate` / `convert-gguf`: exit 0 when `work` is done, 2 with one line on
    a user's error, 128 + N on signal N."""
    try:
        with interrupt.handled():
            work()
    except interrupt.Interrupted as stop:
        print(f"ropo {name}: interrupted by {stop}; nothing was written", file=sys.stderr)
        return stop.exit_code
    except (ValueError, FileNotFoundError, MemoryError) as err:
        print(f"ropo: error: {err}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as err:
        print(f"ropo: error: {_describe_os_error(err, None)}", file=sys.stderr)
        return 2
    return 0


def _generate(settings: list[str]) -> None:
    from ropo.config_load import load_settings
    from ropo.generate_config import GenerateSettings

    cfg = load_settings(GenerateSettings, settings, "ropo generate")
    from ropo.generate import run_generate  # heavy imports only once the keys are valid

    run_generate(cfg)


def _eval(settings: list[str]) -> None:
    from ropo.eval_config import load_eval_settings

    eval_settings = load_eval_settings(settings)
    from ropo.eval_run import run_eval  # torch only once the settings are valid

    run_eval(eval_settings)


def _convert_gguf(gguf_file: str, out_dir: str) -> None:
    from ropo.models.gguf import convert_gguf  # torch only when asked

    convert_gguf(gguf_file, out_dir)
    print(f"wrote {out_dir}")


def _run_builtin(settings: list[str]) -> int:
    try:
        with interrupt.handled():  # the pipeline reports an interrupted stage itself
            # Only here: the demo sits beside the library, which never imports it (nor matplotlib).
            from ropo_builtin.pipeline import main as builtin_main

            return builtin_main(settings)
    except interrupt.Interrupted as stop:  # still loading: nothing was written yet
        print(f"ropo builtin: interrupted by {stop} while starting", file=sys.stderr)
        return stop.exit_code
