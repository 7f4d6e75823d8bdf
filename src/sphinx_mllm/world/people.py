"""Stick-figure people with the 17 COCO keypoints.

A figure is built facing the viewer (the person's left is the image's right, as in COCO), from a pose
(joint angles, jittered) and a height `h` in pixels, then placed. Every joint sits on a pixel centre: a
keypoint at pixel (i, j) is reported as (i + 0.5, j + 0.5), the continuous coordinate of that centre, and
a disc is drawn there, so a visible keypoint always lies on a drawn pixel of its person's colour.

Visibility follows COCO: 2 = drawn, 1 = labelled but hidden (the far eye and ear of a face in profile),
0 = not labelled (outside the image; coordinates 0, 0). Figures may be cut by the image border.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import ImageDraw

from sphinx_mllm.tasks import COCO_KEYPOINT_NAMES
from sphinx_mllm.world.canvas import PixelBox, Size, mask_box, place
from sphinx_mllm.world.vocab import COLOURS, POSES, RGB

Joint = tuple[int, int]

# (upper arm, forearm) angles in degrees from straight down, outwards positive; right arm first.
_ARMS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "standing": ((12, 6), (12, 6)),
    "waving": ((100, 165), (14, 6)),
    "cheering": ((150, 170), (150, 170)),
    "stretching": ((90, 90), (90, 90)),
    "jumping": ((130, 150), (130, 150)),
}
# (thigh, shin) angles, same convention.
_LEGS: dict[str, tuple[float, float]] = {
    "standing": (4, 0), "waving": (5, 0), "cheering": (6, 2), "stretching": (8, 0), "jumping": (26, 12),
}

# Limbs drawn as lines between keypoints (COCO skeleton without the face), plus neck and torso lines.
_LIMBS: tuple[tuple[str, str], ...] = (
    ("left_shoulder", "right_shoulder"), ("left_hip", "right_hip"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
    ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
)
_FACE = ("nose", "left_eye", "right_eye", "left_ear", "right_ear")


@dataclass(frozen=True)
class Figure:
    """A stick figure in image pixels: joints by COCO name (pixel indices), hidden face points, the neck
    and hip centres, head centre and radius, line width, joint disc radius."""

    colour: str
    pose: str
    facing: str  # "front", "left" (towards the image's left) or "right"
    joints: dict[str, Joint]
    hidden: frozenset[str]
    neck: Joint
    pelvis: Joint
    head: Joint
    head_radius: int
    width: int
    dot: int


@dataclass(frozen=True)
class Person:
    """A drawn figure, its tight pixel box, and its COCO keypoints `[x, y, v] * 17` (pixel coordinates)."""

    figure: Figure
    box: PixelBox
    keypoints: tuple[float, ...]

    @property
    def colour(self) -> str:
        return self.figure.colour

    @property
    def pose(self) -> str:
        return self.figure.pose


def _limb(start: tuple[float, float], angle: float, length: float, side: int) -> tuple[float, float]:
    """The end of a limb from `start`, `angle` degrees from straight down, outwards for `side` (+1 = the
    person's left = image right, -1 = right)."""
    rad = math.radians(angle)
    return start[0] + side * length * math.sin(rad), start[1] + length * math.cos(rad)


def _face(head: tuple[float, float], r: float, facing: str) -> tuple[dict[str, tuple[float, float]], frozenset[str]]:
    hx, hy = head
    if facing == "front":
        return {
            "nose": (hx, hy + 0.25 * r), "left_eye": (hx + 0.4 * r, hy - 0.15 * r),
            "right_eye": (hx - 0.4 * r, hy - 0.15 * r), "left_ear": (hx + r, hy), "right_ear": (hx - r, hy),
        }, frozenset()
    s = -1 if facing == "left" else 1  # direction the face points to
    near, far = ("left", "right") if facing == "left" else ("right", "left")
    return {
        "nose": (hx + s * 0.75 * r, hy + 0.15 * r), f"{near}_eye": (hx + s * 0.4 * r, hy - 0.15 * r),
        f"{far}_eye": (hx + s * 0.55 * r, hy - 0.2 * r), f"{near}_ear": (hx - s * 0.15 * r, hy),
        f"{far}_ear": (hx - s * 0.15 * r, hy + 0.05 * r),
    }, frozenset({f"{far}_eye", f"{far}_ear"})


def build_figure(rng: random.Random, colour: str, pose: str, height: float) -> Figure:
    """A figure `height` px tall with its head's top near (0, 0) (joints may be negative)."""
    h = height
    r = 0.085 * h
    jitter = lambda: rng.uniform(-8, 8)  # noqa: E731 - a one-line helper
    head = (0.0, r)
    neck = (0.0, 2 * r + 0.04 * h)
    pelvis = (0.0, neck[1] + 0.30 * h)
    pts: dict[str, tuple[float, float]] = {}
    for side, name in ((-1, "right"), (1, "left")):
        shoulder = (side * 0.11 * h, neck[1])
        hip = (side * 0.075 * h, pelvis[1])
        upper, fore = _ARMS[pose][0 if name == "right" else 1]
        upper, fore = upper + jitter(), fore + jitter()
        elbow = _limb(shoulder, upper, 0.16 * h, side)
        thigh, shin = _LEGS[pose]
        thigh, shin = thigh + jitter() / 2, shin + jitter() / 2
        knee = _limb(hip, thigh, 0.22 * h, side)
        pts.update({
            f"{name}_shoulder": shoulder, f"{name}_elbow": elbow, f"{name}_wrist": _limb(elbow, fore, 0.15 * h, side),
            f"{name}_hip": hip, f"{name}_knee": knee, f"{name}_ankle": _limb(knee, shin, 0.21 * h, side),
        })
    facing = rng.choices(("front", "left", "right"), weights=(0.6, 0.2, 0.2))[0]
    face, hidden = _face(head, r, facing)
    pts.update(face)
    snap = lambda p: (round(p[0]), round(p[1]))  # noqa: E731
    width = max(2, round(0.03 * h))
    return Figure(
        colour=colour, pose=pose, facing=facing, joints={k: snap(v) for k, v in pts.items()}, hidden=hidden,
        neck=snap(neck), pelvis=snap(pelvis), head=snap(head), head_radius=max(2, round(r)), width=width,
        dot=max(1, round(width * 0.6)),
    )


def shift(figure: Figure, dx: int, dy: int) -> Figure:
    move = lambda p: (p[0] + dx, p[1] + dy)  # noqa: E731
    return Figure(
        figure.colour, figure.pose, figure.facing, {k: move(v) for k, v in figure.joints.items()}, figure.hidden,
        move(figure.neck), move(figure.pelvis), move(figure.head), figure.head_radius, figure.width, figure.dot,
    )


def _disc(draw: ImageDraw.ImageDraw, p: Joint, radius: int, fill: RGB | int) -> None:
    draw.ellipse((p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius), fill=fill)


def draw_figure(draw: ImageDraw.ImageDraw, figure: Figure, fill: RGB | int) -> None:
    j = figure.joints
    mid_shoulder = figure.neck
    for a, b in _LIMBS:
        draw.line((j[a], j[b]), fill=fill, width=figure.width)
    draw.line((mid_shoulder, figure.pelvis), fill=fill, width=figure.width)
    hx, hy = figure.head
    r = figure.head_radius
    draw.line(((hx, hy + r), mid_shoulder), fill=fill, width=figure.width)
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), outline=fill, width=max(1, figure.width // 2 + 1))
    for name in COCO_KEYPOINT_NAMES:
        if name in figure.hidden:
            continue
        _disc(draw, j[name], 1 if name in _FACE else figure.dot, fill)


def figure_extent(figure: Figure) -> PixelBox:
    """A box around everything the figure draws (for placement; the tight box is measured later)."""
    xs = [p[0] for p in figure.joints.values()] + [figure.head[0] - figure.head_radius,
                                                    figure.head[0] + figure.head_radius]
    ys = [p[1] for p in figure.joints.values()] + [figure.head[1] - figure.head_radius]
    pad = figure.width + figure.dot + 1
    return (min(xs) - pad, min(ys) - pad, max(xs) + pad + 1, max(ys) + pad + 1)


def coco_keypoints(figure: Figure, image_size: Size) -> tuple[float, ...]:
    """`[x, y, v] * 17`: pixel centres; v 2 drawn, 1 hidden, 0 outside the image (x = y = 0)."""
    width, height = image_size
    flat: list[float] = []
    for name in COCO_KEYPOINT_NAMES:
        x, y = figure.joints[name]
        if not (0 <= x < width and 0 <= y < height):
            flat += [0.0, 0.0, 0]
        else:
            flat += [x + 0.5, y + 0.5, 1 if name in figure.hidden else 2]
    return tuple(flat)


def sample_people(
    rng: random.Random, image_size: Size, count: int, taken: list[PixelBox], gap: int
) -> list[Person]:
    """Up to `count` non-overlapping figures of distinct colours; some are cut by the image border."""
    height = image_size[1]
    colours = rng.sample([c for c in COLOURS if c != "white"], k=min(count, len(COLOURS) - 1))
    people = []
    for colour in colours:
        for attempt in range(4):
            scale = rng.uniform(0.42, 0.8) * height / (1 + 0.35 * (count - 1)) * (0.8**attempt)
            figure = build_figure(rng, colour, rng.choice(POSES), max(24.0, scale))
            x1, y1, x2, y2 = figure_extent(figure)
            cut = rng.random() < 0.15
            overhang = (0, round((y2 - y1) * 0.3)) if cut else (0, 0)
            corner = place(rng, image_size, (x2 - x1, y2 - y1), taken, gap=gap, margin=1, overhang=overhang)
            if corner is None:
                continue
            figure = shift(figure, corner[0] - x1, corner[1] - y1)
            box = mask_box(image_size, lambda d, f=figure: draw_figure(d, f, 255))
            if box is None:
                continue
            people.append(Person(figure, box, coco_keypoints(figure, image_size)))
            taken.append(box)
            break
    return people
