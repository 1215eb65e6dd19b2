"""Decoder messages to the log: Python warnings, Pillow's log records and libtiff's stderr lines, per file.

A hostile or merely old photo library makes Pillow and libtiff talk a lot (hundreds of "Possibly corrupt EXIF",
unknown TIFF tag and "Corrupt JPEG" lines in one run). Printed, they bury the run's own output and name no file.
Here each message is caught while one file decodes, so the decoder can log it at DEBUG with the file's name and
count it; the run then prints one total. Decoding runs in spawned worker processes as well as in-process (query
images, thumbnails), so the routing is installed lazily, once per process, by the first `collect_messages`.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

log = logging.getLogger("clipsearch.indexer.ingest.decode")  # the decoder's logger: one place to turn them up


class _Messages(threading.local):
    """Decoder messages of the file this thread is decoding (None: not decoding; messages go to the log)."""

    current: list[str] | None = None


_MESSAGES = _Messages()
_ROUTED: list[object] = []  # the libtiff callback, kept alive; non-empty once messages are routed in this process


def _note(source: str, text: str) -> None:
    """One message from a decoder library: kept with the file being decoded, or logged at DEBUG."""
    text = " ".join(text.split())[:300] or "(no text)"
    if _MESSAGES.current is None:
        log.debug("%s: %s", source, text)
    else:
        _MESSAGES.current.append(f"{source}: {text}")


class _PillowRelay(logging.Filter):
    """Pillow's logger warnings/errors become decoder messages; its DEBUG chatter goes on as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        _note(record.name, record.getMessage())
        return False


def _route_libtiff() -> None:
    """libtiff prints warnings and errors straight to the process's stderr: hand them to `_note` instead.

    Linux only (the loaded libtiff is found in /proc/self/maps, the same copy Pillow's decoder uses); elsewhere
    libtiff keeps its default handlers. The message is formatted with the C library's vsnprintf, whose va_list
    argument is a pointer on x86-64 and AArch64; on other CPUs the unformatted template is kept.
    """
    try:
        with open("/proc/self/maps") as maps:
            path = next((ln.split()[-1] for ln in maps if "/libtiff" in ln and ".so" in ln), None)
        if path is None:
            return
        tiff, libc = ctypes.CDLL(path), ctypes.CDLL(None)
    except OSError as e:
        log.debug("libtiff messages stay on stderr: %s", e)
        return
    formats = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    @ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
    def handler(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
        buf = ctypes.create_string_buffer(512)
        if formats and fmt:
            libc.vsnprintf(buf, len(buf), fmt, args)
        text = (buf.value or fmt or b"").decode("utf-8", "replace")
        _note(f"libtiff {(module or b'').decode('utf-8', 'replace')}".strip(), text)

    for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
        setter = getattr(tiff, name)
        setter.argtypes, setter.restype = [type(handler)], ctypes.c_void_p
        setter(handler)
    _ROUTED.append(handler)


_ROUTE_LOCK = threading.Lock()


def _route_decoder_messages() -> None:
    """Once per process (decode also runs in spawned workers): send Pillow's and libtiff's messages to `_note`."""
    with _ROUTE_LOCK:
        if _ROUTED:
            return
        Image.init()  # every plugin imported, so every Pillow logger exists
        relay = _PillowRelay()
        for name in list(logging.root.manager.loggerDict):
            if name == "PIL" or name.startswith("PIL."):
                logging.getLogger(name).addFilter(relay)
        _ROUTED.append(relay)
        _route_libtiff()


_DECODER_MODULES = r"(PIL|pillow_heif|clipsearch\.indexer\.ingest)(\.|$)"  # whose warnings count per file
_FILTERS: list[tuple[object, ...]] = []  # our two entries at the front of warnings.filters, once installed
_PREVIOUS_SHOW: list = [warnings.showwarning]  # where warnings from threads that are not decoding go
_IN_SHOW = threading.local()


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
    """`warnings.showwarning` while routed: the decoding thread keeps its warnings; other threads print as before.

    Thread-local on purpose: `warnings.catch_warnings` swaps process-wide state and, entered by two threads at
    once (thumbnails, query images), can leave every later warning of the process recorded into a dead list.
    """
    if _MESSAGES.current is not None:
        _MESSAGES.current.append(f"{category.__name__}: {' '.join(str(message).split())[:300]}")
        return
    if getattr(_IN_SHOW, "active", False):  # someone wrapped us and we wrapped them: break the loop
        return
    _IN_SHOW.active = True
    try:
        _PREVIOUS_SHOW[0](message, category, filename, lineno, file, line)
    finally:
        _IN_SHOW.active = False


def _ensure_python_route() -> None:
    """Cheap check on every decode: our showwarning and filters are in place (a test harness may have reset them).

    The filters: every warning from the decoder libraries is shown each time (so each file's count is right, not
    only the first occurrence in the process), and Pillow's DecompressionBombWarning is an error, which also
    covers pictures nested inside a file (an icon's PNG) that our own pixel limit does not see.
    """
    if warnings.showwarning is not _show:
        _PREVIOUS_SHOW[0] = warnings.showwarning
        warnings.showwarning = _show
    if warnings.filters[:2] != _FILTERS:
        warnings.filterwarnings("always", module=_DECODER_MODULES)
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _FILTERS[:] = warnings.filters[:2]


@contextmanager
def collect_messages() -> Iterator[list[str]]:
    """Collect every decoder message (Python warnings, Pillow log records, libtiff) this thread raises in the block.

    From the first call on, Pillow's DecompressionBombWarning is an error in this process (`_ensure_python_route`).
    """
    _route_decoder_messages()
    _ensure_python_route()
    outer, messages = _MESSAGES.current, []
    _MESSAGES.current = messages
    try:
        yield messages
    finally:
        _MESSAGES.current = outer
