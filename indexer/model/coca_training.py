"""The demo CoCa (issue 18): a small open_clip CoCa with a CNN image tower, its training and its loading.

Why a CoCa beside the embedding captioner (captioner.py): it reads the photo's pixels, so it needs no CLIP
embedding and no particular model in use, and it is the architecture users bring at full size (coca_ViT-B-32).
It is open_clip's own CoCa class (text tower, multimodal decoder, `generate`), trained with open_clip's CoCa loss
(contrastive + captioning), saved as an open_clip model folder (open_clip_config.json + safetensors).

Two departures from open_clip's configs, both measured on this kind of library (bench/RESULTS.md): the image tower
is a CNN, not a ViT, started from the demo CLIP model's resnet10t (its stem and first two stages): a ViT or a CNN
trained from scratch by the CoCa loss on 6,000 photos for minutes on a CPU still guesses the shape (19-28 %),
while the demo model's early stages already separate shapes. So the folder's config says `conv_vision_cfg` and is
built by `build_coca` here (pixel_models.py's CocaCaptioner reads such folders through `load_coca`); the folder
holds every weight it needs, the demo model is read only at training time. And the text side is 32 wide, because
open_clip's BPE tokenizer has 49,408 tokens and a CoCa holds two tables of that many rows (the text tower's token
embedding, the decoder's output projection): in float16 the whole model is 7.2 MB. Images are decoded once by the
indexer's decoder (what captioning sees) and kept as uint8 in memory, as `clipsearch train` does.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.datasets import load_caption_pairs
from clipsearch.indexer.model.training import _augment, _epoch_batches, _load_images, save_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocaConfig:
    """The architecture and the run: every field a trained demo CoCa depends on (saved beside it)."""

    width: int = 32  # text tower, decoder and embedding width; each of the two vocab tables is 49408 x width
    text_layers: int = 1  # text tower (encodes the caption for the contrastive loss and the decoder's input)
    decoder_layers: int = 2  # multimodal decoder: self-attention over the caption + cross-attention to the image
    heads: int = 2  # attention heads of the text side (width / heads per head)
    trunk: str = "resnet10t"  # timm CNN of the image tower: the demo CLIP model's
    trunk_stages: int = 2  # its stages kept (stem + layer1..N): 2 leaves an (image_size / 8)^2 grid of cells
    init_from: str = "demo"  # CLIP model spec whose trunk starts the tower (init_tower); "none": random weights
    image_size: int = 64  # the demo CLIP model's input side
    image_queries: int = 9  # attentional-pooler queries: 1 for the contrastive embedding, the rest for the decoder
    context_length: int = 16  # caption tokens, start and end included (make-sample captions need 11 at most)
    epochs: int = 6
    batch_size: int = 32  # smaller batches, more steps: the same minutes reach a lower loss (measured)
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    caption_loss_weight: float = 2.0  # open_clip's CoCa defaults (--coca-caption-loss-weight)
    clip_loss_weight: float = 1.0  # (--coca-contrastive-loss-weight)
    hard_batches: float = 0.75  # share of photos in batches whose captions differ in one word only (as the demo
    # CLIP model was trained): without them colour and background tell every caption apart, and shape is not learnt
    hard_word: int = 3  # that word's position: 3 is the shape in make-sample's "a SIZE COLOUR SHAPE on BACKGROUND"
    augment: str = "none"  # none | flip | dihedral (training.py's); the library's photos are upright
    seed: int = 0  # torch and batch-order seed
    workers: int = 2  # decode processes for the one-time image load


@dataclass
class CocaReport:
    """Per-epoch figures of a run."""

    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def model_config(cfg: CocaConfig) -> dict[str, Any]:
    """The CoCa config (the `model_cfg` of open_clip_config.json): open_clip's text and multimodal configs, and the
    CNN image tower's."""
    text = {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.width, "heads": cfg.heads,
            "layers": cfg.text_layers, "embed_cls": True, "output_tokens": True}
    return {
        "embed_dim": cfg.width,
        "conv_vision_cfg": {"image_size": cfg.image_size, "timm_model_name": cfg.trunk, "stages": cfg.trunk_stages,
                            "queries": cfg.image_queries, "heads": cfg.heads},
        "text_cfg": text,
        "multimodal_cfg": {**text, "layers": cfg.decoder_layers, "attn_pooler_heads": cfg.heads},
    }


