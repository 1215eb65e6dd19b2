"""Perceptual signatures: what a photo looks like at the pixel level, whatever model embedded it. Torch-free.

Duplicate detection confirms every candidate pair with these, so that the answer never depends on how good the
model is (a random-weight network puts every photo of one colour next to each other). A signature holds:

* ``hashes``: a 63-bit pHash (signs of the low 8x8 DCT coefficients of a 32x32 grey image, DC left out, against
  their median) of the whole photo, then of nine crops at 95 % scale (corners, edge centres, centre). A copy
  cropped by up to ~5 % lines up with one of the nine within ~1 % of the photo, where a whole-photo pHash differs
  in a third of its bits. Dropping DC and thresholding at the median make it blind to a brightness shift;
* ``descriptor``: the same 63 coefficients of the whole photo as an L2-normalised vector: a tiny, brightness- and
  contrast-invariant layout descriptor that FAISS can search for near neighbours (candidates without the model);
* ``colours``: two opponent-colour channels (R - G, (R + G) / 2 - B) averaged over a 4x4 grid: a brightness shift
  leaves them alone, while two photos with one layout but other colours (another object, another background)
  differ there, which the grey hashes cannot see;
* ``aspect``: width / height. Resized and recompressed copies keep it, slight crops change it by a few percent,
  and it separates many unrelated photos that happen to share a layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipsearch.indexer.ingest.decode import open_image

SIGNATURE_VERSION = 1  # bump when the computation changes: stored signatures of an older version are recomputed
N_HASHES = 10  # the whole photo, then nine 95 % crops
DESCRIPTOR_DIM = 64  # 63 AC coefficients, zero-padded to 64 (FAISS likes multiples of 4)
COLOUR_DIM = 32  # 4x4 grid x 2 opponent channels
_SIDE = 32  # grey image side the DCT runs on
_LOW = 8  # low-frequency block side
_CROP = 0.95  # crop scale of the variant hashes
_WORK_SIDE = 256  # photos are first reduced to about this size: the hashes only see 32x32 anyway


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in; older numpy counts bytes through a table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= math.sqrt(2)
    return m * math.sqrt(2 / n)


_DCT = _dct_matrix(_SIDE)


@dataclass(frozen=True)
class PerceptualSignature:
    """One photo's signature (see the module docstring)."""

    hashes: tuple[int, ...]  # N_HASHES 63-bit pHashes: whole photo first, then the 95 % crops
    descriptor: np.ndarray  # float32 (DESCRIPTOR_DIM,), L2-normalised low-frequency layout
    colours: np.ndarray  # int8 (COLOUR_DIM,): opponent colours on a 4x4 grid, halved to fit a byte
    aspect: float  # width / height of the upright photo


def _low_coefficients(grey: np.ndarray) -> np.ndarray:
    """The 63 AC coefficients of the low 8x8 DCT block of a 32x32 grey image."""
    coeffs = _DCT @ grey @ _DCT.T
    return coeffs[:_LOW, :_LOW].ravel()[1:]


def _hash(low: np.ndarray) -> int:
    bits = (low > np.median(low)).astype(np.uint8)
    return int.from_bytes(np.packbits(bits).tobytes(), "big") >> 1  # 63 bits in 8 bytes, last bit padding


def _grey(im: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(im.resize((_SIDE, _SIDE), Image.Resampling.BOX, box=box), np.float64)


def _crop_boxes(w: int, h: int) -> list[tuple[float, float, float, float]]:
    cw, ch = w * _CROP, h * _CROP
    return [((w - cw) * fx, (h - ch) * fy, (w - cw) * fx + cw, (h - ch) * fy + ch)
            for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0)]


def _colours(rgb: Image.Image) -> np.ndarray:
    cells = np.asarray(rgb.resize((4, 4), Image.Resampling.BOX), np.float64)
    r, g, b = cells[..., 0], cells[..., 1], cells[..., 2]
    return np.clip(np.round(np.stack([r - g, (r + g) / 2 - b], axis=-1).ravel() / 2), -128, 127).astype(np.int8)


