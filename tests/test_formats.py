"""Every file is accounted for: each format Pillow decodes that a photo library holds is indexed (by content, not
extension), every other file is counted by extension, every failure says why, and decoder chatter goes to the log
(issue 12.5)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import struct
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from clipsearch.indexer.ingest import decode
from clipsearch.indexer.ingest.decode import PreprocessSpec, decode_bytes, decode_file
from clipsearch.indexer.ingest.scan import scan

SPEC = PreprocessSpec(size=32)
RED = (200, 30, 30)
W, H = 40, 30


def _photo(mode: str = "RGB", size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.new("RGB", size, RED).convert(mode)


def _psd(path: Path) -> None:
    """Pillow cannot write PSD: a minimal Photoshop v1 file by hand (RGB, 8 bit, raw composite, no layers)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, H, W, 8, 3)  # version, channels, height, width, depth, RGB
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layer and mask info: empty
    planes = np.asarray(_photo()).transpose(2, 0, 1).tobytes()  # planar R, G, B
    path.write_bytes(header + sections + struct.pack(">H", 0) + planes)  # compression 0: raw


def _mpo(path: Path) -> None:
    _photo().save(path, "MPO", save_all=True, append_images=[Image.new("RGB", (W, H), (0, 0, 255))])


def _saver(fmt: str, mode: str = "RGB", **kw) -> Callable[[Path], None]:
    return lambda path: _photo(mode).save(path, fmt, **kw)


# name on disk, how to write it, the format decode reports, whether the colour survives exactly (lossless, in colour)
FORMATS = [
    ("stereo.mpo", _mpo, "MPO", False),
    ("scan.jp2", _saver("JPEG2000"), "JPEG2000", False),
    ("scan.j2k", _saver("JPEG2000"), "JPEG2000", False),
    ("scan.jpf", _saver("JPEG2000"), "JPEG2000", False),
    ("raw.ppm", _saver("PPM"), "PPM", True),
    ("grey.pgm", _saver("PPM", "L"), "PPM", False),
    ("bits.pbm", _saver("PPM", "1"), "PPM", False),
    ("any.pnm", _saver("PPM"), "PPM", True),
    ("game.tga", _saver("TGA"), "TGA", True),
    ("rle.tga", _saver("TGA", compression="tga_rle"), "TGA", True),
    ("layered.psd", _psd, "PSD", True),
    ("big.tif", _saver("TIFF", big_tiff=True), "TIFF", True),
    ("anim.apng", _saver("PNG"), "PNG", True),
]


@pytest.mark.parametrize("name, write, fmt, exact", FORMATS, ids=[f[0] for f in FORMATS])
def test_each_library_format_is_indexed_with_its_size(tmp_path: Path, name, write, fmt, exact) -> None:
    path = tmp_path / name
    write(path)
    r = decode_file(path, SPEC)
    assert r.status == "indexed", r.reason
    assert (r.width, r.height, r.format) == (W, H, fmt)
    assert r.pixels.shape == (32, 32, 3)
    mean = r.pixels.reshape(-1, 3).mean(0)
    if exact:
        assert np.abs(mean - RED).max() < 1
    elif fmt in ("MPO", "JPEG2000"):
        assert np.abs(mean - RED).max() < 8  # lossy, and the MPO's first picture (red), not the second (blue)


def test_icons_are_indexed_at_their_largest_size(tmp_path: Path) -> None:
    path = tmp_path / "favicon.ico"
    _photo(size=(48, 48)).save(path, "ICO", sizes=[(16, 16), (48, 48)])
    r = decode_file(path, SPEC)
    assert (r.status, r.format, r.width, r.height) == ("indexed", "ICO", 48, 48)


def test_mpo_takes_the_fast_jpeg_path_with_pillows_pixels(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    first = Image.fromarray(np.cumsum(rng.integers(0, 9, (480, 640, 3)), axis=1).astype(np.uint8))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[first.rotate(90)])
    fast = decode_bytes(buf.getvalue(), PreprocessSpec(size=64))
    monkeypatch.setattr(decode, "_FAST_JPEG", False)
    slow = decode_bytes(buf.getvalue(), PreprocessSpec(size=64))
    assert fast.format == slow.format == "MPO"
    assert np.array_equal(fast.pixels, slow.pixels)


