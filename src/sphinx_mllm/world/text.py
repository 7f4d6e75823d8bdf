"""Rendered words: signs (a few words on a background, the scene-text images of OCR) and document pages
with layout regions (title, text, list, table, figure).

Words are drawn aliased (`fontmode = "1"`) with Pillow's built-in scalable font, so every ink pixel has
exactly the word's colour. A word's `box` is its ink box, measured once per (text, size) by
`canvas.word_extent` and moved to the word's integer origin. A region's box is measured on a mask of
everything the region draws. Lines are spaced so that no two words' boxes touch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import ImageDraw

from sphinx_mllm.world.canvas import PixelBox, Size, draw_text, mask_box, place, word_extent
from sphinx_mllm.world.vocab import COLOURS, RGB, WORDS

PAGE_COLOURS: tuple[RGB, ...] = ((250, 250, 247), (246, 243, 232), (241, 244, 248))
INK_COLOURS: tuple[RGB, ...] = ((25, 25, 25), (20, 30, 90), (60, 60, 60))
GRID_COLOUR: RGB = (120, 120, 120)


@dataclass(frozen=True)
class Word:
    """A word drawn at integer `origin` (Pillow's text anchor "la") in `size` px, and its ink box."""

    text: str
    origin: tuple[int, int]
    size: int
    colour: RGB
    box: PixelBox


def make_word(text: str, x: int, y: int, size: int, colour: RGB) -> Word:
    dx1, dy1, dx2, dy2 = word_extent(text, size)
    return Word(text, (x, y), size, colour, (x + dx1, y + dy1, x + dx2, y + dy2))


def word_at(text: str, box_x: int, box_y: int, size: int, colour: RGB) -> Word:
    """The word whose INK box starts at (box_x, box_y)."""
    dx1, dy1, _, _ = word_extent(text, size)
    return make_word(text, box_x - dx1, box_y - dy1, size, colour)


def draw_word(draw: ImageDraw.ImageDraw, word: Word, fill: RGB | int | None = None) -> None:
    draw_text(draw, word.origin, word.text, word.size, word.colour if fill is None else fill)


# ----------------------------------------------------------------------------- signs

SIGN_SIZES: dict[str, tuple[float, float, int]] = {
    "small": (0.024, 0.032, 8), "medium": (0.045, 0.070, 12), "large": (0.090, 0.130, 18),
}
"""Text size class -> (min, max) font size as a fraction of the long side, and a floor in px."""


@dataclass(frozen=True)
class SignWord:
    word: Word
    colour: str
    size: str


def sample_sign_words(rng: random.Random, image_size: Size, count: int, gap: int) -> list[SignWord]:
    """Up to `count` non-overlapping words of distinct texts in palette colours."""
    long_side = max(image_size)
    taken: list[PixelBox] = []
    out = []
    for text in rng.sample(WORDS, k=count):
        size_class = rng.choices(tuple(SIGN_SIZES), weights=(0.3, 0.4, 0.3))[0]
        lo, hi, floor = SIGN_SIZES[size_class]
        px = max(floor, round(rng.uniform(lo, hi) * long_side))
        dx1, dy1, dx2, dy2 = word_extent(text, px)
        corner = place(rng, image_size, (dx2 - dx1, dy2 - dy1), taken, gap=gap, margin=2)
        if corner is None:
            continue
        colour = rng.choice(list(COLOURS))
        word = word_at(text, corner[0], corner[1], px, COLOURS[colour])
        taken.append(word.box)
        out.append(SignWord(word, colour, size_class))
    return out


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Mark:
    """A non-text drawing of a region: `rect` (filled or outlined), `line` or `disc`, in pixels."""

    shape: str
    xy: tuple[int, int, int, int]
    colour: RGB
    filled: bool = True


@dataclass(frozen=True)
class Region:
    """A layout region: class (`LAYOUT_CLASSES`), its words in reading order, marks, and its pixel box
    (the tight box of all it draws)."""

    kind: str
    words: tuple[Word, ...]
    marks: tuple[Mark, ...]
    box: PixelBox


@dataclass(frozen=True)
class Page:
    paper: RGB
    regions: tuple[Region, ...]

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for region in self.regions for w in region.words)


