"""The seed systems' commands: explain (why a photo matched), caption (what is in a photo), ask (a question).

Each model is optional and loads only when its command runs. caption stores its captions in the catalog (one
transaction after every caption is generated); explain and ask only read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .commands_common import config_from, out, service_for
from .registry import command


def _ref(value: str) -> int | str:
    """A photo id (all digits, not an existing file) or an image path."""
    from clipsearch.search.service import image_ref

    return image_ref(value)  # type: ignore[return-value]


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="the text query to explain")
    p.add_argument("image", help="image path or photo id")
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="where to write the heatmap overlay")
    p.add_argument("--method", choices=["auto", "gradcam", "tokens"], default="auto",
                   help="Grad-CAM on a CNN tower, patch tokens on a ViT (auto picks by architecture)")


@command("explain", "why a photo matched a query: a heatmap of where the query matches it", arguments=_explain_args,
         examples=("clipsearch explain 'a red star' 42 --out heat.png",
                   "clipsearch explain 'a dog' ~/Pictures/dog.jpg --out dog-heat.png --model demo"))
def cmd_explain(args: argparse.Namespace) -> int:
    """Write the heatmap overlay and print where the query matches best."""
    from clipsearch.search.explain import explain_ref

    svc = service_for(args, need_photos=False)
    heat = explain_ref(svc.catalog, svc.encoder, _ref(args.image), args.query, args.method)
    path = heat.write_png(args.out)
    peak = "nowhere in particular (a flat map)" if heat.peak is None else f"x={heat.peak[0]}, y={heat.peak[1]}"
    out(args, {"out": str(path), "peak": heat.peak, "score": heat.score, "method": heat.method,
               "size": list(heat.size)},
        f"wrote {path}: best match at {peak} (score {heat.score:.4f}, {heat.method})")
    return 0


def _caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image paths or photo ids (none: --all)")
    p.add_argument("--all", action="store_true",
                   help="caption every indexed photo that has no caption from this captioner for its current content")
    p.add_argument("--redo", action="store_true", help="with --all: caption again photos that already have one")
    p.add_argument("--captioner", default="demo",
                   help="demo, demo-coca, a trained captioner folder, coca_ARCH:TAG (open_clip CoCa) or blip:NAME "
                        "(transformers)")


def _library_parts(args: argparse.Namespace, embeddings: bool, need_photos: bool) -> tuple:
    """(catalog, encoder, space id) for a model that reads stored embeddings; (catalog, None, None) for one that
    reads pixels, so that no CLIP model is loaded for it."""
    if embeddings:
        svc = service_for(args, need_photos=need_photos)
        return svc.catalog, svc.encoder, svc.space(require_photos=need_photos).id
    from .commands_common import open_library

    return open_library(config_from(args)).catalog, None, None


@command("caption", "describe photos in words and keep the captions in the catalog, searchable with caption:WORDS",
         arguments=_caption_args, hint="name photos (paths or ids) or pass --all",
         examples=("clipsearch caption --all --model demo", "clipsearch caption 42 7 --json",
                   "clipsearch caption --all --captioner coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k"))
def cmd_caption(args: argparse.Namespace) -> int:
    """Caption the named photos or every photo still without a caption, and store those of catalogued photos.

    Every caption is generated before anything is written, so a failure leaves the catalog as it was; an image
    file outside the catalog is captioned and printed, not stored."""
    from clipsearch.indexer.errors import UsageError
    from clipsearch.search.captions import (
        caption_image,
        caption_library,
        captioner_label,
        catalogued_id,
        load_captioner,
        reads_embeddings,
    )

    if not args.images and not args.all:
        raise UsageError("name photos (paths or ids) or pass --all")
    if args.redo and not args.all:
        raise UsageError("--redo goes with --all (named photos are always captioned again)")
    refs = [_ref(i) for i in args.images]
    need_photos = bool(args.all or any(isinstance(r, int) for r in refs))
    catalog, encoder, space_id = _library_parts(args, reads_embeddings(args.captioner), need_photos)
    cap, label = load_captioner(args.captioner, encoder), captioner_label(args.captioner)
    named = {r: r if isinstance(r, int) else catalogued_id(catalog, r) for r in refs}
    loose = {r: caption_image(encoder, cap, _read(r)) for r in refs if named[r] is None}  # generated, not stored
    ids = sorted({i for i in named.values() if i is not None})
    found = caption_library(catalog, cap, label, space_id, ids=ids) if ids else {}
    if args.all:
        found.update(caption_library(catalog, cap, label, space_id, redo=args.redo))
    rows = [{"source": f"#{r}" if isinstance(r, int) else r, "caption": found[named[r]], "stored": True}
            if named[r] is not None else {"source": r, "caption": loose[r], "stored": False} for r in refs]
    rows += [{"source": f"#{i}", "caption": t, "stored": True} for i, t in sorted(found.items()) if i not in ids]
    stored = sum(r["stored"] for r in rows)
    lines = [f"{r['source']}: {r['caption']}" for r in rows]
    if stored:
        lines.append(f"stored {stored} caption(s) from {label} in the catalog (search them with caption:WORDS)")
    elif args.all:
        lines.append(f"every indexed photo already has a caption from {label} (--redo makes them again)")
    out(args, rows, "\n".join(lines) or "no photos to caption")
    return 0


def _read(path: str) -> bytes:
    """An image file's bytes; an unreadable one is a one-line UsageError."""
    from clipsearch.indexer.errors import UsageError

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image path or photo id")
    p.add_argument("question", help='e.g. "what colour is the shape?"')
    p.add_argument("--answerer", default="demo",
                   help="demo, a trained answerer folder, or vilt:NAME (transformers ViLT)")


