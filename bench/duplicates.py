"""Near-duplicate groups: pair precision/recall on a generated library with known groups, per model, and the time
to group 1M photos (synthetic vectors and signatures).

Quality (`--originals N`, default 80): each original (a sample-library image, indexer/model/sample.py) gets four
copies: resized to 40-70 %, recompressed at JPEG quality 40, cropped by 5 % of each side's length (at a random
offset), brightness-shifted by +/-25 levels; every fourth original also a byte-identical copy. Beside
them, two distinct photos of the same class, colour, background and size per original (hard negatives: the same
kind of picture, not a copy). The library is indexed with each model through the real pipeline, then
find_duplicate_groups runs with its defaults; precision and recall are over unordered photo pairs.

Scale (`--scale N`, e.g. 1000000): N synthetic 512-d vectors (clustered, like CLIP embeddings), 2 % of them
near-copies of another photo (vector, layout descriptor and hashes perturbed slightly) and 0.5 % byte-identical
copies, written to a SQLite catalog (setup, untimed, kept in --workdir); timed: one find_duplicate_groups call with
the synthetic signatures (reading the vectors from the catalog included), wall clock and CPU seconds.

    python bench/duplicates.py [--originals 80] [--models demo ViT-B-32:none]
    python bench/duplicates.py --scale 1000000 --workdir /tmp/bench-dup
"""

from __future__ import annotations

import argparse
import io
import itertools
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from clipsearch.indexer.ingest.phash import COLOUR_DIM, DESCRIPTOR_DIM, N_HASHES, SignatureTable
from clipsearch.indexer.model.sample import render, sample_items


def _brightness(im: Image.Image, shift: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + shift, 0, 255).astype(np.uint8))


def copies(im: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """The four edited copies of one original."""
    w, h = im.size
    f = rng.uniform(0.4, 0.7)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=40)
    dx, dy = round(w * 0.05), round(h * 0.05)
    ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))  # anywhere, not only where the hashes look
    return {"resized": im.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS),
            "q40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "crop": im.crop((ox, oy, ox + w - dx, oy + h - dy)),
            "bright": _brightness(im, int(rng.choice([-25, 25])))}


def make_library(root: Path, originals: int, seed: int = 0) -> list[list[str]]:
    """Write the library; returns the true groups as lists of file paths."""
    rng = np.random.default_rng(seed)
    groups = []
    for i, item in enumerate(sample_items(originals, seed)):
        size = int(rng.integers(200, 360)), int(rng.integers(180, 340))
        orig = render(item, *size, rng)
        folder = root / f"g{i:04d}"
        folder.mkdir(parents=True)
        orig.save(folder / "orig.jpg", quality=92)
        group = [str(folder / "orig.jpg")]
        for name, im in copies(orig, rng).items():
            path = folder / (f"{name}.jpg" if name != "resized" else "resized.png")
            im.save(path, quality=92) if path.suffix == ".jpg" else im.save(path)
            group.append(str(path))
        if i % 4 == 0:
            (folder / "exact.jpg").write_bytes((folder / "orig.jpg").read_bytes())
            group.append(str(folder / "exact.jpg"))
        for j in range(2):
            render(item, int(rng.integers(200, 360)), int(rng.integers(180, 340)), rng).save(
                root / f"g{i:04d}" / f"distinct{j}.jpg", quality=92)
        groups.append(group)
    return groups


def pairs_of(groups: list[list[str]]) -> set[tuple[str, str]]:
    """Unordered pairs within each group."""
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}  # type: ignore[misc]


def quality(originals: int, models: list[str], workdir: Path) -> None:
    """Index the generated library with each model and score the groups."""
    from clipsearch.indexer.app import build_indexer, open_parts
    from clipsearch.indexer.config import AppConfig
    from clipsearch.search.duplicates import find_duplicate_groups
    from clipsearch.search.service import build_service

    root = workdir / "library"
    truth = pairs_of(make_library(root, originals))
    n_files = sum(1 for _ in root.rglob("*.*"))
    print(f"library: {originals} originals, {n_files} photos, {len(truth)} true duplicate pairs")
    print("| model | found groups | found pairs | precision | recall | seconds (signatures + grouping) |")
    print("|---|---|---|---|---|---|")
    for spec in models:
        config = AppConfig(home=workdir / f"home-{spec.replace(':', '_').replace('/', '_')}", model=spec, device="cpu")
        build_indexer(config).run([root])
        service = build_service(config)
        parts = open_parts(config)
        t0 = time.perf_counter()
        groups = find_duplicate_groups(parts.catalog, service.space())
        took = time.perf_counter() - t0
        found = pairs_of([[m.path for m in g.members] for g in groups])
        tp = len(found & truth)
        precision, recall = tp / max(len(found), 1), tp / len(truth)
        print(f"| {spec} | {len(groups)} | {len(found)} | {precision:.3f} | {recall:.3f} | {took:.1f} |")
        missed = truth - found
        if missed:
            kinds: dict[str, int] = {}
            for a, b in missed:
                key = "-".join(sorted(Path(x).stem for x in (a, b)))
                kinds[key] = kinds.get(key, 0) + 1
            print("   missed pairs by kind:", dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:8]))
        wrong = found - truth
        if wrong:
            print("   false pairs (examples):", [tuple(Path(x).parent.name + "/" + Path(x).stem for x in p)
                                               for p in list(wrong)[:6]])


