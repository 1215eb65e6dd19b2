"""SearchService with a deterministic fake encoder: ranking, combined queries, filters with top-k, cutoffs,
pagination, image→text, zero-shot and tagging. The integration twin is tests/test_search_integration.py."""

from __future__ import annotations

import csv
import json
from datetime import datetime

import numpy as np
import pytest

from clipsearch.indexer.errors import BadImage, EmptyLibrary, PhotoNotFound, UsageError
from clipsearch.indexer.storage.filters import PhotoFilter
from clipsearch.search.service import SearchService

from .fakes import FakeEncoder, populate

PHOTOS = (
    [(f"/p/beach/dog{i}.jpg", "dog beach sand", datetime(2020, 1, 1 + i)) for i in range(5)]
    + [(f"/p/park/dog{i}.jpg", "dog park grass", datetime(2021, 1, 1 + i)) for i in range(5)]
    + [(f"/p/beach/cat{i}.jpg", "cat beach sand", None) for i in range(5)]
    + [(f"/p/city/car{i}.jpg", "car street city", datetime(2022, 1, 1 + i)) for i in range(25)]
)


@pytest.fixture()
def svc(tmp_path) -> SearchService:
    cat, store = populate(tmp_path, PHOTOS)
    return SearchService(cat, store, FakeEncoder(), cache_dir=tmp_path / "cache")


def names(page) -> list[str]:
    return [h.path.split("/p/")[1] for h in page.hits]


def test_text_ranks_matching_photos_first(svc) -> None:
    page = svc.search("dog", k=10)
    assert all("dog" in n for n in names(page))
    assert [h.score for h in page.hits] == sorted((h.score for h in page.hits), reverse=True)
    assert page.hits[0].z > 1.5  # a quarter of this library is dogs, so 'dog' stands out by ~1.9 sigma
    assert svc.search("cat", k=1).hits[0].z > page.hits[0].z  # rarer concept, more unusual match


def test_combined_query_weights_and_negatives(svc) -> None:
    assert all(n.startswith("park/dog") for n in names(svc.search('"dog" - "beach"', k=5)))
    assert all(n.startswith("beach/dog") for n in names(svc.search('"dog" + "2:sand"', k=5)))
    dog_id = svc.search("dog park", k=1).hits[0].id
    assert all("dog" in n for n in names(svc.search(f'#{dog_id} - "park"', k=3)))


def test_filter_keeps_top_k(svc) -> None:
    page = svc.search("dog", k=20, filters=PhotoFilter(folder="/p/city"))
    assert len(page.hits) == 20 and all(n.startswith("city/") for n in names(page))
    page = svc.search("car", k=3, filters=PhotoFilter(after=datetime(2020, 1, 1), before=datetime(2021, 1, 1)))
    assert names(page) and all(n.startswith("beach/dog") for n in names(page))
    assert not svc.search("dog", filters=PhotoFilter(folder="/p/bea")).hits  # prefix means folder, not string


def test_strong_only_keeps_the_true_matches_and_counts_them(svc) -> None:
    page = svc.search("cat", k=40, strong=True)
    assert sorted(names(page)) == [f"beach/cat{i}.jpg" for i in range(5)]
    assert {h.relevance for h in page.hits} == {"strong"} and page.counts["strong"] == 5
    everything = svc.search("cat", k=40)
    assert [h.rank for h in everything.hits] == list(range(1, 41)) and everything.counts["strong"] == 5
    assert {h.relevance for h in everything.hits[5:]} <= {"possible", "weak"}
    assert not svc.search("a giraffe", k=40, strong=True).hits  # nothing in this library is one


def test_image_queries_keep_the_similarity_cutoff(svc) -> None:
    target = svc.search("cat", k=1).hits[0]
    page = svc.similar(target.id, k=40, strong=True)
    assert page.strong_cutoff is not None and all("cat" in n for n in names(page)[:4])
    assert page.counts is None and all(h.relevance is None for h in page.hits)


def test_pagination_and_date_sort(svc) -> None:
    p1, p2 = svc.search("car", k=10), svc.search("car", k=10, offset=10)
    assert p1.has_more and not set(names(p1)) & set(names(p2))
    assert names(p1) + names(p2) == names(svc.search("car", k=20))
    dated = svc.search("dog", k=10, sort="date")
    dates = [h.date for h in dated.hits]
    assert dates == sorted(dates, reverse=True)


