"""Indexing pipeline end to end with a tiny open_clip model, real FAISS and SQLite."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.storage.store import StoreOptions, VectorStore

from .conftest import TINY2, make_indexer, make_photo

pytestmark = pytest.mark.integration


def _ids_in_index(ix) -> set[int]:
    space = ix.catalog.space(ix.catalog.ensure_space(ix.encoder.get().space.key, "", "", ix.encoder.get().space.dim))
    index = ix.store.index_for(space)
    return {int(i) for i in faiss_ids(index)}


def faiss_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map)


def test_index_library_then_rerun_embeds_nothing(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    first = ix.run([library])
    assert first.indexed == 8 and not first.failed
    assert ix.catalog.counts_by_status()["indexed"] == 8
    assert len(_ids_in_index(ix)) == 8
    again = make_indexer(app_config, tiny_encoder).run([library])
    assert again.indexed == 0 and again.unchanged == 8 and again.removed == 0


def test_bad_files_get_status_and_the_run_goes_on(library, app_config, tiny_encoder) -> None:
    bad = library / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.JPG").write_text("not an image")
    good = (library / "a/p0.jpg").read_bytes()
    (bad / "trunc.jpeg").write_bytes(good[: len(good) // 3])
    make_photo(bad / "huge.png", 99, size=(300, 300))
    (bad / "ignored.txt").write_text("not a candidate at all")
    ix = make_indexer(app_config, tiny_encoder, max_pixels=50_000)
    report = ix.run([library])
    assert report.indexed == 8
    rows = {os.path.basename(r["path"]): r for r in ix.catalog.failures()}
    assert rows["zero.jpg"]["status"] == "empty"
    assert rows["notes.JPG"]["status"] == "unsupported"
    assert rows["trunc.jpeg"]["status"] == "failed" and "truncated" in rows["trunc.jpeg"]["reason"]
    assert rows["huge.png"]["status"] == "failed" and "bomb" in rows["huge.png"]["reason"]
    assert "ignored.txt" not in rows
    assert ix.catalog.counts_by_status() == {"indexed": 8, "failed": 2, "unsupported": 1, "empty": 1}


def test_exif_rotated_photo_embeds_like_its_rotated_twin(tmp_path, app_config, tiny_encoder) -> None:
    root = tmp_path / "rot"
    src = make_photo(root / "src.png", 5, size=(64, 40))
    im = Image.open(src)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(root / "tagged.jpg", quality=95, exif=exif)
    im.transpose(Image.Transpose.ROTATE_270).save(root / "twin.jpg", quality=95)
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([root])
    ids = {os.path.basename(r["path"]): i for i, r in ix.catalog.photos_by_id(list(range(1, 10))).items()}
    vecs = ix.catalog.vectors_for(ix.catalog.spaces()[0].id, list(ids.values()))
    cos = float(vecs[ids["tagged.jpg"]] @ vecs[ids["twin.jpg"]])
    assert cos > 0.99
    assert ix.catalog.photos_by_id([ids["tagged.jpg"]])[ids["tagged.jpg"]]["width"] == 40  # upright size


def test_moved_file_keeps_its_vector_and_deleted_file_leaves(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    before = {r["path"]: i for i, r in ix.catalog.photos_by_id(list(range(1, 20))).items()}
    old_id = before[str(library / "a/p1.jpg")]
    (library / "c").mkdir()
    shutil.move(library / "a/p1.jpg", library / "c/renamed.jpg")
    os.remove(library / "a/p2.jpg")
    report = make_indexer(app_config, tiny_encoder).run([library])
    assert report.moved == 1 and report.indexed == 0 and report.removed == 1
    row = ix.catalog.photos_by_id([old_id])[old_id]
    assert row["path"] == str(library / "c/renamed.jpg") and row["width"] == 96  # same id, metadata kept
    ids = _ids_in_index(make_indexer(app_config, tiny_encoder))
    assert old_id in ids and before[str(library / "a/p2.jpg")] not in ids and len(ids) == 7


def test_duplicate_content_reuses_vectors(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    shutil.copy(library / "a/p0.jpg", library / "b/copy.jpg")
    report = make_indexer(app_config, tiny_encoder).run([library])
    assert report.reused == 1 and report.indexed == 0
    assert ix.catalog.counts_by_status()["indexed"] == 9


def test_changed_file_is_reembedded(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    make_photo(library / "a/p3.jpg", 1234)
    os.utime(library / "a/p3.jpg", ns=(1, 1))
    report = make_indexer(app_config, tiny_encoder).run([library])
    assert report.indexed == 1 and report.unchanged == 7


def test_most_files_vanishing_is_not_purged_without_force(library, app_config, tiny_encoder) -> None:
    make_indexer(app_config, tiny_encoder).run([library])
    for p in (library / "a").iterdir():
        p.unlink()
    report = make_indexer(app_config, tiny_encoder).run([library])
    assert report.removed == 0 and report.missing_kept == 6
    forced = make_indexer(app_config, tiny_encoder, force=True).run([library])
    assert forced.removed == 6


def test_model_change_creates_second_space_and_keeps_old_vectors(library, app_config, tiny_encoder) -> None:
    from clipsearch.indexer.model.factory import create_encoder

    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    old = {s.key: s.count for s in ix.catalog.spaces()}
    report = make_indexer(app_config, create_encoder(TINY2, "cpu")).run([library])
    assert report.indexed == 8
    spaces = {s.key: s for s in ix.catalog.spaces()}
    assert len(spaces) == 2
    for key, count in old.items():
        assert spaces[key].count == count
    assert {s.dim for s in spaces.values()} == {32, 24}


def test_home_dir_and_symlink_loops_are_safe(tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.config import AppConfig

    root = tmp_path / "lib"
    make_photo(root / "x.jpg", 1)
    os.symlink(root, root / "loop")
    cfg = AppConfig(home=root / ".clipsearch", model="unused", device="cpu")
    make_photo(cfg.home / "thumbs" / "t.jpg", 2)  # an app file inside the root: never indexed
    report = make_indexer(cfg, tiny_encoder, follow_symlinks=True).run([root])
    assert report.indexed == 1
    with pytest.raises(UsageError):
        make_indexer(cfg, tiny_encoder).run([cfg.home])


def test_non_utf8_file_name_round_trips(tmp_path, app_config, tiny_encoder) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    raw = os.path.join(os.fsencode(root), b"caf\xe9-\xff.jpg")
    make_photo(tmp_path / "tmp.jpg", 3)
    shutil.copy(tmp_path / "tmp.jpg", raw)
    ix = make_indexer(app_config, tiny_encoder)
    assert ix.run([root]).indexed == 1
    assert raw in ix.catalog.known_files()
    assert make_indexer(app_config, tiny_encoder).run([root]).unchanged == 1


def test_damaged_index_is_rebuilt_and_stale_index_caught_up_never_served(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    space = ix.catalog.spaces()[0]
    manifest = ix.store.read_manifest(space)
    path = app_config.index_dir / manifest["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short (indexes are memory-mapped)
    assert VectorStore(app_config.index_dir, ix.catalog).index_for(space).ntotal == 8  # rebuilt from the catalog
    path.write_bytes(b"garbage")
    fresh = VectorStore(app_config.index_dir, ix.catalog)
    assert fresh.index_for(space).ntotal == 8
    ix.catalog.remove_photos([1])  # catalog moves on; the index on disk is now stale
    strict = VectorStore(app_config.index_dir, ix.catalog, StoreOptions(auto_rebuild=False))
    assert strict.index_for(ix.catalog.space(space.id)).ntotal == 7  # caught up from the change record, no rebuild
    assert VectorStore(app_config.index_dir, ix.catalog).index_for(ix.catalog.space(space.id)).ntotal == 7


def test_inline_decoding_matches_worker_decoding(library, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.config import AppConfig

    a = make_indexer(AppConfig(home=tmp_path / "h0", model="x"), tiny_encoder, workers=0)
    b = make_indexer(AppConfig(home=tmp_path / "h2", model="x"), tiny_encoder, workers=2)
    a.run([library]), b.run([library])
    sa, sb = a.catalog.spaces()[0].id, b.catalog.spaces()[0].id
    va, vb = a.catalog.vectors_for(sa, list(range(1, 9))), b.catalog.vectors_for(sb, list(range(1, 9)))
    assert all(np.allclose(va[i], vb[i], atol=1e-5) for i in va)


class _ReportsDevice:
    """The real tiny encoder, reporting another device so the pipeline picks that device's decode schedule."""

    def __init__(self, encoder, device: str) -> None:
        self._enc, self.device = encoder, device

    def __getattr__(self, name):
        return getattr(self._enc, name)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="this OS has no CPU affinity")
