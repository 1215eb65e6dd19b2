"""Export an open_clip model's image and text towers to ONNX, once per embedding space, and prove the export right.

This is the ONNX backend's one torch-dependent step (it builds the torch encoder to read the model), so it is
imported only when no valid export exists. The graphs:

  * image: ``pixels`` (N, S, S, 3) uint8, the decoder's output → ``features`` (N, D); the torch encoder's
    preprocessing (÷255, mean/std, NHWC→NCHW) is inside the graph, so both backends see the same input;
  * text: ``tokens`` (N, L) int64 → ``features`` (N, D). For open_clip's causal, argmax-pooled towers L is dynamic
    (rows cut after their end-of-text token, as the torch encoder does), else L is the context length.

Both are exported with a batch of 2 and a dynamic batch axis (the dynamo exporter can otherwise fix a batch of 1),
then checked against torch at batch sizes 1 and 3 on texts and pixels (cosine ≥ MIN_COSINE) and the torch-free
tokenizer against open_clip's: an export that fails any check is never installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip import tokenizer as oc_tokenizer

from clipsearch.indexer.errors import ModelUnavailable
from clipsearch.indexer.model.onnx_cache import (
    FORMAT,
    META_FILE,
    PROBE_TEXTS,
    ExportMeta,
    OnnxUnsupported,
    file_sha256,
    find_export,
    install_export,
    intact_export,
    pointer_path,
    tower_hashes,
    write_atomic,
)
from clipsearch.indexer.model.tokenizer import VOCAB_FILE
from clipsearch.indexer.model.torch_encoder import TorchEncoder, _causal_text_tower

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999  # torch vs ONNX agreement an export must reach to share the torch encoder's space
_EXTERNAL_DATA_BYTES = 1_500_000_000  # past this a tower's weights go to a side file (protobuf's 2 GB limit)


class _ImageTower(torch.nn.Module):
    """uint8 NHWC pixels → image features, with the torch encoder's normalisation inside the graph."""

    def __init__(self, model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.detach().clone().cpu())
        self.register_buffer("std", std.detach().clone().cpu())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std)
        return self.model.encode_image(x)


class _TextTower(torch.nn.Module):
    """Token ids → text features: the causal tower on cut rows when it has one, else the model's encode_text."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        tower = _causal_text_tower(model)
        self.tower = dataclasses.replace(tower, prefix_ok=False) if tower is not None else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.encode(tokens) if self.tower is not None else self.model.encode_text(tokens)


def tokenizer_settings(tokenizer: Any) -> tuple[int, str, list[str]]:
    """Context length, cleaning mode and extra special tokens of open_clip's CLIP BPE tokenizer; OnnxUnsupported
    for any other tokenizer (Hugging Face, SigLIP, random token dropping), which BpeTokenizer does not reproduce."""
    if type(tokenizer) is not oc_tokenizer.SimpleTokenizer or tokenizer.reduction_fn is not None:
        raise OnnxUnsupported(f"its tokenizer ({type(tokenizer).__name__}) is not open_clip's CLIP BPE tokenizer")
    modes = {oc_tokenizer._clean_lower: "lower", oc_tokenizer._clean_whitespace: "whitespace",
             oc_tokenizer._clean_canonicalize: "canonicalize"}
    clean = modes.get(tokenizer.clean_fn)
    if clean is None:
        raise OnnxUnsupported("its tokenizer uses an unknown text cleaning function")
    return int(tokenizer.context_length), clean, [tokenizer.decoder[i] for i in tokenizer.all_special_ids[2:]]


def _export_graph(module: torch.nn.Module, example: torch.Tensor, path: Path, name: str,
                  dims: dict[int, Any]) -> None:
    """One graph via the dynamo exporter (quietly: it prints progress), falling back to the TorchScript one."""
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_DATA_BYTES
    common = {"input_names": [name], "output_names": ["features"], "external_data": big}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes={name: dims},
                              verbose=False, **common)
        except Exception as e:  # exporter failures come in many types; the TorchScript exporter may still work
            log.info("dynamo export of %s failed (%s); trying the TorchScript exporter", path.name, e)
            axes = {name: {i: d.__name__ for i, d in dims.items()}, "features": {0: "batch"}}
            torch.onnx.export(module, (example,), str(path), dynamo=False, dynamic_axes=axes, opset_version=18,
                              input_names=[name], output_names=["features"])
    _externalise(path)


def _externalise(path: Path) -> None:
    """Move the graph's weights into one side file, `<name>.data`, that ONNX Runtime maps instead of parsing: the
    ViT-B-32 text tower's session then builds in ~0.11 s instead of ~0.3-0.4 s, a third of a cold query
    (bench/RESULTS.md, issue 13). The side file is part of the tower: checksummed and installed with it."""
    import onnx

    model = onnx.load(str(path))  # reads a side file the exporter may already have written
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    shutil.copymode(path, data)  # onnx writes it 0600: a model cache shared by other users or nodes must read it


def _export_towers(enc: TorchEncoder, tmp: Path, context_length: int) -> bool:
    """Write image.onnx and text.onnx into tmp; returns whether the text graph takes cut rows."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    size = enc.preprocess_spec.size
    with torch.inference_mode(False), torch.no_grad():
        image = _ImageTower(enc.model, enc._mean, enc._std).eval()
        _export_graph(image, torch.zeros(2, size, size, 3, dtype=torch.uint8), tmp / "image.onnx", "pixels",
                      {0: batch})
        text = _TextTower(enc.model).eval()
        tokens = enc.tokenizer(["a photo of a dog", "x"])
        dims: dict[int, Any] = {0: batch}
        if text.tower is not None:
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
            dims[1] = torch.export.Dim("tokens", min=2, max=context_length)
        _export_graph(text, tokens, tmp / "text.onnx", "tokens", dims)
    return text.tower is not None


