"""Safe image decoding: content-sniffed allowlist, bomb limit, EXIF orientation, any mode → RGB, model-size output.

This module is torch-free on purpose: it runs in decode worker processes (and for query images and UI uploads),
and returns the model's input as a small uint8 array so that pickling between processes stays cheap. The
normalisation (mean/std) happens on the embedding side.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipsearch.indexer.ingest.decoder_log import collect_messages
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

IMAGE_EXTENSIONS = frozenset(  # scan's candidates; the content decides what a file really is (sniff_format)
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".gif", ".tif", ".tiff", ".bmp",
     ".heic", ".heif", ".avif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".ppm", ".pgm", ".pbm", ".pnm",
     ".tga", ".icb", ".vda", ".vst", ".psd", ".ico"}
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_PIL_FORMATS = {"JPEG": ["JPEG", "MPO"], "AVIF": ["AVIF", "HEIF"]}  # else the sniffed name is Pillow's own
MAX_KEPT_MESSAGES = 5  # decoder messages kept per file in DecodeResult (all of them are counted)


class DecodeError(ValueError):
    """A file we refuse or cannot decode: `status` (unsupported | failed) and a non-empty, readable `reason`."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:  # picklable across worker processes
        return DecodeError, (self.status, self.reason)


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
    warnings: int = 0  # distinct decoder messages routed to the log instead of stderr (the run prints one total)
    warning_messages: tuple[str, ...] = ()  # the first MAX_KEPT_MESSAGES of them, for the parent process's log


def _is_tga(head: bytes) -> bool:
    """Targa has no magic number: accept only a header whose fields are all ones Pillow's reader supports."""
    if len(head) < 18:
        return False
    cmap, kind, entry_bits, depth, flags = head[1], head[2], head[7], head[16], head[17]
    return (
        cmap in (0, 1)
        and kind in (1, 2, 3, 9, 10, 11)
        and (kind not in (1, 9) or cmap == 1)  # colour-mapped kinds need a colour map
        and (cmap == 0 or entry_bits in (15, 16, 24, 32))
        and head[12:14] != b"\0\0" and head[14:16] != b"\0\0"  # width, height > 0
        and depth in (1, 8, 16, 24, 32)
        and flags & 0xC0 == 0  # reserved interleave bits
    )


def sniff_format(head: bytes) -> str | None:
    """Name of the image format from the first bytes, or None when it is not one we accept.

    An allowlist decided by content, never by extension: a renamed file is still what it is, and Pillow's many
    rarely-used decoders (FLI, SPIDER, EPS, ...) are never reached by a hostile file.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"  # MPO (multi-picture JPEG) too: reported as MPO once opened
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic TIFF and BigTIFF
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):  # JP2 box, J2K codestream
        return "JPEG2000"
    if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and head[2:3].isspace():
        return "PPM"  # PBM, PGM, PPM (ASCII and binary)
    if head[:6] == b"8BPS\x00\x01":  # Photoshop version 1 (PSB, version 2, Pillow cannot read)
        return "PSD"
    if head[:4] == b"\x00\x00\x01\x00" and head[4:6] != b"\x00\x00":  # Windows icon with at least one image
        return "ICO"
    if _is_tga(head):
        return "TGA"
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


def _why(e: BaseException) -> str:
    """An exception's text for a reason; never empty (some Pillow errors have no message)."""
    return " ".join(str(e).split()) or type(e).__name__