class ConvTower(torch.nn.Module):
    """The image tower: the first `stages` stages of a timm CNN (the demo CLIP model's resnet10t), whose feature
    map's cells are pooled by open_clip's AttentionalPooler into the contrastive embedding and the decoder's image
    tokens, as open_clip's ViT does for CoCa."""

    def __init__(self, embed_dim: int, image_size: int, timm_model_name: str, stages: int, queries: int,
                 heads: int) -> None:
        super().__init__()
        import timm
        from open_clip.transformer import AttentionalPooler, LayerNorm

        self.trunk = timm.create_model(timm_model_name, pretrained=False, num_classes=0, global_pool="")
        for name in ("layer1", "layer2", "layer3", "layer4")[stages:]:  # later stages: not kept, not stored
            setattr(self.trunk, name, torch.nn.Identity())
        with torch.no_grad():
            channels = self.trunk.forward_features(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.attn_pool = AttentionalPooler(embed_dim, channels, n_head=heads, n_queries=queries)
        self.ln_post = LayerNorm(embed_dim)
        self.proj = torch.nn.Parameter(torch.randn(embed_dim, embed_dim) * embed_dim**-0.5)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (N, D), tokens (N, queries, D)): open_clip's visual contract with output_tokens. The decoder also
        reads the contrastive query's token, where the contrastive loss puts what tells captions apart."""
        cells = self.trunk.forward_features(x).flatten(2).transpose(1, 2)
        tokens = self.ln_post(self.attn_pool(cells))
        return tokens[:, 0] @ self.proj, tokens


def init_tower(model: Any, spec: str) -> None:
    """Start the image tower's CNN from the trunk of a CLIP model of the same timm architecture (`demo`): its
    weights already tell shapes apart (a linear probe on the demo model's first two stages names 95 % of held-out
    shapes), which a CNN trained from scratch by the CoCa loss does not learn in a CPU budget."""
    from clipsearch.indexer.model.torch_encoder import build_model

    clip = build_model(spec, "cpu")[0]
    source = getattr(getattr(clip.visual, "trunk", None), "state_dict", dict)()
    ours = model.visual.trunk.state_dict()
    if not ours.keys() <= source.keys() or any(source[k].shape != v.shape for k, v in ours.items()):
        raise UsageError(f"the image tower of '{spec}' is not a {type(model.visual.trunk).__name__} like this one")
    model.visual.trunk.load_state_dict({k: source[k].float() for k in ours})


def build_coca(model_cfg: dict[str, Any]) -> Any:
    """open_clip's CoCa with the CNN image tower of `conv_vision_cfg` in place of its ViT (untrained weights)."""
    conv = model_cfg["conv_vision_cfg"]
    stub = {"image_size": conv["image_size"], "layers": 1, "width": 8, "head_width": 8,
            "patch_size": conv["image_size"]}  # CoCa builds a ViT from vision_cfg: the smallest one, replaced
    model = open_clip.CoCa(embed_dim=model_cfg["embed_dim"], text_cfg=model_cfg["text_cfg"],
                           multimodal_cfg=model_cfg["multimodal_cfg"], vision_cfg=stub)
    model.visual = ConvTower(model_cfg["embed_dim"], **conv)
    # open_clip never initialises the decoder's output projection (torch.empty: whatever the memory held, NaN at
    # times): zeros give every token the same first guess, the same on every run
    torch.nn.init.zeros_(model.text_decoder.text_projection)
    return model


def load_coca(folder: Path, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, preprocess config) of a folder written by `save_coca`; a missing or
    mismatched weights file is a one-line ModelUnavailable."""
    import json

    from safetensors.torch import load_file

    from clipsearch.indexer.errors import ModelUnavailable

    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    model = build_coca(config["model_cfg"])
    try:
        state = load_file(str(folder / "open_clip_model.safetensors"))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (OSError, RuntimeError) as e:
        raise ModelUnavailable(f"the CoCa weights in {folder} cannot be read ({str(e).splitlines()[0][:160]}): "
                               "rebuild them with `make demo-coca`") from e
    tokenizer = open_clip.SimpleTokenizer(context_length=config["model_cfg"]["text_cfg"]["context_length"])
    return model.eval().to(device), tokenizer, config["preprocess_cfg"]


def preprocess_config(cfg: CocaConfig) -> dict[str, Any]:
    """Input preprocessing, as the demo CLIP model's: the whole photo squashed to a square (nothing cropped)."""
    return {"size": [cfg.image_size, cfg.image_size], "mode": "RGB", "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "squash",
            "fill_color": 0}


def load_library(data: Path, cfg: CocaConfig, captions: str = "captions.txt") -> tuple[np.ndarray, list[str]]:
    """(uint8 pixels (N, S, S, 3), first caption of each photo) of a captioned library, in a stable order."""
    from clipsearch.indexer.model.torch_encoder import TorchEncoder

    pairs = load_caption_pairs(data, captions)
    paths = sorted(pairs)
    pixels = _load_images(paths, TorchEncoder.preprocess_spec_from(preprocess_config(cfg)), cfg.workers)
    return pixels, [pairs[p][0] for p in paths]