def signature_of_image(im: Image.Image) -> PerceptualSignature:
    """Signature of an upright image (any mode). Pure computation, about a millisecond on a 256-px image."""
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    rgb = im.convert("RGB")
    if max(w, h) > 2 * _WORK_SIDE:
        rgb = rgb.reduce(max(1, max(w, h) // _WORK_SIDE))
    grey = rgb.convert("L")
    gw, gh = grey.size
    whole = _low_coefficients(_grey(grey, (0, 0, gw, gh)))
    hashes = [_hash(whole)] + [_hash(_low_coefficients(_grey(grey, box))) for box in _crop_boxes(gw, gh)]
    norm = float(np.linalg.norm(whole))
    descriptor = np.zeros(DESCRIPTOR_DIM, np.float32)
    if norm > 1e-9:  # a flat image has no layout: its descriptor stays zero and matches nothing
        descriptor[: len(whole)] = whole / norm
    return PerceptualSignature(tuple(hashes), descriptor, _colours(rgb), w / h)


def signature_of_bytes(data: bytes, max_pixels: int = 100_000_000) -> PerceptualSignature:
    """Signature of an image file's bytes through the safe decoder (EXIF orientation applied, JPEG decoded at a
    reduced DCT scale). Raises DecodeError (a ValueError) with a reason on bad input."""
    im, _ = open_image(data, max_pixels, draft_to=_WORK_SIDE)
    return signature_of_image(im)


def signature_of_file(path: str | bytes | os.PathLike[str], max_pixels: int = 100_000_000) -> PerceptualSignature:
    """Signature of an image file; OSError when unreadable, ValueError when it does not decode."""
    with open(path if not isinstance(path, Path) else str(path), "rb") as f:
        data = f.read()
    return signature_of_bytes(data, max_pixels)


@dataclass(frozen=True)
class SignatureTable:
    """Signatures of many photos as arrays, for vectorised comparison: row i belongs to photo ids[i] (sorted)."""

    ids: np.ndarray  # int64 (n,), ascending
    hashes: np.ndarray  # uint64 (n, N_HASHES)
    descriptors: np.ndarray  # float32 (n, DESCRIPTOR_DIM)
    colours: np.ndarray  # int8 (n, COLOUR_DIM)
    aspects: np.ndarray  # float32 (n,)

    @classmethod
    def from_signatures(cls, items: dict[int, PerceptualSignature]) -> SignatureTable:
        """Arrays from a photo id → signature mapping."""
        ids = np.array(sorted(items), dtype=np.int64)
        if not len(ids):
            return cls.empty()
        sigs = [items[int(i)] for i in ids]
        return cls(ids, np.array([s.hashes for s in sigs], dtype=np.uint64),
                   np.stack([s.descriptor for s in sigs]).astype(np.float32),
                   np.stack([s.colours for s in sigs]).astype(np.int8),
                   np.array([s.aspect for s in sigs], dtype=np.float32))

    @classmethod
    def empty(cls) -> SignatureTable:
        """No signatures."""
        return cls(np.zeros(0, np.int64), np.zeros((0, N_HASHES), np.uint64),
                   np.zeros((0, DESCRIPTOR_DIM), np.float32), np.zeros((0, COLOUR_DIM), np.int8),
                   np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, photo_ids: np.ndarray) -> np.ndarray:
        """Row of each photo id, -1 where it has no signature."""
        photo_ids = np.asarray(photo_ids, dtype=np.int64)
        if not len(self.ids):
            return np.full(len(photo_ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, photo_ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == photo_ids, pos, -1)

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Hamming distance of rows a[i], b[i]: the whole photo of each against every hash of the other (whole
        and crops), the smaller; so a slightly cropped copy is compared with the matching crop of the original."""
        ha, hb = self.hashes[a], self.hashes[b]
        d_ab = popcount(ha[:, :1] ^ hb).min(axis=1)
        d_ba = popcount(hb[:, :1] ^ ha).min(axis=1)
        return np.minimum(d_ab, d_ba).astype(np.int32)

    def colour_changes(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Mean absolute difference of the opponent-colour grids of rows a[i], b[i], in 8-bit levels."""
        diff = self.colours[a].astype(np.int16) - self.colours[b].astype(np.int16)
        return np.abs(diff).mean(axis=1) * 2

    def aspect_changes(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """|log| of the ratio of the aspect ratios of rows a[i], b[i] (0: same shape)."""
        return np.abs(np.log(np.maximum(self.aspects[a], 1e-6) / np.maximum(self.aspects[b], 1e-6)))
