"""Text in photos through the product: `index --ocr`, `clipsearch ocr [--retry-failed]`, `text:"..."` and hybrid
queries through real `python -m clipsearch` processes (RapidOCR on a few small rendered images), the one-line error
without the `ocr` extra, and the service's text hits (OCR text and spans in `--json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from clipsearch.indexer.ingest.ocr import available

from .conftest import TINY, make_photo

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not available(), reason="rapidocr-onnxruntime is missing")]

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
HIT_KEYS = {"id", "path", "score", "z", "date", "width", "height", "format", "tags", "relevance", "confidence", "rank"}


def text_photo(path: Path, words: str) -> Path:
    """Dark words on a light card, spaced widely (a narrow gap is read as one word: "INVOICE2024")."""
    im = Image.new("RGB", (520, 200), (225, 215, 190))
    draw, font, x = ImageDraw.Draw(im), ImageFont.truetype(FONT, 40), 30
    for word in words.split():
        draw.text((x, 80), word, fill=(20, 20, 60), font=font)
        x += int(font.getlength(word)) + 36
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=92)
    return path


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_") or k == "CLIPSEARCH_MODEL_CACHE"}
    return subprocess.run([sys.executable, "-m", "clipsearch", "--home", str(home), *args], capture_output=True,
                          text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)


def ok_json(r: subprocess.CompletedProcess) -> object:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture()
def text_library(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    text_photo(root / "invoice.jpg", "INVOICE 2024")
    text_photo(root / "harbour.jpg", "HARBOUR CAFE")
    make_photo(root / "plain1.jpg", 1)
    make_photo(root / "plain2.jpg", 2)
    return root


def test_index_with_ocr_then_text_and_hybrid_queries(text_library: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = ok_json(cli(home, "--model", TINY, "index", str(text_library), "--ocr", "--json"))  # default: a pool
    assert run["indexed"] == 4
    assert {k: run["ocr"][k] for k in ("read", "with_text", "failed")} == {"read": 4, "with_text": 2, "failed": 0}
    assert run["stage_seconds"]["ocr"] > 0
    hits = ok_json(cli(home, "search", 'text:"invoice 2024"', "--json"))
    assert [Path(h["path"]).name for h in hits] == ["invoice.jpg"]  # the phrase, and nothing else
    ocr = hits[0]["ocr"]
    assert [ocr["text"][a:b].lower() for a, b in ocr["spans"]] == ["invoice", "2024"] and ocr["score"] > 0
    hybrid = ok_json(cli(home, "search", "harbour", "--json"))  # a plain query: CLIP and OCR fused
    assert Path(hybrid[0]["path"]).name == "harbour.jpg" and "HARBOUR" in hybrid[0]["ocr"]["text"]
    assert len(hybrid) == 4 and all(set(h) == HIT_KEYS for h in hybrid[1:])  # other hits keep their shape
    text = cli(home, "search", 'text:"invoice 2024"')
    assert text.returncode == 0 and "text: [INVOICE]" in text.stdout, text.stdout
    again = ok_json(cli(home, "index", str(text_library), "--ocr", "--json", "--workers", "0"))
    assert again["ocr"]["read"] == 0  # everything under the folder was read already (and no model was loaded)


def test_ocr_command_keeps_vectors_of_failures_and_retries(text_library: Path, tmp_path: Path) -> None:
    from clipsearch.indexer.storage.catalog import Catalog
    from clipsearch.indexer.storage.ocr_store import OcrStore

    home = tmp_path / "home"
    ok_json(cli(home, "--model", TINY, "index", str(text_library), "--json", "--workers", "0"))
    assert "run clipsearch ocr" in cli(home, "search", 'text:"invoice"').stdout  # no OCR yet: nothing found
    moved = text_library / "invoice.jpg"
    saved = moved.read_bytes()
    moved.unlink()  # gone after indexing: its OCR fails with the reason, its vector stays
    run = ok_json(cli(home, "ocr", "--json", "--workers", "0"))
    assert (run["read"], run["with_text"], run["failed"]) == (4, 1, 1)
    assert run["failures"][0]["status"] == "failed" and "unreadable" in run["failures"][0]["reason"]
    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    try:
        failed_id = run["failures"][0]["id"]
        assert failed_id in cat.embedded_ids(cat.spaces()[0].id)
        assert OcrStore(cat).failures()[0]["path"].endswith("invoice.jpg")
    finally:
        cat.dispose()
    assert ok_json(cli(home, "ocr", "--json"))["read"] == 0  # failures are not retried unless asked
    moved.write_bytes(saved)
    retry = ok_json(cli(home, "ocr", "--retry-failed", "--json", "--workers", "0"))
    assert (retry["read"], retry["with_text"], retry["failed"]) == (1, 1, 0)
    hits = ok_json(cli(home, "search", 'text:"invoice 2024"', "--json"))
    assert [h["id"] for h in hits] == [failed_id]


PROBE = ("import sys\nsys.modules['rapidocr_onnxruntime'] = None  # as if the extra were not installed\n"
         "from clipsearch.ui.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("args", [["index", "{lib}", "--ocr"], ["ocr"]])
def test_missing_ocr_extra_is_one_line_before_any_work(args: list[str], text_library: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    argv = [a.replace("{lib}", str(text_library)) for a in args]
    r = subprocess.run([sys.executable, "-c", PROBE, "--home", str(home), "--model", TINY, *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "pip install 'clipsearch[ocr]'" in err
    assert not (home / "catalog.db").exists()  # nothing was indexed


def test_text_hits_through_the_service_and_the_api_shapes(text_library: Path, app_config, tiny_encoder) -> None:
    from clipsearch.indexer.ingest.ocr import OcrEngine
    from clipsearch.search.ocr_search import run_ocr
    from clipsearch.search.service import SearchService

    from .conftest import make_indexer

    ix = make_indexer(app_config, tiny_encoder)
    ix.run([text_library])
    svc = SearchService(ix.catalog, ix.store, tiny_encoder)
    assert svc.search('text:"invoice"').note and svc.search('text:"invoice"').hits == []
    plain = [h.as_dict() for h in svc.search("harbour").hits]  # no OCR yet: the CLIP ranking, unchanged shape
    assert all(set(h) == HIT_KEYS for h in plain)
    assert run_ocr(ix.catalog, OcrEngine(threads=1)) == {"ok": 4}
    page = svc.search('text:"harbovr"')  # one misread character still finds it; the span marks the word
    hit = page.hits[0]
    assert Path(hit.path).name == "harbour.jpg" and page.note is None
    assert [hit.ocr.text[a:b] for a, b in hit.ocr.spans] == ["HARBOUR"]
    dated = svc.search('text:"harbour cafe"', sort="date", k=1)
    assert [h.id for h in dated.hits] == [hit.id] and not dated.has_more
    both = svc.search('text:"cafe" a sign', k=10)  # a text: term beside a CLIP query: only the photos it matches
    assert [h.id for h in both.hits] == [hit.id] and both.hits[0].score != hit.score  # ranked by CLIP and text
    from clipsearch.indexer.errors import UsageError

    with pytest.raises(UsageError):
        svc.search('text:""')
    ix.catalog.dispose()
