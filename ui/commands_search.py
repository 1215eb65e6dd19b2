"""Query commands: search, similar, describe, classify, tag, texts, and `ocr` (reads the text that `search
'text:"..."'` finds). Each calls one SearchService method (`ocr`: one pass of search/ocr_search.py).

`tag --export` and `tag --remove` need no model: they work on the catalog alone, so they never import torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from .commands_common import (
    MAX_K,
    add_filters,
    add_ranking,
    config_from,
    filters_from,
    labels_from,
    non_negative,
    open_library,
    out,
    page_size,
    probability,
    require_indexed,
    service_for,
    templates_from,
)
from .registry import command

LABELS_HELP = "a FILE (one label per line) or L1,L2,... (label=0.7 sets a per-label threshold)"


def _ref(value: str) -> int | str:
    """A photo id (all digits, not an existing file) or an image path."""
    from clipsearch.search.refs import image_ref  # light: a server may answer, with no model stack here

    return image_ref(value)  # type: ignore[return-value]


def _hit_line(h: Any) -> str:
    """A hit as one line, plus its stack (search --stack) when it folds copies."""
    line = f"{h.rank:4d}. {h.score:7.4f}  {(h.relevance or '-'):8s} #{h.id:<6d} {h.path}"
    stack = getattr(h, "stack", None)
    if stack is not None and stack.count > 1:
        line += f"  [stack of {stack.count}: " + " ".join(f"#{i}" for i in stack.ids) + "]"
    return line


def _ocr_snippet(match: Any, width: int = 100) -> str:
    """The lines of a photo's text that hold matched words, joined by " / ", matched words in [brackets]."""
    text, spans = match.text, [tuple(s) for s in match.spans]
    shown, start = [], 0
    for line in text.split("\n"):
        end = start + len(line)
        inside = [(a - start, b - start) for a, b in spans if start <= a and b <= end]
        if inside:
            marked, pos = [], 0
            for a, b in inside:
                marked += [line[pos:a], f"[{line[a:b]}]"]
                pos = b
            shown.append("".join(marked) + line[pos:])
        start = end + 1
    out = " / ".join(shown) or text.replace("\n", " / ")
    return out if len(out) <= width else out[: width - 1] + "…"


def _print_page(args: argparse.Namespace, page: Any) -> None:
    lines = []
    if page.counts:
        more = "" if page.counts_exact else "at least "
        lines.append(f"{more}{page.counts.get('strong', 0)} strong · {page.counts.get('possible', 0)} possible")
    if page.note:
        lines.append(f"note: {page.note}")
    for h in page.hits:
        lines.append(_hit_line(h))
        match = getattr(h, "ocr", None)
        if match is not None:
            lines.append(f"{'':16s}text: {_ocr_snippet(match)}")
    if not page.hits:
        lines.append("no matches")
    if page.has_more:
        lines.append(f"(more: --offset {page.offset + page.limit})")
    out(args, page.as_list(), "\n".join(lines))


def _box(value: str) -> tuple[int, int, int, int]:
    """--box x,y,w,h: four whole numbers (whether the box fits the photo is checked once it is decoded)."""
    from clipsearch.indexer.errors import UsageError
    from clipsearch.search.region import parse_box

    try:
        return parse_box(value)
    except UsageError:
        raise argparse.ArgumentTypeError(f"wants four whole numbers x,y,w,h (pixels), got '{value}'") from None


def _stack_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", action="store_true",
                   help="fold near-duplicates into one hit with a count (groups from clipsearch duplicates; a small "
                        "library is grouped on first use)")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="text, a combined query ('\"2:dog\" + ./beach.jpg - \"snow\"', #42 is photo 42), "
                                 "or words in the photos: 'text:\"invoice 2024\"' (after index --ocr)")
    _stack_arg(p)
    add_ranking(p)


@command("search", "text→image search (combined queries: '\"2:dog\" + ./beach.jpg - \"snow\"')", arguments=_search_args,
         examples=('clipsearch search "dog on a beach at sunset" --stack',
                   'clipsearch search \'text:"invoice 2024"\' --after 2023-01-01 -k 50',
                   "clipsearch search '\"red car\" - \"night\"' --strong --json"))
def cmd_search(args: argparse.Namespace) -> int:
    """Text (or combined, or text-in-photo) query → photos."""
    extra = {"stack": True} if args.stack else {}  # only when asked: a server that lacks it is then skipped
    page = service_for(args).search(args.query, args.k, args.offset, filters_from(args), args.strong, args.sort,
                                    **extra)
    _print_page(args, page)
    return 0


def _similar_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file, or the id of an indexed photo")
    p.add_argument("--box", type=_box, metavar="X,Y,W,H",
                   help="search with this region only: pixels of the upright photo (x, y of the top-left corner)")
    _stack_arg(p)
    add_ranking(p)


