"""Captioners and a question answerer that read the photo itself: open_clip's CoCa, and BLIP and ViLT through
transformers, for users who have their weights.

The demo captioner and answerer read a photo's stored CLIP embedding; these read pixels, so they describe what the
embedding cannot keep (who does what, where), at the price of decoding every photo and a model of hundreds of MB.
Each is built only when its spec is named, and nothing is fetched behind the user's back when the machine is
offline: the weights are looked up in the Hugging Face cache first, and a model that is neither there nor
reachable is one ModelUnavailable line that names the files to fetch and the folder they go in.
CoCa needs no transformers: with it, `model.generate` (beam search); without it, greedy decoding here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.indexer.errors import ModelUnavailable, UsageError
from clipsearch.indexer.ingest.decode import preprocess

CAPTION_TOKENS = 30  # longest caption, in tokens (CoCa's default seq_len)
MIN_TOKENS = 5  # shortest caption before an end token is allowed (CoCa's default min_seq_len)


def has_transformers() -> bool:
    """True when the transformers package can be imported (found without importing it)."""
    return importlib.util.find_spec("transformers") is not None


def hub_cache() -> str:
    """Where the Hugging Face weights are looked for: $CLIPSEARCH_MODEL_CACHE (as for the CLIP model), else
    huggingface_hub's own cache folder."""
    if os.environ.get("CLIPSEARCH_MODEL_CACHE"):
        return os.environ["CLIPSEARCH_MODEL_CACHE"]
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_reason(repo: str, files: tuple[str, ...] = ("config.json",)) -> str | None:
    """None when a hub repo's weights are a local folder, cached, or the hub answers; else why they cannot be had
    (checked in milliseconds offline, instead of a download timing out)."""
    if os.path.isdir(repo):
        return None
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=hub_cache()), str) for f in files):
        return None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        return f"huggingface.co unreachable: {e}"
    return None


def unavailable(role: str, spec: str, repo: str | None, reason: str | None, transformers: bool = False) -> str:
    """The one line for a model that cannot be loaded here: what to install, which weights to fetch, where."""
    needs = ["install transformers (pip install transformers)"] if transformers else []
    if reason and repo:
        needs.append(f"fetch its weights on a machine with internet with `hf download {repo} --cache-dir "
                     f"{hub_cache()}` and copy that folder to the same place here")
    why = f" ({reason})" if reason else ""
    return f"{role} '{spec}' is not available offline{why}: {'; '.join(needs)}"


def _pick_device(device: str | None) -> str:
    from clipsearch.indexer.model.torch_encoder import pick_device

    return pick_device(device)