def _synthetic_vectors(n: int, dim: int, src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clustered unit vectors (2,000 directions plus noise, like bench/vector_search.py); copies (src >= 0) are
    their source plus a little noise (cosine ~0.99)."""
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 2000, n)] + rng.normal(0, 0.9 / np.sqrt(dim), (n, dim)).astype(np.float32)
    copy = src >= 0
    x[copy] = x[src[copy]] + rng.normal(0, 0.1 / np.sqrt(dim), (int(copy.sum()), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_signatures(ids: np.ndarray, src: np.ndarray, rng: np.random.Generator) -> SignatureTable:
    """Random signatures; a copy's are its source's with 2 hash bits flipped and a little noise elsewhere."""

    n = len(ids)
    hashes = rng.integers(0, 2**63, (n, N_HASHES), dtype=np.uint64)
    centres = rng.normal(size=(1000, DESCRIPTOR_DIM)).astype(np.float32)
    desc = centres[rng.integers(0, 1000, n)] + rng.normal(0, 0.5, (n, DESCRIPTOR_DIM)).astype(np.float32)
    colours = rng.integers(-60, 60, (n, COLOUR_DIM)).astype(np.int8)
    aspects = rng.uniform(0.6, 1.8, n).astype(np.float32)
    copy = np.flatnonzero(src >= 0)
    flips = (np.uint64(1) << rng.integers(0, 63, (len(copy), 2)).astype(np.uint64)).sum(axis=1, dtype=np.uint64)
    hashes[copy] = hashes[src[copy]] ^ flips[:, None]
    desc[copy] = desc[src[copy]] + rng.normal(0, 0.05, (len(copy), DESCRIPTOR_DIM)).astype(np.float32)
    colours[copy] = np.clip(colours[src[copy]].astype(np.int16) + rng.integers(-2, 3, (len(copy), COLOUR_DIM)),
                            -128, 127).astype(np.int8)
    aspects[copy] = aspects[src[copy]]
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return SignatureTable(ids, hashes, desc, colours, aspects)


def _fill(cat, space_id: int, vectors: np.ndarray, hashes: list[str]) -> None:  # noqa: ANN001
    from sqlalchemy import insert

    from clipsearch.indexer.storage.schema import embeddings, photos

    now = datetime.now()
    with cat.engine.begin() as conn:
        for start in range(0, len(vectors), 50_000):
            part = range(start, min(start + 50_000, len(vectors)))
            conn.execute(insert(photos), [{"id": i + 1, "path_bytes": f"/p/{i}.jpg".encode(), "path": f"/p/{i}.jpg",
                                           "folder": "/p", "size": 1000 + i, "mtime_ns": 1, "status": "indexed",
                                           "content_hash": hashes[i], "width": 4000, "height": 3000, "date": now,
                                           "updated_at": now} for i in part])
            conn.execute(insert(embeddings), [{"photo_id": i + 1, "space_id": space_id,
                                               "vector": vectors[i].astype("<f4").tobytes()} for i in part])


def scale(n: int, workdir: Path, dim: int = 512, seed: int = 0) -> None:
    """Time grouping n synthetic photos: 2 % near-copies, 0.5 % byte-identical copies (setup kept in workdir)."""
    from clipsearch.indexer.storage.catalog import Catalog
    from clipsearch.search.duplicates import find_duplicate_groups

    rng = np.random.default_rng(seed)
    src = np.full(n, -1, np.int64)
    pick = rng.choice(np.arange(n // 2, n), size=n // 40, replace=False)  # 2.5 % of the photos are copies
    exact = pick[n // 50 :]  # 0.5 % byte-identical; the first 2 % are near-copies
    src[pick] = rng.integers(0, n // 2, len(pick))
    cat = Catalog(f"sqlite:///{workdir}/cat.db")
    sid = cat.ensure_space("bench", "synthetic", "synthetic", dim)
    if cat.space(sid).count != n:
        t = time.perf_counter()
        hashes = [f"h{i}" for i in range(n)]
        for i in exact:
            hashes[i] = hashes[src[i]]
        vectors = _synthetic_vectors(n, dim, np.where(np.isin(np.arange(n), exact), -1, src), rng)
        vectors[exact] = vectors[src[exact]]  # a byte-identical copy has its source's vector
        _fill(cat, sid, vectors, hashes)
        print(f"setup (catalog, untimed): {time.perf_counter() - t:.0f} s")
    table = synthetic_signatures(np.arange(1, n + 1, dtype=np.int64), src, np.random.default_rng(seed + 1))
    space = cat.space(sid)
    t, cpu = time.perf_counter(), time.process_time()
    groups = find_duplicate_groups(cat, space, signatures=table, on_progress=_progress())
    took, cpu = time.perf_counter() - t, time.process_time() - cpu
    grouped = {i for g in groups for i in g.ids}
    want = {int(i) + 1 for i in np.flatnonzero(src >= 0)} | {int(s) + 1 for s in src[src >= 0]}
    print(f"{n} photos: {len(groups)} groups, {len(grouped)} photos grouped ({len(grouped & want)} of the "
          f"{len(want)} planted copies and originals) in {took:.0f} s wall ({took / 60:.1f} min), {cpu:.0f} CPU s")


def _progress():  # noqa: ANN202
    last: dict[str, float] = {}
    t0 = time.perf_counter()

    def report(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done >= total or now - last.get(stage, 0) > 30:
            last[stage] = now
            print(f"  {now - t0:6.0f} s  {stage}: {done}/{total}", flush=True)

    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--originals", type=int, default=80)
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-32:none"])
    ap.add_argument("--scale", type=int, default=0, help="time grouping of this many synthetic photos instead")
    ap.add_argument("--workdir", type=Path, help="keep generated files here (the scale setup is reused)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.scale:
            scale(args.scale, work)
        else:
            quality(args.originals, args.models, work)
    print(f"finished {datetime.now():%Y-%m-%d %H:%M}")


if __name__ == "__main__":
    main()
