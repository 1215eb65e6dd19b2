"""Graceful stop: SIGTERM or SIGINT asks a long run to end after the batch in flight; a second one interrupts.

The CLI installs the handlers; the pipeline (and the tagger) check `stop_requested()` between batches, so what
was committed stays committed and a re-run resumes. Library code never installs handlers itself.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_stop = threading.Event()


def request_stop() -> None:
    """Ask running work to end at its next batch boundary."""
    _stop.set()


def stop_requested() -> bool:
    """True once a stop was asked for (checked between batches)."""
    return _stop.is_set()


def reset() -> None:
    """Forget a previous request (tests, and long-lived processes between runs)."""
    _stop.clear()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _stop.is_set():  # the second signal: stop now
        raise KeyboardInterrupt
    _stop.set()


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT request a graceful stop; a second one raises KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
