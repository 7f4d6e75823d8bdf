"""One world image: what it holds (with every label in pixels), how it is sampled and how it is drawn.

Four kinds: `shapes` (2-8 flat shapes), `people` (1-4 stick figures and a few shapes), `signs` (a few
words in colours and sizes: scene text) and `document` (a page with layout regions). Sampling takes a
`random.Random` seeded from the world seed and the image's identity only, so any image can be rebuilt
alone; `render` draws it. Nothing drawn overlaps anything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.world.canvas import (
    LANDSCAPE_AND_PORTRAIT,
    Background,
    PixelBox,
    Size,
    draw_background,
    pick_size,
    sample_background,
)
from sphinx_mllm.world.people import Person, draw_figure, sample_people
from sphinx_mllm.world.shapes import Shape, draw_shape, sample_shapes
from sphinx_mllm.world.text import Page, SignWord, draw_region, draw_word, sample_page, sample_sign_words
from sphinx_mllm.world.vocab import COLOURS

KINDS: tuple[str, ...] = ("shapes", "people", "signs", "document")
PAGE_RATIOS: tuple[tuple[int, int], ...] = ((3, 4), (5, 7), (4, 3))


@dataclass(frozen=True)
class WorldImage:
    """A sampled image: identity (`name`, `image_id`), size, background, and its contents with labels.

    `shapes` and `people` are filled for the `shapes` and `people` kinds, `words` for `signs`, `page` for
    `document`.
    """

    kind: str
    name: str
    image_id: int
    size: Size
    background: Background | None
    shapes: tuple[Shape, ...] = ()
    people: tuple[Person, ...] = ()
    words: tuple[SignWord, ...] = ()
    page: Page | None = None

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


def _gap(size: Size) -> int:
    return max(3, round(max(size) * 0.015))


def sample_image(kind: str, rng: random.Random, long_side: int, name: str, image_id: int) -> WorldImage:
    """A new image of `kind` whose long side is `long_side` px."""
    if kind == "document":
        size = pick_size(rng, long_side, PAGE_RATIOS)
        return WorldImage(kind, name, image_id, size, None, page=sample_page(rng, size))
    size = pick_size(rng, long_side, LANDSCAPE_AND_PORTRAIT)
    background = sample_background(rng)
    gap = _gap(size)
    if kind == "shapes":
        shapes = sample_shapes(rng, size, rng.randint(2, 8), [], gap)
        return WorldImage(kind, name, image_id, size, background, shapes=tuple(shapes))
    if kind == "people":
        taken: list[PixelBox] = []
        people = sample_people(rng, size, rng.randint(1, 4), taken, gap)
        shapes = sample_shapes(rng, size, rng.randint(0, 3), taken, gap)
        return WorldImage(kind, name, image_id, size, background, shapes=tuple(shapes), people=tuple(people))
    if kind == "signs":
        words = sample_sign_words(rng, size, rng.randint(2, 6), gap)
        return WorldImage(kind, name, image_id, size, background, words=tuple(words))
    raise SphinxError(f"unknown world image kind {kind!r}; known: {', '.join(KINDS)}")


def render(image: WorldImage) -> Image.Image:
    """The RGB picture of `image`."""
    if image.page is not None:
        canvas = Image.new("RGB", image.size, image.page.paper)
        draw = ImageDraw.Draw(canvas)
        for region in image.page.regions:
            draw_region(draw, region)
        return canvas
    if image.background is None:
        raise SphinxError(f"image {image.name} has neither a page nor a background")
    canvas = draw_background(image.background, image.size)
    draw = ImageDraw.Draw(canvas)
    for shape in image.shapes:
        draw_shape(draw, shape.kind, shape.x, shape.y, shape.side, COLOURS[shape.colour])
    for person in image.people:
        draw_figure(draw, person.figure, COLOURS[person.colour])
    for sign in image.words:
        draw_word(draw, sign.word)
    return canvas
