"""JPEG pixels decoded on the model's device (nvjpeg through torchvision), everything else as the CPU decoder does.

On a GPU box the CPU decode of 12 MP camera JPEGs is the embed stage's bottleneck (clip-retrieval found the same:
"bottlenecked by resizing"). Here the work splits in two:

* `probe_bytes` / `probe_file` (CPU, torch-free, run by the decode workers): the same checks as
  `decode.decode_bytes` (empty file, content hash, reuse, sniffed format, bomb limit, EXIF date, camera, orientation,
  decoder messages) without decoding pixels. A plain baseline JPEG becomes a `PendingJpeg` (those facts plus its
  bytes); anything else (other formats, CMYK, progressive, Adobe RGB-transform or MPO JPEGs, a truncated scan, a
  bomb) is decoded right there by `decode.decode_bytes`, so its result is the CPU path's by construction.
* `TensorJpegDecoder.decode` (beside the model): batched `torchvision.io.decode_jpeg(list, device=...)`, then EXIF
  orientation and resize/crop to the PreprocessSpec on the same device, mirroring `decode.preprocess`. A JPEG the
  device decoder rejects is decoded by `decode.decode_bytes` instead, so its recorded result is the CPU path's.

The output is the CPU path's layout, (S, S, 3) uint8 numpy per photo: `Encoder.encode_pixels` (torch and ONNX
backends alike) stays as it is, and the device-to-host copy is S*S*3 bytes (150 KB at 224 px), under 1% of the
36 MB frame a 12 MP JPEG decodes to. Pixels differ slightly from the CPU path's (nvjpeg's colour conversion; one
antialiased resize from full resolution instead of a reduced-scale DCT decode then a resize), by design close enough
that embeddings agree (tests compare cosines). The same code runs with device="cpu" (torchvision's libjpeg decoder),
which is how the tests exercise it on machines without a GPU. torch and torchvision are imported only inside the
functions that decode, so the workers that probe never load them.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import (
    MAX_KEPT_MESSAGES,
    STATUS_REUSE,
    DecodeResult,
    PreprocessSpec,
    _draft_factor,
    _Header,
    _header,  # the CPU decoder's own header reader: the metadata cannot drift between the two paths
    content_hash,
    decode_bytes,
    decode_file,
    sniff_format,
)
from clipsearch.indexer.ingest.decoder_log import collect_messages
from clipsearch.indexer.status import PhotoStatus

log = logging.getLogger(__name__)
_decoder_log = logging.getLogger("clipsearch.indexer.ingest.decode")  # decoder messages go where decode.py logs them

GPU_DECODE_MODES = ("auto", "on", "off")  # auto: on the model's CUDA device when torchvision can; on: or an error
_CHUNK_PIXELS = 256_000_000  # decoded pixels per device call: ~0.8 GB of uint8 frames (about 20 12 MP photos)
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # a marker inside entropy-coded data (not stuffing, not a restart)
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class PendingJpeg:
    """A JPEG whose catalog facts the CPU has read and whose pixels a device decoder will produce."""

    result: DecodeResult  # status indexed, hash, size, EXIF facts, decoder messages; pixels None
    data: bytes  # the file's bytes, as hashed
    orientation: int  # EXIF orientation to apply after decoding (1 = upright)
    source: str = "<bytes>"  # file name for log lines (and for the CPU decoder, should the device refuse it)

    @property
    def stored_hw(self) -> tuple[int, int]:
        """(height, width) of the frame as stored in the file, before orientation."""
        w, h = self.result.width or 0, self.result.height or 0
        return (w, h) if self.orientation in (5, 6, 7, 8) else (h, w)


def _scan_complete(data: bytes) -> bool:
    """Whether the first scan's entropy-coded data ends in an EOI marker.

    A truncated file fails this (the CPU decoder then names the problem, as it would have), and so does anything
    with a second scan or fill bytes (left to the CPU as unusual). Bytes after EOI (a phone's appended motion-photo
    video, padding) do not matter: decoders stop at EOI.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows its header
            found = _MARKER.search(data, pos + 2 + length)
            return found is not None and found.group() == _EOI
        pos += 2 + length
    return False


