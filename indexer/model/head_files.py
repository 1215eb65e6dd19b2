"""Files of the small heads over CLIP embeddings (the captioner, the answerer): a JSON config beside safetensors
weights (fp16 by default: the demo heads ship in the package).

Both heads are stored and loaded the same way, so the reading and writing live here once: a missing or broken
file is one ModelUnavailable line naming the head and the folder, whichever head it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from clipsearch.indexer.errors import ModelUnavailable

M = TypeVar("M", bound=nn.Module)


def load_head(folder: str | Path, config_file: str, weights_file: str, what: str,
              build: Callable[[dict[str, Any]], M]) -> M:
    """The module `build` makes from the folder's JSON config, with the folder's weights (as float32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        raw = json.loads((folder / config_file).read_text(encoding="utf-8"))
        net = build(raw)
        net.load_state_dict({k: v.float() for k, v in load_file(folder / weights_file).items()})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelUnavailable(f"cannot load the {what} in {folder}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else ''}") from e
    return net


def save_head(folder: str | Path, config_file: str, weights_file: str, config: dict[str, Any], net: nn.Module,
              half: bool = True) -> Path:
    """Write the JSON config and the module's weights (fp16 when `half`) into `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_file).write_text(json.dumps(config, indent=1), encoding="utf-8")
    save_file({k: (v.half() if half else v).contiguous() for k, v in net.state_dict().items()},
              folder / weights_file)
    return folder