class CocaCaptioner:
    """open_clip CoCa: `ARCH:TAG` (e.g. coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k), `ARCH:FILE`, a model
    folder, or `CONFIG.json:none` (untrained, for tests): the CLIP model's spec forms. A folder whose config has a
    `conv_vision_cfg` (the bundled demo CoCa, coca_training.py) is built by `load_coca`."""

    reads = "pixels"

    def __init__(self, spec: str, device: str | None = None) -> None:
        import open_clip
        import torch

        from clipsearch.indexer.model.torch_encoder import TorchEncoder, build_model, parse_spec

        parsed = parse_spec(spec)
        cfg = (json.loads((parsed.folder / "open_clip_config.json").read_text(encoding="utf-8")).get("model_cfg", {})
               if parsed.folder else open_clip.get_model_config(parsed.arch)) or {}
        if "multimodal_cfg" not in cfg:
            raise UsageError(f"'{spec}' has no caption decoder: captioning needs a CoCa model (coca_ViT-B-32, "
                             "coca_ViT-L-14)")
        if parsed.folder is None and parsed.weights and not os.path.isfile(parsed.weights):
            pre = open_clip.get_pretrained_cfg(parsed.arch, parsed.weights) or {}
            repo = (pre.get("hf_hub") or "").strip("/")
            if repo:
                reason = hub_reason(repo, (pre.get("hf_weights_file") or "open_clip_model.safetensors",
                                           "open_clip_pytorch_model.bin"))
                if reason:
                    raise ModelUnavailable(unavailable("captioner", spec, repo, reason))
        self.device = _pick_device(device)
        try:
            if parsed.folder is not None and "conv_vision_cfg" in cfg:  # the demo CoCa's CNN image tower
                from clipsearch.indexer.model.coca_training import load_coca

                self.model, self.tokenizer, pp = load_coca(parsed.folder, self.device)
            else:
                self.model, self.tokenizer, pp, _ = build_model(spec, self.device)
        except ModelUnavailable as e:
            raise ModelUnavailable(f"captioner '{spec}' cannot be loaded: {e}") from e
        self.preprocess_spec = TorchEncoder.preprocess_spec_from(pp)
        self._mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self._std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    def caption_images(self, images: list[Image.Image]) -> list[str]:
        """One caption per upright RGB image."""
        import torch

        if not images:
            return []
        pixels = np.stack([preprocess(im, self.preprocess_spec) for im in images])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        with torch.inference_mode():
            x = x.to(self.device)
            if has_transformers():
                tokens = self.model.generate(x, seq_len=self._longest(), min_seq_len=MIN_TOKENS)
            else:
                tokens = self._greedy(x)
        return [self._text(row) for row in tokens.cpu().tolist()]

    def _longest(self) -> int:
        """Tokens a caption may have, start token included: CAPTION_TOKENS, or fewer for a short text context."""
        return min(CAPTION_TOKENS, int(getattr(self.model.text, "context_length", 76)))

    def _greedy(self, x: Any) -> Any:
        """Greedy decoding with the model's own forward pass (what generate's top-k path does with k = 1)."""
        import torch

        sot = int(getattr(self.tokenizer, "sot_token_id", 49406))
        eot = int(getattr(self.tokenizer, "eot_token_id", 49407))
        latent, embs = self.model._encode_image(x)
        out = torch.full((x.shape[0], 1), sot, dtype=torch.long, device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(self._longest() - 1):
            logits = self.model(x, out, image_latent=latent, image_embs=embs,
                                output_labels=False)["logits"][:, -1]
            if step < MIN_TOKENS:
                logits[:, eot] = -torch.inf
            word = torch.where(done, eot, logits.argmax(dim=-1))
            out = torch.cat([out, word[:, None]], dim=1)
            done |= word == eot
            if bool(done.all()):
                break
        return out

    def _text(self, row: list[int]) -> str:
        if hasattr(self.tokenizer, "decode"):
            raw = self.tokenizer.decode(row)
        else:  # a Hugging Face tokenizer wrapped by open_clip
            raw = self.tokenizer.tokenizer.decode(row, skip_special_tokens=True)
        raw = raw.split("<end_of_text>")[0].replace("<start_of_text>", "")
        return " ".join(raw.split())


def _from_pretrained(role: str, spec: str, repo: str, classes: tuple[str, str], device: str | None) -> tuple:
    """(processor, model) of a transformers model, or the one line saying what to install and fetch."""
    reason = hub_reason(repo)
    if not has_transformers() or reason:
        raise ModelUnavailable(unavailable(role, spec, repo, reason, transformers=not has_transformers()))
    import transformers

    where = {} if os.path.isdir(repo) else {"cache_dir": hub_cache()}  # where hub_reason looked
    try:
        processor = getattr(transformers, classes[0]).from_pretrained(repo, **where)
        model = getattr(transformers, classes[1]).from_pretrained(repo, **where)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelUnavailable(unavailable(role, spec, repo, first)) from e
    return processor, model.eval().to(_pick_device(device))


class BlipCaptioner:
    """BLIP through transformers: `blip:Salesforce/blip-image-captioning-base`, or `blip:FOLDER` of its files."""

    reads = "pixels"

    def __init__(self, spec: str, repo: str, device: str | None = None) -> None:
        self.processor, self.model = _from_pretrained("captioner", spec, repo, ("BlipProcessor",
                                                      "BlipForConditionalGeneration"), device)

    def caption_images(self, images: list[Image.Image]) -> list[str]:
        """One caption per upright RGB image."""
        import torch

        if not images:
            return []
        with torch.inference_mode():
            inputs = self.processor(images=images, return_tensors="pt").to(self.model.device)
            out = self.model.generate(**inputs, max_new_tokens=CAPTION_TOKENS)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class ViltAnswerer:
    """ViLT through transformers: `vilt:dandelin/vilt-b32-finetuned-vqa`, or `vilt:FOLDER` of its files."""

    reads = "pixels"

    def __init__(self, spec: str, repo: str, device: str | None = None) -> None:
        self.processor, self.model = _from_pretrained("question model", spec, repo, ("ViltProcessor",
                                                      "ViltForQuestionAnswering"), device)

    def answer_images(self, images: list[Image.Image], questions: list[str]) -> list[tuple[str, float]]:
        """(answer, probability) per (image, question) pair; ViLT scores each answer independently (sigmoid)."""
        import torch

        out = []
        with torch.inference_mode():
            for im, q in zip(images, questions, strict=True):
                enc = self.processor(im, q, return_tensors="pt").to(self.model.device)
                probs = torch.sigmoid(self.model(**enc).logits[0])
                best = int(probs.argmax())
                out.append((str(self.model.config.id2label[best]), float(probs[best])))
        return out
