"""Stage 1 of an indexing run, *plan*: walk the roots and diff every file against the catalog. No model loads here.

The plan says which files need embedding (new, changed, or lacking this space's vector), how many are unchanged,
and which catalogued files vanished (removed, or recognised as moved by content hash during commit). An empty
plan ends a run before any model starts, which is why a no-op re-index takes a fraction of a second.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.scan import SAMPLE_DIR_NAME, FoundFile, _is_within, scan
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog, KnownFile


@dataclass(frozen=True)
class PlanItem:
    """One file to embed."""

    file: FoundFile
    existing_id: int | None  # row to update in place (a changed file)
    add_space_to: int | None = None  # unchanged photo that only lacks this space's vector (a model change)


@dataclass
class Plan:
    """What a run has to do; built from the file system and the catalog only."""

    roots: list[Path]
    todo: list[PlanItem] = field(default_factory=list)
    unchanged: int = 0
    scanned: int = 0
    known_total: int = 0  # catalogued files under the roots before the run (the vanish guard's base)
    vanished: dict[bytes, KnownFile] = field(default_factory=dict)  # under the roots, no longer on disk
    embedded: set[int] = field(default_factory=set)  # photo ids that already have this space's vector
    skipped_dirs: list[str] = field(default_factory=list)
    skipped_by_ext: Counter = field(default_factory=Counter)  # files never read: not a photo extension

    @property
    def vanished_by_hash(self) -> dict[str, KnownFile]:
        """Vanished indexed photos by content hash: a new file with one of these hashes is a move."""
        return {k.content_hash: k for k in self.vanished.values()
                if k.content_hash and k.status == PhotoStatus.INDEXED}

    def needs_model(self) -> bool:
        """True when something must be embedded; an empty plan never loads a model."""
        return bool(self.todo)


def check_roots(roots: list[Path], home: Path) -> list[Path]:
    """Absolute roots; refuses a non-folder and clipsearch's own data dir (except its sample library)."""
    out = []
    home_real = os.path.realpath(home)
    for r in roots:
        if not os.path.isdir(r):
            raise UsageError(f"not a folder: {r}")
        real = os.path.realpath(r)
        sample = os.path.join(home_real, SAMPLE_DIR_NAME)
        inside = real == home_real or real.startswith(home_real.rstrip(os.sep) + os.sep)
        if inside and not (real == sample or real.startswith(sample + os.sep)):
            raise UsageError(f"{r} is inside clipsearch's own data dir ({home}); index your photos instead")
        out.append(Path(os.path.abspath(r)))
    return out


def make_plan(catalog: Catalog, roots: list[Path], home: Path, space_id: int | None,
              follow_symlinks: bool = False) -> Plan:
    """Scan `roots` and diff against the catalog for the space `space_id` (None: a space with no vectors yet)."""
    roots = check_roots(roots, home)
    found = scan(roots, home, follow_symlinks)
    known = catalog.known_files(under=[os.fsencode(str(r)) for r in roots])  # this run's trees, not the library
    plan = Plan(roots, scanned=len(found.files), known_total=len(known))
    plan.embedded = catalog.embedded_ids(space_id, among=[k.id for k in known.values()]) \
        if space_id is not None else set()
    plan.skipped_dirs = [f"{os.fsdecode(p)}: {r}" for p, r in found.skipped]
    plan.skipped_by_ext = Counter(getattr(found, "skipped_by_ext", None) or {})
    for f in found.files:
        k = known.get(f.path)
        if k is None:
            plan.todo.append(PlanItem(f, None))
        elif k.size != f.size or k.mtime_ns != f.mtime_ns:
            plan.todo.append(PlanItem(f, k.id))
        elif k.status == PhotoStatus.INDEXED and k.id not in plan.embedded:
            plan.todo.append(PlanItem(f, None, add_space_to=k.id))  # model change: keep row, tags, other vectors
        else:
            plan.unchanged += 1
    root_bytes = [os.fsencode(str(r)) for r in roots]
    seen = {f.path for f in found.files}
    plan.vanished = {p: k for p, k in known.items()
                     if p not in seen and any(_is_within(p, r) for r in root_bytes)}
    return plan
