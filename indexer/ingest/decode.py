"""Safe image decoding: content-sniffed allowlist, bomb limit, EXIF orientation, any mode → RGB, model-size output.

This module is torch-free on purpose: it runs in decode worker processes (and for query images and UI uploads),
and returns the model's input as a small uint8 array so that pickling between processes stays cheap. The
normalisation (mean/std) happens on the embedding side.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipsearch.indexer.status import PhotoStatus

log = logging.getLogger(__name__)

try:  # HEIC/AVIF support is optional at import time so that a broken wheel does not take the app down
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the platform wheel
    HEIF_AVAILABLE = False

try:  # libjpeg-turbo called directly: the same pixels as Pillow's draft decode in ~12% less time
    import simplejpeg
except ImportError:  # pragma: no cover - an optional accelerator; Pillow decodes everything without it
    simplejpeg = None
_FAST_JPEG = True  # tests switch it off to compare the fast path with Pillow's own decoder

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure with a reason, not a half-grey photo

STATUS_REUSE = "reuse"  # content already embedded elsewhere (moved or duplicate file): no decode needed

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


@dataclass(frozen=True)
class PreprocessSpec:
    """How the model wants its input: mirrors open_clip's PreprocessCfg (size, interpolation, resize mode)."""

    size: int = 224  # square input side in pixels
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest
    resize_mode: str = "shortest"  # shortest (resize + centre crop) | longest (fit + pad) | squash
    fill_color: int = 0  # padding value for resize_mode="longest"


@dataclass(frozen=True)
class DecodeResult:
    """What a worker learnt about one file. `pixels` is (size, size, 3) uint8 when status is indexed."""

    status: str
    reason: str | None = None
    content_hash: str | None = None
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    format: str | None = None


def sniff_format(head: bytes) -> str | None:
    """Name of the image format from the first bytes, or None when it is not one we accept."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    return None


def content_hash(data: bytes) -> str:
    """Hash of the file's bytes: how a moved or renamed photo is recognised (and keeps its embedding)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _exif_metadata(im: Image.Image) -> tuple[datetime | None, str | None, str | None]:
    try:
        exif = im.getexif()
    except Exception:
        return None, None, None
    raw = exif.get_ifd(0x8769).get(36867) or exif.get(306)  # DateTimeOriginal, else DateTime
    taken = None
    if isinstance(raw, str):
        try:
            taken = datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:
            taken = None

    def text(tag: int) -> str | None:
        value = exif.get(tag)
        if value is None:
            return None
        return str(value).strip("\x00 ") or None

    return taken, text(271), text(272)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB, compositing transparency on white and scaling 16/32-bit greys correctly."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr, peak = arr - lo, max(hi - lo, 1e-12)
        grey = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _resample(name: str) -> Image.Resampling:
    return {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}.get(
        name, Image.Resampling.BICUBIC
    )


def preprocess(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize/crop like open_clip's eval transform; returns (size, size, 3) uint8."""
    size, resample = spec.size, _resample(spec.interpolation)
    w, h = im.size
    if spec.resize_mode == "squash":
        out = im.resize((size, size), resample)
    elif spec.resize_mode == "longest":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        fill = (spec.fill_color,) * 3
        out = Image.new("RGB", (size, size), fill)
        out.paste(im.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
    else:  # shortest side to `size`, then centre crop (torchvision Resize(int) + CenterCrop)
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), resample) if (nw, nh) != (w, h) else im
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        out = im.crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.uint8)


@dataclass(frozen=True)
class _Header:
    """What the file's header says, read before decoding (EXIF is lost once the image is transposed)."""

    width: int  # full-resolution size as displayed (swapped for EXIF orientations that rotate by 90 degrees)
    height: int
    taken_at: datetime | None
    camera_make: str | None
    camera_model: str | None
    orientation: int = 1  # EXIF orientation tag (1 = upright)


def _header(im: Image.Image) -> _Header:
    w, h = im.size
    try:
        taken, make, model = _exif_metadata(im)
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block costs its metadata, not the photo
        taken, make, model, orientation = None, None, None, 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return _Header(w, h, taken, make, model, orientation)