def test_format_is_decided_by_content_not_extension(tmp_path: Path) -> None:
    _saver("TGA")(tmp_path / "really-a-targa.png")
    (tmp_path / "fake.tga").write_bytes(b"just some notes, not a picture\n" * 4)
    (tmp_path / "fake.psd").write_bytes(b"8BPS\x00\x02" + bytes(40))  # PSB (large document): Pillow cannot read
    assert decode_file(tmp_path / "really-a-targa.png", SPEC).format == "TGA"
    for name in ("fake.tga", "fake.psd"):
        r = decode_file(tmp_path / name, SPEC)
        assert r.status == "unsupported" and r.reason


def test_every_failure_has_a_reason(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 * 1024 * 1024), zip=True)  # Pillow: a ValueError without ": " in its text
    buf = io.BytesIO()
    _photo().save(buf, "PNG", pnginfo=info)
    r = decode_bytes(buf.getvalue(), SPEC)
    assert r.status == "failed" and "MAX_TEXT_CHUNK" in r.reason
    for name, write, _, _ in FORMATS:  # every new format, cut short
        path = tmp_path / name
        write(path)
        data = path.read_bytes()
        for cut in (len(data) // 2, 20):
            r = decode_bytes(data[:cut], SPEC)
            assert r.status == "indexed" or r.reason, (name, cut, r)


def test_scan_counts_every_skipped_file_by_extension(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name, write, _, _ in FORMATS:
        write(root / "sub" / name)
    _saver("ICO")(root / "favicon.ico")
    for name in ("notes.txt", "data.xyz", "README", "sub/clip.MOV", "sub/more.mov", "v1.0 final", ".DS_Store"):
        (root / name).write_bytes(b"not a photo")
    found = scan([root], tmp_path / "home")
    assert sorted(Path(f.path.decode()).name for f in found.files) == sorted([f[0] for f in FORMATS] + ["favicon.ico"])
    assert found.skipped_by_ext == Counter({".txt": 1, ".xyz": 1, ".mov": 2, "": 3})


def _tiff_with_odd_tag(compression: str, tag_type: int, count: int) -> bytes:
    """A TIFF whose PlanarConfiguration entry is replaced by custom tag 40000 of the given type and count."""
    buf = io.BytesIO()
    _photo().save(buf, "TIFF", compression=compression)
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 284:
            data[entry : entry + 12] = struct.pack("<HHII", 40000, tag_type, count, 8)
    return bytes(data)


LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="libtiff's stderr is routed on Linux only")


@LINUX_ONLY
def test_decoder_chatter_goes_to_the_log_not_the_terminal(tmp_path: Path, capfd, caplog) -> None:
    noisy_libtiff = tmp_path / "lzw.tif"  # libtiff writes "TIFFFetchNormalTag: ..." to stderr by default
    noisy_libtiff.write_bytes(_tiff_with_odd_tag("tiff_lzw", 99, 1))
    noisy_pillow = tmp_path / "raw.tif"  # Pillow: UserWarning "Tag data larger than file"
    noisy_pillow.write_bytes(_tiff_with_odd_tag("raw", 2, 10**6))
    with caplog.at_level(logging.DEBUG, logger="clipsearch.indexer.ingest.decode"):
        results = [decode_file(p, SPEC) for p in (noisy_libtiff, noisy_pillow)]
    assert [r.status for r in results] == ["indexed", "indexed"]
    assert all(r.warnings >= 1 for r in results)
    assert "40000" in results[0].warning_messages[0] and "larger than file" in results[1].warning_messages[0]
    assert capfd.readouterr().err == ""
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "clipsearch.indexer.ingest.decode"]
    assert any(str(noisy_libtiff) in m and "40000" in m for m in logged)


@LINUX_ONLY
def test_decoder_chatter_is_counted_in_spawned_workers_too(tmp_path: Path, capfd) -> None:
    path = tmp_path / "lzw.tif"
    path.write_bytes(_tiff_with_odd_tag("tiff_lzw", 99, 1))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        r = pool.submit(decode_file, str(path), SPEC).result(timeout=120)
    assert r.status == "indexed" and r.warnings >= 1
    assert capfd.readouterr().err == ""


def test_each_thread_counts_only_its_own_files_chatter(tmp_path: Path) -> None:
    noisy, clean = tmp_path / "noisy.tif", tmp_path / "clean.png"
    noisy.write_bytes(_tiff_with_odd_tag("raw", 2, 10**6))
    _photo().save(clean)
    paths = [noisy, clean] * 40
    with ThreadPoolExecutor(4) as pool:  # query images and thumbnails decode on threads
        results = list(pool.map(lambda p: decode_file(p, SPEC), paths))
    assert all(r.status == "indexed" for r in results)
    assert [r.warnings > 0 for r in results] == [p == noisy for p in paths]