def _open(data: bytes, max_pixels: int, draft_to: int | None) -> tuple[Image.Image, str, _Header]:
    """Open once: sniff, bomb-check, read the header, decode (JPEG at a reduced DCT scale), orient, RGB."""
    fmt = sniff_format(data[:32])
    if fmt is None:
        raise DecodeError(PhotoStatus.UNSUPPORTED, "not an image format we accept (content sniffed)")
    if fmt in ("HEIF", "AVIF") and not HEIF_AVAILABLE:
        raise DecodeError(PhotoStatus.UNSUPPORTED, "HEIC/AVIF support (pillow-heif) is not installed")
    try:  # inside collect_messages: Pillow's DecompressionBombWarning is raised as an error
        im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(fmt, [fmt]))
        fmt = "MPO" if im.format == "MPO" else fmt
        w, h = im.size
        if w * h > max_pixels:
            limit = f"decompression bomb ({w}x{h} exceeds the {max_pixels}-pixel limit)"
            raise DecodeError(PhotoStatus.FAILED, limit)
        header = _header(im)
        if fmt in ("JPEG", "MPO") and draft_to:
            fast = _fast_jpeg(data, im, header, draft_to) if _FAST_JPEG else None
            if fast is not None:
                return fast, fmt, header
            im.draft("RGB", (draft_to, draft_to))
        if fmt != "PSD":  # first frame of animations; a PSD opens on its composite (layers are frames 1..n)
            im.seek(0)
        im.load()
        oriented = ImageOps.exif_transpose(im)
        return to_rgb(oriented if oriented is not None else im), fmt, header
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(PhotoStatus.FAILED, f"decompression bomb ({_why(e)})") from e
    except UnidentifiedImageError as e:
        raise DecodeError(PhotoStatus.FAILED, f"cannot identify image ({fmt} header but unreadable)") from e
    except (OSError, SyntaxError, EOFError, IndexError, TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise DecodeError(PhotoStatus.FAILED, f"corrupt or truncated {fmt} ({_why(e)})") from e


def open_image(data: bytes, max_pixels: int, draft_to: int | None = None) -> tuple[Image.Image, str]:
    """Open, bomb-check, orient and convert to RGB. Raises DecodeError (a ValueError) with a reason on bad input."""
    with collect_messages() as messages:
        im, fmt, _ = _open(data, max_pixels, draft_to)
    for text in messages:
        log.debug("decoder: %s", text)
    return im, fmt


def _decode(data: bytes, spec: PreprocessSpec, max_pixels: int, reuse_hashes: frozenset[str]) -> DecodeResult:
    if not data:
        return DecodeResult(PhotoStatus.EMPTY, "zero-byte file")
    digest = content_hash(data)
    if digest in reuse_hashes:
        return DecodeResult(STATUS_REUSE, content_hash=digest)
    try:
        im, fmt, head = _open(data, max_pixels, draft_to=spec.size)
        pixels = preprocess(im, spec)
    except DecodeError as e:
        return DecodeResult(e.status, e.reason, content_hash=digest)
    except Exception as e:  # noqa: BLE001 - a decoder bug must not stop the run
        return DecodeResult(PhotoStatus.FAILED, f"decoder error: {type(e).__name__}: {_why(e)}", content_hash=digest)
    return DecodeResult(PhotoStatus.INDEXED, None, digest, pixels, head.width, head.height, head.taken_at,
                        head.camera_make, head.camera_model, fmt)


def decode_bytes(
    data: bytes,
    spec: PreprocessSpec,
    max_pixels: int = 100_000_000,
    reuse_hashes: frozenset[str] = frozenset(),
    *,
    source: str = "<bytes>",
) -> DecodeResult:
    """Decode one file's bytes into model input plus catalog metadata; never raises on bad input.

    Whatever the decoders say on the way (Python warnings, Pillow log records, libtiff's stderr lines) is logged
    at DEBUG under `source` and counted in `warnings`, so that a run shows one total instead of a flood.
    """
    with collect_messages() as collected:
        result = _decode(data, spec, max_pixels, reuse_hashes)
    if not collected:
        return result
    messages = list(dict.fromkeys(collected))  # Pillow reads some headers twice: one message per cause
    for text in messages:
        log.debug("%s: %s", source, text)
    return replace(result, warnings=len(messages), warning_messages=tuple(messages[:MAX_KEPT_MESSAGES]))


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
        return DecodeResult(PhotoStatus.FAILED, f"unreadable: {e.strerror or _why(e)}")
    name = path if isinstance(path, bytes) else os.fsencode(path)  # any file name, printable in any log file
    return decode_bytes(data, spec, max_pixels, reuse_hashes, source=name.decode("utf-8", "backslashreplace"))


def load_display_image(path: str | bytes | Path, max_side: int, max_pixels: int = 100_000_000) -> Image.Image:
    """An upright RGB image no larger than `max_side`, for thumbnails. Raises ValueError on bad input."""
    with open(path, "rb") as f:
        data = f.read()
    im, _ = open_image(data, max_pixels, draft_to=max_side)
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im
