"""The torch backend of the Encoder Protocol: the one module (with training.py) that imports torch and open_clip.

A model spec is one of:
  * ``ARCH:TAG``        an open_clip pretrained tag, e.g. ``ViT-B-32:laion2b_s34b_b79k`` (downloaded once, cached);
  * ``ARCH:PATH``       a local checkpoint (.safetensors preferred; .pt/.bin loaded with ``weights_only=True``);
  * ``ARCH:none``       untrained weights (seeded, so deterministic) -- tests and benchmarks only;
  * ``FOLDER``          a folder with ``open_clip_config.json`` + weights, as written by ``clipsearch train``;
  * ``demo``            the small model bundled with clipsearch (runs offline);
  * ``SPEC@int8``       SPEC quantized to int8: ONNX Runtime only (onnx_quant), rejected here with one line;
ARCH may also be a path to an open_clip model-config JSON file (registered with ``open_clip.add_model_config``).

The embedding space id covers architecture, weights and preprocessing, so vectors of different spaces never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock

from clipsearch.indexer.errors import ModelUnavailable, UsageError
from clipsearch.indexer.ingest.decode import PreprocessSpec
from clipsearch.indexer.model.onnx_quant import split_quant
from clipsearch.indexer.model.protocol import EmbeddingSpace, PixelInputs

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
_TEXT_BATCH = 256
_MIN_SHARED_PREFIX = 3  # shared tokens (start token included) from which running the prefix once pays off


@dataclass(frozen=True)
class ParsedSpec:
    """A model spec split into its parts; `folder` set for config+weights folders (demo included)."""

    arch: str
    weights: str | None  # tag, checkpoint path, or None for untrained
    folder: Path | None = None


def parse_spec(spec: str) -> ParsedSpec:
    """Split a model spec; raises UsageError for an unknown architecture or a missing file, and for an int8 model
    (`SPEC@int8`), which exists only as an ONNX Runtime export: training, heatmaps and captions need SPEC itself,
    and its vectors are of another space than the int8 library's, so no torch stand-in is given silently."""
    spec = spec.strip()
    base, int8 = split_quant(spec)
    if int8:
        raise UsageError(f"int8 models run on ONNX Runtime on the CPU only: {spec} cannot be loaded in torch "
                         f"(training, heatmaps and captions need a torch model such as {base})")
    if spec == "demo":
        return ParsedSpec("demo", None, DEMO_DIR)
    if os.path.isdir(spec):
        if not (Path(spec) / "open_clip_config.json").is_file():
            raise UsageError(f"model folder {spec} has no open_clip_config.json")
        return ParsedSpec(Path(spec).name, None, Path(spec).resolve())
    arch, sep, weights = spec.partition(":")
    if not sep or not weights:
        raise UsageError(f"model spec '{spec}' must be ARCH:WEIGHTS (e.g. ViT-B-32:laion2b_s34b_b79k), "
                         "a model folder or 'demo'")
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise UsageError(f"model config file {arch} does not exist")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise UsageError(f"unknown architecture '{arch}' (see open_clip.list_models())")
    return ParsedSpec(arch, None if weights.lower() == "none" else weights)


def pick_device(requested: str | None = None) -> str:
    """Best available device (CUDA, then MPS, then CPU) unless one is requested and available."""
    if requested:
        ok = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        }
        base = requested.split(":")[0]
        if base not in ok:
            raise UsageError(f"unknown device '{requested}' (use cuda, mps or cpu)")
        if not ok[base]:
            raise UsageError(f"device '{requested}' was requested but is not available on this machine")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_id(parsed: ParsedSpec) -> str:
    if parsed.folder is not None:
        files = sorted(parsed.folder.glob("*.safetensors")) + sorted(parsed.folder.glob("*.bin"))
        return "folder-" + (_file_digest(files[0]) if files else "untrained")
    if parsed.weights is None:
        return "none"
    if os.path.isfile(parsed.weights):
        return "file-" + _file_digest(parsed.weights)
    return parsed.weights


