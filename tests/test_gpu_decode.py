"""JPEG pixels decoded by torchvision beside the model (indexer/ingest/gpu_decode.py), against the CPU decoder.

The tensor path runs here with device="cpu" (torchvision's libjpeg decoder): the same code as with nvjpeg on a GPU,
so every machine tests the probe, orientation, resize, batching and fallbacks. The `gpu` test repeats the
comparison on CUDA. Statuses and metadata must be identical to the CPU path's; pixels close enough that the
embeddings agree.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.executors import EmbedContext, EmbedTask, LocalExecutor
from clipsearch.indexer.ingest import gpu_decode
from clipsearch.indexer.ingest.decode import _TRANSPOSE, DecodeResult, PreprocessSpec, decode_file
from clipsearch.indexer.ingest.gpu_decode import PendingJpeg, TensorJpegDecoder, probe_file

from .conftest import TINY, make_photo

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

SPEC = PreprocessSpec(size=224)
SIZES_ORIENTATIONS = [((96, 72), o) for o in (1, 3, 6, 8)] + [((640, 480), o) for o in (1, 3, 6, 8)] + [
    ((481, 641), o) for o in (1, 6)] + [((4000, 3000), o) for o in (1, 6)]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112], exif[271], exif[272], exif[306] = orientation, "Canon", "EOS 5D", "2021:05:06 07:08:09"
    return exif


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Camera-like JPEGs: several sizes (a 12 MP one too), EXIF orientations, greyscale, bytes after EOI."""
    root = tmp_path_factory.mktemp("jpegs")
    out = [make_photo(root / f"{w}x{h}-o{o}.jpg", w + o, size=(w, h), exif=_exif(o), quality=90)
           for (w, h), o in SIZES_ORIENTATIONS]
    grey = root / "grey.jpg"
    Image.open(make_photo(root / "src.png", 7, size=(800, 600))).convert("L").save(grey, quality=90)
    motion = root / "motion.jpg"  # a phone's motion photo: a video appended after the JPEG's EOI
    motion.write_bytes(make_photo(root / "m.jpg", 8, size=(600, 800)).read_bytes() + b"\0\0\0\x18ftypmp42" * 50)
    return [*out, grey, motion]


def _meta(r: DecodeResult) -> DecodeResult:
    return replace(r, pixels=None)


def _same(a: DecodeResult, b: DecodeResult) -> bool:
    """Identical results, pixels included."""
    pixels_equal = (a.pixels is None and b.pixels is None) or (
        a.pixels is not None and b.pixels is not None and np.array_equal(a.pixels, b.pixels))
    return _meta(a) == _meta(b) and pixels_equal


def _tensor_path(paths: list[Path], spec: PreprocessSpec, device: str = "cpu") -> list[DecodeResult]:
    probes = [probe_file(p, spec) for p in paths]
    assert all(isinstance(p, PendingJpeg) for p in probes), [type(p).__name__ for p in probes]
    return TensorJpegDecoder(device, spec).decode(probes)


def _agree(va: np.ndarray, vb: np.ndarray) -> None:
    """Row i of `va` and of `vb` embed the same photo: centred cosine >= 0.99 on average, and each row's nearest
    neighbour in the other set is its own photo. Centred on `vb`'s mean: the tiny untrained model maps every photo
    close to one direction (raw cosines between different photos are ~0.99), which would hide any slip."""
    a, b = va - vb.mean(0), vb - vb.mean(0)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T
    assert np.diag(sim).mean() >= 0.99, np.diag(sim)
    assert np.array_equal(sim.argmax(axis=1), np.arange(len(sim))), sim.argmax(axis=1)


def _embed(encoder, results: list[DecodeResult]) -> np.ndarray:
    return encoder.encode_pixels(np.stack([r.pixels for r in results]))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_pillows_transpose_exactly(orientation: int) -> None:
    arr = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    want = np.asarray(im.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else im)
    got = gpu_decode._orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_tensor_path_records_what_the_cpu_path_records_and_embeds_alike(photos, tiny_encoder) -> None:
    for spec in (SPEC, tiny_encoder.preprocess_spec):
        cpu = [decode_file(p, spec) for p in photos]
        tensor = _tensor_path(photos, spec)  # one batch: every size together
        assert [_meta(r) for r in tensor] == [_meta(r) for r in cpu]  # status, hash, size, date, camera: exact
        for path, t, c in zip(photos, tensor, cpu, strict=True):
            assert t.pixels.shape == c.pixels.shape == (spec.size, spec.size, 3) and t.pixels.dtype == np.uint8
            assert np.abs(t.pixels.astype(int) - c.pixels.astype(int)).mean() < 3, path.name  # same orientation
    _agree(_embed(tiny_encoder, tensor), _embed(tiny_encoder, cpu))


