"""One writer per library (issue 12.3): a second writer is refused with one line naming the running one, a killed
writer's lock is taken over, readers never wait. Lock holders are real processes, killed for real."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsearch.indexer.errors import LibraryBusy
from clipsearch.indexer.lock import hold_writer_lock

from .conftest import TINY, make_photo

BUSY = re.compile(r"another clipsearch index is running on this library \(pid (\d+) since "
                  r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it or stop it")

_HOLDER = """
import os, sys, time
from pathlib import Path
from clipsearch.indexer.lock import hold_writer_lock
home, url, fork = Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3] == "fork"
with hold_writer_lock(home, url):
    if fork and os.fork() == 0:  # a copy that keeps the lock's connection (and file) open after we die
        time.sleep(120)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_in_child(home: Path, url: str | None = None, fork: bool = False) -> subprocess.Popen:
    """A separate process that holds the writer lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(home), url or "", "fork" if fork else ""],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _refusal(home: Path, url: str | None = None) -> LibraryBusy:
    with pytest.raises(LibraryBusy) as e, hold_writer_lock(home, url):
        pass
    return e.value


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a forked copy too
    proc.wait()


def test_second_writer_is_refused_with_one_line_naming_the_first(tmp_path: Path) -> None:
    holder = _hold_in_child(tmp_path / "home")
    try:
        err = _refusal(tmp_path / "home")
    finally:
        _kill(holder)
    m = BUSY.fullmatch(str(err))
    assert m, str(err)
    assert int(m.group(1)) == holder.pid
    assert err.exit_code == 4


def test_lock_of_a_killed_writer_is_taken_over_with_a_log_line(tmp_path: Path, caplog) -> None:
    holder = _hold_in_child(tmp_path / "home")
    _kill(holder)
    with caplog.at_level(logging.INFO, logger="clipsearch.indexer.lock"), hold_writer_lock(tmp_path / "home", None):
        pass
    assert f"left by pid {holder.pid}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.indexer.lock"), hold_writer_lock(tmp_path / "home", None):
        pass  # released cleanly the second time: nothing to take over
    assert "took over" not in caplog.text


def test_same_process_cannot_write_twice_and_lock_frees_on_release(tmp_path: Path) -> None:
    with hold_writer_lock(tmp_path, None):  # two UI sessions indexing at once in one server process
        assert BUSY.fullmatch(str(_refusal(tmp_path))).group(1) == str(os.getpid())
    with hold_writer_lock(tmp_path, None):
        pass


def test_two_homes_sharing_one_sqlite_catalog_are_kept_apart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared' / 'cat.db'}"
    holder = _hold_in_child(tmp_path / "home1", url)
    try:
        err = _refusal(tmp_path / "home2", url)
    finally:
        _kill(holder)
    assert BUSY.fullmatch(str(err)).group(1) == str(holder.pid)


@pytest.mark.postgres
def test_postgres_catalog_is_locked_across_homes_and_taken_over_after_a_kill(tmp_path: Path,
                                                                            fresh_pg_url: str) -> None:
    holder = _hold_in_child(tmp_path / "home1", fresh_pg_url)
    try:
        err = _refusal(tmp_path / "home2", fresh_pg_url)  # another machine's home, the same catalog
    finally:
        _kill(holder)
    assert BUSY.fullmatch(str(err)).group(1) == str(holder.pid)
    with hold_writer_lock(tmp_path / "home2", fresh_pg_url):
        pass


@pytest.mark.postgres
def test_postgres_lock_whose_writer_died_but_connection_lingers_is_taken_over(tmp_path: Path,
                                                                             fresh_pg_url: str) -> None:
    holder = _hold_in_child(tmp_path / "home1", fresh_pg_url, fork=True)
    os.kill(holder.pid, signal.SIGKILL)  # the writer dies; its forked copy keeps the session (a half-open link)
    holder.wait()
    try:
        t0 = time.monotonic()
        with hold_writer_lock(tmp_path / "home2", fresh_pg_url):
            pass
        assert time.monotonic() - t0 < 15
    finally:
        _kill(holder)


# --- end to end: two real `clipsearch index` runs on one library ------------------------------------------------
def _index(lib: Path, home: Path) -> list[str]:
    return [sys.executable, "-m", "clipsearch", "index", str(lib), "--home", str(home), "--model", TINY,
            "--device", "cpu", "--workers", "1", "--no-progress"]


def _wait_for_lock_record(home: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((home / "index.lock").read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"first index run never took the lock (exit {proc.poll()})")


@pytest.mark.integration
def test_second_index_run_exits_4_with_one_line_while_readers_go_on(tmp_path: Path) -> None:
    lib, home = tmp_path / "lib", tmp_path / "home"
    for i in range(12):
        make_photo(lib / f"p{i}.jpg", i)
    first = subprocess.Popen(_index(lib, home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _wait_for_lock_record(home, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, however fast this machine is
        second = subprocess.run(_index(lib, home), capture_output=True, text=True, timeout=120)
        status = subprocess.run([sys.executable, "-m", "clipsearch", "status", "--home", str(home)],
                                capture_output=True, text=True, timeout=120)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        _kill(first)
    assert second.returncode == 4
    assert second.stdout == ""
    line = second.stderr.strip()
    assert "\n" not in line and "Error" not in line, second.stderr
    assert BUSY.search(line).group(1) == str(first.pid)
    assert status.returncode == 0, status.stderr  # a reader does not wait for the writer
    assert first.returncode == 0, err
    assert "indexed 12," in out