def _pending_header(data: bytes, max_pixels: int) -> _Header | None:
    """The header of a JPEG a device decoder can take (baseline, YCbCr or grey, complete), else None."""
    try:
        im = Image.open(io.BytesIO(data), formats=["JPEG", "MPO"])
        w, h = im.size
        plain = im.format == "JPEG" and im.mode in ("RGB", "L") and not im.info.get("progressive")
        rgb_transform = im.info.get("adobe") is not None and im.info.get("adobe_transform") == 0
        if not plain or rgb_transform or w * h > max_pixels or not _scan_complete(data):
            return None
        return _header(im)
    except Exception:  # noqa: BLE001 - whatever it is, the CPU decoder decides (and gives the reason)
        return None


def probe_bytes(data: bytes, spec: PreprocessSpec, max_pixels: int = 100_000_000,
                reuse_hashes: frozenset[str] = frozenset(), *, source: str = "<bytes>") -> DecodeResult | PendingJpeg:
    """`decode.decode_bytes` without the pixels of a plain JPEG: those are left to a device decoder.

    Returns the CPU decoder's own DecodeResult for everything it does not hand over (never raises on bad input).
    """
    if sniff_format(data[:32]) != "JPEG":
        return decode_bytes(data, spec, max_pixels, reuse_hashes, source=source)
    digest = content_hash(data)
    if digest in reuse_hashes:
        return DecodeResult(STATUS_REUSE, content_hash=digest)
    with collect_messages() as collected:
        head = _pending_header(data, max_pixels)
    if head is None:
        return decode_bytes(data, spec, max_pixels, reuse_hashes, source=source)
    messages = list(dict.fromkeys(collected))  # as decode_bytes counts and logs them
    for text in messages:
        _decoder_log.debug("%s: %s", source, text)
    result = DecodeResult(PhotoStatus.INDEXED, None, digest, None, head.width, head.height, head.taken_at,
                          head.camera_make, head.camera_model, "JPEG", len(messages),
                          tuple(messages[:MAX_KEPT_MESSAGES]))
    return PendingJpeg(result, data, head.orientation, source)


def probe_file(path: str | bytes | Path, spec: PreprocessSpec, max_pixels: int = 100_000_000,
               reuse_hashes: frozenset[str] = frozenset()) -> DecodeResult | PendingJpeg:
    """`decode.decode_file` without the pixels of a plain JPEG (see `probe_bytes`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return decode_file(path, spec, max_pixels, reuse_hashes)  # the CPU decoder words the failure
    name = path if isinstance(path, bytes) else os.fsencode(path)
    return probe_bytes(data, spec, max_pixels, reuse_hashes, source=name.decode("utf-8", "backslashreplace"))


def probe_task(path: bytes, allow_reuse: bool = True) -> DecodeResult | PendingJpeg:
    """The decode workers' task when a device decodes JPEG pixels; settings as `workers.init_worker` stored them."""
    from clipsearch.indexer.ingest import workers

    w = workers._W  # the per-process settings the pool's initializer set (private: one package)
    return probe_file(path, w["spec"], w["max_pixels"], w["reuse"] if allow_reuse else frozenset())


def cpu_decode(item: PendingJpeg, spec: PreprocessSpec, max_pixels: int = 100_000_000) -> DecodeResult:
    """The CPU decoder's result for a pending JPEG: what a decode worker would have recorded (reuse was ruled out)."""
    return decode_bytes(item.data, spec, max_pixels, source=item.source)


