"""Int8 models (`SPEC@int8`): their own embedding space, quantized once into the model cache from the fp32 ONNX
export, checked against it, rebuilt when damaged, ONNX Runtime on the CPU only, and indexed and searched end to end
through the CLI like any model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.errors import ModelUnavailable, UsageError
from clipsearch.indexer.model import onnx_quant
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.onnx_cache import META_FILE, ExportMeta, OnnxUnsupported, cache_root, pointer_path
from clipsearch.indexer.model.onnx_encoder import OnnxEncoder
from clipsearch.indexer.model.onnx_quant import MIN_COSINE, export_source, int8_space, split_quant

from .conftest import TINY

pytestmark = pytest.mark.integration

TINY8 = TINY + "@int8"
TEXTS = ["a photo of a dog", "", "A RED circle on GREEN grass!!", "café 東京 🐶", "word " * 100]


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cache() -> Path:
    """The session's model cache (conftest), so CLI subprocesses find the exports built here."""
    return Path(os.environ["CLIPSEARCH_MODEL_CACHE"])


@pytest.fixture(scope="module")
def pair(cache: Path) -> tuple[OnnxEncoder, OnnxEncoder]:
    """(int8, fp32) encoders of the tiny model."""
    int8 = create_encoder(TINY8, None, "auto", cache)
    return int8, create_encoder(TINY, "cpu", "onnx", cache)


def _copy_cache(pair: tuple[OnnxEncoder, OnnxEncoder], tmp_path: Path) -> Path:
    """A private model cache holding both exports and their pointers; returns the int8 folder."""
    root = cache_root(tmp_path)
    for enc in pair:
        shutil.copytree(enc.export_dir, root / enc.export_dir.name)
    shutil.copytree(pair[0].export_dir.parent / "sources", root / "sources")
    return root / pair[0].export_dir.name


def test_spec_suffix_and_space_identity() -> None:
    assert split_quant(" demo@int8 ") == ("demo", True) and split_quant("ViT-B-32:none") == ("ViT-B-32:none", False)
    assert export_source("demo@int8") == export_source("demo") + "-int8"
    from clipsearch.indexer.model.protocol import EmbeddingSpace

    base = EmbeddingSpace("0123456789abcdef", "ViT-B-32:none", 512)
    space = int8_space(base)
    assert space.key != base.key and len(space.key) == 16 and space == int8_space(base)
    assert space.label == "ViT-B-32:none@int8" and space.dim == 512


def test_int8_is_its_own_space_with_vectors_close_to_fp32(pair) -> None:
    int8, fp32 = pair
    assert isinstance(int8, OnnxEncoder) and int8.device == "cpu"
    assert int8.space == int8_space(fp32.space) and int8.space.key != fp32.space.key
    assert int8.preprocess_spec == fp32.preprocess_spec and int8.logit_scale == fp32.logit_scale
    assert int8.export_dir.name == int8.space.key and int8.export_meta.spec == TINY8
    assert int8.export_meta.cosine_checked >= MIN_COSINE
    pix = _pixels(5, int8.preprocess_spec.size)
    pairs = ((int8.encode_texts(TEXTS), fp32.encode_texts(TEXTS)), (int8.encode_pixels(pix), fp32.encode_pixels(pix)))
    for a, b in pairs:
        assert a.dtype == np.float32 and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert (a * b).sum(1).min() >= MIN_COSINE
        assert not np.allclose(a, b, atol=1e-6)  # really another graph
    files = json.loads((int8.export_dir / META_FILE).read_text())["files"]
    assert set(files) == {"image", "text", "vocab"} and "text.onnx.data" in files["text"]


def test_quantized_once_and_reused(pair, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_quant, "_build", lambda *a: pytest.fail("quantized again"))
    again = create_encoder(TINY8, "cpu", "onnx", cache)
    assert again.export_dir == pair[0].export_dir
    assert np.array_equal(again.encode_texts(TEXTS), pair[0].encode_texts(TEXTS))


def test_a_tower_where_int8_does_not_pay_stays_fp32(pair, tmp_path: Path, monkeypatch) -> None:
    """The rule (not a timing): towers with under half their weights in MatMul/Gather (a CNN) are copied as is."""
    folder = _copy_cache(pair, tmp_path)
    shutil.rmtree(folder)
    monkeypatch.setattr(onnx_quant, "_MIN_SHARE", 1.01)
    enc = create_encoder(TINY8, "cpu", "onnx", tmp_path)
    base = pair[1].export_dir
    assert (enc.export_dir / "image.onnx").read_bytes() == (base / "image.onnx").read_bytes()
    assert enc.space == pair[0].space  # the recipe, not the outcome, names the space


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_int8_file_is_quantized_again(pair, tmp_path: Path, damage: str, caplog) -> None:
    folder = _copy_cache(pair, tmp_path)
    target = folder / "text.onnx.data"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING):
        enc = create_encoder(TINY8, "cpu", "onnx", tmp_path)
        vec = enc.encode_texts(TEXTS)
    assert enc.space == pair[0].space and np.allclose(vec, pair[0].encode_texts(TEXTS), atol=1e-6)
    assert (folder / "text.onnx.data").read_bytes() == (pair[0].export_dir / "text.onnx.data").read_bytes()
    assert "int8" in caplog.text


