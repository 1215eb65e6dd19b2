"""Where a text query matches inside a photo: a relevance grid over the model's input (the torch side of `explain`).

Two methods; which one an image tower gets by default was decided by measurement (bench/explain.py, results in
bench/RESULTS.md, issue 18):

* ``gradcam`` (CNN towers): Grad-CAM of the query's cosine similarity with the image embedding, taken at the
  deepest stage that still has at least `MIN_CELLS` cells a side. The demo tower's last stage is 2x2 at 64 px,
  too coarse to point at anything (peak in the object's box 18 % of the time); its stride-8 stage (8x8) puts the
  peak in the box 91 % of the time.
* ``tokens`` (ViT towers, and CNNs with a linear head): the cosine of the query with every spatial position's
  features projected into the embedding space: a ViT's patch tokens after ``ln_post`` and ``proj`` (what
  open_clip pools into the image embedding), or a CNN's pre-pool feature map through its linear head (CAM).

The grid covers the model's square input; mapping it back onto the photo (crop, padding) is the service's job
(`clipsearch.search.explain`), which reaches this module only through `explainer_for`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.torch_encoder import build_model

log = logging.getLogger(__name__)

METHODS = ("auto", "gradcam", "tokens")
MIN_CELLS = 8  # Grad-CAM stage: the deepest one whose feature map is at least this many cells a side


@dataclass(frozen=True)
class RelevanceGrid:
    """How much each cell of the model's square input speaks for the query."""

    values: np.ndarray  # (h, w) float32 over the model input; higher = more relevant, scale is method-specific
    score: float  # cosine similarity of the query with the whole image, from the same forward pass
    method: str  # what produced it: "gradcam:layer2", "tokens", ...


class TorchExplainer:
    """Relevance grids from an open_clip model's image tower (ViT, timm CNN or open_clip's ModifiedResNet)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.visual = model.visual
        self.device = device
        pp = dict(open_clip.get_model_preprocess_cfg(model))
        self._mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))  # tensors are made per call, outside
        self._std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))  # any caller's inference_mode

    def default_method(self) -> str:
        """Grad-CAM for CNN towers, patch tokens for ViTs (see the module docstring for why)."""
        return "tokens" if isinstance(self.visual, VisionTransformer) else "gradcam"

    def relevance(self, pixels: np.ndarray, text_vec: np.ndarray, method: str = "auto") -> RelevanceGrid:
        """The relevance grid of one decoded model input, (S, S, 3) uint8, for an L2-normalised query vector."""
        if method not in METHODS:
            raise UsageError(f"unknown explain method '{method}' (choose {', '.join(METHODS)})")
        method = self.default_method() if method == "auto" else method
        with torch.inference_mode(False), torch.enable_grad():  # tensors made here can carry gradients
            x = torch.from_numpy(np.array(pixels, np.uint8)).to(self.device)
            mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in (self._mean, self._std))
            x = x.permute(2, 0, 1)[None].float().div(255.0).sub(mean).div(std)
            t = torch.from_numpy(np.asarray(text_vec, np.float32).copy()).to(self.device)
            if method == "gradcam":
                values, score, name = self._gradcam(x, t)
            else:
                values, score, name = self._tokens(x, t)
        return RelevanceGrid(values.detach().float().cpu().numpy(), score, name)

    # --- Grad-CAM --------------------------------------------------------------------------------------------
    def _stage(self, size: int) -> tuple[str, torch.nn.Module]:
        """The deepest CNN stage with at least MIN_CELLS cells a side at this input size (else the shallowest)."""
        vis = self.visual
        if isinstance(vis, TimmModel) and getattr(vis.trunk, "feature_info", None):
            stages = [(f["module"], int(f["reduction"])) for f in vis.trunk.feature_info]
            root: torch.nn.Module = vis.trunk
        elif isinstance(vis, ModifiedResNet):
            stages = [("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
            root = vis
        else:
            raise UsageError(f"gradcam needs a CNN image tower; this model's is a {type(vis).__name__} "
                             "(use the tokens method)")
        fitting = [name for name, reduction in stages if size // reduction >= MIN_CELLS]
        name = fitting[-1] if fitting else stages[0][0]
        return name, root.get_submodule(name)

    def _gradcam(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float, str]:
        """Grad-CAM: the stage's activations weighted by the spatial mean of the similarity's gradient, ReLU.

        The gradient is taken with autograd.grad, so nothing accumulates in the model's parameters (the model is
        shared with the encoder)."""
        name, module = self._stage(int(x.shape[-1]))
        seen: dict[str, torch.Tensor] = {}
        handle = module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("act", out))
        try:
            emb = self.visual(x.requires_grad_(True))
            score = (emb[0] / emb[0].norm().clamp_min(1e-12)) @ t
            (grad,) = torch.autograd.grad(score, seen["act"])
        finally:
            handle.remove()
        act = seen["act"].detach()
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1))[0]
        return cam, float(score.detach()), f"gradcam:{name}"

    # --- projected spatial features --------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float, str]:
        """Cosine of the query with each position's features in the embedding space; (h, w)."""
        with torch.no_grad():
            feats, pooled = self._spatial_embeddings(x)
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        score = float((pooled / pooled.norm().clamp_min(1e-12)) @ t)
        return feats @ t, score, "tokens"

    def _spatial_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((h, w, D) per-position embeddings, (D,) pooled image embedding) of one image."""
        vis = self.visual
        if isinstance(vis, VisionTransformer) and vis.attn_pool is None and vis.proj is not None \
                and not getattr(vis, "final_ln_after_pool", False):
            out = vis.forward_intermediates(x, indices=1, normalize_intermediates=True)
            tokens = out["image_intermediates"][-1][0].permute(1, 2, 0)  # (h, w, width) after ln_post
            return tokens @ vis.proj, out["image_features"][0]
        if isinstance(vis, TimmModel) and isinstance(getattr(vis.head, "proj", None), torch.nn.Linear) \
                and getattr(vis.trunk.global_pool, "pool_type", "") == "avg":
            fmap = vis.trunk.forward_features(x)[0].permute(1, 2, 0)  # (h, w, C) before average pooling
            return vis.head.proj(fmap), vis(x)[0]
        raise UsageError(f"the tokens method needs a ViT or a CNN with a linear head; this model's image tower is a "
                         f"{type(vis).__name__} with {type(getattr(vis, 'head', None)).__name__} (use gradcam)")


def explainer_for(encoder: Any) -> TorchExplainer:
    """An explainer sharing a torch encoder's model, or, for another backend (ONNX Runtime), a torch copy of the
    same spec loaded once per process on the CPU: both produce vectors of the same embedding space."""
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module) and hasattr(model, "visual"):
        return TorchExplainer(model, getattr(encoder, "device", "cpu"))
    return _explainer_for_spec(str(encoder.spec))


@functools.lru_cache(maxsize=2)
def _explainer_for_spec(spec: str) -> TorchExplainer:
    log.info("loading the torch model of %s to explain matches", spec)
    model, _, _, _ = build_model(spec, "cpu")
    return TorchExplainer(model, "cpu")