def _check(enc: TorchEncoder, tmp: Path, meta: ExportMeta) -> float:
    """Lowest cosine between torch and the export on probe texts and pixels at batch sizes 1 and 3, after checking
    the torch-free tokenizer's ids against open_clip's; raises OnnxUnsupported when either disagrees."""
    from clipsearch.indexer.model.onnx_encoder import OnnxEncoder

    onnx_enc = OnnxEncoder.from_export(enc.spec, tmp, meta, threads=None)
    ours, theirs = onnx_enc.tokenizer(PROBE_TEXTS), enc.tokenizer(PROBE_TEXTS).numpy()
    if not np.array_equal(ours, theirs):
        raise OnnxUnsupported("the torch-free tokenizer gives other token ids than open_clip's for this model")
    size = enc.preprocess_spec.size
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    cos = [(enc.encode_texts(PROBE_TEXTS) * onnx_enc.encode_texts(PROBE_TEXTS)).sum(1),
           (enc.encode_texts(PROBE_TEXTS[:1]) * onnx_enc.encode_texts(PROBE_TEXTS[:1])).sum(1),
           (enc.encode_pixels(pixels) * onnx_enc.encode_pixels(pixels)).sum(1),
           (enc.encode_pixels(pixels[:1]) * onnx_enc.encode_pixels(pixels[:1])).sum(1)]
    low = float(min(c.min() for c in cos))
    if not low >= MIN_COSINE:
        raise OnnxUnsupported(f"its ONNX export differs from torch (cosine {low:.6f} < {MIN_COSINE})")
    return low


def _meta_for(enc: TorchEncoder, tmp: Path, settings: tuple[int, str, list[str]], dynamic: bool,
              cosine: float) -> ExportMeta:
    files = tower_hashes(tmp)
    files["vocab"] = {VOCAB_FILE: file_sha256(tmp / VOCAB_FILE)}
    context_length, clean, specials = settings
    return ExportMeta(FORMAT, enc.spec, enc.space, enc.preprocess_spec, float(enc.logit_scale), context_length,
                      clean, specials, dynamic, files, cosine)


def _build(enc: TorchEncoder, root: Path) -> Path:
    """Export, check and install the export of enc's space; returns its folder."""
    final = root / enc.space.key
    settings = tokenizer_settings(enc.tokenizer)
    tmp = root / f".tmp-{enc.space.key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(oc_tokenizer.default_bpe(), tmp / VOCAB_FILE)
        dynamic = _export_towers(enc, tmp, settings[0])
        meta = _meta_for(enc, tmp, settings, dynamic, 1.0)
        meta = dataclasses.replace(meta, cosine_checked=_check(enc, tmp, meta))
        (tmp / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        install_export(tmp, final)  # replaces a damaged export of this space (an intact one was reused before)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_model(spec: str, root: Path, source: str) -> tuple[Path, ExportMeta]:
    """The export for spec (source key `source`), built now unless its space already has an intact one.

    Raises OnnxUnsupported (and records why, so `auto` does not retry at every start) when the model cannot be
    exported faithfully, ModelUnavailable when its weights cannot be loaded or the cache cannot be written."""
    enc = TorchEncoder(spec, "cpu")  # first: a model whose weights are missing fails here, with one line
    final = root / enc.space.key
    reuse = intact_export(final, enc.space)
    try:
        if not reuse:
            log.warning("exporting model %s to ONNX into %s (once per model; a ViT-B-32 takes about a minute)",
                        spec, root)
            _build(enc, root)
        write_atomic(pointer_path(root, source), enc.space.key)
        pointer_path(root, source).with_suffix(".unsupported").unlink(missing_ok=True)
    except OnnxUnsupported as e:
        write_atomic(pointer_path(root, source).with_suffix(".unsupported"), str(e))
        raise OnnxUnsupported(f"model {spec} cannot run on ONNX Runtime: {e}") from e
    except OSError as e:
        raise ModelUnavailable(f"cannot write the ONNX export of {spec} under {root}: {e}") from e
    except Exception as e:  # an exporter or ONNX Runtime failure: this model is not exportable here
        first = str(e).splitlines()[0][:200] if str(e) else ""
        reason = f"export failed ({type(e).__name__}: {first})"
        write_atomic(pointer_path(root, source).with_suffix(".unsupported"), reason)
        raise OnnxUnsupported(f"model {spec} cannot run on ONNX Runtime: {reason}") from e
    found = find_export(root, source)
    if found is None:
        raise ModelUnavailable(f"the ONNX export of {spec} under {root} vanished right after it was written")
    log.info("ONNX export of %s ready in %s (open_clip %s)", spec, found[0], open_clip.__version__)
    return found
