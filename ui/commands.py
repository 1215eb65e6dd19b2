"""Bodies of the library commands (index, status, reindex, search, similar, describe, classify, tag, texts).

Each reads its arguments, calls one service method, and prints a table or `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from clipsearch.indexer.config import AppConfig, IndexOptions, load_config
from clipsearch.indexer.errors import UsageError


def config_from(args: argparse.Namespace) -> AppConfig:
    """AppConfig from the environment and the common flags (home, db, model, device)."""
    return load_config(home=getattr(args, "home", None), db=getattr(args, "db", None),
                       model=getattr(args, "model", None), device=getattr(args, "device", None))


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False) if args.json else text)


def _date(value: str | None, flag: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise UsageError(f"{flag} expects YYYY-MM-DD, got '{value}'") from e


def filters_from(args: argparse.Namespace):  # -> PhotoFilter
    """PhotoFilter from --folder/--after/--before/--tag/--format."""
    from clipsearch.indexer.storage.filters import PhotoFilter

    return PhotoFilter(folder=args.folder, after=_date(args.after, "--after"), before=_date(args.before, "--before"),
                       tags=tuple(args.tag), formats=tuple(args.formats))


def _ref(value: str) -> int | str:
    """A photo id (all digits, not an existing file) or an image path."""
    from clipsearch.search.service import image_ref

    return image_ref(value)  # type: ignore[return-value]


def cmd_index(args: argparse.Namespace) -> int:
    """Index folders and print the run summary."""
    from clipsearch.indexer.app import build_indexer

    opts = IndexOptions(batch_size=args.batch_size, force=args.force, max_pixels=args.max_pixels,
                        follow_symlinks=args.follow_symlinks, progress=not (args.no_progress or args.json))
    if args.workers is not None:
        opts = IndexOptions(**{**opts.__dict__, "workers": args.workers})
    indexer = build_indexer(config_from(args), opts)
    report = indexer.run(args.paths, on_progress=_progress_writer(args.progress_file))
    lines = [f"indexed {report.indexed}, unchanged {report.unchanged}, moved {report.moved}, "
             f"reused {report.reused}, removed {report.removed}, failed {sum(report.failed.values())} "
             f"in {report.seconds:.1f}s ({report.images_per_second:.1f} images/s)"]
    lines += [f"  {n:5d} x {reason}" for reason, n in report.failed.most_common()]
    lines += [f"  skipped {d}" for d in report.skipped_dirs]
    if report.missing_kept:
        lines.append(f"  {report.missing_kept} catalogued files are missing and were NOT removed (most of the "
                     "library vanished at once: unmounted disk?); re-run with --force to remove them")
    _out(args, report.as_dict(), "\n".join(lines))
    return 0


def _progress_writer(path: Any) -> Any:
    """A callback that atomically rewrites {done, total} to `path` (None: no callback)."""
    if path is None:
        return None
    import os

    def write(done: int, total: int) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"done": done, "total": total}, f)
        os.replace(tmp, path)

    write(0, 0)
    return write


def status_data(config: AppConfig) -> dict[str, Any]:
    """Everything `status` reports (shared with the UI's Library page)."""
    from clipsearch.indexer.app import open_parts

    parts = open_parts(config)
    counts = parts.catalog.counts_by_status()
    spaces = []
    for s in parts.catalog.spaces():
        m = parts.store.read_manifest(s) or {}
        spaces.append({"key": s.key, "label": s.label, "model": s.model_spec, "dim": s.dim, "vectors": s.count,
                       "index_type": m.get("index_type"), "index_vectors": m.get("count"),
                       "index_current": m.get("generation") == s.generation and m.get("count") == s.count})
    return {**counts, "total": sum(counts.values()), "failures": parts.catalog.failures(),
            "spaces": spaces, "home": str(config.home), "catalog": parts.catalog._safe_url(),
            "index_dir": str(config.index_dir)}


def cmd_status(args: argparse.Namespace) -> int:
    """Print counts by status, failures and spaces."""
    d = status_data(config_from(args))
    lines = [f"photos: {d['total']} (indexed {d['indexed']}, failed {d['failed']}, "
             f"unsupported {d['unsupported']}, empty {d['empty']})"]
    lines += [f"  {f['status']:11s} {f['path']}: {f['reason']}" for f in d["failures"][:50]]
    lines += [f"space {s['label']} [{s['key']}] dim {s['dim']}: {s['vectors']} vectors, index "
              f"{s['index_type'] or 'not built'}{'' if s['index_current'] else ' (stale: rebuilt on next use)'}"
              for s in d["spaces"]]
    lines += [f"catalog: {d['catalog']}", f"indexes: {d['index_dir']}"]
    _out(args, d, "\n".join(lines))
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Rebuild every space's vector index from the catalog."""
    from clipsearch.indexer.app import open_parts

    parts = open_parts(config_from(args))
    done = []
    for s in parts.catalog.spaces():
        parts.store.rebuild(s)
        done.append({"space": s.label, "vectors": parts.catalog.space(s.id).count})
    _out(args, done, "\n".join(f"rebuilt {d['space']}: {d['vectors']} vectors" for d in done) or "no spaces yet")
    return 0


def _service(args: argparse.Namespace):  # -> SearchService
    from clipsearch.search import build_service

    return build_service(config_from(args))


def _print_page(args: argparse.Namespace, page: Any) -> None:
    lines = [f"{h.score:7.4f}  z={h.z:5.1f}  #{h.id:<6d} {h.path}" for h in page.hits] or ["no matches"]
    if page.has_more:
        lines.append(f"(more: --offset {page.offset + page.limit})")
    _out(args, page.as_list(), "\n".join(lines))


def cmd_search(args: argparse.Namespace) -> int:
    """Text (or combined) query → photos."""
    page = _service(args).search(args.query, args.k, args.offset, filters_from(args), args.strong, args.sort)
    _print_page(args, page)
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    """Image file or photo id → similar photos."""
    page = _service(args).similar(_ref(args.image), args.k, args.offset, filters_from(args), args.strong, args.sort)
    _print_page(args, page)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Image → ranked labels, vocabulary entries or captions."""
    ranked = _service(args).describe(_ref(args.image), labels=args.labels, vocab=args.vocab, texts=args.texts,
                                     k=args.k)
    _out(args, [r.as_dict() for r in ranked], "\n".join(f"{r.score:7.4f}  {r.label}" for r in ranked))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Zero-shot classification of image files or ids."""
    results = _service(args).classify([_ref(i) for i in args.images], args.labels, args.templates,
                                      args.multi_label, args.threshold, args.k)
    text = []
    for r in results:
        text.append(f"{r.source}: {', '.join(r.chosen) or '(none passes the threshold)'}")
        text += [f"  {x.score:6.3f}  {x.label}" for x in r.labels]
    _out(args, [r.as_dict() for r in results], "\n".join(text))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    """Batch tagging, undo, or export."""
    svc = _service(args)
    if args.remove:
        n = svc.remove_tags(args.remove)
        _out(args, {"removed": n, "label_set": args.remove}, f"removed {n} tags of set '{args.remove}'")
        return 0
    if args.export:
        n = svc.export_tags(args.export, args.name)
        _out(args, {"exported": n, "file": args.export}, f"exported {n} tags to {args.export}")
        return 0
    p = svc.tag(args.labels, args.name, args.threshold, args.multi_label, filters_from(args), args.dry_run,
                args.templates)
    head = "would tag" if p.dry_run else f"tagged ({p.written} tags written to set '{p.label_set}')"
    lines = [f"{head}: {p.photos_considered} photos considered"]
    for label, n in sorted(p.counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:6d}  {label}  e.g. {', '.join(p.examples.get(label, [])[:3])}")
    _out(args, p.as_dict(), "\n".join(lines))
    return 0


def cmd_texts(args: argparse.Namespace) -> int:
    """Embed a caption collection once."""
    n = _service(args).add_texts(args.file, args.name)
    _out(args, {"collection": args.name, "texts": n}, f"added {n} texts as collection '{args.name}'")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command."""
    from . import commands_model

    table = {"index": cmd_index, "status": cmd_status, "reindex": cmd_reindex, "search": cmd_search,
             "similar": cmd_similar, "describe": cmd_describe, "classify": cmd_classify, "tag": cmd_tag,
             "texts": cmd_texts, **commands_model.COMMANDS}
    sys.stdout.reconfigure(errors="replace")  # type: ignore[attr-defined]  # odd file names never crash output
    return table[args.command](args)
