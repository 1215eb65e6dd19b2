"""Int8 models (`SPEC@int8`): the ONNX export of SPEC with its weights dynamically quantized to int8, an embedding
space of its own. Torch-free: it needs onnxruntime's quantization tools and the fp32 export.

Why a space of its own: int8 vectors are close to the fp32 ones (cosine ≥ MIN_COSINE, checked here) but not equal,
so mixing them in one index would rank photos by which encoder embedded them. A library indexed `@int8` keeps its
spec in the catalog and queries with int8; an fp32 library stays fp32.

What is quantized, from measurement on 2 cores (bench/int8_space.py): MatMul and Gather weights, per output
channel. ViT-B-32's towers run ~3x faster that way; ONNX Runtime's ConvInteger is slower than fp32 Conv (the demo
model's CNN image tower 5x slower, ViT-B-32's patch embedding too), so Conv stays fp32. A tower whose quantizable
weights are under half of its weights (a CNN image tower) is copied as it is: int8 would change its vectors and
gain nothing. The rule is fixed, never timed at install, so one space key always means the same graphs.

The export goes into the model cache once, like the fp32 one: `onnx/<int8 space key>/` with its own export.json
(same format: SHA-256 per file, checked when each session is built; a damaged file is quantized again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import ModelUnavailable, UsageError
from clipsearch.indexer.model.onnx_cache import (
    META_FILE,
    PROBE_TEXTS,
    TOWERS,
    ExportMeta,
    OnnxUnsupported,
    find_export,
    install_export,
    intact_export,
    pointer_path,
    source_key,
    tower_hashes,
    write_atomic,
)
from clipsearch.indexer.model.protocol import EmbeddingSpace

log = logging.getLogger(__name__)

INT8_SUFFIX = "@int8"
# In the space key: a changed recipe quantizes differently, so it is another space (never mixed in one index).
RECIPE = "ort-dynamic-qint8-per-channel-matmul-gather-v1"
_OPS = ["MatMul", "Gather"]  # ConvInteger is slower than fp32 Conv on ONNX Runtime's CPU provider (module doc)
_MIN_SHARE = 0.5  # share of a tower's weights that must be quantizable for int8 to pay
# Lowest cosine int8 vs fp32 allowed on the probes. Measured: 0.9986-0.99999 (ViT-B-32-256, demo, tiny test
# models), as int8 rounding moves a vector by ~0.02-0.05 in L2. A broken quantization (an activation-outlier model
# whose per-tensor activation scale crushes the rest) falls far below; 0.99 (L2 error 0.14) leaves room for trained
# models' outliers while refusing those. Ranking quality is measured separately (bench/int8_space.py: recall@10).
MIN_COSINE = 0.99
WHAT_TO_INSTALL = "int8 models need onnxruntime with its quantization tools and onnx (pip install onnxruntime onnx)"


def split_quant(spec: str) -> tuple[str, bool]:
    """(base spec, whether `spec` names its int8 model): 'demo@int8' → ('demo', True)."""
    spec = spec.strip()
    if spec.endswith(INT8_SUFFIX):
        return spec[: -len(INT8_SUFFIX)].strip(), True
    return spec, False


def is_int8(spec: str) -> bool:
    """Whether a spec names an int8 model (which runs on ONNX Runtime on the CPU only)."""
    return split_quant(spec)[1]


def export_source(spec: str) -> str:
    """The source key an export of `spec` is found by (onnx_cache.source_key, suffixed for int8 models)."""
    base, int8 = split_quant(spec)
    return source_key(base) + "-int8" if int8 else source_key(base)


def int8_space(base: EmbeddingSpace) -> EmbeddingSpace:
    """The int8 model's space: derived from the fp32 space and the recipe, never equal to the fp32 one."""
    key = hashlib.sha1(f"{base.key}+int8:{RECIPE}".encode()).hexdigest()[:16]
    return EmbeddingSpace(key, base.label + INT8_SUFFIX, base.dim)


def _require_quantization() -> None:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime.quantization") is None:
        raise UsageError(WHAT_TO_INSTALL)


def quantizable_share(graph_path: Path) -> float:
    """The share of a graph's weight elements that feed the ops int8 quantizes (MatMul, Gather)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    fed = {name for node in model.graph.node if node.op_type in _OPS for name in node.input if name in sizes}
    total = sum(sizes.values())
    return sum(sizes[n] for n in fed) / total if total else 0.0


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    """Drop the quantizer's advice lines (it logs to the root logger, several lines per graph: not ours to show)."""
    return f"onnxruntime{os.sep}quantization" not in record.pathname


