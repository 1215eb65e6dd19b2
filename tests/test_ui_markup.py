"""The UI's pure helpers (ui/markup.py): recognised text made safe for Markdown with its matched words highlighted,
result-card snippets, the region box in percent → photo pixels and its preview, and what "why did it match" can
explain of a query."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from clipsearch.ui.markup import (
    box_pixels,
    draw_box,
    escape_markdown,
    explainable_text,
    highlight_markdown,
    human_size,
    snippet,
)

HL = ":orange-background["


def test_markdown_escaping_keeps_every_character_literal() -> None:
    assert escape_markdown("a *b* _c_ [d](e) :red[x] $1 #2") == (
        r"a \*b\* \_c\_ \[d\]\(e\) \:red\[x\] \$1 \#2")
    assert escape_markdown("TOTAL\nIVA 21%") == "TOTAL  \nIVA 21\\%"
    assert escape_markdown("Café – ok") == "Café – ok"  # only ASCII punctuation is special


def test_highlights_wrap_the_spans_and_escape_the_rest() -> None:
    text = "INVOICE no. 17\nTotal: 2024"
    out = highlight_markdown(text, [(22, 26), (0, 7)])  # any order
    assert out == f"{HL}INVOICE] no\\. 17  \nTotal\\: {HL}2024]"
    assert highlight_markdown("abc", [(1, 2), (1, 3), (5, 9), (2, 2)]) == f"a{HL}bc]"  # merged, clipped, empty dropped
    assert highlight_markdown("a*b", []) == "a\\*b"


def test_snippet_is_one_line_around_the_first_match() -> None:
    text = "x" * 200 + " HARBOUR " + "y" * 200
    line, spans = snippet(text, [(201, 208)], width=60)
    assert line.startswith("…") and line.endswith("…") and "\n" not in line
    assert [line[a:b] for a, b in spans] == ["HARBOUR"]
    assert snippet("short\ntext", [(6, 10)]) == ("short text", [(6, 10)])


def test_box_percent_to_pixels() -> None:
    assert box_pixels((25, 75), (10, 60), 400, 200) == (100, 20, 200, 100)
    assert box_pixels((75, 25), (0, 100), 400, 200) == (100, 0, 200, 200)  # ends in any order
    assert box_pixels((40, 40), (0, 100), 400, 200)[2] == 0  # no width: check_box refuses it
    assert box_pixels((-5, 120), (0, 100), 400, 200) == (0, 0, 400, 200)  # clamped to the photo


def test_box_preview_dims_outside_and_outlines_the_box() -> None:
    im = Image.new("RGB", (200, 100), (200, 200, 200))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = np.asarray(draw_box(buf.getvalue(), (50, 100), (0, 100)))
    assert out.shape == (100, 200, 3)
    assert out[50, 20].tolist() == [80, 80, 80]  # outside: dimmed
    assert out[50, 150].tolist() == [200, 200, 200]  # inside: as it was
    assert out[50, 100].tolist() == [255, 210, 0]  # the outline


def test_explainable_text_of_queries() -> None:
    assert explainable_text("a red circle") == "a red circle"
    assert explainable_text('"red" + "circle" - "grass"') == "red circle"
    assert explainable_text('text:"invoice 2024"') is None  # words in the photo: nothing to explain
    assert explainable_text('text:"invoice" a receipt') == "a receipt"
    assert explainable_text("#12") is None and explainable_text(None) is None and explainable_text("  ") is None
    assert explainable_text('"unbalanced') is None


def test_human_sizes() -> None:
    assert [human_size(n) for n in (980, 17_300, 4_200_000, None)] == ["980 B", "17.3 kB", "4.2 MB", "? B"]
