"""`clipsearch` command line: the parser built from the command registry, logging, signals, and typed errors turned
into exit codes.

Exit codes: 0 success (per-file failures are reported, not fatal), 2 usage, 3 fatal, 4 library busy, 130 stopped.
Global options work before and after the command (`clipsearch --home H status` = `clipsearch status --home H`):
the main parser defines them with their defaults, each command's parser again with `argparse.SUPPRESS`, so a value
given after the command wins and an absent one leaves the main parser's. Heavy imports (torch, FAISS, SQLAlchemy)
happen inside the commands, so `--help` and `--version` are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from clipsearch.indexer.config import DEFAULT_MODEL

from .registry import Command, commands

MODEL_DEFAULT = f"the model the library was indexed with, else {DEFAULT_MODEL}"


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (plus one hint line for a missing argument), not the usage
    block: a bad value says what is wrong with it and nothing else."""

    def __init__(self, *args: Any, hint: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.hint = hint

    def error(self, message: str) -> NoReturn:
        text = f"{self.prog}: error: {message}\n"
        if not message.startswith("argument "):  # a missing or unknown argument, not a bad value
            text += f"{self.prog}: hint: {self.hint or f'see {self.prog} --help'}\n"
        self.exit(2, text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's true default, except where the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == argparse.SUPPRESS or default == []
        if hidden or "default" in text or not text:
            return text
        return f"{text} (default: %(default)s)"


_NOISY = ("huggingface_hub", "httpx", "urllib3", "faiss")  # loggers that narrate (faiss: which CPU build loaded)


class _QuietThirdParty(logging.Filter):
    """open_clip, huggingface_hub and faiss log through the root logger; we report their failures ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = "open_clip" in record.pathname or record.name.startswith(_NOISY)
        return not noisy or record.levelno >= logging.CRITICAL


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_QuietThirdParty())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def add_global_options(p: argparse.ArgumentParser, suppress: bool, model_default: str | None = None) -> None:
    """--home, --db, --model, --device, --backend, --json, -v: with their defaults on the main parser, with
    SUPPRESS on a command's parser (so that, given after the command, they override; absent, they do not)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--home", type=Path, default=default(None), metavar="DIR",
                   help="app data dir: catalog, indexes, caches (default: $CLIPSEARCH_HOME, else the per-user data "
                        "dir)")
    g.add_argument("--db", default=default(None), metavar="URL",
                   help="SQLAlchemy catalog URL, e.g. postgresql+psycopg://user@host/db (default: $CLIPSEARCH_DB, "
                        "else SQLite in the home dir)")
    g.add_argument("--model", default=default(None), metavar="SPEC",
                   help="ARCH:WEIGHTS, a model folder, or 'demo' (default: $CLIPSEARCH_MODEL, else "
                        f"{model_default or MODEL_DEFAULT})")
    g.add_argument("--device", default=default(None), help="cuda, mps or cpu (default: $CLIPSEARCH_DEVICE, else the "
                                                           "best available)")
    g.add_argument("--backend", choices=["auto", "onnx", "torch"], default=default(None),
                   help="encoder backend (default: $CLIPSEARCH_BACKEND, else auto: torch on CUDA, ONNX Runtime on CPU)")
    g.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")
    g.add_argument("-v", "--verbose", action="store_true", default=default(False), help="log progress details")


def _epilog(cmd: Command) -> str | None:
    return "examples:\n" + "\n".join(f"  {e}" for e in cmd.examples) if cmd.examples else None


def _add_command(sub: Any, cmd: Command) -> None:
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=_epilog(cmd), hint=cmd.hint)
    if cmd.arguments:
        cmd.arguments(p)
    p.set_defaults(_command=cmd)
    _add_globals_below(p, cmd.model_default)


def _add_globals_below(p: argparse.ArgumentParser, model_default: str | None) -> None:
    """Global options on a command's parser and on any nested one (`clipsearch texts add ... --home H`)."""
    add_global_options(p, suppress=True, model_default=model_default)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in dict.fromkeys(action.choices.values()):
                _add_globals_below(nested, model_default)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options, then one sub-parser per registered command, in registry order."""
    from clipsearch import __version__

    parser = CliParser(prog="clipsearch", description="Search your photo library by meaning.",
                       epilog="examples:\n  clipsearch demo\n  clipsearch index ~/Pictures\n"
                              '  clipsearch search "dog on a beach at sunset"\n\n'
                              "`clipsearch COMMAND --help` shows a command's options, defaults and examples.")
    parser.add_argument("--version", action="version", version=f"clipsearch {__version__}")
    add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in commands().values():
        _add_command(sub, cmd)
    return parser


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Tab completion when argcomplete is installed and the shell is asking (`register-python-argcomplete
    clipsearch`); otherwise nothing is imported."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _error_line(e: BaseException) -> str | None:
    """One line for an environment failure outside our typed errors (a read-only home, a full disk, a catalog the
    database refuses): no SQL text and no "internal error". None for anything else (a bug)."""
    if isinstance(e, OSError):
        return f"cannot use {e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    if type(e).__module__.startswith("sqlalchemy"):
        orig = getattr(e, "orig", None)
        text = str(orig if orig is not None else e).strip().splitlines()
        return f"the catalog refused the operation: {text[0] if text else type(e).__name__}"
    return None


def run_command(cmd: Command, args: argparse.Namespace) -> int:
    """Run a parsed command; typed errors become one line on stderr and their exit code."""
    from clipsearch.indexer.errors import ClipsearchError

    if cmd.graceful_stop:
        from clipsearch.indexer.stop import install_signal_handlers

        install_signal_handlers()
    try:
        return int(cmd.run(args) or 0)
    except ClipsearchError as e:
        print(f"clipsearch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("clipsearch: interrupted (work committed so far is kept; re-run to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `clipsearch search ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        from clipsearch.indexer.config import load_config

        if load_config().debug:  # CLIPSEARCH_DEBUG=1: the traceback, for a bug report
            raise
        line = _error_line(e)
        if line is not None:
            print(f"clipsearch: error: {line}", file=sys.stderr)
        else:  # a bug: one readable line, the traceback only on request
            print(f"clipsearch: internal error: {type(e).__name__}: {e} (set CLIPSEARCH_DEBUG=1 for details)",
                  file=sys.stderr)
        return 3


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clipsearch` console script; returns the exit code (argparse's exits included)."""
    parser = build_parser()
    _autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    _setup_logging(args.verbose)
    sys.stdout.reconfigure(errors="replace")  # type: ignore[attr-defined]  # odd file names never crash output
    return run_command(args._command, args)


if __name__ == "__main__":
    sys.exit(main())