@pytest.mark.parametrize("mode, interpolation", [("longest", "bicubic"), ("squash", "bilinear"),
                                                 ("shortest", "nearest"), ("shortest", "bilinear")])
def test_every_resize_mode_matches_the_cpu_path(photos, mode: str, interpolation: str) -> None:
    spec = PreprocessSpec(size=64, interpolation=interpolation, resize_mode=mode, fill_color=17)
    some = [p for p in photos if "4000" not in p.name]
    for path, t in zip(some, _tensor_path(some, spec), strict=True):
        c = decode_file(path, spec)
        assert _meta(t) == _meta(c)
        assert np.abs(t.pixels.astype(int) - c.pixels.astype(int)).mean() < 4, path.name


def test_files_the_tensor_path_does_not_take_get_the_cpu_paths_result(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "src.jpg", 1, size=(300, 200), quality=90)
    good = src.read_bytes()
    Image.open(src).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.open(src).save(tmp_path / "progressive.jpg", progressive=True)
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "no-eoi.jpg").write_bytes(good[:-2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    make_photo(tmp_path / "png.jpg", 2, fmt="PNG")
    cases = ["cmyk", "progressive", "truncated", "no-eoi", "empty", "text", "png"]
    for name in cases:
        path = tmp_path / f"{name}.jpg"
        probed = probe_file(path, SPEC)
        assert isinstance(probed, DecodeResult) and _same(probed, decode_file(path, SPEC)), name
    assert probe_file(tmp_path / "truncated.jpg", SPEC).status == "failed"
    assert _same(probe_file(tmp_path / "missing.jpg", SPEC), decode_file(tmp_path / "missing.jpg", SPEC))
    bomb = probe_file(src, SPEC, max_pixels=1000)
    assert bomb.status == "failed" and _same(bomb, decode_file(src, SPEC, max_pixels=1000))
    reuse = frozenset({decode_file(src, SPEC).content_hash})
    assert _same(probe_file(src, SPEC, reuse_hashes=reuse), decode_file(src, SPEC, reuse_hashes=reuse))


def test_a_jpeg_the_device_rejects_is_decoded_on_the_cpu(photos, monkeypatch) -> None:
    paths = photos[:3]
    bad = paths[1].read_bytes()
    real = gpu_decode._decode_jpegs
    calls: list[int] = []

    def picky(datas, device):
        calls.append(len(datas))
        if any(d == bad for d in datas):
            raise RuntimeError("Error while decoding JPEG images: nvjpeg status 6")
        return real(datas, device)

    monkeypatch.setattr(gpu_decode, "_decode_jpegs", picky)
    decoder = TensorJpegDecoder("cpu", SPEC)
    results = decoder.decode([probe_file(p, SPEC) for p in paths])
    assert calls == [3, 1, 1, 1]  # the batch, then one by one
    assert decoder.fallbacks == 1 and _same(results[1], decode_file(paths[1], SPEC))  # exactly the CPU path's
    assert all(_meta(r) == _meta(decode_file(p, SPEC)) for p, r in zip(paths, results, strict=True))


def test_decoding_is_chunked_by_decoded_pixels(photos, monkeypatch) -> None:
    some = [p for p in photos if "4000" not in p.name][:6]
    probes = [probe_file(p, SPEC) for p in some]
    whole = TensorJpegDecoder("cpu", SPEC).decode(probes)
    sizes: list[int] = []
    real = gpu_decode._decode_jpegs
    monkeypatch.setattr(gpu_decode, "_decode_jpegs", lambda datas, device: sizes.append(len(datas)) or real(datas,
                                                                                                             device))
    chunked = TensorJpegDecoder("cpu", SPEC, chunk_pixels=700 * 500).decode(probes)
    assert len(sizes) > 1 and sum(sizes) == len(probes)
    assert all(_same(a, b) for a, b in zip(whole, chunked, strict=True))


def test_modes_and_availability() -> None:
    assert gpu_decode.available("cpu")
    assert gpu_decode.decode_device("auto", "cpu") is None  # a CPU model keeps the CPU path
    assert gpu_decode.decode_device("off", "cuda") is None
    with pytest.raises(UsageError, match="gpu-decode"):
        gpu_decode.decode_device("sometimes", "cuda")
    with pytest.raises(UsageError, match="gpu-decode"):
        LocalExecutor(gpu_decode="sometimes")
    with pytest.raises(UsageError, match="not available"):
        gpu_decode.decode_device("on", "cpu")
    if not torch.cuda.is_available():
        assert not gpu_decode.available("cuda")
        assert gpu_decode.decode_device("auto", "cuda") is None  # the fallback: CPU decode workers
        with pytest.raises(UsageError, match="not available"):
            gpu_decode.decode_device("on", "cuda")


class _CudaLooking:
    """The tiny CPU encoder, claiming to run on CUDA: what the executor sees on a GPU box."""

    device = "cuda"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.space, self.preprocess_spec = inner.space, inner.preprocess_spec

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.inner.encode_pixels(pixels)


def _run_local(executor: LocalExecutor, paths: list[Path], encoder) -> dict[int, tuple[DecodeResult, np.ndarray]]:
    tasks = [EmbedTask(i, bytes(p)) for i, p in enumerate(paths)]
    ctx = EmbedContext(TINY, encoder.preprocess_spec, 100_000_000, frozenset(), batch_size=4)
    return {r.key: (r.decoded, r.vector) for batch in executor.run(tasks, ctx, lambda: encoder) for r in batch}


@pytest.fixture()
def mixed(photos, tmp_path: Path) -> list[Path]:
    """Small JPEGs of the module's set, plus a PNG and a truncated JPEG."""
    small = [p for p in photos if "4000" not in p.name]
    png = make_photo(tmp_path / "q.png", 3)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(small[0].read_bytes()[:500])
    return [*small, png, trunc]


def _count_decodes(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = TensorJpegDecoder.decode
    monkeypatch.setattr(TensorJpegDecoder, "decode", lambda self, items: seen.append(len(items)) or real(self, items))
    return seen


def test_local_engine_decodes_jpegs_beside_a_cuda_model(mixed, tiny_encoder, monkeypatch) -> None:
    """Workers probe (in a spawned process), the executor decodes pending JPEGs on the 'device' (CPU here)."""
    enc = _CudaLooking(tiny_encoder)
    cpu = _run_local(LocalExecutor(workers=0, gpu_decode="off"), mixed, enc)
    seen = _count_decodes(monkeypatch)
    monkeypatch.setattr(gpu_decode, "decode_device", lambda mode, device: None if mode == "off" else "cpu")
    tensor = _run_local(LocalExecutor(workers=1), mixed, enc)
    assert sum(seen) == len(mixed) - 2  # every JPEG but the truncated one, and not the PNG
    assert cpu.keys() == tensor.keys() == set(range(len(mixed)))
    assert [_meta(tensor[k][0]) for k in cpu] == [_meta(cpu[k][0]) for k in cpu]
    assert tensor[len(mixed) - 1][0].status == "failed" and tensor[len(mixed) - 1][1] is None
    embedded = [k for k in cpu if cpu[k][1] is not None]
    assert len(embedded) == len(mixed) - 1 and all(tensor[k][1] is not None for k in embedded)
    _agree(np.stack([tensor[k][1] for k in embedded]), np.stack([cpu[k][1] for k in embedded]))


def test_without_gpu_decode_the_local_engine_decodes_on_the_cpu(mixed, tiny_encoder, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine can decode on CUDA; the fallback is tested where it cannot")
    enc = _CudaLooking(tiny_encoder)
    seen = _count_decodes(monkeypatch)
    auto = _run_local(LocalExecutor(workers=0), mixed, enc)  # auto: available("cuda") is False here
    assert seen == []
    for k, path in enumerate(mixed):
        assert _same(auto[k][0], replace(decode_file(path, enc.preprocess_spec), pixels=None))


def _ray_batch(paths: list[Path]) -> dict[str, np.ndarray]:
    return {"key": np.arange(len(paths), dtype=np.int64), "path": np.array([bytes(p) for p in paths], object),
            "reuse": np.ones(len(paths), bool)}


def _actor_out(batch: dict, space_key: str, monkeypatch,
               decode_on: str | None) -> tuple[list[DecodeResult], np.ndarray, np.ndarray]:
    """An encode actor's output for `batch`, its JPEG decode device forced to `decode_on`."""
    from clipsearch.indexer import ray_stages

    monkeypatch.setattr(ray_stages, "decode_device", lambda mode, device: decode_on)
    out = ray_stages.EncodeActor(TINY, "cpu", "torch", None, space_key, gpu_decode="auto")(batch)
    return [pickle.loads(m) for m in out["meta"]], out["has_vector"], out["vector"]


def test_ray_stages_ship_jpeg_bytes_to_the_encode_actor(mixed, tiny_encoder, monkeypatch) -> None:
    """The Ray engine's two stages called in-process: shipped JPEGs are decoded by the actor (on its 'GPU', else
    on its CPU) and record what the decode task would have recorded."""
    from clipsearch.indexer.ray_stages import decode_batch

    spec, key = tiny_encoder.preprocess_spec, tiny_encoder.space.key
    plain = decode_batch(_ray_batch(mixed), spec, 100_000_000)
    shipped = decode_batch(_ray_batch(mixed), spec, 100_000_000, ship_jpeg=True)
    assert "jpeg" not in plain and int(shipped["has_jpeg"].sum()) == len(mixed) - 2
    assert not shipped["has_pixels"][shipped["has_jpeg"]].any()
    meta0, has0, vec0 = _actor_out(plain, key, monkeypatch, None)
    meta1, has1, vec1 = _actor_out(shipped, key, monkeypatch, "cpu")  # the tensor path
    meta2, has2, vec2 = _actor_out(shipped, key, monkeypatch, None)  # a node that cannot decode on its GPU
    assert meta0 == meta1 == meta2 and np.array_equal(has0, has1) and np.array_equal(has0, has2)
    assert np.array_equal(vec0, vec2)  # the actor's CPU fallback is the CPU decoder itself
    _agree(vec1[has0], vec0[has0])


@pytest.mark.gpu
def test_nvjpeg_on_cuda_records_what_the_cpu_path_records(photos, tiny_encoder) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU JPEG decoding is tested with device='cpu' above")
    assert gpu_decode.available("cuda"), "torchvision cannot decode JPEGs on this GPU (built without nvjpeg?)"
    assert gpu_decode.decode_device("auto", "cuda") == "cuda"
    for spec in (SPEC, tiny_encoder.preprocess_spec):
        cpu = [decode_file(p, spec) for p in photos]
        decoder = TensorJpegDecoder("cuda", spec)
        cuda = decoder.decode([probe_file(p, spec) for p in photos])
        assert decoder.fallbacks == 0
        assert [_meta(r) for r in cuda] == [_meta(r) for r in cpu]
        for path, g, c in zip(photos, cuda, cpu, strict=True):
            assert np.abs(g.pixels.astype(int) - c.pixels.astype(int)).mean() < 4, path.name
    _agree(_embed(tiny_encoder, cuda), _embed(tiny_encoder, cpu))


def test_cli_gpu_decode_on_without_a_gpu_is_one_line_and_nothing_is_lost(tmp_path: Path) -> None:
    """`--gpu-decode on` where the model runs on the CPU: a one-line usage error, the catalog untouched; `off`
    and the default index the same folder normally."""
    import json
    import os
    import subprocess
    import sys

    lib = tmp_path / "photos"
    for i in range(3):
        make_photo(lib / f"p{i}.jpg", i)
    home = tmp_path / "home"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipsearch", *args, "--home", str(home), "--model", TINY],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    r = cli("index", str(lib), "--gpu-decode", "on", "--device", "cpu")
    assert r.returncode == 2 and "--gpu-decode on" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("index", str(lib), "--gpu-decode", "off", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["indexed"] == 3, r.stderr