def test_similar_by_id_excludes_itself(svc) -> None:
    target = svc.search("cat", k=1).hits[0]
    page = svc.similar(target.id, k=4)
    assert target.id not in [h.id for h in page.hits] and all("cat" in n for n in names(page))
    with pytest.raises(PhotoNotFound):
        svc.similar(99999)
    assert all("dog" in n for n in names(svc.similar(b"concept:dog beach sand", k=3)))
    with pytest.raises(BadImage):
        svc.similar(b"\x00not an image")


def test_describe_labels_and_text_collection(svc, tmp_path) -> None:
    ranked = svc.describe(b"concept:cat beach sand", labels="car,cat,dog", k=3)
    assert ranked[0].label == "cat"
    (tmp_path / "caps.txt").write_text("a cat on sand\na red car in the city\na dog in a park\n")
    assert svc.add_texts(str(tmp_path / "caps.txt"), "caps") == 3
    top = svc.describe(svc.search("car", k=1).hits[0].id, texts="caps", k=2)
    assert top[0].label == "a red car in the city" and len(top) == 2
    with pytest.raises(UsageError):
        svc.describe(b"concept:cat", labels=",,")


def test_classify_single_and_multi_label(svc) -> None:
    (single,) = svc.classify([b"concept:dog park grass"], "dog,cat,car", k=3)
    assert single.labels[0].label == "dog" and abs(sum(x.score for x in single.labels) - 1) < 1e-4
    (multi,) = svc.classify([b"concept:dog cat"], ["dog", "cat", "car"], multi_label=True, threshold=0.5)
    assert set(multi.chosen) == {"dog", "cat"}
    with pytest.raises(UsageError):
        svc.classify([b"concept:dog"], [])


def test_tagging_is_idempotent_undoable_filterable_and_exported(svc, tmp_path) -> None:
    preview = svc.tag("dog,cat,car", name="animals", dry_run=True)
    assert preview.written == 0 and svc.tags.label_sets() == {}
    assert preview.counts == {"dog": 10, "cat": 5, "car": 25} and len(preview.examples["cat"]) == 3
    first = svc.tag("dog,cat,car", name="animals")
    again = svc.tag("dog,cat,car", name="animals")
    assert first.written == again.written == 40 and svc.tags.label_sets() == {"animals": 40}
    page = svc.search("sand", k=20, filters=PhotoFilter(tags=("cat",)))
    assert sorted(names(page)) == [f"beach/cat{i}.jpg" for i in range(5)]
    assert "cat" in page.hits[0].tags
    assert svc.export_tags(str(tmp_path / "t.csv")) == 40
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert {r["label"] for r in rows} == {"dog", "cat", "car"}
    svc.export_tags(str(tmp_path / "t.json"))
    assert len(json.load(open(tmp_path / "t.json"))) == 40
    only_beach = svc.tag("dog,cat", name="beach", filters=PhotoFilter(folder="/p/beach"))
    assert only_beach.photos_considered == 10
    assert svc.remove_tags("animals") == 40 and svc.tags.label_sets() == {"beach": 10}


def test_empty_library_and_bad_arguments(tmp_path) -> None:
    cat, store = populate(tmp_path, [])
    svc = SearchService(cat, store, FakeEncoder())
    with pytest.raises(EmptyLibrary):
        svc.search("dog")
    (tmp_path / "x").mkdir()
    cat2, store2 = populate(tmp_path / "x", PHOTOS)
    svc2 = SearchService(cat2, store2, FakeEncoder())
    for bad in (dict(k=0), dict(offset=-1), dict(sort="random")):
        with pytest.raises(UsageError):
            svc2.search("dog", **bad)
    with pytest.raises(UsageError):
        svc2.search('"dog" +')
    with pytest.raises(UsageError, match="cancel"):
        svc2.search('"dog" - "dog"')