_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the photo upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _draft_factor(size: tuple[int, int], target: int) -> int:
    """The DCT scale-down Pillow's `draft` picks: the largest of 8, 4, 2, 1 that keeps both sides >= target."""
    fits = min(size[0] // target, size[1] // target)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _fast_jpeg(data: bytes, im: Image.Image, header: _Header, target: int) -> Image.Image | None:
    """Upright RGB through simplejpeg at Pillow's draft scale, or None to let Pillow decode (and explain) it.

    Decoding dominates indexing on a CPU: a 12 MP JPEG costs ~39 ms of a core this way even at 1/8 scale, almost
    all of it entropy decoding, and ~44 ms through Pillow (bench/RESULTS.md). Asking for the exact size Pillow's
    draft would produce makes the pixels identical (tested), so a library indexed either way embeds the same.
    CMYK and anything libjpeg reports as damaged take the Pillow path, which gives the failure its reason.
    """
    if simplejpeg is None or im.mode not in ("RGB", "L"):
        return None
    factor = _draft_factor(im.size, target)
    w, h = im.size
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=-(-w // factor), min_height=-(-h // factor), strict=True
        )
    except Exception:  # noqa: BLE001 - any complaint: Pillow decodes it again and names the problem
        return None
    rgb = Image.fromarray(pixels, "RGB")
    method = _TRANSPOSE.get(header.orientation)
    return rgb.transpose(method) if method is not None else rgb


def _open(data: bytes, max_pixels: int, draft_to: int | None) -> tuple[Image.Image, str, _Header]:
    """Open once: sniff, bomb-check, read the header, decode (JPEG at a reduced DCT scale), orient, RGB."""
    fmt = sniff_format(data[:32])
    if fmt is None:
        raise ValueError("unsupported: not an image format we accept (content sniffed)")
    if fmt in ("HEIF", "AVIF") and not HEIF_AVAILABLE:
        raise ValueError("unsupported: HEIC/AVIF support (pillow-heif) is not installed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"failed: decompression bomb ({w}x{h} exceeds the {max_pixels}-pixel limit)")
            header = _header(im)
            if fmt == "JPEG" and draft_to:
                fast = _fast_jpeg(data, im, header, draft_to) if _FAST_JPEG else None
                if fast is not None:
                    return fast, fmt, header
                im.draft("RGB", (draft_to, draft_to))
            im.seek(0)  # first frame of animations
            im.load()
            oriented = ImageOps.exif_transpose(im)
            return to_rgb(oriented if oriented is not None else im), fmt, header
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"failed: decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"failed: cannot identify image ({fmt} header but unreadable)") from e
    except (OSError, SyntaxError, EOFError, IndexError, TypeError) as e:
        msg = str(e) or type(e).__name__
        raise ValueError(f"failed: corrupt or truncated {fmt} ({msg})") from e


def open_image(data: bytes, max_pixels: int, draft_to: int | None = None) -> tuple[Image.Image, str]:
    """Open, bomb-check, orient and convert to RGB. Raises ValueError with a readable reason on bad input."""
    im, fmt, _ = _open(data, max_pixels, draft_to)
    return im, fmt


def decode_bytes(
    data: bytes, spec: PreprocessSpec, max_pixels: int = 100_000_000, reuse_hashes: frozenset[str] = frozenset()
) -> DecodeResult:
    """Decode one file's bytes into model input plus catalog metadata; never raises on bad input."""
    if not data:
        return DecodeResult(PhotoStatus.EMPTY, "zero-byte file")
    digest = content_hash(data)
    if digest in reuse_hashes:
        return DecodeResult(STATUS_REUSE, content_hash=digest)
    try:
        im, fmt, head = _open(data, max_pixels, draft_to=spec.size)
        pixels = preprocess(im, spec)
    except ValueError as e:
        status, _, reason = str(e).partition(": ")
        status = PhotoStatus.UNSUPPORTED if status == PhotoStatus.UNSUPPORTED else PhotoStatus.FAILED
        return DecodeResult(status, reason, content_hash=digest)
    except Exception as e:  # a decoder bug must not stop the run
        return DecodeResult(PhotoStatus.FAILED, f"decoder error: {type(e).__name__}: {e}", content_hash=digest)
    return DecodeResult(PhotoStatus.INDEXED, None, digest, pixels, head.width, head.height, head.taken_at,
                        head.camera_make, head.camera_model, fmt)


def decode_file(
    path: str | bytes | Path,
    spec: PreprocessSpec,
    max_pixels: int = 100_000_000,
    reuse_hashes: frozenset[str] = frozenset(),
) -> DecodeResult:
    """Read and decode a file; unreadable files become a failed result with the OS reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return DecodeResult(PhotoStatus.FAILED, f"unreadable: {e.strerror or e}")
    return decode_bytes(data, spec, max_pixels, reuse_hashes)


def load_display_image(path: str | bytes | Path, max_side: int, max_pixels: int = 100_000_000) -> Image.Image:
    """An upright RGB image no larger than `max_side`, for thumbnails. Raises ValueError on bad input."""
    with open(path, "rb") as f:
        data = f.read()
    im, _ = open_image(data, max_pixels, draft_to=max_side)
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im
