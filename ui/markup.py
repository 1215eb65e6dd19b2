"""Pure helpers behind the result cards and the lightbox: text from photos made safe for Markdown with the matched
words highlighted, a box given in percent of a photo turned into the photo's pixels and drawn over a preview, and
the part of a query a heatmap can explain. No Streamlit here, so each is tested directly (tests/test_ui_markup.py).
"""

from __future__ import annotations

import io
import string
from collections.abc import Sequence

from PIL import Image, ImageDraw

Span = tuple[int, int]  # (start, end) character offsets, as OcrMatch.spans gives them
HIGHLIGHT = "orange-background"  # Streamlit's coloured-background directive for the matched words
_SPECIAL = frozenset(string.punctuation)  # CommonMark lets a backslash escape every ASCII punctuation character


def escape_markdown(text: str) -> str:
    """`text` as Markdown that shows exactly these characters: recognised text may hold `*`, `_`, `[`, `:` or `$`
    that Streamlit would otherwise read as formatting, a colour directive or maths. Line breaks stay line breaks."""
    out = "".join("\\" + c if c in _SPECIAL else c for c in text)
    return out.replace("\r\n", "\n").replace("\n", "  \n")


def _clean_spans(spans: Sequence[Span], length: int) -> list[Span]:
    """Spans clipped to the text, sorted, overlapping ones merged, empty ones dropped."""
    merged: list[list[int]] = []
    for a, b in sorted((max(0, int(a)), min(length, int(b))) for a, b in spans):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def highlight_markdown(text: str, spans: Sequence[Span], style: str = HIGHLIGHT) -> str:
    """Escaped Markdown of `text` with each span wrapped in a `:style[...]` directive (the words a query matched)."""
    out, at = [], 0
    for a, b in _clean_spans(spans, len(text)):
        out.append(escape_markdown(text[at:a]))
        out.append(f":{style}[{escape_markdown(text[a:b])}]")
        at = b
    out.append(escape_markdown(text[at:]))
    return "".join(out)


def snippet(text: str, spans: Sequence[Span], width: int = 90) -> tuple[str, list[Span]]:
    """One line of at most about `width` characters around the first matched word, with the spans moved along: what
    a result card shows of a photo's text. Line breaks become spaces (same length, so offsets hold); cut ends get
    an ellipsis."""
    flat = text.replace("\n", " ").replace("\r", " ")
    spans = _clean_spans(spans, len(flat))
    if len(flat) <= width:
        return flat, spans
    first = spans[0][0] if spans else 0
    start = max(0, min(first - width // 3, len(flat) - width))
    end = start + width
    shown = [(max(a, start) - start, min(b, end) - start) for a, b in spans if a < end and b > start]
    head = "…" if start > 0 else ""
    body = flat[start:end] + ("…" if end < len(flat) else "")
    return head + body, [(a + len(head), b + len(head)) for a, b in shown]


def box_pixels(xs: tuple[float, float], ys: tuple[float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) in a width x height photo's pixels for a box given as left–right and top–bottom percentages
    (what the lightbox's sliders hold); equal ends give a box without area, which check_box refuses."""
    x0, x1 = sorted(min(100.0, max(0.0, float(v))) for v in xs)
    y0, y1 = sorted(min(100.0, max(0.0, float(v))) for v in ys)
    left, right = round(x0 * width / 100), round(x1 * width / 100)
    top, bottom = round(y0 * height / 100), round(y1 * height / 100)
    return left, top, right - left, bottom - top


def draw_box(image: bytes | Image.Image, xs: tuple[float, float], ys: tuple[float, float]) -> Image.Image:
    """The image with everything outside the box dimmed and the box outlined: a preview of the region that will be
    searched. The box is in percent, so the preview can be any size of the photo (thumbnail or heatmap)."""
    im = Image.open(io.BytesIO(image)) if isinstance(image, bytes | bytearray) else image
    im = im.convert("RGB")
    x, y, w, h = box_pixels(xs, ys, *im.size)
    out = Image.eval(im, lambda v: v * 2 // 5)
    if w > 0 and h > 0:
        out.paste(im.crop((x, y, x + w, y + h)), (x, y))
    line = max(2, min(im.size) // 120)
    draw = ImageDraw.Draw(out)
    draw.rectangle([x, y, x + max(w, 1) - 1, y + max(h, 1) - 1], outline=(255, 210, 0), width=line)
    return out


def explainable_text(query: str | None) -> str | None:
    """The words a heatmap can explain for a search: the query's positive text terms (without `text:` terms, which
    match words written in the photo, not what it shows); None when there are none or the query does not parse."""
    if not query or not query.strip():
        return None
    from clipsearch.indexer.errors import ClipsearchError
    from clipsearch.search.ocr_search import plan_query
    from clipsearch.search.query import parse_query

    try:
        clip_part, _ = plan_query(query)
        terms = parse_query(clip_part, allow_files=False) if clip_part.strip() else []
    except ClipsearchError:
        return None
    text = " ".join(t.value.strip() for t in terms if t.kind == "text" and t.weight > 0).strip()
    return text or None


def human_size(n: int | None) -> str:
    """A file size for people: 980 B, 17.3 kB, 4.2 MB."""
    if n is None:
        return "? B"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
