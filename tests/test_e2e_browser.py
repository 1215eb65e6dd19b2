"""End to end in a real headless Chromium, used as a person would: `clipsearch ui --roots DIR` over a 48-photo
sample library indexed with the bundled demo model. Search and read the count and the badges, open the lightbox,
ask for strong matches of something absent, classify then preview tags and see both, index a second folder (which
holds a resized copy of a photo of the first) from the Library page and see the count change, stack the copy under
its original with a badge, see why a photo matched, ask it a question and search by a region of it, see the pair
side by side on the Duplicates page, and feed each page bad input. Screenshots go to test-artifacts/.

One server and one browser for the module keep it to about a minute of browser time."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageOps

pytestmark = pytest.mark.e2e
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SEED = 99


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (scripts/system-deps.sh installs it)")
    from clipsearch.indexer.model.sample import make_sample

    base = tmp_path_factory.mktemp("e2e")
    roots, home = base / "photos", base / "home"
    rows = make_sample(roots / "first", 48, seed=SEED)
    later = make_sample(roots / "second", 12, seed=SEED + 1)  # indexed later from the Library page
    original = roots / "first" / rows[0][0]  # its half-size copy joins it with the second folder
    im = ImageOps.exif_transpose(Image.open(original)).convert("RGB")
    im.resize((im.width // 2, im.height // 2)).save(roots / "second" / "copy-of-first.jpg", quality=90)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    cli = [sys.executable, "-m", "clipsearch"]
    subprocess.run(cli + ["index", str(roots / "first"), "--home", str(home), "--model", "demo", "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=600)
    port = _free_port()
    log = base / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli + ["ui", "--home", str(home), "--model", "demo", "--port", str(port), "--roots",
                                       str(roots)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("clipsearch ui did not start")
    every = {Path(rel).name: item for rel, item in rows + later}
    yield url, {Path(rel).name: item for rel, item in rows}, roots, log, Path(rows[0][0]).name, every
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = b.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(server[0], wait_until="domcontentloaded")
        pg.get_by_label("Describe the photo you want").wait_for(timeout=90_000)
        _settle(pg)
        yield pg
        b.close()


_SETTLED = """() => !document.querySelector("[data-testid='stStatusWidgetRunningIcon']")
    && !document.querySelector("[data-stale='true']")"""


def _settle(page) -> None:
    """Wait until the app's run has finished. While Streamlit reruns, the previous run's elements stay on the
    page (marked stale) until replaced, so reading earlier would see the old page."""
    page.wait_for_timeout(300)
    page.wait_for_function(_SETTLED, timeout=90_000)


def _search(page, text: str) -> None:
    box = page.get_by_label("Describe the photo you want")
    box.fill(text)
    box.press("Enter")
    _settle(page)


def _hit_names(page) -> list[str]:
    texts = page.locator("[data-testid='stMain'] [data-testid='stCaptionContainer']").all_inner_texts()
    return [t.split("·")[0].strip() for t in texts if f"s{SEED}_" in t]


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"e2e-{name}.png"), full_page=True)


def _goto(page, title: str) -> None:
    page.get_by_role("link", name=title).first.click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)  # the run has started
    _settle(page)


def test_search_counts_badges_and_lightbox(server, page) -> None:
    items = server[1]
    assert page.get_by_role("button", name="Deploy").count() == 0  # the toolbar is minimal
    _shot(page, "start")
    chips = page.locator("[data-testid='stButtonGroup'] button").all_inner_texts()
    assert chips, "example queries are offered"
    page.locator("[data-testid='stButtonGroup'] button").first.click()  # a chip fills the box and searches
    _settle(page)
    assert page.get_by_label("Describe the photo you want").input_value() == chips[0].strip()
    m = re.fullmatch(r"a (\w+) (\w+)|a (\w+) on (.+)", chips[0].strip())  # the demo's two example patterns
    colour, shape, background = (m[1], m[2], None) if m[1] else (None, m[3], m[4])
    truth = sum(1 for it in items.values() if it.shape == shape and colour in (None, it.colour)
                and background in (None, it.background))
    counts = page.get_by_text(re.compile(r"\d+ strong · \d+ possible")).first.inner_text()
    strong = int(re.search(r"(\d+) strong", counts).group(1))
    _shot(page, "search")
    assert 1 <= strong and abs(strong - truth) <= max(1, truth // 5), (counts, truth)  # the calibrated count
    assert page.get_by_text("strong match").count() >= min(strong, 12)
    assert page.get_by_text(re.compile(r"^1\.")).count() >= 1  # ranks on the results
    first = _hit_names(page)[0]
    assert items[first].shape == shape

    page.locator("[data-testid='stMain']").get_by_role("button", name="Open").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Photos like this").wait_for(timeout=60_000)
    dialog.get_by_label("Describe with my labels").wait_for()
    _settle(page)
    _shot(page, "lightbox")
    assert dialog.get_by_text(first).count() >= 1 and dialog.locator("img").count() >= 2
    dialog.get_by_label("Describe with my labels").fill("circle, star, sunset")
    dialog.get_by_label("Describe with my labels").press("Enter")
    _settle(page)
    assert dialog.locator("[data-testid='stVegaLiteChart']").count() == 1
    page.keyboard.press("Escape")


def test_absent_things_and_bad_queries_get_clear_messages(page) -> None:
    _search(page, "a giraffe")
    assert page.get_by_text("The model does not know 'giraffe'").count() == 1
    page.get_by_text("Strong matches only", exact=True).click()
    _settle(page)
    assert page.get_by_text("No strong matches").count() == 1 and not _hit_names(page)
    _shot(page, "absent-strong-only")
    page.get_by_text("Strong matches only", exact=True).click()
    _settle(page)
    _search(page, "x" * 5000)
    assert page.get_by_text("at most 1,000 are read").count() == 1
    _search(page, "一只猫")
    assert page.get_by_text("The model does not know '一只猫'").count() == 1
    assert page.locator("[data-testid='stException']").count() == 0  # never a traceback


def test_zero_shot_results_stay_side_by_side(page) -> None:
    _goto(page, "Zero-shot")
    page.get_by_label("…or a catalogued photo id").fill("1")
    page.get_by_label("…or a catalogued photo id").press("Enter")
    _settle(page)
    page.get_by_role("button", name="Classify").click()
    page.get_by_text("Prediction for #1").wait_for(timeout=60_000)
    page.get_by_role("button", name="Preview").click()
    page.get_by_text("Preview: would tag").wait_for(timeout=60_000)
    _settle(page)
    _shot(page, "zero-shot")
    assert page.get_by_text(re.compile(r"Prediction for #1: (circle|square|triangle|star|hexagon|cross)")).count()
    assert page.get_by_text("Preview: would tag 48 of 48 photos").count() == 1
    assert page.locator("[data-testid='stVegaLiteChart']").count() == 2  # both charts, labelled
    page.locator("[data-testid='stFileUploaderDropzone'][aria-label='Image'] input[type=file]").set_input_files(files=[
        {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"this is not an image"}])
    _settle(page)
    page.get_by_role("button", name="Classify").click()
    _settle(page)
    assert page.get_by_text(re.compile("cannot use this image|not an image|cannot identify", re.I)).count() >= 1
    assert page.get_by_text("Preview: would tag 48 of 48 photos").count() == 1  # kept through the error
    assert page.locator("[data-testid='stException']").count() == 0


def test_library_indexes_a_folder_and_updates(server, page) -> None:
    roots, log = server[2], server[3]
    _goto(page, "Library")
    indexed = page.locator("[data-testid='stMetric']").filter(has_text="Indexed")
    assert "48" in indexed.inner_text()
    page.get_by_label("Folder on this machine").fill("/etc")
    page.get_by_role("button", name="Index", exact=True).click()
    _settle(page)
    assert page.get_by_text("outside the folders this UI may index").count() == 1
    page.get_by_label("Folder on this machine").fill(str(roots / "second"))
    page.get_by_role("button", name="Index", exact=True).click()
    page.get_by_text("Indexing finished.").wait_for(timeout=120_000)
    _settle(page)
    _shot(page, "library")
    assert "61" in indexed.inner_text()  # 48 + 12 + the copy
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Warning" not in text, text[-2000:]


def test_stack_toggle_folds_the_copy_under_its_original(server, page) -> None:
    items, original = server[1], server[4]
    _goto(page, "Search")
    _search(page, items[original].caption)
    toggle = page.get_by_text("Stack near-duplicates", exact=True)
    toggle.click()
    _settle(page)
    assert page.get_by_text("+1 near-duplicate").count() == 1  # grouped on demand (a small library)
    _shot(page, "stacked")
    shown = " ".join(page.locator("[data-testid='stMain'] [data-testid='stCaptionContainer']").all_inner_texts())
    assert (original in shown) != ("copy-of-first.jpg" in shown)  # one card for the pair: the better ranked
    toggle.click()
    _settle(page)
    assert page.get_by_text("+1 near-duplicate").count() == 0


def test_lightbox_explains_answers_and_searches_a_region(server, page) -> None:
    every = server[5]
    _search(page, "a red circle")
    page.locator("[data-testid='stMain']").get_by_role("button", name="Open").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Photos like this").wait_for(timeout=60_000)
    _settle(page)
    shown = re.search(r"s\d+_\d+\.\w+", dialog.inner_text()).group(0)  # the file name at the top
    dialog.get_by_text("Why did it match?", exact=True).click()
    dialog.get_by_text("Where 'a red circle' matches").wait_for(timeout=60_000)
    _settle(page)
    _shot(page, "lightbox-why")
    assert dialog.locator("img").count() >= 2  # the heatmap, and photos like it
    box = dialog.get_by_label("Ask about this photo")
    box.fill("what colour is the shape?")
    box.press("Enter")
    dialog.get_by_text("Answer:").wait_for(timeout=60_000)
    _settle(page)
    _shot(page, "lightbox-ask")
    assert re.search(rf"Answer: {every[shown].colour} · confidence [01]\.\d\d", dialog.inner_text())
    dialog.get_by_text("Search by a region", exact=True).click()
    dialog.get_by_role("button", name="Search this region").wait_for(timeout=30_000)
    _settle(page)
    _shot(page, "lightbox-region")
    dialog.get_by_role("button", name="Search this region").click()
    page.get_by_text(re.compile(r"Photos like this region of #\d+")).wait_for(timeout=60_000)
    _settle(page)
    assert page.get_by_role("dialog").count() == 0 and len(_hit_names(page)) >= 1
    page.get_by_role("button", name="Back to query").click()
    _settle(page)
    assert page.locator("[data-testid='stException']").count() == 0


def test_duplicates_page_shows_the_pair_side_by_side(server, page) -> None:
    log, original = server[3], server[4]
    _goto(page, "Duplicates")
    assert page.get_by_text("never deletes or moves a photo").count() == 1
    page.get_by_role("button", name="Find duplicates").click()
    page.get_by_text("Group 1: 2 photos").wait_for(timeout=120_000)
    _settle(page)
    _shot(page, "duplicates")
    assert page.get_by_text(re.compile(r"^1 group of duplicates · 2 photos")).count() == 1
    assert page.get_by_text("keep (suggested)").count() == 1
    kept = page.get_by_text(re.compile(rf"^{re.escape(original)} — ")).first.bounding_box()
    copy = page.get_by_text(re.compile(r"^copy-of-first\.jpg — ")).first.bounding_box()
    assert abs(kept["y"] - copy["y"]) < 5 and copy["x"] > kept["x"] + 50  # side by side, the original first
    assert page.locator("[data-testid='stException']").count() == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Warning" not in text, text[-2000:]


def test_more_like_this_from_the_image_page_opens_the_search_page(page) -> None:
    _goto(page, "Image")
    page.get_by_label("…or a catalogued photo id").fill("2")
    page.get_by_label("…or a catalogued photo id").press("Enter")
    _settle(page)
    page.get_by_text("Similar photos").wait_for(timeout=60_000)
    page.locator("[data-testid='stMain']").get_by_role("button", name="More like this").first.click()
    page.get_by_text(re.compile(r"^Photos like #\d+$")).wait_for(timeout=60_000)
    _settle(page)
    assert page.get_by_label("Describe the photo you want").count() == 1 and len(_hit_names(page)) >= 1
    assert page.locator("[data-testid='stException']").count() == 0
