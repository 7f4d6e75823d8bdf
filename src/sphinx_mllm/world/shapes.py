"""Flat shapes: their geometry, drawing, and the sampling of a scene of them.

A shape is drawn inside a `side` x `side` square whose top-left corner is (x, y), filled with its exact
palette colour (no anti-aliasing). Its `box` is the tight box of the pixels drawn, measured on a mask
drawn by the same call, so it is right by construction; the tests check it against the saved image.
Shapes never overlap: each keeps a gap of a few pixels to every other object, so no label is hidden.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import ImageDraw

from sphinx_mllm.world.canvas import PixelBox, Size, mask_box, place_on_grid
from sphinx_mllm.world.vocab import COLOURS, RGB, SHAPES, SIZE_CLASSES


@dataclass(frozen=True)
class Shape:
    """One drawn shape; `size` is its size class ("small", "medium", "large"), `box` its pixel box."""

    kind: str
    colour: str
    size: str
    x: int
    y: int
    side: int
    box: PixelBox


def _star(cx: float, cy: float, outer: float) -> list[tuple[float, float]]:
    inner = outer * 0.45
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(x: int, y: int, d: int) -> list[tuple[float, float]]:
    t = max(2, round(d * 0.34))
    a = (d - t) // 2
    b, e = a + t - 1, d - 1
    outline = [(a, 0), (b, 0), (b, a), (e, a), (e, b), (b, b), (b, e), (a, e), (a, b), (0, b), (0, a), (a, a)]
    return [(x + px, y + py) for px, py in outline]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, side: int, fill: RGB | int) -> None:
    """Draw a `kind` shape in the `side`-px square at (x, y)."""
    d = side
    last = d - 1
    cx, cy = x + last / 2, y + last / 2
    if kind == "circle":
        draw.ellipse((x, y, x + last, y + last), fill=fill)
    elif kind == "square":
        inset = round(d * 0.06)
        draw.rectangle((x + inset, y + inset, x + last - inset, y + last - inset), fill=fill)
    elif kind == "triangle":
        inset = round(d * 0.065)
        draw.polygon([(cx, y + inset), (x + last, y + last - inset), (x, y + last - inset)], fill=fill)
    elif kind == "diamond":
        inset = round(d * 0.18)
        draw.polygon([(cx, y), (x + last - inset, cy), (cx, y + last), (x + inset, cy)], fill=fill)
    elif kind == "star":
        draw.polygon(_star(cx, cy + d * 0.04, last / 2), fill=fill)
    elif kind == "cross":
        draw.polygon(_cross(x, y, d), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPES)}")


def shape_side(rng: random.Random, size_class: str, long_side: int) -> int:
    lo, hi, floor = SIZE_CLASSES[size_class]
    return max(floor, round(rng.uniform(lo, hi) * long_side))


def make_shape(kind: str, colour: str, size_class: str, x: int, y: int, side: int, image_size: Size) -> Shape | None:
    """A `Shape` with its measured pixel box (None if nothing of it lands in the image)."""
    box = mask_box(image_size, lambda d: draw_shape(d, kind, x, y, side, 255))
    return None if box is None else Shape(kind, colour, size_class, x, y, side, box)


def _plan(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """(kind, colour, size class) of `count` shapes. Often one kind (and sometimes one colour) repeats,
    so that count questions have answers above one."""
    colours = list(COLOURS)
    plan = []
    if count >= 2 and rng.random() < 0.6:
        kind, colour = rng.choice(SHAPES), rng.choice(colours)
        same_colour = rng.random() < 0.35
        for _ in range(rng.randint(2, min(5, count))):
            plan.append((kind, colour if same_colour else rng.choice(colours), _size_class(rng)))
    while len(plan) < count:
        plan.append((rng.choice(SHAPES), rng.choice(colours), _size_class(rng)))
    rng.shuffle(plan)
    return plan


def _size_class(rng: random.Random) -> str:
    return rng.choices(("small", "medium", "large"), weights=(0.3, 0.35, 0.35))[0]


SHAPE_GRID = 14
"""Shape centres sit on the centres of the cells of a `SHAPE_GRID` x `SHAPE_GRID` grid over the padded square: the
world preset's sub-image token grid (2 x 2 views of 7 x 7 tokens). A stride-32 encoder sees a shape at one offset
within its token instead of any, which is what it could not learn within the recipe's budget (shape recall 0.19
at 450 steps; 0.57 on grid-centred shapes: docs/world_report.md, ninth round). Positions stay varied: 196 places,
fewer near the edges of a non-square image."""


def sample_shapes(
    rng: random.Random, image_size: Size, count: int, taken: list[PixelBox], gap: int
) -> list[Shape]:
    """Up to `count` non-overlapping shapes (large ones placed first), centred on the `SHAPE_GRID` cells; `taken`
    boxes are avoided and the new boxes are appended to it. A shape that finds no room is left out."""
    long_side = max(image_size)
    order = {"large": 0, "medium": 1, "small": 2}
    shapes = []
    for kind, colour, size_class in sorted(_plan(rng, count), key=lambda p: order[p[2]]):
        side = shape_side(rng, size_class, long_side)
        corner = place_on_grid(rng, image_size, side, taken, gap=gap, cells=SHAPE_GRID, margin=1)
        if corner is None:
            continue
        shape = make_shape(kind, colour, size_class, corner[0], corner[1], side, image_size)
        if shape is not None:
            shapes.append(shape)
            taken.append(shape.box)
    return shapes
