"""The one factory for encoders: a model spec + device (+ backend) → an object satisfying the Encoder Protocol.

Backends are imported here lazily, so asking for an encoder is the moment torch (or onnxruntime) loads.
`auto` (the default) is ONNX Runtime on CPU, where it starts in about a second instead of torch's 4-8 s, and torch
where CUDA is present (fp16 on the GPU beats any CPU backend). Both give vectors of the same embedding space.
An int8 model (`SPEC@int8`, onnx_quant) is its own space and exists only on ONNX Runtime: it runs there on the
CPU whatever CUDA is present, and asking for torch or an accelerator with it is a usage error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.protocol import Encoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")


def create_encoder(spec: str, device: str | None = None, backend: str = "auto",
                   model_cache: str | Path | None = None) -> Encoder:
    """An encoder for `spec` on `device` (None: best available) with the chosen backend.

    `model_cache` is where ONNX exports live (None: $CLIPSEARCH_MODEL_CACHE, else the user cache dir). With `auto`,
    a model the ONNX backend cannot run (another tokenizer, a failed export check) or a missing onnxruntime falls
    back to torch with a log line; with `onnx` those are errors. An `@int8` spec always runs on ONNX Runtime on
    the CPU (quantized into the model cache on first use); torch or an accelerator with it is a UsageError."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    from clipsearch.indexer.model.onnx_quant import split_quant

    base, int8 = split_quant(spec)
    if int8:
        if backend == "torch" or (device and device.split(":")[0] != "cpu"):
            asked = "--backend torch" if backend == "torch" else f"device '{device}'"
            raise UsageError(f"int8 models run on ONNX Runtime on the CPU: {spec} cannot use {asked} (use {base} "
                             "there: another embedding space, so a library is indexed and searched with one of them)")
        return _onnx_encoder(spec, "cpu", model_cache)  # no torch fallback: torch has no int8 space
    chosen = _auto_backend(device) if backend == "auto" else backend
    if chosen == "onnx":
        from clipsearch.indexer.model.onnx_cache import OnnxUnsupported

        try:
            return _onnx_encoder(spec, device, model_cache)
        except OnnxUnsupported as e:
            if backend != "auto":
                raise
            log.warning("%s; encoding with torch instead", e)
    from clipsearch.indexer.model.torch_encoder import TorchEncoder

    return TorchEncoder(spec, device)


def _onnx_encoder(spec: str, device: str | None, model_cache: str | Path | None) -> Encoder:
    if device and device.split(":")[0] != "cpu":
        raise UsageError(f"the ONNX backend runs on the CPU only; use --backend torch for device '{device}'")
    if importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("the ONNX backend (and any @int8 model) needs onnxruntime (pip install onnxruntime)")
    from clipsearch.indexer.model.onnx_encoder import OnnxEncoder

    return OnnxEncoder(spec, model_cache)


def _auto_backend(device: str | None) -> str:
    """torch for an accelerator (asked for, or CUDA present when no device is named), else ONNX Runtime when it is
    installed. CUDA is probed without importing torch where no NVIDIA driver is visible (the common CPU case)."""
    if device and device.split(":")[0] != "cpu":
        return "torch"
    if device is None and _cuda_available():
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("onnxruntime is not installed: encoding with torch (pip install onnxruntime starts faster on CPU)")
        return "torch"
    return "onnx"


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
            or shutil.which("nvidia-smi")):
        return False
    import torch

    return bool(torch.cuda.is_available())
