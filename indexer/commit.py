"""Stage 3 of an indexing run, *commit*: turn each batch of embed results into one catalog transaction.

A result becomes a new or updated photo row with its vector, a move (same content at a new path: the photo keeps
its id, vectors and tags), a copy (duplicate content: vectors copied, not recomputed) or a status row with its
reason. A result that asked to reuse a vector which turned out not to be reusable comes back as a redo item,
embedded in a second pass. Killing the process between two batches loses nothing that was committed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.indexer.executors import EmbedResult
from clipsearch.indexer.ingest.decode import STATUS_REUSE, DecodeResult
from clipsearch.indexer.plan import Plan, PlanItem
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What a run did; the CLI prints it and `--json` serialises it."""

    scanned: int = 0
    indexed: int = 0  # newly embedded
    unchanged: int = 0
    moved: int = 0  # same content at a new path: kept its id, vectors and tags
    reused: int = 0  # duplicate content: vectors copied, not recomputed
    removed: int = 0
    missing_kept: int = 0  # vanished files not removed because too many vanished at once
    failed: Counter = field(default_factory=Counter)  # "status: reason" -> count (a summary for people)
    skipped_dirs: list[str] = field(default_factory=list)
    skipped_by_ext: Counter = field(default_factory=Counter)  # files not read: extension -> count
    decoder_warnings: int = 0  # decoder messages (routed to the log), summed over files
    files_with_warnings: int = 0
    interrupted: bool = False  # a stop was requested: the run ended after a committed batch; re-run to resume
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"plan": 0.0, "decode_wait": 0.0,
                                                                      "embed": 0.0, "write": 0.0, "index": 0.0})

    @property
    def images_per_second(self) -> float:
        """Embedded images per wall-clock second of the whole run."""
        return self.indexed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scanned": self.scanned, "indexed": self.indexed, "unchanged": self.unchanged, "moved": self.moved,
            "reused": self.reused, "removed": self.removed, "missing_kept": self.missing_kept,
            "failed": dict(self.failed), "skipped_dirs": self.skipped_dirs,
            "skipped_by_extension": dict(self.skipped_by_ext), "interrupted": self.interrupted,
            "decoder_warnings": self.decoder_warnings, "files_with_warnings": self.files_with_warnings,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 2),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


@dataclass
class _Txn:
    """The rows and vectors of one catalog transaction."""

    records: list[PhotoRecord] = field(default_factory=list)
    by_row: dict[int, np.ndarray] = field(default_factory=dict)  # records index -> vector
    by_photo: dict[int, np.ndarray] = field(default_factory=dict)  # existing photo id -> vector of this space
    moves: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    copies: list[tuple[int, bytes, int, int]] = field(default_factory=list)


class Committer:
    """Applies embed results to the catalog, one transaction per batch; collects redo items and the report."""

    def __init__(self, catalog: Catalog, space_id: int | None, plan: Plan, report: IndexReport) -> None:
        self.catalog, self.space_id, self.plan, self.report = catalog, space_id, plan, report
        self.vanished_by_hash = plan.vanished_by_hash
        self.vec_by_hash = catalog.hashes_with_vectors(space_id) if space_id is not None else {}
        self.claimed: set[int] = set()  # vanished photo ids taken over by a move

    def reuse_hashes(self) -> frozenset[str]:
        """Content hashes for which the embed stage may answer "reuse" instead of decoding."""
        return frozenset(self.vanished_by_hash) | frozenset(self.vec_by_hash)

    def commit(self, items: list[PlanItem], results: list[EmbedResult]) -> list[PlanItem]:
        """Write one batch atomically; returns the items that must be embedded again without reuse."""
        assert self.space_id is not None, "commit needs the space the vectors belong to"
        txn, redo = _Txn(), []
        for res in results:
            again = self._absorb(items[res.key], res.decoded, res.vector, txn)
            if again is not None:
                redo.append(again)
        self.catalog.write_batch(self.space_id, txn.records, txn.by_row, moves=txn.moves,
                                 copies=self._copy_records(txn.copies), extra_vectors=txn.by_photo)
        return redo

    def _absorb(self, item: PlanItem, r: DecodeResult, vec: np.ndarray | None, txn: _Txn) -> PlanItem | None:
        """Turn one result into catalog work; a PlanItem back means "embed this again, decoding for real"."""
        f, report = item.file, self.report
        if r.warnings:
            report.decoder_warnings += r.warnings
            report.files_with_warnings += 1
            log.debug("decoder messages for %s: %s", os.fsdecode(f.path), "; ".join(r.warning_messages))
        if item.add_space_to is not None:
            if r.status == STATUS_REUSE:
                return item
            if vec is None:
                report.failed[f"{r.status}: {r.reason}"] += 1
            else:
                txn.by_photo[item.add_space_to] = vec
                report.indexed += 1
            return None
        if r.status == STATUS_REUSE:
            return self._reuse(item, r, txn)
        rec = PhotoRecord(path_bytes=f.path, size=f.size, mtime_ns=f.mtime_ns, status=r.status, reason=r.reason,
                          content_hash=r.content_hash, width=r.width, height=r.height, taken_at=r.taken_at,
                          camera_make=r.camera_make, camera_model=r.camera_model, format=r.format,
                          id=item.existing_id)
        if r.status == PhotoStatus.INDEXED and vec is not None:
            txn.by_row[len(txn.records)] = vec
            report.indexed += 1
        else:
            report.failed[f"{r.status}: {r.reason}"] += 1
        txn.records.append(rec)
        return None

    def _reuse(self, item: PlanItem, r: DecodeResult, txn: _Txn) -> PlanItem | None:
        """Known content: a move of a vanished photo, a copy of an indexed duplicate, or (neither) a real decode."""
        f, digest = item.file, r.content_hash or ""
        moved, src = self.vanished_by_hash.get(digest), self.vec_by_hash.get(digest)
        if item.existing_id is None and moved is not None and moved.id not in self.claimed:
            self.claimed.add(moved.id)
            txn.moves.append((moved.id, f.path, f.size, f.mtime_ns))
            self.report.moved += 1
            return None if moved.id in self.plan.embedded else PlanItem(f, None, add_space_to=moved.id)
        if item.existing_id is None and src is not None:
            txn.copies.append((src, f.path, f.size, f.mtime_ns))
            self.report.reused += 1
            return None
        return item

    def _copy_records(self, copies: list[tuple[int, bytes, int, int]]) -> list[tuple[int, PhotoRecord]]:
        if not copies:
            return []
        rows = self.catalog.photos_by_id([c[0] for c in copies])
        out = []
        for src, path, size, mtime_ns in copies:
            s = rows[src]
            out.append((src, PhotoRecord(path_bytes=path, size=size, mtime_ns=mtime_ns, status=PhotoStatus.INDEXED,
                                         content_hash=s["content_hash"], width=s["width"], height=s["height"],
                                         taken_at=s["taken_at"], camera_make=s["camera_make"],
                                         camera_model=s["camera_model"], format=s["format"])))
        return out

    def purge_vanished(self, force: bool, vanish_ratio: float) -> None:
        """Remove catalogued files that vanished under the roots, unless most of the library vanished at once."""
        ids = [k.id for k in self.plan.vanished.values() if k.id not in self.claimed]
        if not ids:
            return
        total = self.plan.known_total
        if not force and len(ids) > vanish_ratio * max(total, 1):
            self.report.missing_kept = len(ids)
            log.warning("%d of %d catalogued files are missing (unmounted disk?): not removing them; "
                        "re-run with --force to remove them", len(ids), total)
            return
        self.report.removed = self.catalog.remove_photos(ids)
