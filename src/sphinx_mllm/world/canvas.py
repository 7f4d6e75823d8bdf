"""Drawing primitives shared by every kind of world image: seeds, image sizes, backgrounds, fonts, masks
and placement.

Everything here is deterministic given its inputs: randomness comes in as a `random.Random` (or a seed
derived with SHA-256 from the world seed and the image's identity), never from global state, so one image
can be regenerated alone. Pixel boxes are `(x1, y1, x2, y2)` integers with exclusive ends (the edges of
the pixels), i.e. what `Image.getbbox()` returns: the box of a one-pixel dot at (3, 4) is (3, 4, 4, 5).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFont

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.world.vocab import BACKGROUND_RANGE, RGB

PixelBox = tuple[int, int, int, int]
Size = tuple[int, int]

LANDSCAPE_AND_PORTRAIT: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
"""Aspect ratios (w, h) of scenes: square, landscape and portrait, so that the padded square matters."""


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any identifying parts (world seed, split, kind, index), stable across runs."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def pick_size(rng: random.Random, long_side: int, ratios: Sequence[tuple[int, int]]) -> Size:
    """(W, H) with the longer side `long_side` and a ratio drawn from `ratios`."""
    rw, rh = rng.choice(list(ratios))
    if rw >= rh:
        return long_side, max(1, round(long_side * rh / rw))
    return max(1, round(long_side * rw / rh)), long_side


# ----------------------------------------------------------------------------- backgrounds


@dataclass(frozen=True)
class Background:
    """How the area behind the objects is filled: `plain` (colour a), `gradient` (a -> b along
    `direction`: "down", "up", "right", "left" or "radial") or `noise` (blocks of `block` px around a,
    jittered by a generator seeded with `noise_seed`)."""

    style: str
    a: RGB
    b: RGB = (0, 0, 0)
    direction: str = "down"
    block: int = 6
    noise_seed: int = 0


BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "noise")


def _muted(rng: random.Random) -> RGB:
    """A desaturated mid-tone: channels in BACKGROUND_RANGE (with room for noise), spread <= 20."""
    lo, hi = BACKGROUND_RANGE
    base = rng.randint(lo + 15, hi - 15)
    return tuple(base + rng.randint(-10, 10) for _ in range(3))  # type: ignore[return-value]


def sample_background(rng: random.Random) -> Background:
    style = rng.choice(BACKGROUND_STYLES)
    if style == "plain":
        return Background("plain", _muted(rng))
    if style == "gradient":
        direction = rng.choice(("down", "up", "right", "left", "radial"))
        return Background("gradient", _muted(rng), _muted(rng), direction=direction)
    return Background("noise", _muted(rng), block=rng.randint(3, 9), noise_seed=rng.getrandbits(32))


_COMMON = bytes(v % 29 for v in range(256))  # byte -> common jitter + 14 (0..28)
_OWN = bytes(v % 13 for v in range(256))  # byte -> per-channel jitter + 6 (0..12)


def _noise(bg: Background, size: Size) -> Image.Image:
    """Blocks of `bg.block` px whose channels are `bg.a` plus a jitter shared by the channels (+-14) and
    one of each channel (+-6), clipped to BACKGROUND_RANGE (the spread stays <= 20 + 12)."""
    width, height = size
    rng = random.Random(bg.noise_seed)
    cols, rows = -(-width // bg.block), -(-height // bg.block)
    n = cols * rows
    common = Image.frombytes("L", (cols, rows), rng.randbytes(n).translate(_COMMON))
    lo, hi = BACKGROUND_RANGE
    bands = []
    for base in bg.a:
        own = Image.frombytes("L", (cols, rows), rng.randbytes(n).translate(_OWN))
        lut = [min(hi, max(lo, base + v - 20)) for v in range(256)]
        bands.append(ImageChops.add(common, own).point(lut))
    small = Image.merge("RGB", bands)
    return small.resize((cols * bg.block, rows * bg.block), Image.Resampling.NEAREST).crop((0, 0, width, height))


def draw_background(bg: Background, size: Size) -> Image.Image:
    """A new RGB image of `size` filled with `bg` (never a palette colour, see `vocab`)."""
    if bg.style == "plain":
        return Image.new("RGB", size, bg.a)
    if bg.style == "gradient":
        ramp = Image.radial_gradient("L") if bg.direction == "radial" else Image.linear_gradient("L")
        if bg.direction in ("up", "left"):
            ramp = ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if bg.direction in ("right", "left"):
            ramp = ramp.transpose(Image.Transpose.ROTATE_90)
        ramp = ramp.resize(size, Image.Resampling.BILINEAR)
        return Image.composite(Image.new("RGB", size, bg.b), Image.new("RGB", size, bg.a), ramp)
    if bg.style == "noise":
        return _noise(bg, size)
    raise SphinxError(f"unknown background style {bg.style!r}; known: {', '.join(BACKGROUND_STYLES)}")


# ----------------------------------------------------------------------------- fonts and words


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at `size` px (nothing is downloaded)."""
    loaded = ImageFont.load_default(size=size)
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        raise SphinxError("the world needs Pillow with FreeType support (for its scalable default font)")
    return loaded


