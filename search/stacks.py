"""Collapse search results into stacks of duplicates, and keep the groups between runs.

`stack_hits` is a pure function over a ranked hit list and duplicate groups (search/duplicates.py): each group
present in the hits becomes one entry at the rank of its best-ranked member, with a count. Finding the groups costs
a pass over the library, so `save_groups`/`load_groups` keep the last result in the cache dir; a cached result is
still right for the photos it names after the library changed (new photos are simply not stacked until
`clipsearch duplicates` runs again), and is dropped when the model or the thresholds differ.

`GroupCache` is what a search with `stack=True` asks: the saved groups, reloaded when the file changes. When there
are none yet (or they are older than the library) and the space is small (`on_demand_max` photos), it groups the
library then and there and saves the result; a larger library gets a one-line UsageError asking for `clipsearch
duplicates` first, because grouping decodes every photo once (minutes to hours), which no query should wait for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo

from .duplicates import DEFAULT_PHASH_MAX, DEFAULT_THRESHOLD, DuplicateGroup, DuplicateOptions, find_duplicate_groups
from .results import SearchHit, SearchPage, StackInfo

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


def stacked_page(fetch: Callable[[int], SearchPage], k: int, offset: int, index: Mapping[int, tuple[int, int]],
                 max_k: int) -> SearchPage:
    """A page of k stacks from offset (counted in stacks): `fetch(n)` returns the first n hits of the ranking, and
    is asked for more until the page is full or the ranking ends. Each hit carries a StackInfo (count 1 for a photo
    without duplicates among the hits) and its rank among the stacks."""
    want = offset + k
    n = min(max_k, 2 * want + 16)
    while True:
        page = fetch(n)
        stacks = stack_hits(page.hits, index)
        if len(stacks) > want or not page.has_more or n >= max_k:
            break
        n = min(max_k, 4 * n)
    hits = [dataclasses.replace(st.hit, rank=offset + i + 1, stack=StackInfo(st.ids, st.group_size))
            for i, st in enumerate(stacks[offset:want])]
    return dataclasses.replace(page, hits=hits, offset=offset, limit=k, has_more=len(stacks) > want or page.has_more)


class GroupCache:
    """Duplicate groups for stacking, per space: the saved ones (reloaded when their file changes), else made on
    demand for a small library (see the module docstring). `cache_dir` None keeps them in memory only."""

    def __init__(self, catalog: Catalog, cache_dir: Path | None, on_demand_max: int = 5000, workers: int = 1) -> None:
        self.catalog, self.cache_dir, self.on_demand_max, self.workers = catalog, cache_dir, on_demand_max, workers
        self._loaded: dict[str, tuple[object, int, dict[int, tuple[int, int]]]] = {}  # key -> (stamp, gen, index)

    def _stamp(self, space: SpaceInfo) -> object:
        if self.cache_dir is None:
            return None
        try:
            st = _cache_file(self.cache_dir, space).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def index(self, space: SpaceInfo) -> dict[int, tuple[int, int]]:
        """photo id -> (group number, group size) for stack_hits."""
        stamp, cached = self._stamp(space), self._loaded.get(space.key)
        if cached is not None and cached[0] == stamp and cached[1] == space.generation:
            return cached[2]
        groups = load_groups(self.cache_dir, space) if self.cache_dir is not None else None
        generation = _saved_generation(self.cache_dir, space) if groups is not None else None
        if groups is None or generation != space.generation:
            count = self.catalog.space(space.id).count
            if count <= self.on_demand_max:
                groups = self._make(space, count)
            elif groups is None:
                raise UsageError(f"no duplicate groups yet for this library ({count:,} photos): run clipsearch "
                                 "duplicates once (it decodes every photo), then search with --stack")
        index = group_index(groups)
        self._loaded[space.key] = (self._stamp(space), space.generation, index)
        return index

    def _make(self, space: SpaceInfo, count: int) -> list[DuplicateGroup]:
        log.info("grouping near-duplicates of %d photos for stacking (clipsearch duplicates does it ahead)", count)
        groups = find_duplicate_groups(self.catalog, space, DEFAULT_THRESHOLD, DEFAULT_PHASH_MAX,
                                       options=DuplicateOptions(workers=self.workers))
        if self.cache_dir is not None:
            try:
                save_groups(self.cache_dir, space, groups, DEFAULT_THRESHOLD, DEFAULT_PHASH_MAX)
            except OSError as e:  # a read-only cache dir costs the next query the same work, nothing more
                log.info("cannot save the duplicate groups: %s", e)
        return groups


def _saved_generation(cache_dir: Path | None, space: SpaceInfo) -> int | None:
    """The space generation the saved groups were made at (None when unknown)."""
    if cache_dir is None:
        return None
    try:
        return int(json.loads(_cache_file(cache_dir, space).read_text(encoding="utf-8"))["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
