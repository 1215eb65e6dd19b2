"""Model commands: make-sample, train, eval, demo, and ui (filled in by the demo-model and UI work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_commands(sub: Any) -> None:
    """Register the model-related sub-commands."""


COMMANDS: dict[str, Any] = {}
