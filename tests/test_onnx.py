"""The ONNX Runtime backend: the torch-free tokenizer, export into the model cache, vectors equal to torch's in the
same embedding space, no torch once exported, damaged exports rebuilt, and the factory's backend choice."""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.onnx_cache import META_FILE, OnnxUnsupported, cache_root, pointer_path, source_key
from clipsearch.indexer.model.onnx_encoder import OnnxEncoder
from clipsearch.indexer.model.protocol import Encoder

from .conftest import DATA, TINY

MIN_COSINE = 0.9999
TEXTS = ["a photo of a dog", "", "  ", "A RED circle on GREEN grass!!", "café naïve Ærøskøbing 東京 日本語 🐶🐱👍🏽",
         "&amp; &lt;b&gt; don't you'll", "word " * 120, "x" * 300, "Привет мир", "a_b-c.d 3.14", "a photo of a cat."]


def _strings() -> list[str]:
    """Hand-picked hard cases and random unicode (ASCII, Latin-1 and beyond, CJK, emoji), some past the context."""
    rng = random.Random(0)
    out = TEXTS + ["\t\nnew\nlines\t", "Ｆｕｌｌｗｉｄｔｈ", "Ã©mojibake", "<start_of_text> hi <end_of_text>",
                   "\u200bzero width", "مرحبا بالعالم", "🇫🇷 flag", "ﬁ ligature", "I'M ALL CAPS", "1234567890"]
    ranges = [(32, 126), (160, 0x2FFF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(200):
        out.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 100))))
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float((a * b).sum(1).min())


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_bpe_tokenizer_gives_open_clip_token_ids() -> None:
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from clipsearch.indexer.model.tokenizer import BpeTokenizer

    texts = _strings()
    for context, clean in ((77, "lower"), (32, "lower"), (77, "whitespace"), (16, "canonicalize")):
        ours = BpeTokenizer(default_bpe(), context, clean)(texts)
        theirs = SimpleTokenizer(context_length=context, clean=clean)(texts).numpy()
        assert ours.dtype == np.int64 and ours.shape == (len(texts), context)
        assert np.array_equal(ours, theirs), (context, clean)
    assert (ours[:, -1] != 0).any()  # some texts were truncated, ending on the end-of-text token


def test_only_open_clips_bpe_tokenizer_is_exported() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    from clipsearch.indexer.model.onnx_export import tokenizer_settings

    assert tokenizer_settings(SimpleTokenizer(context_length=32)) == (32, "lower", [])
    with pytest.raises(OnnxUnsupported):
        tokenizer_settings(SimpleTokenizer(reduction_mask="simple"))  # random token dropping: not reproducible
    with pytest.raises(OnnxUnsupported):
        tokenizer_settings(object())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the module: each model is exported once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def demo(cache: Path) -> tuple[OnnxEncoder, object]:
    onnx = create_encoder("demo", "cpu", "onnx", cache)
    return onnx, create_encoder("demo", "cpu", "torch")


@pytest.fixture(scope="module")
def tiny_export(cache: Path) -> Path:
    """The tiny model's export folder (copied by tests that damage one)."""
    return OnnxEncoder(TINY, cache)._dir


def _check_equal(onnx: OnnxEncoder, torch_enc: object) -> None:
    assert isinstance(onnx, OnnxEncoder) and isinstance(onnx, Encoder) and type(torch_enc).__name__ == "TorchEncoder"
    assert onnx.space == torch_enc.space  # same key, label and dim: one index for both backends
    assert onnx.preprocess_spec == torch_enc.preprocess_spec
    assert onnx.logit_scale == pytest.approx(torch_enc.logit_scale)
    assert _cos(onnx.encode_texts(TEXTS), torch_enc.encode_texts(TEXTS)) >= MIN_COSINE
    assert _cos(onnx.encode_texts(TEXTS[:1]), torch_enc.encode_texts(TEXTS[:1])) >= MIN_COSINE
    size = onnx.preprocess_spec.size
    for n in (1, 3, 17):  # a dynamic batch axis, not one fixed by the export's example
        pix = _pixels(n, size, seed=n)
        assert _cos(onnx.encode_pixels(pix), torch_enc.encode_pixels(pix)) >= MIN_COSINE
    assert onnx.encode_texts([]).shape == (0, onnx.space.dim) and onnx.encode_pixels(_pixels(0, size)).shape[0] == 0