@command("similar", "photos similar to an image file or an indexed photo id (or a region of it)",
         arguments=_similar_args,
         examples=("clipsearch similar ~/Downloads/beach.jpg", "clipsearch similar 42 -k 10 --sort date",
                   "clipsearch similar 42 --box 120,80,200,150 --stack"))
def cmd_similar(args: argparse.Namespace) -> int:
    """Image file or photo id (or a box of it) → similar photos."""
    extra: dict[str, Any] = {"box": args.box} if args.box is not None else {}
    if args.stack:
        extra["stack"] = True
    page = service_for(args).similar(_ref(args.image), args.k, args.offset, filters_from(args), args.strong,
                                     args.sort, **extra)
    _print_page(args, page)
    return 0


def _describe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file, or the id of an indexed photo")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help=LABELS_HELP)
    g.add_argument("--vocab", help="a built-in vocabulary: imagenet")
    g.add_argument("--texts", help="a caption collection added with `clipsearch texts add`")
    p.add_argument("--templates", help="prompt templates: a FILE (one per line) or text with {} "
                                       "(default: the model's own, else CLIP's ImageNet ensemble)")
    p.add_argument("-k", type=page_size, metavar="N", default=10, help=f"how many to list, 1 to {MAX_K}")


@command("describe", "image→text: rank your labels, a vocabulary or a caption collection for one photo",
         arguments=_describe_args,
         hint="say what to rank: --labels dog,cat (or a FILE), --vocab imagenet, or --texts NAME",
         examples=("clipsearch describe photo.jpg --labels 'dog,cat,car'", "clipsearch describe 42 --vocab imagenet",
                   "clipsearch describe photo.jpg --texts captions -k 3"))
def cmd_describe(args: argparse.Namespace) -> int:
    """Image → ranked labels, vocabulary entries or captions."""
    ranked = service_for(args, need_photos=False).describe(
        _ref(args.image), labels=labels_from(args.labels), vocab=args.vocab, texts=args.texts, k=args.k,
        templates=templates_from(args.templates))
    out(args, [r.as_dict() for r in ranked], "\n".join(f"{r.score:7.4f}  {r.label}" for r in ranked))
    return 0


def _classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or ids of indexed photos")
    p.add_argument("--labels", required=True, help=LABELS_HELP)
    p.add_argument("--templates", help="prompt templates: a FILE (one per line) or text with {} "
                                       "(default: the model's own, else CLIP's ImageNet ensemble)")
    p.add_argument("--multi-label", action="store_true", help="each label on its own (a photo may get several)")
    p.add_argument("--threshold", type=probability, metavar="P",
                   help="minimum probability, 0 to 1, for a label to be chosen (default: 0.5 with --multi-label, "
                        "else 0: the top label)")
    p.add_argument("-k", type=page_size, metavar="N", default=5, help=f"labels listed per image, 1 to {MAX_K}")


@command("classify", "zero-shot classify images into your labels", arguments=_classify_args,
         hint="give the labels: --labels dog,cat (or a FILE with one label per line)",
         examples=("clipsearch classify a.jpg b.jpg --labels 'cat,dog,bird'",
                   "clipsearch classify 42 43 --labels labels.txt --multi-label --threshold 0.6 --json"))
def cmd_classify(args: argparse.Namespace) -> int:
    """Zero-shot classification of image files or ids."""
    results = service_for(args, need_photos=False).classify(
        [_ref(i) for i in args.images], labels_from(args.labels), templates_from(args.templates), args.multi_label,
        args.threshold, args.k)
    text = []
    for r in results:
        text.append(f"{r.source}: {', '.join(r.chosen) or '(none passes the threshold)'}")
        text += [f"  {x.score:6.3f}  {x.label}" for x in r.labels]
    out(args, [r.as_dict() for r in results], "\n".join(text))
    return 0


def _tag_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help=LABELS_HELP)
    g.add_argument("--remove", metavar="SET", help="delete every tag of a label set (undo; no model needed)")
    g.add_argument("--export", metavar="FILE", help="export tags to FILE.csv or FILE.json (no model needed)")
    p.add_argument("--name", help="label set to write, or to export (default: 'zeroshot'; export: every set)")
    p.add_argument("--threshold", type=probability, metavar="P", help="minimum probability, 0 to 1 (default: 0.5)")
    p.add_argument("--multi-label", action="store_true", help="each label on its own (a photo may get several)")
    p.add_argument("--templates", help="prompt templates: a FILE (one per line) or text with {} "
                                       "(default: the model's own, else CLIP's ImageNet ensemble)")
    p.add_argument("--dry-run", action="store_true", help="preview counts and examples, write nothing")
    p.add_argument("--strong", action="store_true",
                   help="tag only confident photos (the search cutoff's strong matches for each label)")
    add_filters(p)


