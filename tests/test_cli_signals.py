"""`clipsearch ui` takes its Streamlit server with it: SIGTERM or SIGINT to the CLI process alone (not its group)
stops the server, and on Linux so does a SIGKILL (parent-death signal), so nothing is left answering on the port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import _free_port
from .test_cli_options import _env

pytestmark = pytest.mark.integration


def _answers(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status == 200
    except OSError:
        return False


def _start_ui(home: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipsearch", "ui", "--home", str(home), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)  # its own group: only our cleanup may signal the group
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _answers(port):
        time.sleep(0.3)
    assert _answers(port), proc.communicate(timeout=30)[0] if proc.poll() is not None else "the UI did not answer"
    return proc


def _stops_answering(port: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _answers(port):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_cli_stops_the_streamlit_server(sig: signal.Signals, tmp_path: Path) -> None:
    port = _free_port()
    proc = _start_ui(tmp_path / "home", port)
    try:
        os.kill(proc.pid, sig)  # the CLI process only, as a service manager or `kill PID` would
        assert _stops_answering(port, within=10), "the Streamlit server still answers after the CLI was stopped"
        out = proc.communicate(timeout=30)[0]
    finally:
        _kill_group(proc)
    assert proc.returncode == 128 + sig, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_sigkill_of_the_cli_takes_the_streamlit_server_down_too(tmp_path: Path) -> None:
    port = _free_port()
    proc = _start_ui(tmp_path / "home", port)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert _stops_answering(port, within=10), "the Streamlit server outlived a SIGKILLed `clipsearch ui`"
    finally:
        _kill_group(proc)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the child's environment from /proc")
def test_ui_hands_its_home_and_roots_to_the_streamlit_child(tmp_path: Path) -> None:
    roots = [tmp_path / "photos", tmp_path / "more"]
    for r in roots:
        r.mkdir()
    port = _free_port()
    proc = _start_ui(tmp_path / "home", port, "--roots", *map(str, roots))
    try:
        (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
    finally:
        _kill_group(proc)
    assert env["CLIPSEARCH_HOME"] == str(tmp_path / "home")
    assert env["CLIPSEARCH_ROOTS"] == os.pathsep.join(str(r.resolve()) for r in roots)


def _kill_group(proc: subprocess.Popen) -> None:
    """Never leave a server behind for the next test, whatever the assertions said."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)