@pytest.mark.integration
def test_demo_on_onnx_equals_torch_in_the_same_space(demo) -> None:
    onnx, torch_enc = demo
    _check_equal(onnx, torch_enc)
    assert onnx.default_templates() == torch_enc.default_templates() and onnx.default_templates()
    img = Image.fromarray(_pixels(1, 90)[0])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert _cos(onnx.encode_image_bytes(buf.getvalue()), torch_enc.encode_image_bytes(buf.getvalue())) >= MIN_COSINE
    assert _cos(onnx.encode_images([img]), torch_enc.encode_images([img])) >= MIN_COSINE
    texts = [f"a photo of a {w}." for w in ("dog", "red circle", "blue square on sand")] * 100  # > one text batch
    assert _cos(onnx.encode_texts(texts), torch_enc.encode_texts(texts)) >= MIN_COSINE


@pytest.mark.integration
def test_export_lives_in_the_model_cache_keyed_by_space(demo, cache: Path) -> None:
    onnx, torch_enc = demo
    folder = cache_root(cache) / torch_enc.space.key
    assert onnx._dir == folder
    names = {p.name for p in folder.iterdir()}
    assert {"image.onnx", "text.onnx", "bpe_simple_vocab_16e6.txt.gz", META_FILE} <= names
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["space"] == {"key": torch_enc.space.key, "label": torch_enc.space.label, "dim": torch_enc.space.dim}
    assert pointer_path(cache_root(cache), source_key("demo")).read_text() == torch_enc.space.key
    again = OnnxEncoder("demo", cache)  # found, not exported again
    assert again._dir == folder and again.space == onnx.space


