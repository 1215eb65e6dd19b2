"""Server commands: ui (the Streamlit app), demo (sample library → index → ui) and serve (the query server).

`ui` runs Streamlit as a child process and stays its supervisor: SIGTERM or SIGINT to `clipsearch ui` stops the
child, waits for it and exits; on Linux the child also gets a parent-death signal, so a SIGKILLed `clipsearch ui`
does not leave a server answering on its port.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from clipsearch.indexer.config import AppConfig
from clipsearch.indexer.errors import UsageError

from .commands_common import config_from, out, port, positive
from .registry import command

UI_PORT = 8501  # Streamlit's usual port
SERVE_PORT = 8765  # ui/server.py DEFAULT_PORT (not imported here: that module loads FastAPI and the search service)
STOP_GRACE_S = 10.0  # how long a stopping child may take before it is killed


def _address_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--port", type=port, default=default_port, metavar="N", help="TCP port, 1 to 65535")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to bind; 127.0.0.1 is this machine only")


def _ui_args(p: argparse.ArgumentParser) -> None:
    _address_args(p, UI_PORT)
    p.add_argument("--roots", nargs="+", type=Path, metavar="DIR",
                   help="folders the UI may index (default: $CLIPSEARCH_ROOTS, else none: indexing from the UI is off)")


def _checked_roots(config: AppConfig) -> None:
    for root in config.roots:
        if not root.is_dir():
            raise UsageError(f"--roots {root} is not a folder")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGTERM when this process dies, even by SIGKILL (Linux prctl; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls into it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def supervise(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc`; SIGTERM/SIGINT here stop it (a second signal, or STOP_GRACE_S, kills it). Returns the exit
    code: 128 + the signal when one ended it, as a shell reports it."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if proc.poll() is None:
            (proc.kill if len(received) > 1 else proc.terminate)()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline: float | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE_S
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        return 128 + received[0]
    return 128 - rc if rc < 0 else rc


def run_ui(config: AppConfig, host: str, ui_port: int) -> int:
    """Run `streamlit run ui/app.py` for this config (passed to the child through `config.as_env()`)."""
    _checked_roots(config)
    env = {**os.environ, **config.as_env()}
    app = Path(__file__).parent / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host,
           "--server.port", str(ui_port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.maxUploadSize", str(max(1, round(config.max_upload_mb))), "--client.toolbarMode", "minimal"]
    print(f"clipsearch UI on http://{host}:{ui_port}", flush=True)
    return supervise(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent()))


@command("ui", "start the Streamlit interface (search, similar, zero-shot, library)", arguments=_ui_args,
         examples=("clipsearch ui", "clipsearch ui --roots ~/Pictures /mnt/photos --port 8600",
                   "clipsearch --home ~/trip-library ui --model demo"))
def cmd_ui(args: argparse.Namespace) -> int:
    """The Streamlit app on --host/--port for this home; stops with SIGTERM/SIGINT."""
    return run_ui(config_from(args), args.host, args.port)


def _cli_name() -> str:
    """How to run this CLI as printed: the console script beside this Python (a venv's bin/), else `python -m`."""
    script = Path(sys.executable).with_name("clipsearch")
    if script.is_file():
        return shlex.quote(os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script))
    return f"{shlex.quote(sys.executable)} -m clipsearch"


def _demo_query(config: AppConfig) -> str:
    """An example query with strong matches in the demo library (the UI's first suggestion)."""
    try:
        from clipsearch.search import build_service

        return build_service(config).example_queries()[0]
    except Exception:  # the hint is a courtesy: never fail the demo over it
        return "a red star"


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=positive, default=240, metavar="N", help="sample photos to generate")
    p.add_argument("--no-ui", action="store_true", help="stop after indexing")
    _ui_args(p)  # demo ends in the UI, so it takes the same options


@command("demo", "generate a sample library, index it with the bundled model, open the UI (offline)",
         arguments=_demo_args, model_default="the bundled 'demo' model",
         examples=("clipsearch demo", "clipsearch demo --count 60 --no-ui", "clipsearch demo --port 8600"))
def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: sample library → index with the demo model → UI."""
    from dataclasses import replace

    from clipsearch.indexer.app import build_indexer
    from clipsearch.indexer.config import IndexOptions
    from clipsearch.indexer.ingest.scan import SAMPLE_DIR_NAME
    from clipsearch.indexer.model.sample import make_sample
    from clipsearch.indexer.stop import install_signal_handlers, stop_requested

    config = config_from(args)
    config = replace(config, model=config.model or "demo")
    _checked_roots(config)
    lib = config.home / SAMPLE_DIR_NAME  # generated data, kept in the app's home (not in any photo root)
    if not (lib / "captions.txt").is_file():
        make_sample(lib, args.count, seed=7)
    install_signal_handlers()  # a stop during indexing ends it after a committed batch
    report = build_indexer(config, IndexOptions(progress=not args.json)).run([lib])
    print(f"indexed {report.indexed} sample photos into {config.home} ({report.unchanged} already there)")
    if report.interrupted or stop_requested():
        return 130
    print(f"try: {_cli_name()} search {shlex.quote(_demo_query(config))} --home {shlex.quote(str(config.home))}")
    if args.no_ui:
        return 0
    return run_ui(config, args.host, args.port)


def _serve_args(p: argparse.ArgumentParser) -> None:
    _address_args(p, SERVE_PORT)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token every request must carry (required to bind beyond this machine; "
                                     "shows in `ps`: prefer --token-file or $CLIPSEARCH_TOKEN)")
    tok.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from the first line of FILE")
    p.add_argument("--access-log", action="store_true", help="log every request")


@command("serve", "keep the model warm and answer queries over a local HTTP API (the CLI and scripts use it)",
         arguments=_serve_args,
         examples=("clipsearch serve", "clipsearch serve --port 9000 --model demo",
                   "python -c 'import secrets; print(secrets.token_urlsafe())' > ~/.clipsearch-token && "
                   "chmod 600 ~/.clipsearch-token && clipsearch serve --host 0.0.0.0 --token-file ~/.clipsearch-token"))
def cmd_serve(args: argparse.Namespace) -> int:
    """The query server for this home until SIGTERM/SIGINT (uvicorn stops it gracefully)."""
    from clipsearch.ui.server import serve

    def ready(url: str) -> None:
        out(args, {"url": url}, f"clipsearch server on {url} (API docs at {url}/docs)")
        sys.stdout.flush()

    serve(config_from(args), args.host, args.port, _token(args), access_log=args.access_log, on_ready=ready)
    return 0


def _token(args: argparse.Namespace) -> str | None:
    """--token, else the first line of --token-file, else $CLIPSEARCH_TOKEN (a command line is visible to every
    user of the machine in `ps`; a file or the environment is not)."""
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise UsageError(f"cannot read the token file {args.token_file}: {why}") from e
        if not lines or not lines[0].strip():
            raise UsageError(f"the token file {args.token_file} is empty")
        return lines[0].strip()
    return args.token or os.environ.get("CLIPSEARCH_TOKEN") or None