@command("tag", "batch zero-shot tagging of the library (undo with --remove, save with --export)",
         arguments=_tag_args,
         hint="say what to do: --labels dog,cat (tag), --remove SET (undo) or --export FILE.csv|FILE.json",
         examples=("clipsearch tag --labels 'beach,snow,city' --name places --dry-run",
                   "clipsearch tag --labels labels.txt --multi-label --threshold 0.6",
                   "clipsearch tag --remove places   # or: clipsearch tag --export tags.csv"))
def cmd_tag(args: argparse.Namespace) -> int:
    """Batch tagging, undo, or export (the last two without a model)."""
    if args.remove or args.export:
        return _tag_without_model(args)
    p = service_for(args).tag(labels_from(args.labels), args.name, args.threshold, args.multi_label,
                              filters_from(args), args.dry_run, templates_from(args.templates),
                              strong_only=args.strong)
    head = "would tag" if p.dry_run else f"tagged ({p.written} tags written to set '{p.label_set}')"
    lines = [f"{head}: {p.photos_considered} photos considered"]
    for label, n in sorted(p.counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:6d}  {label}  e.g. {', '.join(p.examples.get(label, [])[:3])}")
    out(args, p.as_dict(), "\n".join(lines))
    return 0


def _tag_without_model(args: argparse.Namespace) -> int:
    """`tag --remove SET` / `tag --export FILE`: catalog work only (no encoder, so no torch)."""
    from clipsearch.search.tagging import export_tags, remove_tags

    parts = open_library(config_from(args))
    try:
        if args.remove:
            n = remove_tags(parts.catalog, args.remove)
            out(args, {"removed": n, "label_set": args.remove}, f"removed {n} tags of set '{args.remove}'")
        else:
            n = export_tags(parts.catalog, args.export, args.name)
            out(args, {"exported": n, "file": args.export}, f"exported {n} tags to {args.export}")
    finally:
        parts.catalog.dispose()
    return 0


def _texts_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="texts_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="embed a text file (one caption per line) once, as a named collection")
    add.add_argument("file", help="UTF-8 text file, one caption per line")
    add.add_argument("--name", required=True, help="the collection's name (for describe --texts NAME)")


@command("texts", "caption collections for image→text (describe --texts NAME)", arguments=_texts_args,
         hint="say what to do: clipsearch texts add FILE --name NAME",
         examples=("clipsearch texts add captions.txt --name captions",
                   "clipsearch describe photo.jpg --texts captions"))
def cmd_texts(args: argparse.Namespace) -> int:
    """Embed a caption collection once."""
    n = service_for(args, need_photos=False).add_texts(args.file, args.name)
    out(args, {"collection": args.name, "texts": n}, f"added {n} texts as collection '{args.name}'")
    return 0


def _ocr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-failed", action="store_true", help="read again the photos whose OCR failed or timed out")
    p.add_argument("--workers", type=non_negative, default=None, metavar="N",
                   help="OCR processes; 0 reads in this process (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("ocr", "read the text in indexed photos (signs, receipts, screenshots) for search 'text:\"...\"'",
         arguments=_ocr_args, graceful_stop=True,
         examples=("clipsearch ocr", "clipsearch ocr --retry-failed --json"))
def cmd_ocr(args: argparse.Namespace) -> int:
    """Read the photos that have no text yet for their content (a writer: it holds the library's writer lock)."""
    from clipsearch.indexer.ingest.cores import usable_cores
    from clipsearch.indexer.ingest.ocr import require_engine
    from clipsearch.indexer.lock import hold_writer_lock
    from clipsearch.indexer.stop import stop_requested
    from clipsearch.search.ocr_search import ocr_library

    require_engine()  # before any work: a missing extra is one line naming it
    config = config_from(args)
    require_indexed(config)
    parts = open_library(config)
    workers = usable_cores() if args.workers is None else args.workers
    bar = None if args.no_progress or args.json else _bar()
    try:
        with hold_writer_lock(config.home, config.db_url):
            report = ocr_library(parts.catalog, args.retry_failed, workers, should_stop=stop_requested,
                                 on_progress=bar and (lambda done, total: _advance(bar, done, total)))
    finally:
        if bar is not None:
            bar.close()
        parts.catalog.dispose()
    lines = [report.summary()]
    if report.interrupted:
        lines.append("stopped on request after a stored part; re-run to read the rest")
    out(args, report.as_dict(), "\n".join(lines))
    return 130 if report.interrupted else 0


def _bar() -> Any:
    from tqdm import tqdm

    return tqdm(unit="img", desc="reading text", dynamic_ncols=True, smoothing=0.1)


def _advance(bar: Any, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)