@pytest.mark.integration
def test_onnx_encoder_never_imports_torch_once_exported(demo, cache: Path) -> None:
    probe = ("import json, sys\nfrom clipsearch.indexer.model.factory import create_encoder\n"
             "import numpy as np\n"
             f"enc = create_encoder('demo', None, 'auto', {str(cache)!r})\n"
             "t = enc.encode_texts(['a red circle'])\n"
             "i = enc.encode_pixels(np.zeros((2, 64, 64, 3), np.uint8))\n"
             "print(json.dumps({'cls': type(enc).__name__, 'shapes': [t.shape, i.shape], 'torch': 'torch' in "
             "sys.modules, 'open_clip': 'open_clip' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"cls": "OnnxEncoder", "shapes": [[1, 128], [2, 128]], "torch": False, "open_clip": False}


@pytest.mark.integration
def test_text_tower_without_the_causal_shortcut(cache: Path, monkeypatch, capfd) -> None:
    """Towers the exact cut does not apply to are exported at the full context; vectors still equal torch's. The
    export prints nothing (the exporter's progress lines are library output)."""
    from clipsearch.indexer.model import onnx_export

    monkeypatch.setattr(onnx_export, "_causal_text_tower", lambda model: None)
    cfg = json.loads((DATA / "tiny-vit.json").read_text())
    cfg["custom_text"] = True  # CustomTextCLIP: another model class, so another space and export
    path = cache / "tiny-custom.json"
    path.write_text(json.dumps(cfg))
    spec = f"{path}:none"
    onnx = create_encoder(spec, "cpu", "onnx", cache / "static")
    assert not onnx._meta.text_dynamic_length
    assert capfd.readouterr().out == ""
    _check_equal(onnx, create_encoder(spec, "cpu", "torch"))


def _copy_cache(tiny_export: Path, tmp_path: Path) -> Path:
    """A private model cache holding the tiny model's export, to damage."""
    root = cache_root(tmp_path)
    shutil.copytree(tiny_export, root / tiny_export.name)
    shutil.copytree(tiny_export.parent / "sources", root / "sources")
    return root / tiny_export.name


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["flip", "delete", "meta"])
def test_damaged_export_is_rebuilt_never_run(tiny_export: Path, tmp_path: Path, damage: str, caplog) -> None:
    folder = _copy_cache(tiny_export, tmp_path)
    target = folder / "text.onnx"
    data = bytearray(target.read_bytes())
    if damage == "flip":  # same size: only the checksum can tell
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        meta = json.loads((folder / META_FILE).read_text())
        meta["logit_scale"] = 1.0  # an edit the per-field checksum catches
        (folder / META_FILE).write_text(json.dumps(meta))
    torch_enc = create_encoder(TINY, "cpu", "torch")
    with caplog.at_level(logging.WARNING):
        onnx = create_encoder(TINY, "cpu", "onnx", tmp_path)
        vec = onnx.encode_texts(TEXTS)
    assert _cos(vec, torch_enc.encode_texts(TEXTS)) >= MIN_COSINE and onnx.space == torch_enc.space
    assert onnx.logit_scale == pytest.approx(torch_enc.logit_scale)
    assert (folder / "text.onnx").read_bytes() == (tiny_export / "text.onnx").read_bytes()  # rebuilt in place
    assert any("ONNX" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_damage_that_cannot_be_rebuilt_is_one_line(tiny_export: Path, tmp_path: Path) -> None:
    from clipsearch.indexer.errors import ModelUnavailable
    from clipsearch.indexer.model.onnx_cache import ExportMeta

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    meta = ExportMeta.from_json((folder / META_FILE).read_text())
    (folder / "image.onnx").write_bytes(b"not a model")
    enc = OnnxEncoder.from_export(TINY, folder, meta)
    with pytest.raises(ModelUnavailable, match="checksum") as info:
        enc.encode_pixels(_pixels(1, enc.preprocess_spec.size))
    assert "\n" not in str(info.value)


@pytest.mark.integration
def test_limit_threads_rebuilds_sessions_with_the_same_vectors(tiny_export: Path, cache: Path) -> None:
    enc = OnnxEncoder(TINY, cache)
    before = enc.encode_texts(TEXTS)
    old = enc._threads
    restore = enc.limit_threads(1)
    assert enc._threads == 1 and (old == 1 or not enc._sessions)  # ONNX Runtime fixes threads per session
    assert np.allclose(enc.encode_texts(TEXTS), before, atol=1e-6)
    restore()
    assert enc._threads == old


def test_factory_rejects_bad_backends_and_devices() -> None:
    with pytest.raises(UsageError, match="unknown backend"):
        create_encoder("demo", "cpu", "tensorrt")
    with pytest.raises(UsageError, match="CPU only"):
        create_encoder("demo", "cuda", "onnx")


@pytest.mark.integration
def test_auto_falls_back_to_torch_with_a_log_line(tiny_export: Path, cache: Path, tmp_path: Path, monkeypatch,
                                                  caplog) -> None:
    import importlib.util

    from clipsearch.indexer.model import factory

    assert isinstance(create_encoder(TINY, "cpu", "auto", cache), OnnxEncoder)
    assert type(create_encoder(TINY, "cpu", "torch", cache)).__name__ == "TorchEncoder"
    root = cache_root(tmp_path)  # an export that failed before is recorded, so auto goes straight to torch
    marker = pointer_path(root, source_key(TINY)).with_suffix(".unsupported")
    marker.parent.mkdir(parents=True)
    marker.write_text("its tokenizer (HFTokenizer) is not open_clip's CLIP BPE tokenizer")
    with caplog.at_level(logging.WARNING):
        enc = create_encoder(TINY, "cpu", "auto", tmp_path)
    assert type(enc).__name__ == "TorchEncoder" and "HFTokenizer" in caplog.text
    with pytest.raises(OnnxUnsupported, match="HFTokenizer"):
        create_encoder(TINY, "cpu", "onnx", tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert factory._auto_backend("cpu") == "torch" and factory._auto_backend("cuda") == "torch"
    with pytest.raises(UsageError, match="onnxruntime"):
        create_encoder(TINY, "cpu", "onnx", cache)


@pytest.mark.integration
def test_a_failed_export_is_recorded_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from clipsearch.indexer.model import onnx_export

    def refuse(tokenizer):
        raise OnnxUnsupported("its tokenizer is not open_clip's")

    monkeypatch.setattr(onnx_export, "tokenizer_settings", refuse)
    with pytest.raises(OnnxUnsupported, match="cannot run on ONNX Runtime"):
        OnnxEncoder(TINY, tmp_path)
    assert pointer_path(cache_root(tmp_path), source_key(TINY)).with_suffix(".unsupported").is_file()
    assert not list(cache_root(tmp_path).glob(".tmp-*"))  # no half-written export left behind


def test_zero_shot_vocabulary_without_torch() -> None:
    """ImageNet names and templates for zero-shot on the ONNX backend come without importing open_clip or torch."""
    probe = ("import json, sys\nfrom clipsearch.indexer.model.zero_shot_data import imagenet_classnames as c, "
             "imagenet_templates as t\nprint(json.dumps([c(), t(), 'torch' in sys.modules or 'open_clip' in "
             "sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    names, templates, heavy = json.loads(out.stdout)
    from clipsearch.indexer.model.torch_encoder import imagenet_classnames, imagenet_templates

    assert (names, templates, heavy) == (imagenet_classnames(), imagenet_templates(), False)


@pytest.mark.slow
def test_vit_b_32_on_onnx_equals_torch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The issue's random-weight ViT-B-32 (fp32 files are ~600 MB, exported into a temporary cache)."""
    cache = tmp_path_factory.mktemp("vit-cache")
    spec = "ViT-B-32:none"
    onnx = create_encoder(spec, "cpu", "onnx", cache)
    _check_equal(onnx, create_encoder(spec, "cpu", "torch"))
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.integration
def test_a_checked_file_is_not_hashed_again_but_an_edit_is_caught(tiny_export: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The stat stamp saves re-hashing a 254 MB tower in every cold query; an edit that even restores the old
    mtime changes ctime, so it is still hashed and refused."""
    import os

    from clipsearch.indexer.model import onnx_cache
    from clipsearch.indexer.model.onnx_cache import ExportMeta, verify_files

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    meta = ExportMeta.from_json((folder / META_FILE).read_text())
    hashed: list[str] = []
    real = onnx_cache.file_sha256
    monkeypatch.setattr(onnx_cache, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    files = sorted(meta.files["text"])
    assert "text.onnx.data" in files  # the weights live in a side file ONNX Runtime maps
    assert verify_files(folder, meta, "text") is None and sorted(hashed) == files
    assert verify_files(folder, meta, "text") is None and sorted(hashed) == files  # stamped: not hashed again
    target = folder / "text.onnx.data"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    reason = verify_files(folder, meta, "text")
    assert reason is not None and "checksum" in reason and sorted(hashed) == [*files, "text.onnx.data"]


def test_texts_of_very_different_lengths_run_in_separate_batches() -> None:
    from clipsearch.indexer.model.onnx_encoder import length_batches

    assert length_batches([10] * 62 + [14], 256, 24) == [(0, 62), (62, 63)]  # not 62 rows padded by 4
    assert length_batches([10, 10, 11, 11], 256, 24) == [(0, 4)]  # padding cheaper than another run
    assert length_batches([5, 5, 5, 5, 5], 2, 24) == [(0, 2), (2, 4), (4, 5)]
    assert length_batches([], 256, 24) == []


@pytest.mark.integration
def test_mixed_length_texts_equal_their_one_by_one_vectors(tiny_export: Path, cache: Path) -> None:
    enc = OnnxEncoder(TINY, cache)
    texts = ["a dog"] * 30 + ["a photo of a very small dog sitting on a long sandy beach at sunset"] + ["x"]
    together = enc.encode_texts(texts)
    alone = np.vstack([enc.encode_texts([t]) for t in dict.fromkeys(texts)])
    np.testing.assert_allclose(together[[0, 30, 31]], alone, atol=1e-5)
