"""Boxes and points of an answer, in pixels of the original image, and drawn on it.

Answers carry coordinates in the release's frame (0-1 in the padded square, SPHINX.md section 8); they are
mapped back with `sphinx_mllm.geometry.box_to_pixels` / `point_to_pixels`, so drawings land on the original
(non-square) image, not on the padded square. When the phrases of points are the 17 COCO keypoint names
(`left_eye`, "left eye"...), the points of each person are joined by the COCO skeleton; a new `nose` (or a
name seen before) starts a new person.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sphinx_mllm.geometry import box_to_pixels, parse_grounded, point_to_pixels
from sphinx_mllm.tasks.spatial import COCO_KEYPOINT_NAMES

PixelBox = tuple[float, float, float, float]
PixelPoint = tuple[float, float]

# COCO person skeleton (the `skeleton` of person_keypoints_*.json, 1-based keypoint indices).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10),
    (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
)  # fmt: skip
SKELETON_COLOR = (255, 215, 0)


@dataclass(frozen=True)
class PixelGrounding:
    """A phrase (None for bare coordinates) with its boxes `(x1, y1, x2, y2)` and points `(x, y)` in pixels
    of the original image (boxes clipped to it)."""

    phrase: str | None
    boxes: tuple[PixelBox, ...] = ()
    points: tuple[PixelPoint, ...] = ()


def keypoint_name(phrase: str | None) -> str | None:
    """The COCO keypoint name a phrase spells ("Left eye" -> "left_eye"), or None."""
    if phrase is None:
        return None
    name = re.sub(r"[\s\-]+", "_", phrase.strip().lower())
    return name if name in COCO_KEYPOINT_NAMES else None


def answer_groundings(text: str, width: int, height: int) -> list[PixelGrounding]:
    """Phrases, boxes and points of an answer, mapped to pixels of a `width` x `height` image."""
    out = []
    for g in parse_grounded(text):
        boxes = tuple(box_to_pixels(b, width, height) for b in g.boxes)
        points = tuple(point_to_pixels(p, width, height) for p in g.points)
        out.append(PixelGrounding(g.phrase, boxes, points))
    return out


def format_groundings(groundings: Sequence[PixelGrounding]) -> list[str]:
    """One line per grounding, e.g. `person: box (12, 30, 140, 220)`, `left_eye: point (55, 80)`."""
    lines = []
    for g in groundings:
        parts = [f"box ({', '.join(f'{v:.0f}' for v in b)})" for b in g.boxes]
        parts += [f"point ({p[0]:.0f}, {p[1]:.0f})" for p in g.points]
        if parts:
            lines.append(f"{g.phrase or '(no phrase)'}: " + "; ".join(parts))
    return lines


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _people(groundings: Sequence[PixelGrounding]) -> list[dict[str, PixelPoint]]:
    """Keypoints grouped into people: a name already seen in the current person starts the next one."""
    people: list[dict[str, PixelPoint]] = []
    for g in groundings:
        name = keypoint_name(g.phrase)
        if name is None or not g.points:
            continue
        if not people or name in people[-1]:
            people.append({})
        people[-1][name] = g.points[0]
    return people


def _label(draw: ImageDraw.ImageDraw, xy: PixelPoint, text: str, color: tuple[int, int, int],
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont, image_size: tuple[int, int]) -> None:
    """A filled tag with the phrase above the box's top-left corner (inside the image)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, image_size[0] - tw))
    y = xy[1] - th if xy[1] - th >= 0 else xy[1]
    draw.rectangle((x, y, x + tw, y + th), fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_answer(image: Image.Image, text: str, line_width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with the answer's boxes (outlined, with their phrase), keypoint skeletons and
    points drawn at their pixels. Box outlines are drawn inside the box: its edge pixels are the outline's."""
    canvas = image.convert("RGB").copy()
    width, height = canvas.size
    lw = line_width or max(2, round(min(width, height) / 150))
    font = _font(max(10, round(min(width, height) / 30)))
    draw = ImageDraw.Draw(canvas)
    groundings = answer_groundings(text, width, height)
    labels = []
    for i, g in enumerate(groundings):
        color = PALETTE[i % len(PALETTE)]
        for x1, y1, x2, y2 in g.boxes:
            # Pixel boxes are continuous [x1, x2): the last covered pixel column is round(x2) - 1.
            left, top = round(x1), round(y1)
            right, bottom = max(left, round(x2) - 1), max(top, round(y2) - 1)
            draw.rectangle((left, top, right, bottom), outline=color, width=lw)
            if g.phrase:
                labels.append(((x1, y1), g.phrase, color))
    for person in _people(groundings):
        for a, b in COCO_SKELETON:
            na, nb = COCO_KEYPOINT_NAMES[a - 1], COCO_KEYPOINT_NAMES[b - 1]
            if na in person and nb in person:
                draw.line((person[na], person[nb]), fill=SKELETON_COLOR, width=lw)
    radius = lw + 1
    for i, g in enumerate(groundings):
        color = PALETTE[i % len(PALETTE)] if keypoint_name(g.phrase) is None else (255, 0, 0)
        for x, y in g.points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    for xy, phrase, color in labels:  # last, so that tags stay readable over lines
        _label(draw, xy, phrase, color, font, (width, height))
    return canvas


__all__ = ["COCO_SKELETON", "PixelGrounding", "answer_groundings", "draw_answer", "format_groundings",
           "keypoint_name"]