def test_decode_workers_follow_the_cpu_set_not_the_host_count(tmp_path, tiny_encoder) -> None:
    """In a container limited to one CPU (here: this thread pinned to one), one decode process, not one per host
    core pre-empting the model."""
    from clipsearch.indexer.config import AppConfig

    ix = make_indexer(AppConfig(home=tmp_path / "h", model="x"), tiny_encoder, workers=None)
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1 and ix.executor._worker_count(overlap=False) == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cores() == len(before)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_alternating_and_overlapping_schedules_index_the_same(library, tmp_path, tiny_encoder, device) -> None:
    """CPU-only: decode and embed phases alternate on all cores; with an accelerator they overlap. Same result."""
    from clipsearch.indexer.config import AppConfig

    ref = make_indexer(AppConfig(home=tmp_path / "ref", model="x"), tiny_encoder, workers=0)
    ix = make_indexer(AppConfig(home=tmp_path / device, model="x"), _ReportsDevice(tiny_encoder, device),
                      workers=None, batch_size=3)
    overlap = device != "cpu"
    assert ix.executor._worker_count(overlap) == (max(1, usable_cores() - 1) if overlap else usable_cores())
    r0, r1 = ref.run([library]), ix.run([library])
    assert (r1.indexed, dict(r1.failed)) == (r0.indexed, dict(r0.failed)) and r1.indexed == 8
    s0, s1 = ref.catalog.spaces()[0].id, ix.catalog.spaces()[0].id
    v0, v1 = ref.catalog.vectors_for(s0, list(range(1, 20))), ix.catalog.vectors_for(s1, list(range(1, 20)))
    assert v0.keys() == v1.keys() and all(np.allclose(v0[i], v1[i], atol=1e-5) for i in v0)