class RowsCocaLoss(open_clip.CoCaLoss):
    """open_clip's CoCaLoss with the caption term taken over (token, vocabulary) rows instead of the permuted
    (N, vocabulary, L) tensor: the same weighted contrastive and mean token cross-entropy (pads ignored), but the
    49,408-way log-softmax runs over contiguous rows, 2.4x faster on a CPU, where it is most of a step."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale: torch.Tensor, output_dict: bool = False) -> Any:
        clip_loss = self.clip_loss_weight * open_clip.ClipLoss.forward(self, image_features, text_features,
                                                                       logit_scale)
        rows = logits.reshape(-1, logits.shape[-1])
        caption_loss = self.caption_loss_weight * self.caption_loss(rows, labels.reshape(-1))
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


def train_coca(pixels: np.ndarray, captions: list[str], cfg: CocaConfig, out: Path | None = None) -> tuple[Any,
                                                                                                          CocaReport]:
    """Train a CoCa on (pixels, captions) with CoCaLoss (text side and decoder from scratch, the image tower from
    `cfg.init_from`'s trunk); returns (model in eval mode, report) and, with `out`, writes the model folder
    (float16 weights) plus train_log.json."""
    if len(captions) != len(pixels) or len(captions) < cfg.batch_size:
        raise UsageError(f"need at least {cfg.batch_size} photos, one caption each")
    torch.manual_seed(cfg.seed)
    rnd = random.Random(cfg.seed)
    model = build_coca(model_config(cfg))
    if cfg.init_from != "none":
        init_tower(model, cfg.init_from)
    tokens = open_clip.tokenize(captions, context_length=cfg.context_length)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    by_index = {i: [c] for i, c in enumerate(captions)}
    plan = [_epoch_batches(list(range(len(captions))), by_index, cfg.batch_size, cfg.hard_batches, rnd,  # type: ignore[arg-type]
                           cfg.hard_word) for _ in range(cfg.epochs)]
    opt, sched = _optimizer(model, cfg, sum(len(batches) for batches in plan))
    loss_fn = RowsCocaLoss(caption_loss_weight=cfg.caption_loss_weight, clip_loss_weight=cfg.clip_loss_weight)
    report, t0 = CocaReport(), time.perf_counter()
    for epoch, batches in enumerate(plan):
        model.train()
        sums = np.zeros(2)
        for idx, _ in batches:
            x = _augment(torch.from_numpy(pixels[idx]), cfg.augment, rnd)
            x = x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
            sums += _step(model, x, _trim(tokens[idx]), loss_fn, opt, sched)
        row = {"epoch": epoch + 1, "contrastive_loss": sums[0] / len(batches), "caption_loss": sums[1] / len(batches),
               "seconds": time.perf_counter() - t0}
        report.epochs.append(row)
        log.warning("epoch %d/%d: contrastive %.4f caption %.4f (%.0f s)", epoch + 1, cfg.epochs,
                    row["contrastive_loss"], row["caption_loss"], row["seconds"])
    report.seconds = time.perf_counter() - t0
    report.images_per_second = len(captions) * cfg.epochs / max(1e-9, report.seconds)
    model.eval()
    if out is not None:
        save_coca(model, cfg, report, out)
    return model, report


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens cut to the batch's longest caption: trailing pads only cost vocabulary-wide logits."""
    return tokens[:, : int((tokens != 0).sum(dim=1).max())]


def _step(model: Any, x: torch.Tensor, tokens: torch.Tensor, loss_fn: Any, opt: Any, sched: Any) -> np.ndarray:
    """One optimiser step; returns the (contrastive, caption) losses."""
    out = model(x, tokens)
    clip_loss, caption_loss = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                      out["logit_scale"])
    opt.zero_grad(set_to_none=True)
    (clip_loss + caption_loss).backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return np.array([clip_loss.item(), caption_loss.item()])


def _optimizer(model: torch.nn.Module, cfg: CocaConfig, total: int) -> tuple[Any, Any]:
    """AdamW (weight decay on matrices only) with linear warmup and a cosine decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_coca(model: torch.nn.Module, cfg: CocaConfig, report: CocaReport, out: Path) -> Path:
    """Write the open_clip model folder (float16 weights) and the run's config and losses (train_log.json)."""
    import json

    save_model(model, model_config(cfg), preprocess_config(cfg), out, half=True)
    (out / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "epochs": report.epochs,
                                                    "seconds": round(report.seconds, 1)}, indent=2) + "\n")
    return out
