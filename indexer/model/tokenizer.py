"""CLIP's byte-level BPE tokenizer without torch: the ONNX backend's text input, token for token open_clip's.

open_clip's `SimpleTokenizer` lives in a module that imports torch at its top, so importing it would cost the
ONNX backend the 1.5-2 s start-up it exists to avoid. This is the same algorithm (ftfy + html unescape, whitespace
cleaning, the same regex, the same merges from `bpe_simple_vocab_16e6.txt.gz`), returning NumPy int64 rows;
tests/test_onnx.py checks the ids against open_clip's on many strings.
"""

from __future__ import annotations

import gzip
import html
import string
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's vocabulary, copied next to each export
CLEAN_MODES = ("lower", "whitespace", "canonicalize")  # open_clip's `clean` options
_N_MERGES = 49152 - 256 - 2  # merges open_clip reads from the file (the vocabulary is 49408 with the specials)
_PUNCT = str.maketrans("", "", string.punctuation)
_PRE_TOKENS = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokens


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible byte → printable unicode map, so BPE never sees whitespace or control characters (as CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _clean(text: str, mode: str) -> str:
    """open_clip's `basic_clean` followed by the chosen cleaning (lower-casing is the CLIP default)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCT).lower()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


class BpeTokenizer:
    """Texts → (N, context_length) int64 token ids, identical to open_clip's SimpleTokenizer (truncation included:
    a text longer than the context keeps its first tokens and ends with the end-of-text token)."""

    def __init__(self, bpe_path: str | Path, context_length: int = 77, clean: str = "lower",
                 additional_special_tokens: list[str] | None = None) -> None:
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r} (open_clip has {', '.join(CLEAN_MODES)})")
        self.byte_encoder = _bytes_to_unicode()
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        specials = ["<start_of_text>", "<end_of_text>", *(additional_special_tokens or [])]
        vocab += specials
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, str] = {t: t for t in specials}
        self.pattern = regex.compile("|".join(specials) + _PRE_TOKENS, regex.IGNORECASE)
        self.sot_token_id, self.eot_token_id = self.encoder[specials[0]], self.encoder[specials[1]]
        self.context_length = context_length
        self.clean = clean

    def bpe(self, token: str) -> str:
        """The space-separated BPE pieces of one pre-token (the lowest-ranked pair merges first, as in CLIP)."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start and end tokens."""
        ids: list[int] = []
        for token in self.pattern.findall(_clean(text, self.clean)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int64: start token, text tokens, end token, zero padding."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
