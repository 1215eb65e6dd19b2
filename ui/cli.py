"""`clipsearch` command line: argument parsing, logging, and turning typed errors into exit codes.

Exit codes: 0 success (per-file failures are reported, not fatal), 2 usage, 3 fatal. Heavy imports (torch,
faiss) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DATE_HELP = "YYYY-MM-DD or ISO date-time"


class _QuietThirdParty(logging.Filter):
    """open_clip and huggingface_hub log through the root logger; we report their failures ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = "open_clip" in record.pathname or record.name.startswith(("huggingface_hub", "httpx", "urllib3"))
        return not noisy or record.levelno >= logging.CRITICAL


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_QuietThirdParty())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, help="app data dir (default $CLIPSEARCH_HOME or the per-user data dir)")
    p.add_argument("--db", help="SQLAlchemy catalog URL (default: SQLite in the home dir)")
    p.add_argument("--model", help="model spec ARCH:WEIGHTS, a model folder, or 'demo' (default: the model the "
                                   "library was indexed with, else ViT-B-32:laion2b_s34b_b79k)")
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", help="only photos under this folder")
    p.add_argument("--after", help=f"only photos dated on/after ({DATE_HELP})")
    p.add_argument("--before", help=f"only photos dated before ({DATE_HELP})")
    p.add_argument("--tag", action="append", default=[], help="only photos with this tag (repeatable)")
    p.add_argument("--format", action="append", default=[], dest="formats", help="only this file type, e.g. JPEG")


def _ranking(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", type=int, default=20, help="hits per page (default 20)")
    p.add_argument("--offset", type=int, default=0, help="skip this many hits (pagination)")
    p.add_argument("--strong", action="store_true", help="only strong matches (calibrated cutoff)")
    p.add_argument("--sort", choices=["relevance", "date"], default="relevance")
    _filters(p)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (also used by the README's command reference)."""
    parser = argparse.ArgumentParser(prog="clipsearch", description="Search your photo library by meaning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="index photo folders (incremental)")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="decode worker processes (default: all cores; cores - 1 with a GPU)")
    p.add_argument("--force", action="store_true", help="remove vanished files even if most of the library vanished")
    p.add_argument("--follow-symlinks", action="store_true")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="decompression-bomb limit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-file", type=Path, help="keep {done,total} JSON here (the UI polls it)")

    sub.add_parser("status", help="counts, failures, embedding spaces, paths")
    sub.add_parser("reindex", help="rebuild vector indexes from the catalog")

    p = sub.add_parser("search", help="text→image search (combined queries: '\"2:dog\" + ./beach.jpg - \"snow\"')")
    p.add_argument("query")
    _ranking(p)
    p = sub.add_parser("similar", help="photos similar to an image file or an indexed photo id")
    p.add_argument("image", help="image path or photo id")
    _ranking(p)

    p = sub.add_parser("describe", help="image→text: rank labels, a vocabulary or a caption collection")
    p.add_argument("image", help="image path or photo id")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help="FILE or L1,L2,...")
    g.add_argument("--vocab", help="built-in vocabulary (imagenet)")
    g.add_argument("--texts", help="name of a collection added with `clipsearch texts add`")
    p.add_argument("-k", type=int, default=10)

    p = sub.add_parser("classify", help="zero-shot classify images")
    p.add_argument("images", nargs="+", help="image paths or photo ids")
    p.add_argument("--labels", required=True, help="FILE or L1,L2,... (label=0.7 sets a per-label threshold)")
    p.add_argument("--templates", help="file of prompt templates with {} (default: CLIP's ImageNet ensemble)")
    p.add_argument("--multi-label", action="store_true")
    p.add_argument("--threshold", type=float)
    p.add_argument("-k", type=int, default=5)

    p = sub.add_parser("tag", help="batch zero-shot tagging of the library")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help="FILE or L1,L2,...")
    g.add_argument("--remove", metavar="SET", help="delete every tag of a label set (undo)")
    g.add_argument("--export", metavar="FILE", help="export tags to FILE.csv or FILE.json")
    p.add_argument("--name", help="label set name (default 'zeroshot')")
    p.add_argument("--threshold", type=float, help="minimum probability (default 0.5)")
    p.add_argument("--multi-label", action="store_true")
    p.add_argument("--templates")
    p.add_argument("--dry-run", action="store_true", help="preview counts and examples, write nothing")
    _filters(p)

    p = sub.add_parser("texts", help="caption collections for image→text")
    tsub = p.add_subparsers(dest="texts_command", required=True)
    ta = tsub.add_parser("add", help="embed a text file (one caption per line) once")
    ta.add_argument("file")
    ta.add_argument("--name", required=True)

    from .commands_model import add_model_commands

    add_model_commands(sub)
    _common(ta)
    for name, sp in sub.choices.items():
        if name != "texts":  # its `add` sub-command carries the common flags
            _common(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clipsearch` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from clipsearch.indexer.errors import ClipsearchError

    from . import commands

    try:
        return int(commands.dispatch(args) or 0)
    except ClipsearchError as e:
        print(f"clipsearch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("clipsearch: interrupted (work committed so far is kept; re-run to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one readable line, the traceback only on request
        if os.environ.get("CLIPSEARCH_DEBUG"):
            raise
        print(f"clipsearch: internal error: {type(e).__name__}: {e} (set CLIPSEARCH_DEBUG=1 for details)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