@command("ask", "answer a question about a photo (visual question answering; the demo model runs offline)",
         arguments=_ask_args,
         examples=("clipsearch ask 42 'what colour is the shape?' --model demo",
                   "clipsearch ask photo.jpg 'how many shapes are there?'",
                   "clipsearch ask 42 'what is the man holding?' --answerer vilt:dandelin/vilt-b32-finetuned-vqa"))
def cmd_ask(args: argparse.Namespace) -> int:
    """Print the answer with its confidence; the catalog is only read."""
    from clipsearch.search.questions import ask_ref, load_answerer, reads_embeddings

    catalog, encoder, space_id = _library_parts(args, reads_embeddings(args.answerer), need_photos=False)
    answerer = load_answerer(args.answerer, encoder)
    ans = ask_ref(catalog, space_id, encoder, answerer, _ref(args.image), args.question)
    out(args, {"question": ans.question, "answer": ans.text, "confidence": ans.confidence, "how": ans.how},
        f"{ans.text}  (confidence {ans.confidence:.2f})")
    return 0


def _duplicates_args(p: argparse.ArgumentParser) -> None:
    from clipsearch.search.duplicate_defaults import DEFAULT_PHASH_MAX, DEFAULT_THRESHOLD

    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T",
                   help="cosine similarity from which two photos are candidates (0..1)")
    p.add_argument("--phash-max", type=int, default=DEFAULT_PHASH_MAX, metavar="N",
                   help="largest perceptual-hash distance (bits) that confirms a candidate pair")


@command("duplicates", "group exact and near-duplicate photos (resized, recompressed, cropped, edited copies)",
         arguments=_duplicates_args,
         examples=("clipsearch duplicates", "clipsearch duplicates --threshold 0.93 --json"))
def cmd_duplicates(args: argparse.Namespace) -> int:
    """Print each group best-first (clipsearch never deletes a photo); no model is loaded."""
    from clipsearch.indexer.app import open_parts, resolve_model
    from clipsearch.indexer.errors import EmptyLibrary, UsageError
    from clipsearch.indexer.ingest.cores import usable_cores
    from clipsearch.search.duplicates import DuplicateOptions, duplicates_document, find_duplicate_groups
    from clipsearch.search.stacks import save_groups

    if not 0.0 < args.threshold <= 1.0 or args.phash_max < 0:
        raise UsageError("--threshold must be in (0, 1] and --phash-max >= 0")
    config = config_from(args)
    parts = open_parts(config)
    spec = resolve_model(config, parts.catalog)
    mine = [s for s in parts.catalog.spaces() if s.model_spec == spec]
    if not mine:
        raise EmptyLibrary(f"nothing is indexed with model {spec} in {config.home}: nothing to compare")
    space = max(mine, key=lambda s: s.id)
    groups = find_duplicate_groups(parts.catalog, space, args.threshold, args.phash_max,
                                   options=DuplicateOptions(workers=usable_cores()))
    save_groups(config.cache_dir, space, groups, args.threshold, args.phash_max)  # `search --stack` reuses them
    doc = duplicates_document(groups)
    lines = [f"{doc['groups']} groups, {doc['photos']} photos, {doc['reclaimable_bytes'] / 1e6:.1f} MB in copies"]
    for g in groups:
        lines.append(f"group of {len(g.members)}{' (identical files)' if g.exact else ''}:")
        lines += [f"  {'keep' if m.id == g.keep.id else '    '} #{m.id:<6d} {m.path}" for m in g.members]
    out(args, doc, "\n".join(lines))
    return 0