def draw_mark(draw: ImageDraw.ImageDraw, mark: Mark, fill: RGB | int | None = None) -> None:
    colour = mark.colour if fill is None else fill
    if mark.shape == "rect":
        draw.rectangle(mark.xy, fill=colour if mark.filled else None, outline=colour)
    elif mark.shape == "line":
        draw.line(mark.xy, fill=colour, width=1)
    elif mark.shape == "disc":
        draw.ellipse(mark.xy, fill=colour)
    else:
        raise ValueError(f"unknown mark {mark.shape!r}")


def draw_region(draw: ImageDraw.ImageDraw, region: Region, fill: RGB | int | None = None) -> None:
    for mark in region.marks:
        draw_mark(draw, mark, fill)
    for word in region.words:
        draw_word(draw, word, fill)


@dataclass
class _Layout:
    """The page being filled: column [x0, x1), the next free y, the bottom limit, font sizes, ink."""

    rng: random.Random
    size: Size
    x0: int
    x1: int
    y: int
    bottom: int
    body: int
    ink: RGB

    @property
    def line_height(self) -> int:
        return round(self.body * 1.6)

    def word(self) -> str:
        return self.rng.choice(WORDS)


def _line(lay: _Layout, x: int, y: int, width: int, size: int, texts: list[str] | None = None) -> list[Word]:
    """Words on one line from x (cap top at y) until `width` is used or `texts` (default: random words)
    run out."""
    space = max(3, round(size * 0.55))
    words: list[Word] = []
    cursor = x
    queue = list(texts) if texts is not None else None
    while queue is None or queue:
        text = lay.word() if queue is None else queue.pop(0)
        dx1, _, dx2, _ = word_extent(text, size)
        if cursor + dx2 - dx1 > x + width:
            break
        words.append(_at_line(text, cursor, y, size, lay.ink))
        cursor += dx2 - dx1 + space
    return words


def _at_line(text: str, x: int, y: int, size: int, ink: RGB) -> Word:
    """A word whose ink starts at x and whose line's cap top is y (words of a line share the baseline)."""
    dx1, _, _, _ = word_extent(text, size)
    _, cap_top, _, _ = word_extent("H", size)
    return make_word(text, x - dx1, y - cap_top, size, ink)


def _title(lay: _Layout) -> list[Word]:
    size = max(lay.body + 4, round(lay.body * 2.0))
    texts = [lay.word().title() for _ in range(lay.rng.randint(1, 3))]
    return _line(lay, lay.x0, lay.y, lay.x1 - lay.x0, size, texts)


def _text(lay: _Layout) -> list[Word]:
    width = round((lay.x1 - lay.x0) * lay.rng.uniform(0.6, 1.0))
    words = []
    lines = lay.rng.randint(1, 4)
    for k in range(lines):
        line_width = width if k < lines - 1 else round(width * lay.rng.uniform(0.4, 0.9))
        words += _line(lay, lay.x0, lay.y + k * lay.line_height, line_width, lay.body)
    return words