@functools.lru_cache(maxsize=8192)
def word_extent(text: str, size: int) -> PixelBox:
    """The ink box of `text` drawn at origin (0, 0) in `size` px, relative to that origin, measured on a
    drawing of it (aliased text, as the world draws it, is wider than `getbbox` says). Raises
    `SphinxError` for text without ink."""
    margin = 2 * size
    canvas = Image.new("L", (2 * margin + size * max(1, len(text)), 2 * margin + size))
    draw_text(ImageDraw.Draw(canvas), (margin, margin), text, size, 255)
    box = canvas.getbbox()
    if box is None:
        raise SphinxError(f"text {text!r} has no ink at {size} px")
    return (box[0] - margin, box[1] - margin, box[2] - margin, box[3] - margin)


def draw_text(draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, size: int, fill: RGB | int) -> None:
    """Aliased text (every ink pixel exactly `fill`)."""
    draw.fontmode = "1"
    draw.text(origin, text, font=font(size), fill=fill)


# ----------------------------------------------------------------------------- masks and placement


def mask_box(size: Size, paint: Callable[[ImageDraw.ImageDraw], None]) -> PixelBox | None:
    """The tight pixel box of what `paint` draws (called with a draw on a blank mask; it must use fill 255),
    or None when it draws nothing inside the image."""
    mask = Image.new("L", size)
    paint(ImageDraw.Draw(mask))
    return mask.getbbox()


def boxes_near(a: PixelBox, b: PixelBox, gap: int) -> bool:
    """True when the boxes overlap or come closer than `gap` pixels."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _clear(box: PixelBox, taken: Sequence[PixelBox], gap: int) -> bool:
    """True when `box` keeps `gap` px away from every box in `taken` (the placement test of `place` and
    `place_on_grid`)."""
    return not any(boxes_near(box, other, gap) for other in taken)


def place(
    rng: random.Random, size: Size, extent: tuple[int, int], taken: Sequence[PixelBox], *, gap: int, margin: int,
    tries: int = 60, overhang: tuple[int, int] = (0, 0),
) -> tuple[int, int] | None:
    """A top-left corner for a `extent` = (w, h) box inside the image (`margin` px from its edges, or up to
    `overhang` px past them) that keeps `gap` px away from every box in `taken`; None after `tries`."""
    width, height = size
    w, h = extent
    x_lo, y_lo = margin - overhang[0], margin - overhang[1]
    x_hi, y_hi = width - margin - w + overhang[0], height - margin - h + overhang[1]
    if x_hi < x_lo or y_hi < y_lo:
        return None
    for _ in range(tries):
        x, y = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
        box = (x, y, x + w, y + h)
        if _clear(box, taken, gap):
            return x, y
    return None


def place_on_grid(
    rng: random.Random, size: Size, side: int, taken: Sequence[PixelBox], *, gap: int, cells: int, margin: int,
    tries: int = 60,
) -> tuple[int, int] | None:
    """A top-left corner for a `side` x `side` box centred on the centre of a random cell of a `cells` x `cells`
    grid over the image padded to a centred square (the processor's pad: `(S - W) // 2` left, `(S - H) // 2`
    top), inside the image (`margin` px from its edges) and `gap` px away from every box in `taken`; None after
    `tries`."""
    width, height = size
    square = max(size)
    cell = square / cells
    pad_x, pad_y = (square - width) // 2, (square - height) // 2
    for _ in range(tries):
        col, row = rng.randrange(cells), rng.randrange(cells)
        x = round((col + 0.5) * cell - pad_x - side / 2)
        y = round((row + 0.5) * cell - pad_y - side / 2)
        if x < margin or y < margin or x + side > width - margin or y + side > height - margin:
            continue
        box = (x, y, x + side, y + side)
        if _clear(box, taken, gap):
            return x, y
    return None


def box_center(box: PixelBox) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