def test_damage_that_cannot_be_rebuilt_is_one_line(pair, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(pair[0].export_dir, folder)
    (folder / "image.onnx").write_bytes(b"not a model")
    enc = OnnxEncoder.from_export(TINY8, folder, ExportMeta.from_json((folder / META_FILE).read_text()))
    with pytest.raises(ModelUnavailable, match="checksum") as info:
        enc.encode_pixels(_pixels(1, enc.preprocess_spec.size))
    assert "\n" not in str(info.value)


def test_a_quantization_too_far_from_fp32_is_refused_and_recorded(pair, tmp_path: Path, monkeypatch) -> None:
    folder = _copy_cache(pair, tmp_path)
    shutil.rmtree(folder)
    (tmp_path / "onnx" / "sources" / export_source(TINY8)).unlink()
    monkeypatch.setattr(onnx_quant, "MIN_COSINE", 1.5)
    with pytest.raises(OnnxUnsupported, match="int8 vectors differ too much") as info:
        create_encoder(TINY8, None, "auto", tmp_path)  # no torch fallback for an int8 model
    assert "\n" not in str(info.value) and not folder.exists()
    assert not list(cache_root(tmp_path).glob(".tmp-*"))
    assert pointer_path(cache_root(tmp_path), export_source(TINY8)).with_suffix(".unsupported").is_file()
    with pytest.raises(OnnxUnsupported, match="delete the file to retry"):
        create_encoder(TINY8, "cpu", "onnx", tmp_path)


def test_missing_quantization_tools_are_one_line(pair, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    shutil.rmtree(_copy_cache(pair, tmp_path))
    (tmp_path / "onnx" / "sources" / export_source(TINY8)).unlink()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime.quantization" else real(name, *a))
    with pytest.raises(UsageError, match="pip install onnxruntime onnx") as info:
        create_encoder(TINY8, "cpu", "onnx", tmp_path)
    assert "\n" not in str(info.value)


def test_int8_runs_on_onnx_runtime_on_the_cpu_only(pair, cache: Path, monkeypatch) -> None:
    from clipsearch.indexer.model import factory
    from clipsearch.indexer.model.torch_encoder import parse_spec

    monkeypatch.setattr(factory, "_cuda_available", lambda: True)  # auto picks ONNX on the CPU even so
    assert isinstance(create_encoder(TINY8, None, "auto", cache), OnnxEncoder)
    for device, backend in ((None, "torch"), ("cpu", "torch"), ("cuda", "auto"), ("cuda:1", "onnx")):
        with pytest.raises(UsageError, match="int8 models run on ONNX Runtime on the CPU") as info:
            create_encoder(TINY8, device, backend, cache)
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="cannot be loaded in torch"):  # training, captioners
        parse_spec("demo@int8")
    from clipsearch.indexer.model.explain import explainer_for

    with pytest.raises(UsageError, match="cannot be loaded in torch"):  # heatmaps: no fp32 stand-in, one line
        explainer_for(pair[0])


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "clipsearch", *args, "--home", str(home)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_index_and_search_an_int8_library_through_the_cli(pair, library: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = _cli("index", str(library), "--model", TINY8, "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["indexed"] == 8, r.stderr
    r = _cli("search", "a photo of a dog", "-k", "8", "--json", home=home)  # the model comes from the catalog
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    from clipsearch.indexer.storage.catalog import Catalog

    catalog = Catalog(f"sqlite:///{home / 'catalog.db'}")
    (space,) = catalog.spaces()
    assert (space.key, space.model_spec, space.count) == (pair[0].space.key, TINY8, 8)
    stored = catalog.vectors_for(space.id, [h["id"] for h in hits])
    query = pair[0].encode_texts(["a photo of a dog"])[0]  # scored with the int8 text tower
    assert len(hits) == 8 and all(h["score"] == pytest.approx(float(stored[h["id"]] @ query), abs=1e-5) for h in hits)
    for h in hits:  # and indexed with its image tower (a batch of 1 here: dynamic int8 rounds per batch)
        assert float(stored[h["id"]] @ pair[0].encode_image_bytes(Path(h["path"]).read_bytes())[0]) > 0.999
    r = _cli("search", "a dog", "--backend", "torch", home=home)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "int8 models run on ONNX Runtime on the CPU" in r.stderr
