"""Collapse search results into stacks of duplicates, and keep the groups between runs.

`stack_hits` is a pure function over a ranked hit list and duplicate groups (search/duplicates.py): each group
present in the hits becomes one entry at the rank of its best-ranked member, with a count. Finding the groups costs
a pass over the library, so `save_groups`/`load_groups` keep the last result in the cache dir; a cached result is
still right for the photos it names after the library changed (new photos are simply not stacked until
`clipsearch duplicates` runs again), and is dropped when the model or the thresholds differ.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.indexer.storage.catalog import SpaceInfo

from .duplicates import DuplicateGroup
from .results import SearchHit

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass(frozen=True)
class Stack:
    """One entry of a stacked result list: the best-ranked hit of a group, and the group's other hits."""

    hit: SearchHit  # shown at this rank
    ids: tuple[int, ...]  # every member found in the hits, in rank order (hit.id first)
    group_size: int  # members of the whole group in the library (1: not a duplicate of anything)

    @property
    def count(self) -> int:
        """Hits folded into this entry (1 for a photo without duplicates among the hits)."""
        return len(self.ids)

    def as_dict(self) -> dict[str, Any]:
        """The hit's JSON form plus a `stack` object: count, ids, group_size."""
        return {**self.hit.as_dict(), "stack": {"count": self.count, "ids": list(self.ids),
                                                "group_size": self.group_size}}


def group_index(groups: Sequence[DuplicateGroup]) -> dict[int, tuple[int, int]]:
    """photo id -> (group number, group size): build once, pass to stack_hits for every query."""
    return {pid: (n, len(g.members)) for n, g in enumerate(groups) for pid in g.ids}


def stack_hits(hits: Sequence[SearchHit],
               groups: Sequence[DuplicateGroup] | Mapping[int, tuple[int, int]]) -> list[Stack]:
    """Fold hits of one duplicate group into one stack at the rank of its best hit; order otherwise kept.

    A caller that shows k stacks should ask for more than k hits (a page of copies folds into fewer entries)."""
    index = groups if isinstance(groups, Mapping) else group_index(groups)
    order: list[tuple[int, SearchHit]] = []  # (group key, best hit) in rank order
    members: dict[int, list[int]] = {}  # group number (or -1 - id for a photo in no group) -> ids in rank order
    sizes: dict[int, int] = {}
    for hit in hits:
        found = index.get(hit.id)
        key = found[0] if found else -1 - hit.id
        if key not in members:
            members[key], sizes[key] = [], found[1] if found else 1
            order.append((key, hit))
        members[key].append(hit.id)
    return [Stack(hit, tuple(members[key]), sizes[key]) for key, hit in order]


def _cache_file(cache_dir: Path, space: SpaceInfo) -> Path:
    return cache_dir / f"duplicates-{space.key}.json"


def save_groups(cache_dir: Path, space: SpaceInfo, groups: Sequence[DuplicateGroup], threshold: float,
                phash_max: int) -> Path:
    """Write the groups of a space (atomically) for later stacking; returns the file."""
    path = _cache_file(cache_dir, space)
    doc = {"version": _CACHE_VERSION, "space_key": space.key, "generation": space.generation,
           "threshold": threshold, "phash_max": phash_max, "groups": [g.as_dict() for g in groups]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_groups(cache_dir: Path, space: SpaceInfo, threshold: float | None = None,
                phash_max: int | None = None) -> list[DuplicateGroup] | None:
    """The saved groups of a space, or None when there are none (or they were made with other thresholds, when
    given, or cannot be read)."""
    try:
        doc = json.loads(_cache_file(cache_dir, space).read_text(encoding="utf-8"))
        if doc.get("version") != _CACHE_VERSION or doc.get("space_key") != space.key:
            return None
        if (threshold is not None and doc["threshold"] != threshold) or (
                phash_max is not None and doc["phash_max"] != phash_max):
            return None
        return [DuplicateGroup.from_dict(g) for g in doc["groups"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.info("ignoring the saved duplicate groups: %s", e)
        return None
