"""Boxes and points in SPHINX's text frame, and the parsing of model output that mentions them.

The frame (as released): an image of W x H pixels is padded to a centred square of side S = max(W, H),
with `pad_x = (S - W) // 2` and `pad_y = (S - H) // 2` (integer division, as the release does);
a pixel coordinate maps to `xn = (x + pad_x) / S` and back with `x = xn * S - pad_x`. Coordinates are
floats in [0, 1] written with two decimals: a box `[x1,y1,x2,y2]`, several boxes of one thing in one
bracket `[x1,y1,x2,y2;x1,y1,x2,y2]`, a point `[x,y]`, a grounded phrase `<p>phrase</p> [box]`.

Decisions that callers rely on:
- `Box` always has ordered corners (x1 <= x2, y1 <= y2) and finite values; the constructor raises
  `ValueError` otherwise. It may lie outside [0, 1]; `clamp()` brings it back.
- `box_from_pixels` orders swapped corners and, by default, clips the box to the image (the padding is not
  image content); `box_to_pixels` clips to the image by default as well.
- Parsers are tolerant of generated text: spaces anywhere inside brackets, integers, swapped corners
  (reordered), values up to `SLACK` outside [0, 1] (clamped). A comma group that is not 2 or 4 numbers,
  holds garbage or NaN, or lies further out of range is ignored; the other groups of its bracket are kept.
  Brackets of prose (`[a, b]`, `[1,2,3]`) yield nothing.
- Parsers expect the 0-1 frame. Output in another integer frame (0-1000 of Qwen-VL/Ferret, 0-100 of
  MiniGPT-v2) is read with `scale=1000` / `scale=100`: every number is divided by `scale` before the range
  check. Without it such boxes are out of range and ignored, never silently misread.
- Degenerate boxes (zero width or height) are returned by the parsers as written; filter them with
  `Box.is_degenerate()` where they matter (their IoU with anything is 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# How far outside [0, 1] a parsed coordinate may be (after `scale`) and still count, clamped.
SLACK = 0.05

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_PHRASE = re.compile(r"<p>(.*?)</p>", re.DOTALL)
# What may sit between `</p>` and its first bracket, and between brackets of one run.
_GAP_AFTER_PHRASE = re.compile(r"\s*")
_GAP_BETWEEN_BRACKETS = re.compile(r"[\s,;]*")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in the padded-square frame, corners (x1, y1) top-left and (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        vals = (self.x1, self.y1, self.x2, self.y2)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"box coordinates must be finite, got {vals}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(f"box corners must be ordered (x1 <= x2, y1 <= y2), got {vals}")

    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union; 0.0 when the union is empty (two degenerate boxes)."""
        iw = min(self.x2, other.x2) - max(self.x1, other.x1)
        ih = min(self.y2, other.y2) - max(self.y1, other.y1)
        inter = max(0.0, iw) * max(0.0, ih)
        union = self.area() + other.area() - inter
        return inter / union if union > 0 else 0.0

    def clamp(self) -> Box:
        """This box with every coordinate clipped to [0, 1]."""
        return Box(*(min(1.0, max(0.0, v)) for v in (self.x1, self.y1, self.x2, self.y2)))

    def is_degenerate(self, min_size: float = 0.0) -> bool:
        """True when the width or the height is <= `min_size` (same units as the box)."""
        return (self.x2 - self.x1) <= min_size or (self.y2 - self.y1) <= min_size


@dataclass(frozen=True)
class Point:
    """A point in the padded-square frame."""

    x: float
    y: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError(f"point coordinates must be finite, got {(self.x, self.y)}")


@dataclass(frozen=True)
class Grounding:
    """A phrase (None for bare coordinates) with the boxes and points written right after it."""

    phrase: str | None
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()


# ----------------------------------------------------------------------------- pixels <-> frame