def _list(lay: _Layout) -> tuple[list[Word], list[Mark]]:
    words, marks = [], []
    bullet = max(2, round(lay.body * 0.35))
    _, cap_top, _, cap_bottom = word_extent("H", lay.body)
    for k in range(lay.rng.randint(2, 4)):
        y = lay.y + k * lay.line_height
        mid = y + (cap_bottom - cap_top) // 2
        marks.append(Mark("disc", (lay.x0, mid - bullet // 2, lay.x0 + bullet, mid - bullet // 2 + bullet), lay.ink))
        texts = [lay.word() for _ in range(lay.rng.randint(1, 3))]
        words += _line(lay, lay.x0 + bullet + lay.body, y, lay.x1 - lay.x0 - bullet - lay.body, lay.body, texts)
    return words, marks


def _table(lay: _Layout) -> tuple[list[Word], list[Mark]]:
    rows, cols = lay.rng.randint(2, 4), lay.rng.randint(2, 3)
    width = round((lay.x1 - lay.x0) * lay.rng.uniform(0.5, 0.9))
    cell_w, cell_h = width // cols, lay.line_height + 2
    pad = max(2, lay.body // 3)
    words, marks = [], []
    for r in range(rows):
        for c in range(cols):
            text = lay.word() if r == 0 or lay.rng.random() < 0.5 else str(lay.rng.randint(1, 999))
            x, y = lay.x0 + c * cell_w + pad, lay.y + r * cell_h + pad
            words += _line(lay, x, y, cell_w - 2 * pad, lay.body, [text])
    right, bottom = lay.x0 + cols * cell_w, lay.y + rows * cell_h
    for r in range(rows + 1):
        marks.append(Mark("line", (lay.x0, lay.y + r * cell_h, right, lay.y + r * cell_h), GRID_COLOUR))
    for c in range(cols + 1):
        marks.append(Mark("line", (lay.x0 + c * cell_w, lay.y, lay.x0 + c * cell_w, bottom), GRID_COLOUR))
    return words, marks


def _figure(lay: _Layout) -> list[Mark]:
    column = lay.x1 - lay.x0
    width = round(column * lay.rng.uniform(0.4, 0.85))
    height = round(lay.size[1] * lay.rng.uniform(0.12, 0.22))
    x = lay.x0 + lay.rng.randint(0, column - width)
    marks = [Mark("rect", (x, lay.y, x + width - 1, lay.y + height - 1), GRID_COLOUR, filled=False)]
    bars = lay.rng.randint(3, 6)
    slot = (width - 4) // bars
    colours = list(COLOURS.values())
    for k in range(bars):
        bar_h = round((height - 6) * lay.rng.uniform(0.2, 0.95))
        bx = x + 2 + k * slot + slot // 6
        marks.append(Mark("rect", (bx, lay.y + height - 3 - bar_h, bx + max(1, slot * 2 // 3) - 1, lay.y + height - 3),
                          lay.rng.choice(colours)))
    return marks


def _fits(words: list[Word], marks: list[Mark], bottom: int) -> bool:
    """Whether a block ends above `bottom` (its words' ink and its marks)."""
    lowest = [w.box[3] for w in words] + [max(m.xy[1], m.xy[3]) + 1 for m in marks]
    return not lowest or max(lowest) <= bottom


def _region(kind: str, words: list[Word], marks: list[Mark], size: Size) -> Region | None:
    """The region with its measured box, or None when it drew nothing."""
    region = Region(kind, tuple(words), tuple(marks), (0, 0, 0, 0))
    box = mask_box(size, lambda d: draw_region(d, region, 255))
    if box is None or not (words or kind == "figure"):
        return None
    return Region(kind, tuple(words), tuple(marks), box)


def sample_page(rng: random.Random, size: Size) -> Page:
    """A page: an optional title then a column of text, list, table and figure blocks until it is full."""
    width, height = size
    body = max(8, round(0.022 * max(size)))
    lay = _Layout(rng, size, round(width * 0.07), width - round(width * 0.07), round(height * 0.06),
                  height - round(height * 0.05), body, rng.choice(INK_COLOURS))
    gap = max(4, round(height * 0.035))
    regions: list[Region] = []
    blocks = (["title"] if rng.random() < 0.85 else []) + rng.choices(
        ("text", "list", "table", "figure"), weights=(0.4, 0.2, 0.2, 0.2), k=rng.randint(2, 5))
    for kind in blocks:
        words: list[Word] = []
        marks: list[Mark] = []
        if kind == "title":
            words = _title(lay)
        elif kind == "text":
            words = _text(lay)
        elif kind == "list":
            words, marks = _list(lay)
        elif kind == "table":
            words, marks = _table(lay)
        else:
            marks = _figure(lay)
        if not _fits(words, marks, lay.bottom):
            break
        region = _region(kind, words, marks, size)
        if region is None:
            continue
        regions.append(region)
        lay.y = region.box[3] + gap
    return Page(rng.choice(PAGE_COLOURS), tuple(regions))