def _tag_cached_or_reachable(arch: str, tag: str, cache_dir: str | None) -> str | None:
    """None when the tag's weights are cached or the hub answers; else a reason (so offline fails in ms, not 45 s)."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return None  # open_clip itself reports unknown tags
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.get("hf_weights_file")] if cfg.get("hf_weights_file") else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set"
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        return f"huggingface.co unreachable: {e}"
    return None


def build_model(spec: str, device: str = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any], ParsedSpec]:
    """Create the open_clip model, tokenizer and preprocess config for a spec (shared by encoding and training)."""
    parsed = parse_spec(spec)
    cache_dir = os.environ.get("CLIPSEARCH_MODEL_CACHE")
    try:
        if parsed.folder is not None:
            name = f"local-dir:{parsed.folder}"
            if not any(parsed.folder.glob("*.safetensors")) and not any(parsed.folder.glob("*.bin")):
                raise ModelUnavailable(f"model folder {parsed.folder} has no weights file (*.safetensors)")
            model = open_clip.create_model(name, device=device, cache_dir=cache_dir)
        else:
            name = parsed.arch
            if parsed.weights and not os.path.isfile(parsed.weights):
                reason = _tag_cached_or_reachable(name, parsed.weights, cache_dir)
                if reason:
                    raise RuntimeError(reason)
            if parsed.weights is None:
                log.warning("model %s has untrained weights: embeddings carry no meaning (tests/benchmarks only)", name)
                torch.manual_seed(0)  # deterministic "none" weights, so re-runs land in the same space
            model = open_clip.create_model(
                name, pretrained=parsed.weights, device=device, cache_dir=cache_dir, pretrained_text=False
            )
        tokenizer = open_clip.get_tokenizer(name)
    except ModelUnavailable:
        raise
    except (RuntimeError, OSError, ValueError) as e:
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelUnavailable(
            f"cannot load model '{spec}': weights not found locally (looked in {where}) "
            f"and could not be fetched ({reason})"
        ) from e
    model.eval()
    return model, tokenizer, dict(open_clip.get_model_preprocess_cfg(model)), parsed


class TorchEncoder(PixelInputs):
    """open_clip on torch, satisfying the Encoder Protocol: L2-normalised float32 (N, D) under inference_mode."""

    def __init__(self, spec: str, device: str | None = None) -> None:
        self.spec = spec
        self.device = pick_device(device)
        self.model, self.tokenizer, pp, parsed = build_model(spec, self.device)
        self.preprocess_spec = self.preprocess_spec_from(pp)
        self.folder = parsed.folder  # model folders may carry their own prompt templates (templates.txt)
        self._mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), device=self.device).view(1, 3, 1, 1)
        self._text_tower = _causal_text_tower(self.model)  # looked up once, not per query
        with torch.inference_mode():
            dim = int(self.encode_texts(["a photo"]).shape[1])
        label = f"{parsed.arch}:{_weights_id(parsed)}"
        canon = json.dumps({"label": label, "pp": pp, "dim": dim}, sort_keys=True, default=str)
        self.space = EmbeddingSpace(hashlib.sha1(canon.encode()).hexdigest()[:16], label, dim)
        self.logit_scale = float(self.model.logit_scale.exp().item()) if hasattr(self.model, "logit_scale") else 100.0

    @staticmethod
    def preprocess_spec_from(pp: dict[str, Any]) -> PreprocessSpec:
        """The decoder's PreprocessSpec from open_clip's preprocess config."""
        size = pp.get("size", 224)
        size = size[0] if isinstance(size, list | tuple) else int(size)
        return PreprocessSpec(size=size, interpolation=str(pp.get("interpolation", "bicubic")),
                              resize_mode=str(pp.get("resize_mode", "shortest")),
                              fill_color=int(pp.get("fill_color", 0)))

    def default_templates(self) -> list[str] | None:
        """Prompt templates shipped with a model folder (one per line, with {}), else None."""
        path = self.folder / "templates.txt" if self.folder else None
        if path and path.is_file():
            return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if "{}" in t]
        return None

    def limit_threads(self, n: int | None) -> Any:
        """Use at most n CPU threads for the model (None: unchanged); returns a function restoring the old count."""
        old = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        return lambda: torch.set_num_threads(old)

    def _autocast(self) -> Any:
        if self.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    @staticmethod
    def _finish(t: torch.Tensor) -> np.ndarray:
        t = t.float()
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return t.cpu().numpy().astype(np.float32, copy=False)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of decoded model inputs, (N, S, S, 3) uint8 as produced by indexer.decode."""
        if len(pixels) == 0:
            return np.zeros((0, self.space.dim), np.float32)
        with torch.inference_mode(), self._autocast():
            pixels = np.require(pixels, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # a decoded upload is read-only
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
            return self._finish(self.model.encode_image(x))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts in batches; returns (N, D).

        Texts are tokenised once and batched by length. For the standard causal CLIP text tower two exact
        shortcuts apply, because causal attention means no position looks at anything after it: a batch runs only
        up to its longest text's end-of-text token instead of the full context (77 tokens), and a token prefix that
        every text of a batch shares (a prompt template's "a photo of a") is run once for the batch, not per text.
        Within a length, texts are sorted by their tokens so that prompts of one template land in one batch.
        """
        if not texts:
            return np.zeros((0, self.space.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        tower = self._text_tower
        lengths = tokens.argmax(dim=-1) + 1 if tower is not None else torch.full((len(texts),), tokens.shape[1])
        keys = tokens[:, : int(lengths.max())].numpy()
        order = torch.from_numpy(np.lexsort((*keys.T[::-1], lengths.numpy())))  # by length, then by tokens
        out: np.ndarray | None = None
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), _TEXT_BATCH):
                idx = order[i : i + _TEXT_BATCH]
                batch = tokens[idx].to(self.device)
                if tower is not None:
                    vecs = self._finish(tower.encode(batch[:, : int(lengths[idx].max())]))
                else:
                    vecs = self._finish(self.model.encode_text(batch))
                if out is None:  # the dimension is known only now when called from __init__
                    out = np.empty((len(texts), vecs.shape[1]), np.float32)
                out[idx.numpy()] = vecs
        assert out is not None
        return out


@dataclass(frozen=True)
class _CausalTextTower:
    """The parts of a standard CLIP text tower (causal mask, end-of-text pooling) needed to run it on a prefix."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    text_projection: Any
    prefix_ok: bool = False  # blocks are open_clip ResidualAttentionBlocks, batch-first: a shared prefix can run once

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features of token rows cut after their longest end-of-text token (argmax pooling)."""
        n = tokens.shape[1]
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else torch.float32
        shared = self._shared_prefix(tokens)
        if shared >= _MIN_SHARED_PREFIX:
            x = self._run_after_prefix(tokens, shared, cast)
        else:
            x = self.token_embedding(tokens).to(cast) + self.positional_embedding[:n].to(cast)
            x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1) - (n - x.shape[1])]
        if self.text_projection is None:
            return x
        proj = self.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def _shared_prefix(self, tokens: torch.Tensor) -> int:
        """How many leading tokens every row shares, leaving each row's end-of-text token in the rest; 0 when the
        blocks are not plain open_clip residual attention blocks (the only ones whose attention is re-run here)."""
        if not self.prefix_ok or len(tokens) < 2:
            return 0
        same = (tokens == tokens[:1]).all(dim=0)
        differs = torch.nonzero(~same)
        common = int(differs[0, 0]) if len(differs) else tokens.shape[1]
        return min(common, int(tokens.argmax(dim=-1).min()))

    def _run_after_prefix(self, tokens: torch.Tensor, p: int, cast: torch.dtype) -> torch.Tensor:
        """Hidden states of positions p.. of every row: the shared prefix runs once, as one sequence, and each block
        lets the rows' later positions attend to it (its keys and values come from that block's prefix input)."""
        n, blocks = tokens.shape[1], list(self.transformer.resblocks)
        mask = self.attn_mask[:n, :n]
        x = self.token_embedding(tokens[:1, :p]).to(cast) + self.positional_embedding[:p].to(cast)
        prefix_inputs = []
        for block in blocks:
            prefix_inputs.append(x)
            x = block(x, attn_mask=mask[:p, :p])
        x = self.token_embedding(tokens[:, p:]).to(cast) + self.positional_embedding[p:n].to(cast)
        rest_mask = mask[p:, :].to(x.dtype)  # later positions see the whole prefix and causally each other
        for block, prefix in zip(blocks, prefix_inputs, strict=True):
            kv = block.ln_1(torch.cat([prefix.expand(len(x), -1, -1), x], dim=1))
            attn = block.attn(kv[:, p:], kv, kv, need_weights=False, attn_mask=rest_mask)[0]
            x = x + block.ls_1(attn)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x


def _causal_text_tower(model: torch.nn.Module) -> _CausalTextTower | None:
    """The text tower when truncating it is exact (open_clip's CLIP and TextTransformer towers), else None."""
    owner = getattr(model, "text", model)  # CustomTextCLIP keeps it in .text, CLIP on the model itself
    pool = getattr(owner, "pool_type", getattr(owner, "text_pool_type", None))
    parts = [getattr(owner, n, None) for n in ("token_embedding", "positional_embedding", "transformer",
                                                "attn_mask", "ln_final")]
    if pool != "argmax" or any(p is None for p in parts) or getattr(owner, "cls_emb", None) is not None \
            or getattr(owner, "use_pad_mask", False) or not isinstance(parts[3], torch.Tensor):
        return None
    blocks = getattr(parts[2], "resblocks", None)
    prefix_ok = getattr(parts[2], "batch_first", False) and blocks is not None and all(
        type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") and b.attn.batch_first for b in blocks)
    return _CausalTextTower(*parts, getattr(owner, "text_projection", None), bool(prefix_ok))


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names from open_clip's zero-shot metadata (a built-in vocabulary)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates as ``{}`` format strings (the default prompt ensemble)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    out = []
    for t in OPENAI_IMAGENET_TEMPLATES:
        out.append(t("{}") if callable(t) else str(t))
    return out
