"""The safe decoder: formats by content, every pixel mode to correct RGB, orientation, bad input as statuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.ingest import decode
from clipsearch.indexer.ingest.decode import PreprocessSpec, decode_bytes, decode_file, preprocess, sniff_format

SPEC = PreprocessSpec(size=32)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_each_allowed_format_decodes_and_is_sniffed(fmt: str) -> None:
    data = _bytes(Image.new("RGB", (40, 30), (200, 30, 30)), fmt)
    r = decode_bytes(data, SPEC)
    assert r.status == "indexed" and r.format == fmt and r.pixels.shape == (32, 32, 3)
    assert (r.width, r.height) == (40, 30)


def test_heic_and_avif_decode() -> None:
    import pillow_heif

    im = Image.new("RGB", (64, 48), (10, 200, 10))
    for fmt in ("HEIF", "AVIF"):
        data = _bytes(im, fmt, quality=90)
        r = decode_bytes(data, SPEC)
        assert r.status == "indexed", (fmt, r.reason)
        assert abs(int(r.pixels[..., 1].mean()) - 200) < 12
    assert pillow_heif is not None


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("P", (20, 20), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], palette=[0] * 3 + [255, 0, 0] + [0, 0, 255])
    r = decode_bytes(buf.getvalue(), SPEC)
    assert r.status == "indexed"


@pytest.mark.parametrize(
    "mode,make,expect",
    [
        ("RGBA", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),  # transparent → white
        ("LA", lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),  # pure red in CMYK
        ("1", lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)), (128, 128, 128)),
        ("P+transparency", None, (255, 255, 255)),
    ],
)
def test_every_mode_becomes_correct_rgb(mode, make, expect) -> None:
    if make is None:
        im = Image.new("P", (8, 8), 0)
        im.putpalette([0, 0, 0] * 256)
        im.info["transparency"] = 0
        data = _bytes(im, "PNG", transparency=0)
    else:
        im = make()
        data = _bytes(im, "TIFF" if mode == "CMYK" else "PNG")
    r = decode_bytes(data, SPEC)
    assert r.status == "indexed", r.reason
    assert np.abs(r.pixels.reshape(-1, 3).mean(0) - np.array(expect)).max() < 3


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)  # left half red, right half blue
    arr[:, 30:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored as-is; viewers rotate 90° clockwise
    r = decode_bytes(_bytes(im, "PNG", exif=exif), PreprocessSpec(size=30, resize_mode="squash"))
    upright = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270)  # what a viewer shows
    assert (r.width, r.height) == (30, 60)
    want = preprocess(upright, PreprocessSpec(size=30, resize_mode="squash")).astype(int)
    assert np.abs(r.pixels.astype(int) - want).mean() < 2
    assert r.pixels[0, :, 0].mean() > 200 and r.pixels[-1, :, 2].mean() > 200  # red on top, blue below


def test_bad_inputs_become_statuses(tmp_path) -> None:
    good = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert decode_bytes(b"", SPEC).status == "empty"
    assert decode_bytes(b"hello, not an image", SPEC).status == "unsupported"
    r = decode_bytes(good[: len(good) // 2], SPEC)
    assert r.status == "failed" and "truncated" in r.reason
    r = decode_bytes(good, SPEC, max_pixels=1000)
    assert r.status == "failed" and "bomb" in r.reason
    r = decode_file(tmp_path / "missing.jpg", SPEC)
    assert r.status == "failed" and r.reason.startswith("unreadable")


def test_sniffing_ignores_extensions() -> None:
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"<html>") is None


@pytest.mark.parametrize(
    "head, fmt",
    [
        (b"II+\x00\x08\x00\x00\x00", "TIFF"),  # BigTIFF, little- and big-endian
        (b"MM\x00+\x00\x08\x00\x00", "TIFF"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
        (b"\xff\x4f\xff\x51\x00\x2f", "JPEG2000"),
        (b"P6\n40 30\n255\n", "PPM"),
        (b"P1 4 4", "PPM"),
        (b"P7\nWIDTH 4", None),  # PAM: Pillow cannot read it
        (b"8BPS\x00\x01", "PSD"),
        (b"8BPS\x00\x02", None),  # PSB
        (b"\x00\x00\x01\x00\x01\x00", "ICO"),
        (b"\x00\x00\x02\x00\x01\x00", None),  # a cursor, not a picture
        (b"\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00(\x00\x1e\x00\x18 ", "TGA"),
        (b"\x00\x01\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00(\x00\x1e\x00\x18 ", None),  # colour map, no entry size
        (b"Hello, world! Here are my notes", None),
    ],
)
def test_sniffing_the_library_formats(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt


def test_decode_errors_carry_status_and_reason_across_processes() -> None:
    import pickle

    with pytest.raises(ValueError) as caught:  # callers that catch ValueError keep working
        decode.open_image(b"GIF89a" + bytes(20), max_pixels=1000)
    err = pickle.loads(pickle.dumps(caught.value))
    assert (err.status, err.reason) == (caught.value.status, caught.value.reason) and err.reason


def test_jpeg_draft_decodes_near_model_size() -> None:
    data = _bytes(Image.new("RGB", (4000, 3000), (9, 9, 9)), "JPEG")
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (224, 224))
    assert im.size[0] < 1000  # the DCT-scaled decode the indexer relies on
    r = decode_bytes(data, PreprocessSpec(size=224))
    assert r.status == "indexed" and (r.width, r.height) == (4000, 3000)


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth-ish colour gradients with noise: JPEG blocks that differ, so a scale or pixel slip shows."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.integers(0, 9, (h, w, 3)), axis=1).astype(np.uint8)


@pytest.mark.parametrize(
    "size, mode, save",
    [
        ((4000, 3000), "RGB", {}),  # camera-sized: 1/8 DCT scale
        ((999, 749), "RGB", {}),  # 1/2 scale with odd sides
        ((1001, 751), "RGB", {"progressive": True}),
        ((1200, 1600), "RGB", {"subsampling": 0}),  # 4:4:4, portrait, 1/4 scale
        ((1600, 1200), "L", {}),  # greyscale JPEG
        ((230, 900), "RGB", {}),  # too small to scale down
        ((40, 30), "RGB", {}),  # smaller than the model input
    ],
)
@pytest.mark.parametrize("orientation", range(1, 9))  # every EXIF orientation: the transpose table is ours
def test_fast_jpeg_path_gives_pillows_pixels(size, mode, save, orientation, monkeypatch) -> None:
    im = Image.fromarray(_textured(*size, seed=size[0])).convert(mode)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = _bytes(im, "JPEG", quality=90, exif=exif, **save)
    spec = PreprocessSpec(size=224)
    fast = decode_bytes(data, spec)
    monkeypatch.setattr(decode, "_FAST_JPEG", False)
    slow = decode_bytes(data, spec)
    assert fast.status == slow.status == "indexed"
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert np.array_equal(fast.pixels, slow.pixels)  # same scale, same upsampling, same orientation


def _fast(data: bytes, target: int) -> Image.Image | None:
    return decode._fast_jpeg(data, Image.open(io.BytesIO(data)), decode._header(Image.open(io.BytesIO(data))), target)


def test_fast_jpeg_path_defers_damage_and_cmyk_to_pillow(monkeypatch) -> None:
    rgb = _bytes(Image.fromarray(_textured(640, 480, seed=1)), "JPEG", quality=90)
    assert _fast(rgb, 224) is not None
    cut = rgb[: len(rgb) * 2 // 3]
    assert _fast(cut, 224) is None
    r = decode_bytes(cut, SPEC)
    assert r.status == "failed" and "truncated" in r.reason  # Pillow's reason, not a grey half-photo
    cmyk = _bytes(Image.fromarray(_textured(320, 240, seed=2)).convert("CMYK"), "JPEG")
    assert _fast(cmyk, 64) is None
    r = decode_bytes(cmyk, PreprocessSpec(size=64))
    monkeypatch.setattr(decode, "_FAST_JPEG", False)
    assert r.status == "indexed" and np.array_equal(r.pixels, decode_bytes(cmyk, PreprocessSpec(size=64)).pixels)
