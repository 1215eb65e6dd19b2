"""The per-process text cache behind the relevance check: the same vectors as the encoder, each text encoded once."""

from __future__ import annotations

from typing import Any

import numpy as np

from clipsearch.search.relevance import Relevance, parse_vocab
from clipsearch.search.text_cache import TextVectors
from clipsearch.search.zeroshot import LabelVectors


def test_cached_vectors_equal_the_encoders_and_each_text_is_encoded_once(tiny_encoder: Any) -> None:
    cache = TextVectors(tiny_encoder, max_texts=3)
    texts = ["a red dog", "a red cat", "a red dog"]
    np.testing.assert_allclose(cache(texts), tiny_encoder.encode_texts(texts), atol=1e-6)
    assert cache.encoded == 2  # the repeat inside one call is not encoded twice
    cache(["a red cat", "a blue cat"])
    assert cache.encoded == 3
    cache(["a green cat", "a red dog"])  # holds 3: the least recently used ("a red dog"... was used) goes
    assert cache.encoded == 4 and cache(["a green cat"]).shape == (1, tiny_encoder.space.dim)
    assert cache.encoded == 4 and cache([]).shape == (0, tiny_encoder.space.dim)


def test_related_queries_share_their_contrasts(tiny_encoder: Any) -> None:
    vocab = parse_vocab("[colour]\nred\nblue\ngreen\n[thing]\ndog\ncat\ncar\n")
    rel = Relevance(tiny_encoder, vocab, LabelVectors(tiny_encoder))
    photos = tiny_encoder.encode_texts(["x", "y"])
    qvec = tiny_encoder.encode_texts(["a red dog"])[0]
    first = rel.probabilities(rel.plan("a red dog"), qvec, photos)
    n = rel.text_vectors.encoded
    assert n == 4  # a blue dog, a green dog, a red cat, a red car
    rel.probabilities(rel.plan("a red cat"), tiny_encoder.encode_texts(["a red cat"])[0], photos)
    assert rel.text_vectors.encoded == n + 3  # a blue cat, a green cat, a red dog: "a red car" is shared
    again = rel.probabilities(rel.plan("a red dog"), qvec, photos)
    assert rel.text_vectors.encoded == n + 3 and np.array_equal(first, again)


def test_a_large_group_is_embedded_once_whichever_entry_a_query_names(tiny_encoder: Any) -> None:
    """The alternatives of "a red dog" and "a red cat" come from one embedding of the whole group (it was once
    re-embedded for every entry a query named: ~6 s per new word with a 1,000-entry vocabulary)."""

    class Counting:
        def __init__(self) -> None:
            self.texts = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(tiny_encoder, name)

        def encode_texts(self, texts: list[str]) -> np.ndarray:
            self.texts += len(texts)
            return tiny_encoder.encode_texts(texts)

    enc = Counting()
    things = [f"thing{i}" for i in range(40)]
    vocab = parse_vocab("@alternatives 4\n[thing]\n" + "\n".join(things) + "\n")
    rel = Relevance(enc, vocab, LabelVectors(enc))
    photos = tiny_encoder.encode_texts(["x", "y", "z"])
    rel.plan("a thing1", photos)
    first = enc.texts
    assert first == 40  # the group, once
    plan = rel.plan("a thing7", photos)
    assert enc.texts == first and len(plan.contrasts) == 4 and "a thing7" not in plan.contrasts


def test_a_new_process_reads_the_texts_an_earlier_one_stored(tiny_encoder: Any, tmp_path) -> None:
    """A cold CLI query starts with an empty memory: its contrasts come from the disk store instead of the encoder,
    with the same vectors."""
    texts = ["a red dog", "a red cat", "a blue car"]
    first = TextVectors(tiny_encoder, disk_dir=tmp_path)
    want = first(texts)
    assert first.encoded == 3
    second = TextVectors(tiny_encoder, disk_dir=tmp_path)  # another process: nothing in memory
    np.testing.assert_array_equal(second(texts + ["a green car"]), np.vstack([want, tiny_encoder.encode_texts(
        ["a green car"])]))
    assert second.encoded == 1  # only the text never stored


def test_the_disk_store_keeps_its_newest_rows_and_a_broken_file_only_costs_encoding(tiny_encoder: Any,
                                                                                    tmp_path) -> None:
    from clipsearch.search.text_cache import DiskTexts

    cache = TextVectors(tiny_encoder, disk_dir=tmp_path)
    cache.disk = DiskTexts(tmp_path, tiny_encoder.space.key, tiny_encoder.space.dim, max_texts=2)
    cache(["one", "two"])
    cache(["three"])
    fresh = TextVectors(tiny_encoder, disk_dir=tmp_path)
    fresh(["one", "two", "three"])
    assert fresh.encoded == 1  # "one", the oldest, was dropped past 2 rows
    store = tmp_path / f"texts-{tiny_encoder.space.key}.sqlite3"
    for extra in store.parent.glob(store.name + "-*"):
        extra.unlink()
    store.write_bytes(b"not a database" * 100)
    broken = TextVectors(tiny_encoder, disk_dir=tmp_path)
    np.testing.assert_allclose(broken(["two"]), tiny_encoder.encode_texts(["two"]), atol=1e-6)
    assert broken.encoded == 1