def test_tag_probabilities_match_the_reference_softmax_and_sigmoid() -> None:
    """The chunked tagging math (no probability matrix) gives exactly what the textbook formulas give."""
    from clipsearch.search.tagging import passing_labels
    from clipsearch.search.zeroshot import multi_label_probs, single_label_probs

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(500, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    labels = rng.normal(size=(7, 32)).astype(np.float32)
    labels /= np.linalg.norm(labels, axis=1, keepdims=True)
    thr = np.array([0.0, 0.3, 0.5, 0.7, 0.9, 1.0, 0.2], np.float32)
    rows, cols, probs = passing_labels(vecs, labels, thr, 30.0)
    ref = single_label_probs(vecs, labels, 30.0)
    best = ref.argmax(axis=1)
    want = np.nonzero(ref[np.arange(500), best] >= thr[best])[0]
    assert 0 < len(want) < 500  # the thresholds really cut
    assert rows.tolist() == want.tolist() and cols.tolist() == best[want].tolist()
    np.testing.assert_allclose(probs, ref[want, best[want]], rtol=1e-5)
    neutral = labels[0] + labels[1]
    neutral /= np.linalg.norm(neutral)
    thr[5] = 0.99  # 1.0 would differ only by float32 rounding (sigmoid < 1 but rounds to 1.0 in the reference)
    rows, cols, probs = passing_labels(vecs, labels, thr, 30.0, neutral)
    ref = multi_label_probs(vecs, labels, neutral, 30.0)
    want_r, want_c = np.nonzero(ref >= thr[None, :])
    got = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == set(zip(want_r.tolist(), want_c.tolist(), strict=True))
    np.testing.assert_allclose(probs, ref[rows, cols], rtol=1e-4)


@pytest.mark.parametrize("multi", [False, True])
def test_tag_scoring_on_a_thread_per_core_matches_one_pass(multi: bool) -> None:
    """Tagging scores a chunk's blocks on a thread pool; the rows, labels and probabilities are those of one
    serial pass, in the same order, across block boundaries (10,000 rows: three blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.search.tagging import _BLOCK, _score_blocks, passing_labels

    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(10_000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    labels = rng.normal(size=(9, 32)).astype(np.float32)
    labels /= np.linalg.norm(labels, axis=1, keepdims=True)
    thr = np.full(9, 0.4, np.float32)
    neutral = (labels[0] + labels[1]) / np.linalg.norm(labels[0] + labels[1]) if multi else None
    assert len(vecs) > 2 * _BLOCK
    with ThreadPoolExecutor(3) as pool:
        got = _score_blocks(pool.map, vecs, labels, thr, 30.0, neutral)
    want = passing_labels(vecs, labels, thr, 30.0, neutral)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert got[0].max() > 2 * _BLOCK  # rows of the last block carry their offset
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)


def test_tag_examples_are_each_labels_strongest_matches(tmp_path) -> None:
    photos = [("/p/a/dogcar.jpg", "dog car park", None), ("/p/a/dog.jpg", "dog", None),
              ("/p/a/doggrass.jpg", "dog grass", None), ("/p/a/car.jpg", "car", None)]
    cat, store = populate(tmp_path, photos)
    svc = SearchService(cat, store, FakeEncoder())
    preview = svc.tag("dog,car", name="x", threshold=0.0)
    assert preview.examples["dog"][0] == "/p/a/dog.jpg" and preview.examples["car"][0] == "/p/a/car.jpg"
    assert sum(preview.counts.values()) == preview.written == 4
    stored = {r.path: (r.label, r.score) for r in svc.tags.rows("x")}
    (expect,) = svc.classify([1], "dog,car", k=2)  # photo id 1 is dogcar.jpg: tags hold classify's probability
    assert stored["/p/a/dogcar.jpg"][0] == expect.labels[0].label
    assert abs(stored["/p/a/dogcar.jpg"][1] - expect.labels[0].score) < 1e-5


# --- labels and templates are text, never files (issue 12.1) ----------------------------------------------------
def test_labels_are_text_never_a_file(svc, tmp_path) -> None:
    from clipsearch.search.zeroshot import parse_labels

    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET\nother\n")
    assert [lab.name for lab in parse_labels(str(secret))] == [str(secret)]  # a path is a label like any other
    ranked = svc.describe(b"concept:cat", labels=str(secret), k=5)
    assert [r.label for r in ranked] == [str(secret)]
    (res,) = svc.classify([b"concept:cat"], f"{secret},cat", k=5)
    assert {x.label for x in res.labels} == {str(secret), "cat"}


def test_label_lists_are_cleaned_and_an_empty_one_is_one_line() -> None:
    from clipsearch.search.zeroshot import parse_labels

    assert [x.name for x in parse_labels("dog\n\n  cat \n# comment\ndog\n")] == ["dog", "cat"]
    assert [x.name for x in parse_labels(" dog, ,cat,dog ,")] == ["dog", "cat"]
    assert [x.name for x in parse_labels(["dog", "", " cat", "dog"])] == ["dog", "cat"]
    assert parse_labels("a dog, sitting\nred car=0.7")[1].threshold == pytest.approx(0.7)  # lines keep commas
    for empty in ("", " , ", "\n\n", [], ["  "]):
        with pytest.raises(UsageError, match="^the label list is empty$"):
            parse_labels(empty)
    with pytest.raises(UsageError, match="between 0 and 1"):
        parse_labels("dog=5,cat")


def test_read_label_and_template_files_for_the_cli(tmp_path) -> None:
    from clipsearch.search.zeroshot import read_label_file, read_template_file

    (tmp_path / "l.txt").write_text("\ufeffdog\n\n# pets\ncat, sitting\n")
    assert read_label_file(str(tmp_path / "l.txt")) == ["dog", "cat, sitting"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\n{} in the wild\n")
    assert read_template_file(str(tmp_path / "t.txt")) == ["a photo of a {}.", "{} in the wild"]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00x")
    (tmp_path / "bad.txt").write_text("a {x} photo of {}\n")
    cases = [(read_label_file, tmp_path / "missing.txt", "cannot read label file .*No such file"),
             (read_label_file, tmp_path, "cannot read label file"),
             (read_label_file, tmp_path / "bin.txt", "not UTF-8 text"),
             (read_template_file, tmp_path / "missing.txt", "cannot read template file"),
             (read_template_file, tmp_path / "bad.txt", "placeholder")]
    for fn, path, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            fn(str(path))
        assert "\n" not in str(err.value)


def test_templates_are_text_or_a_list(svc) -> None:
    ranked = svc.describe(b"concept:cat", labels="cat,car", templates="a photo of a {}.\n{} on sand\n")
    assert ranked[0].label == "cat"
    assert svc.describe(b"concept:cat", labels="cat,car", templates=["{}"])[0].label == "cat"
    for bad in ("no slot here", ["{} and {}"], ["{0} {name}"], []):
        with pytest.raises(UsageError, match="template"):
            svc.classify([b"concept:cat"], "cat,car", templates=bad)


# --- ranges checked in the service (issue 12.2) ------------------------------------------------------------------
def test_out_of_range_threshold_raises_before_any_tag_is_touched(svc) -> None:
    svc.tag("dog,cat,car", name="animals", threshold=0.0)
    before = svc.tags.label_sets()
    for bad in (5, 1.0001, -1, float("nan"), "high"):
        with pytest.raises(UsageError, match="between 0 and 1"):
            svc.tag("dog,cat", name="animals", threshold=bad)
        with pytest.raises(UsageError, match="between 0 and 1"):
            svc.classify([b"concept:dog"], "dog,cat", threshold=bad)
    with pytest.raises(UsageError, match="between 0 and 1"):
        svc.tag("dog=7,cat", name="animals")
    with pytest.raises(UsageError, match="label set name is empty"):
        svc.tag("dog,cat", name="  ")
    with pytest.raises(UsageError, match="empty"):
        svc.tag(" , ", name="animals")
    assert svc.tags.label_sets() == before == {"animals": 40}


def test_k_and_offset_are_checked_everywhere(svc) -> None:
    calls = [lambda k, o: svc.search("dog", k=k, offset=o), lambda k, o: svc.similar(1, k=k, offset=o)]
    for call in calls:
        for k, o, message in ((0, 0, "k must be between 1 and"), (10_001, 0, "k must be"), (-3, 0, "k must be"),
                              (5, -1, "offset must be 0 or more"), (2.5, 0, "k must be")):
            with pytest.raises(UsageError, match=message):
                call(k, o)
    with pytest.raises(UsageError, match="k must be"):
        svc.describe(b"concept:dog", labels="dog,cat", k=0)
    with pytest.raises(UsageError, match="k must be"):
        svc.classify([b"concept:dog"], "dog,cat", k=0)
    assert len(svc.search("dog", k=10_000).hits) == len(PHOTOS)


# --- front ends that must not read server files (allow_files=False) ---------------------------------------------
def test_without_files_queries_and_images_never_touch_the_disk(tmp_path) -> None:
    from clipsearch.search.query import parse_query
    from clipsearch.search.service import SearchOptions

    real = tmp_path / "real.jpg"
    real.write_bytes(b"concept:dog")
    assert parse_query(f'"cat" + {real}')[1].kind == "image"  # the CLI may name files
    errors = []
    for path in (real, tmp_path / "missing.jpg"):
        with pytest.raises(UsageError, match="cannot be used in a query") as err:
            parse_query(f'"cat" + {path}', allow_files=False)
        errors.append(str(err.value).replace(str(path), "P"))
    assert errors[0] == errors[1]  # the same answer whether the file exists or not
    cat, store = populate(tmp_path, PHOTOS)
    ui = SearchService(cat, store, FakeEncoder(), options=SearchOptions(allow_files=False))
    with pytest.raises(UsageError, match="cannot be used in a query"):
        ui.search(f'"dog" + {real}')
    assert ui.search('"dog" - #1', k=3).hits  # catalogued photos by id stay allowed
    assert ui.similar("#2", k=2).hits and ui.similar("2", k=2).hits
    for call in (lambda: ui.similar(str(real)), lambda: ui.describe(str(real), labels="dog"),
                 lambda: ui.classify([str(real)], "dog,cat"), lambda: ui.add_texts(str(real), "x"),
                 lambda: ui.export_tags(str(tmp_path / "t.csv"))):
        with pytest.raises(UsageError, match="server"):
            call()
    assert not (tmp_path / "t.csv").exists()


# --- Tagger, export and removal ------------------------------------------------------------------------------------
def test_tagger_works_from_its_parts_alone(tmp_path) -> None:
    """The Tagger gets what it uses (no SearchService): tag, preview, classify vectors."""
    from clipsearch.indexer.storage.annotations import TagStore
    from clipsearch.search.tagging import Tagger
    from clipsearch.search.zeroshot import LabelVectors

    from .fakes import concept

    cat, store = populate(tmp_path, PHOTOS)
    enc = FakeEncoder()
    sid = cat.ensure_space(enc.space.key, "fake", "fake", enc.space.dim)
    tagger = Tagger(enc, cat, store, TagStore(cat), LabelVectors(enc), lambda: cat.space(sid))
    done = tagger.tag("dog,cat,car", name="t")
    assert done.counts == {"dog": 10, "cat": 5, "car": 25} and done.written == 40
    (res,) = tagger.classify(concept("cat beach")[None], ["x"], ["dog", "cat"])
    assert res.source == "x" and res.chosen == ["cat"]


def test_tagging_module_does_not_import_the_service() -> None:
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "search" / "tagging.py"
    imported = {n.module or "" for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.endswith("service")}


def test_export_and_remove_need_no_encoder(svc, tmp_path) -> None:
    from clipsearch.search.tagging import export_tags, remove_tags, tags_document

    svc.tag("dog,cat,car", name="animals")
    assert export_tags(svc.catalog, str(tmp_path / "t.csv"), "animals") == 40
    assert len(list(csv.DictReader(open(tmp_path / "t.csv")))) == 40
    text, n = tags_document(svc.catalog, "json", "animals")
    assert n == 40 and len(json.loads(text)) == 40
    assert svc.tags_document("csv").count("\n") == 41  # header + rows, built in memory
    with pytest.raises(UsageError, match="cannot write .*No such file"):
        export_tags(svc.catalog, str(tmp_path / "missing" / "t.csv"))
    with pytest.raises(UsageError, match=r"\.csv or \.json"):
        export_tags(svc.catalog, str(tmp_path / "t.txt"))
    assert not list(tmp_path.glob("**/*.tmp*")) and not (tmp_path / "t.txt").exists()
    with pytest.raises(UsageError, match="empty"):
        remove_tags(svc.catalog, " ")
    assert remove_tags(svc.catalog, "animals") == 40 and svc.tags.label_sets() == {}


def test_tagging_only_confident_photos_uses_the_search_cutoff(svc) -> None:
    everything = svc.tag("cat, dog", "pets", threshold=0.0, dry_run=True)
    assert sum(everything.counts.values()) == 40  # single-label at threshold 0: every photo gets one of the two
    confident = svc.tag("cat, dog", "pets", threshold=0.0, strong_only=True)
    assert confident.counts["cat"] == 5 and 5 <= confident.counts["dog"] <= 10  # strong matches of each label
    rows = svc.tags.rows("pets")
    assert len(rows) == confident.written == sum(confident.counts.values())
    assert not [r for r in rows if "/car" in r.path]  # the cars are neither: no tag


def test_example_queries_photo_info_and_long_queries(svc) -> None:
    assert svc.example_queries() == [] or all(svc.search(q, k=5).counts["strong"] for q in svc.example_queries())
    hit = svc.search("cat", k=1).hits[0]
    info = svc.photo_info(hit.id)
    assert info.path == hit.path and info.format == "JPEG"
    with pytest.raises(PhotoNotFound):
        svc.photo_info(99999)
    with pytest.raises(UsageError, match="at most 1,000"):
        svc.search("dog " * 1000)
    assert svc.search("猫 " * 10, k=3).hits  # another script is searched like any text