def _decode_jpegs(datas: Sequence[bytes], device: str) -> list[Any]:
    """torchvision's batched decode (nvjpeg on CUDA, libjpeg on CPU): (3, H, W) uint8 tensors; raises if any fails."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image I/O on every call; the bytes are read-only
        warnings.simplefilter("ignore")
        encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


@functools.cache
def available(device: str = "cuda") -> bool:
    """Whether JPEGs can be decoded on `device` in this process: torchvision importable, CUDA present for a cuda
    device, and its decoder working (torchvision built without nvjpeg only says so when called, so one tiny JPEG
    is decoded, once per process and device)."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or a torch/torchvision mismatch that fails on import
        return False
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return False
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buf, "JPEG")
    try:
        frame = _decode_jpegs([buf.getvalue()], device)[0]
    except Exception as e:  # noqa: BLE001 - e.g. "torchvision not compiled with nvJPEG support"
        log.info("JPEG decoding on %s is not available: %s", device, " ".join(str(e).split())[:200])
        return False
    return tuple(frame.shape) == (3, 8, 16)


def decode_device(mode: str, encoder_device: str) -> str | None:
    """Where JPEG pixels are decoded: the encoder's CUDA device, or None for the CPU decoder.

    `auto` uses the device when the model runs on CUDA and torchvision can decode there; `on` the same, but a
    UsageError instead of the CPU decoder; `off` never. A model on the CPU never gains from it: the decode workers
    already use every core, and a full-resolution decode there costs more than the CPU path's reduced-scale one.
    """
    if mode not in GPU_DECODE_MODES:
        raise UsageError(f"--gpu-decode must be one of {', '.join(GPU_DECODE_MODES)} (got {mode!r})")
    device = str(encoder_device)
    if mode == "off":
        return None
    if device.startswith("cuda") and available(device):
        return device
    if mode == "on":
        raise UsageError(f"--gpu-decode on: JPEG decoding on the GPU is not available here (the model runs on "
                         f"{device}; it needs CUDA and torchvision built with nvjpeg)")
    return None


_TRANSPOSES = {  # EXIF orientation -> (transpose H and W, flip H, flip W) after the transpose; as decode._TRANSPOSE
    2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
    6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}


def _orient(frame: Any, orientation: int) -> Any:
    """A (C, H, W) frame made upright like PIL's exif_transpose (exact: only copies pixels)."""
    transpose, flip_h, flip_w = _TRANSPOSES.get(orientation, (False, False, False))
    if transpose:
        frame = frame.transpose(-1, -2)
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    return frame.flip(dims) if dims else frame


def _resize(x: Any, h: int, w: int, interpolation: str) -> Any:
    """(1, C, H, W) float to (h, w) with PIL's filters (torch's antialiased kernels follow Pillow's)."""
    import torch.nn.functional as F

    if interpolation == "nearest":
        return F.interpolate(x, size=(h, w), mode="nearest-exact")
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"
    return F.interpolate(x, size=(h, w), mode=mode, antialias=True, align_corners=False)


def _reduced(frame: Any, target: int) -> Any:
    """(1, C, h, w) float: the frame averaged down by the factor the CPU path's reduced-scale DCT decode uses.

    Block averaging stands in for libjpeg's DCT scaling (a low-pass of the same factor), so the resize that
    follows sees the size and roughly the spectrum the CPU path's does, and works on 1/64 of the pixels.
    """
    import torch.nn.functional as F

    x = frame.unsqueeze(0).float()
    factor = _draft_factor((x.shape[-1], x.shape[-2]), target)
    return F.avg_pool2d(x, factor, ceil_mode=True) if factor > 1 else x


def model_input(frame: Any, orientation: int, spec: PreprocessSpec) -> Any:
    """(3, H, W) uint8 as stored → (3, S, S) uint8 on the same device, as `decode.preprocess` makes it from the
    upright reduced-scale image (resize modes shortest, longest and squash; the same sizes and offsets)."""
    import torch

    x = _orient(_reduced(frame, spec.size), orientation)
    h, w = x.shape[-2:]
    size = spec.size
    if spec.resize_mode == "squash":
        out = _resize(x, size, size, spec.interpolation)
    elif spec.resize_mode == "longest":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = torch.full((1, 3, size, size), float(spec.fill_color), device=x.device)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[..., top : top + nh, left : left + nw] = _resize(x, nh, nw, spec.interpolation)
    else:  # shortest side to `size`, then centre crop
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (nw, nh) != (w, h):
            x = _resize(x, nh, nw, spec.interpolation)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        out = x[..., top : top + size, left : left + size]
    return out[0].round().clamp_(0, 255).to(torch.uint8)


