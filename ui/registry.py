"""The one way to add a `clipsearch` command: decorate its run function with `@command(...)`.

A command is a name, a one-line help, two or three examples, a function that adds its own arguments and the
function that runs it. Command modules register themselves when imported; the CLI imports the modules named in
`COMMAND_MODULES` (and only when it builds its parser), so no command module imports another and none imports the
CLI. Command modules stay cheap to import: torch, FAISS and SQLAlchemy load inside run functions.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

Run = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]

# In the order `clipsearch --help` lists their commands.
COMMAND_MODULES = ("clipsearch.ui.commands", "clipsearch.ui.commands_search", "clipsearch.ui.commands_model",
                   "clipsearch.ui.commands_app", "clipsearch.ui.commands_seed")


@dataclass(frozen=True)
class Command:
    """One sub-command of `clipsearch`, as its module declared it."""

    name: str  # what the user types: `clipsearch NAME`
    help: str  # one line in `clipsearch --help`, and the first line of `clipsearch NAME --help`
    run: Run  # reads the parsed arguments, does the work, prints; returns the exit code
    arguments: AddArguments | None = None  # adds the command's own arguments (global options are added for it)
    examples: tuple[str, ...] = ()  # shown under `clipsearch NAME --help`
    hint: str | None = None  # printed under a missing-argument error instead of "see --help"
    graceful_stop: bool = False  # SIGTERM/SIGINT end the run after the batch in flight (the command checks)
    model_default: str | None = None  # what --model defaults to, when not the library's model (e.g. `demo`)


_REGISTRY: dict[str, Command] = {}


def command(name: str, help: str, *, arguments: AddArguments | None = None, examples: tuple[str, ...] = (),
            hint: str | None = None, graceful_stop: bool = False,
            model_default: str | None = None) -> Callable[[Run], Run]:
    """Register the decorated function as `clipsearch NAME`; a second registration of a name is a bug."""

    def register(run: Run) -> Run:
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise ValueError(f"command {name!r} is registered twice")
        _REGISTRY[name] = Command(name, help, run, arguments, tuple(examples), hint, graceful_stop, model_default)
        return run

    return register


def commands() -> dict[str, Command]:
    """Every command, by name, in registration order (imports the command modules on first call)."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)