def _square(width: int, height: int) -> tuple[int, int, int]:
    """(S, pad_x, pad_y) of the release's padded square."""
    if not (isinstance(width, int | float) and isinstance(height, int | float)) or width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width!r} height={height!r}")
    width, height = int(width), int(height)
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _clip(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


def box_from_pixels(xyxy: Sequence[float], width: int, height: int, clamp: bool = True) -> Box:
    """A pixel box (x1, y1, x2, y2) of a W x H image in the frame; corners reordered, clipped to the image
    unless `clamp=False`."""
    if len(xyxy) != 4:
        raise ValueError(f"a pixel box needs 4 values (x1, y1, x2, y2), got {list(xyxy)!r}")
    side, pad_x, pad_y = _square(width, height)
    x1, x2 = sorted((float(xyxy[0]), float(xyxy[2])))
    y1, y2 = sorted((float(xyxy[1]), float(xyxy[3])))
    if clamp:
        x1, x2 = _clip(x1, 0.0, width), _clip(x2, 0.0, width)
        y1, y2 = _clip(y1, 0.0, height), _clip(y2, 0.0, height)
    return Box((x1 + pad_x) / side, (y1 + pad_y) / side, (x2 + pad_x) / side, (y2 + pad_y) / side)


def box_to_pixels(box: Box, width: int, height: int, clamp: bool = True) -> tuple[float, float, float, float]:
    """A frame box back to pixels (x1, y1, x2, y2) of a W x H image; clipped to the image unless
    `clamp=False` (a box drawn in the padding has no pixels)."""
    side, pad_x, pad_y = _square(width, height)
    x1, y1 = box.x1 * side - pad_x, box.y1 * side - pad_y
    x2, y2 = box.x2 * side - pad_x, box.y2 * side - pad_y
    if clamp:
        x1, x2 = _clip(x1, 0.0, width), _clip(x2, 0.0, width)
        y1, y2 = _clip(y1, 0.0, height), _clip(y2, 0.0, height)
    return (x1, y1, x2, y2)


def point_from_pixels(xy: Sequence[float], width: int, height: int) -> Point:
    """A pixel point (x, y) of a W x H image in the frame (not clipped)."""
    if len(xy) != 2:
        raise ValueError(f"a pixel point needs 2 values (x, y), got {list(xy)!r}")
    side, pad_x, pad_y = _square(width, height)
    return Point((float(xy[0]) + pad_x) / side, (float(xy[1]) + pad_y) / side)


def point_to_pixels(point: Point, width: int, height: int) -> tuple[float, float]:
    """A frame point back to pixels (x, y) of a W x H image (not clipped)."""
    side, pad_x, pad_y = _square(width, height)
    return (point.x * side - pad_x, point.y * side - pad_y)


# ----------------------------------------------------------------------------- formatting


def _fmt(v: float, decimals: int) -> str:
    text = f"{v:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.00"


def format_box(box: Box, decimals: int = 2) -> str:
    """`[x1,y1,x2,y2]` with `decimals` digits, no spaces, e.g. "[0.12,0.30,0.55,0.91]"."""
    return "[" + _box_body(box, decimals) + "]"


def _box_body(box: Box, decimals: int) -> str:
    return ",".join(_fmt(v, decimals) for v in (box.x1, box.y1, box.x2, box.y2))


def format_boxes(boxes: Iterable[Box], decimals: int = 2) -> str:
    """One bracket holding all boxes, split by `;`. Raises ValueError for no boxes (there is no text
    for "nothing"; the caller words that)."""
    bodies = [_box_body(b, decimals) for b in boxes]
    if not bodies:
        raise ValueError("format_boxes needs at least one box")
    return "[" + ";".join(bodies) + "]"


def format_point(point: Point, decimals: int = 2) -> str:
    """`[x,y]` with `decimals` digits, e.g. "[0.12,0.30]"."""
    return f"[{_fmt(point.x, decimals)},{_fmt(point.y, decimals)}]"


# ----------------------------------------------------------------------------- parsing


def _read_group(group: str, scale: float) -> tuple[float, ...] | None:
    """The numbers of one comma group, divided by `scale` and clamped; None when it is not 2 or 4
    in-range numbers."""
    parts = [p.strip() for p in group.split(",")]
    if len(parts) not in (2, 4) or not all(_NUMBER.fullmatch(p) for p in parts):
        return None
    vals = [float(p) / scale for p in parts]
    if not all(math.isfinite(v) and -SLACK <= v <= 1.0 + SLACK for v in vals):
        return None
    return tuple(_clip(v, 0.0, 1.0) for v in vals)


def _read_bracket(body: str, scale: float) -> tuple[list[Box], list[Point]]:
    boxes: list[Box] = []
    points: list[Point] = []
    for group in body.split(";"):
        vals = _read_group(group, scale)
        if vals is None:
            continue
        if len(vals) == 4:
            x1, x2 = sorted((vals[0], vals[2]))
            y1, y2 = sorted((vals[1], vals[3]))
            boxes.append(Box(x1, y1, x2, y2))
        else:
            points.append(Point(vals[0], vals[1]))
    return boxes, points


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def parse_boxes(text: str, scale: float = 1.0) -> list[Box]:
    """Every box in `text`, in order of appearance (see the module docstring for what is tolerated)."""
    _check_scale(scale)
    return [b for m in _BRACKET.finditer(text) for b in _read_bracket(m.group(1), scale)[0]]


def parse_points(text: str, scale: float = 1.0) -> list[Point]:
    """Every point `[x,y]` in `text`, in order of appearance."""
    _check_scale(scale)
    return [p for m in _BRACKET.finditer(text) for p in _read_bracket(m.group(1), scale)[1]]


def _bracket_run(text: str, pos: int, gap: re.Pattern[str], scale: float) -> tuple[list[Box], list[Point], int]:
    """Boxes and points of the brackets starting at `pos` (after `gap`), chained by `[\\s,;]*`;
    returns them and the position after the run (== pos when there is none)."""
    boxes: list[Box] = []
    points: list[Point] = []
    end = pos
    while True:
        m = _BRACKET.match(text, gap.match(text, end).end())
        if m is None:
            return boxes, points, end
        b, p = _read_bracket(m.group(1), scale)
        boxes += b
        points += p
        end = m.end()
        gap = _GAP_BETWEEN_BRACKETS


def parse_grounded(text: str, scale: float = 1.0) -> list[Grounding]:
    """Phrases and coordinates in order of appearance.

    A phrase `<p>..</p>` owns the brackets right after it (only whitespace before the first; whitespace,
    `,` or `;` between several); a phrase with none gets empty boxes/points. Any other bracket with
    coordinates becomes a Grounding with phrase=None. Phrase text is stripped, inner whitespace collapsed.
    Brackets without a valid box or point produce nothing.
    """
    _check_scale(scale)
    out: list[Grounding] = []
    pos = 0
    for pm in _PHRASE.finditer(text):
        out += _bare_groundings(text[pos : pm.start()], scale)
        boxes, points, pos = _bracket_run(text, pm.end(), _GAP_AFTER_PHRASE, scale)
        phrase = " ".join(pm.group(1).split())
        out.append(Grounding(phrase, tuple(boxes), tuple(points)))
    out += _bare_groundings(text[pos:], scale)
    return out


def _bare_groundings(text: str, scale: float) -> list[Grounding]:
    out: list[Grounding] = []
    for m in _BRACKET.finditer(text):
        boxes, points = _read_bracket(m.group(1), scale)
        if boxes or points:
            out.append(Grounding(None, tuple(boxes), tuple(points)))
    return out


# ----------------------------------------------------------------------------- other conventions


def coco_xywh_to_xyxy(xywh: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` (pixels) to `(x1, y1, x2, y2)`."""
    if len(xywh) != 4:
        raise ValueError(f"a COCO box needs 4 values (x, y, w, h), got {list(xywh)!r}")
    x, y, w, h = (float(v) for v in xywh)
    return (x, y, x + w, y + h)


def xyxy_to_coco_xywh(xyxy: Sequence[float]) -> tuple[float, float, float, float]:
    """`(x1, y1, x2, y2)` (pixels) to COCO `(x, y, w, h)`."""
    if len(xyxy) != 4:
        raise ValueError(f"a box needs 4 values (x1, y1, x2, y2), got {list(xyxy)!r}")
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return (x1, y1, x2 - x1, y2 - y1)


def _to_ints(box: Box, top: int) -> tuple[int, int, int, int]:
    c = box.clamp()
    return tuple(round(v * top) for v in (c.x1, c.y1, c.x2, c.y2))  # type: ignore[return-value]


def _from_ints(vals: Sequence[float], top: int) -> Box:
    if len(vals) != 4:
        raise ValueError(f"an integer box needs 4 values, got {list(vals)!r}")
    x1, x2 = sorted((float(vals[0]) / top, float(vals[2]) / top))
    y1, y2 = sorted((float(vals[1]) / top, float(vals[3]) / top))
    return Box(x1, y1, x2, y2)


def box_to_int1000(box: Box) -> tuple[int, int, int, int]:
    """Integers 0-1000 (Qwen-VL, InternVL, Ferret style), rounded after clamping. Only the numbers are
    rescaled: those models normalise by the image's own W and H, not by the padded square, so convert
    between conventions through pixels."""
    return _to_ints(box, 1000)


def box_from_int1000(vals: Sequence[float]) -> Box:
    """Inverse of `box_to_int1000` (corners reordered; same caveat about the frame)."""
    return _from_ints(vals, 1000)


def box_to_int100(box: Box) -> tuple[int, int, int, int]:
    """Integers 0-100 (MiniGPT-v2 style); same caveat as `box_to_int1000`."""
    return _to_ints(box, 100)


def box_from_int100(vals: Sequence[float]) -> Box:
    """Inverse of `box_to_int100`."""
    return _from_ints(vals, 100)


__all__ = [
    "SLACK",
    "Box",
    "Grounding",
    "Point",
    "box_from_int100",
    "box_from_int1000",
    "box_from_pixels",
    "box_to_int100",
    "box_to_int1000",
    "box_to_pixels",
    "coco_xywh_to_xyxy",
    "format_box",
    "format_boxes",
    "format_point",
    "parse_boxes",
    "parse_grounded",
    "parse_points",
    "point_from_pixels",
    "point_to_pixels",
    "xyxy_to_coco_xywh",
]