def _chunks(items: Sequence[PendingJpeg], max_pixels: int) -> Iterator[list[int]]:
    """Indices of `items` in runs of at most `max_pixels` decoded pixels (at least one item each)."""
    run: list[int] = []
    total = 0
    for i, item in enumerate(items):
        pixels = (item.result.width or 0) * (item.result.height or 0)
        if run and total + pixels > max_pixels:
            yield run
            run, total = [], 0
        run.append(i)
        total += pixels
    if run:
        yield run


class TensorJpegDecoder:
    """Decodes PendingJpegs on one torch device into model inputs: the embed stage's decoder beside the model.

    `decode` returns one DecodeResult per item, in order, each with (S, S, 3) uint8 pixels; a JPEG the device
    refuses (or decodes to another size than its header said) gets the CPU decoder's result instead. `fallbacks`
    counts those, for a run's diagnostics.
    """

    def __init__(self, device: str, spec: PreprocessSpec, max_pixels: int = 100_000_000,
                 chunk_pixels: int = _CHUNK_PIXELS) -> None:
        self.device, self.spec, self.max_pixels, self.chunk_pixels = str(device), spec, max_pixels, chunk_pixels
        self.fallbacks = 0

    def decode(self, items: Sequence[PendingJpeg]) -> list[DecodeResult]:
        """Pixels for every item (device decode, else the CPU decoder's result for that file)."""
        out: list[DecodeResult | None] = [None] * len(items)
        for run in _chunks(items, self.chunk_pixels):
            for i, pixels in zip(run, self._inputs([items[i] for i in run]), strict=True):
                if pixels is not None:
                    out[i] = replace(items[i].result, pixels=pixels)
        return [r if r is not None else self._on_cpu(item) for r, item in zip(out, items, strict=True)]

    def _on_cpu(self, item: PendingJpeg) -> DecodeResult:
        self.fallbacks += 1
        return cpu_decode(item, self.spec, self.max_pixels)

    def _inputs(self, items: Sequence[PendingJpeg]) -> list[np.ndarray | None]:
        """Model inputs for a chunk, one host copy for all of them; None where the device decoder failed."""
        import torch

        with torch.inference_mode():
            made: dict[int, Any] = {}
            for i, (item, frame) in enumerate(zip(items, self._frames(items), strict=True)):
                if frame is None:
                    continue
                if tuple(frame.shape[1:]) != item.stored_hw:
                    log.debug("%s: decoded %s on %s, the header says %s; decoding on the CPU", item.source,
                              tuple(frame.shape[1:]), self.device, item.stored_hw)
                    continue
                made[i] = model_input(frame, item.orientation, self.spec)
            if not made:
                return [None] * len(items)
            host = torch.stack(list(made.values())).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        where = {i: k for k, i in enumerate(made)}
        return [host[where[i]] if i in where else None for i in range(len(items))]

    def _frames(self, items: Sequence[PendingJpeg]) -> list[Any | None]:
        """Decoded frames: the chunk in one call, else one by one (a batch with one bad JPEG returns nothing)."""
        try:
            return _decode_jpegs([item.data for item in items], self.device)
        except Exception as e:  # noqa: BLE001 - nvjpeg's complaints are RuntimeErrors with a status code
            if len(items) == 1:
                log.debug("%s: the %s JPEG decoder refused it (%s); decoding on the CPU", items[0].source,
                          self.device, _one_line(e))
                return [None]
        frames: list[Any | None] = []
        for item in items:
            frames.extend(self._frames([item]))
        return frames


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
