"""What `clipsearch status` reports, as data: shared by the CLI, the Library page, the query server and the Python
API, so the four never disagree. No model is loaded (status must start in well under a second).
"""

from __future__ import annotations

import json
from typing import Any

from clipsearch.indexer.config import AppConfig


def skipped_by_extension(raw: str | None) -> dict[str, int]:
    """The indexer's record of files it never read (catalog meta "skipped_extensions", a JSON {".ext": count}),
    most frequent first; {} when absent or unreadable (status must never fail on it)."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    counts = {str(ext): int(n) for ext, n in data.items() if isinstance(n, int) and n > 0}
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def status_data(config: AppConfig) -> dict[str, Any]:
    """Counts by status, failures, files skipped by extension, embedding spaces and paths."""
    from clipsearch.indexer.app import open_parts

    parts = open_parts(config)
    try:
        catalog = parts.catalog
        counts = catalog.counts_by_status()
        spaces = []
        for s in catalog.spaces():
            m = parts.store.read_manifest(s) or {}
            spaces.append({"key": s.key, "label": s.label, "model": s.model_spec, "dim": s.dim, "vectors": s.count,
                           "index_type": m.get("index_type"), "index_vectors": m.get("count"),
                           "index_current": m.get("generation") == s.generation and m.get("count") == s.count})
        return {**counts, "total": sum(counts.values()), "failures": catalog.failures(),
                "skipped_by_extension": skipped_by_extension(catalog.get_meta("skipped_extensions")),
                "spaces": spaces, "home": str(config.home), "catalog": catalog._safe_url(),
                "index_dir": str(config.index_dir)}
    finally:
        parts.catalog.dispose()


def status_lines(d: dict[str, Any], max_failures: int = 50) -> list[str]:
    """`status_data` as the text `clipsearch status` prints."""
    lines = [f"photos: {d['total']} (indexed {d.get('indexed', 0)}, failed {d.get('failed', 0)}, "
             f"unsupported {d.get('unsupported', 0)}, empty {d.get('empty', 0)})"]
    lines += [f"  {f['status']:11s} {f['path']}: {f['reason']}" for f in d["failures"][:max_failures]]
    if len(d["failures"]) > max_failures:
        lines.append(f"  ... and {len(d['failures']) - max_failures} more (--json lists them all)")
    skipped = d.get("skipped_by_extension") or {}
    if skipped:
        lines.append(f"skipped (not a photo type): {sum(skipped.values())} files: "
                     + ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in skipped.items()))
    behind = " (behind the catalog: caught up on next use)"
    lines += [f"space {s['label']} [{s['key']}] dim {s['dim']}: {s['vectors']} vectors, index "
              f"{s['index_type'] or 'not built'}{'' if s['index_current'] else behind}" for s in d["spaces"]]
    lines += [f"catalog: {d['catalog']}", f"indexes: {d['index_dir']}"]
    return lines