def _quantize_tower(src_dir: Path, dst_dir: Path, tower: str) -> bool:
    """Write `tower`'s int8 graph (weights in a side file, as the fp32 exports) into dst_dir, or copy its fp32
    files when int8 would not pay; returns whether it was quantized."""
    src = src_dir / f"{tower}.onnx"
    if quantizable_share(src) < _MIN_SHARE:
        for path in sorted(src_dir.glob(f"{tower}.onnx*")):
            shutil.copyfile(path, dst_dir / path.name)
        return False
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    root_logger.addFilter(_quiet_quantizer)
    try:
        quantize_dynamic(src, dst_dir / src.name, op_types_to_quantize=_OPS, per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
    finally:
        root_logger.removeFilter(_quiet_quantizer)
    for path in dst_dir.glob(f"{tower}.onnx*"):
        os.chmod(path, 0o644)  # onnx writes side files 0600: a shared model cache must read them
    return True


def _probe_pixels(size: int) -> np.ndarray:
    """Noise, a smooth gradient and flat grey: what a check on uint8 inputs should cover."""
    noise = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    grad = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 128)], -1)
    return np.concatenate([noise, grad.astype(np.uint8)[None], np.full((1, size, size, 3), 128, np.uint8)])


def check_cosine(int8_enc: Any, base_enc: Any) -> float:
    """Lowest cosine int8 vs fp32 on probe texts and pixels at batch sizes 1 and 4; OnnxUnsupported below
    MIN_COSINE (a quantization that moved the vectors too far is refused, not installed)."""
    pixels = _probe_pixels(base_enc.preprocess_spec.size)
    pairs = [(int8_enc.encode_texts(PROBE_TEXTS), base_enc.encode_texts(PROBE_TEXTS)),
             (int8_enc.encode_texts(PROBE_TEXTS[:1]), base_enc.encode_texts(PROBE_TEXTS[:1])),
             (int8_enc.encode_pixels(pixels), base_enc.encode_pixels(pixels)),
             (int8_enc.encode_pixels(pixels[:1]), base_enc.encode_pixels(pixels[:1]))]
    low = float(min((a * b).sum(1).min() for a, b in pairs))
    if not low >= MIN_COSINE:
        raise OnnxUnsupported(f"its int8 vectors differ too much from fp32 (cosine {low:.4f} < {MIN_COSINE})")
    return low


def _build(spec: str, base_enc: Any, root: Path, space: EmbeddingSpace) -> None:
    """Quantize, check and install the int8 export (temp folder + rename: readers see none or all of it)."""
    from clipsearch.indexer.model.onnx_encoder import OnnxEncoder

    src, base_meta = base_enc.export_dir, base_enc.export_meta
    tmp = root / f".tmp-{space.key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        done = [tower for tower in TOWERS if _quantize_tower(src, tmp, tower)]
        for name in base_meta.files["vocab"]:
            shutil.copyfile(src / name, tmp / name)
        files = tower_hashes(tmp)
        files["vocab"] = dict(base_meta.files["vocab"])
        meta = dataclasses.replace(base_meta, spec=spec, space=space, files=files, cosine_checked=1.0)
        low = check_cosine(OnnxEncoder.from_export(spec, tmp, meta), base_enc)
        meta = dataclasses.replace(meta, cosine_checked=low)
        (tmp / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        install_export(tmp, root / space.key)  # replaces a damaged one (an intact one is reused before this)
        log.info("quantized %s to int8 in %.1f s (towers %s; lowest cosine to fp32 %.5f)", spec,
                    time.perf_counter() - start, ", ".join(done) or "none", low)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def quantize_export(spec: str, base_enc: Any, root: Path, source: str) -> tuple[Path, ExportMeta]:
    """The int8 export of `spec` (source key `source`), quantized now from base_enc's fp32 export unless its space
    already has an intact one. base_enc is the base model's OnnxEncoder: its sessions check the fp32 files first.

    Raises OnnxUnsupported (recorded, so the next start does not quantize again to fail again) when the int8
    vectors are too far from fp32, UsageError when the quantization tools are missing, ModelUnavailable when the
    cache cannot be written."""
    _require_quantization()
    space = int8_space(base_enc.space)
    base_enc.open_towers()  # checks (or rebuilds) the fp32 files before they are quantized
    marker = pointer_path(root, source).with_suffix(".unsupported")
    try:
        if not intact_export(root / space.key, space):
            log.warning("quantizing model %s to int8 into %s (once per model)", spec, root)
            _build(spec, base_enc, root, space)
        write_atomic(pointer_path(root, source), space.key)
        marker.unlink(missing_ok=True)
    except OnnxUnsupported as e:
        write_atomic(marker, str(e))
        raise OnnxUnsupported(f"model {spec} cannot run on ONNX Runtime: {e}") from e
    except OSError as e:
        raise ModelUnavailable(f"cannot write the int8 export of {spec} under {root}: {e}") from e
    found = find_export(root, source)
    if found is None:
        raise ModelUnavailable(f"the int8 export of {spec} under {root} vanished right after it was written")
    return found
