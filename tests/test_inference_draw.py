"""Answers' boxes and keypoints land on the right pixels of NON-square images (checked on pixel values).

Frame of the release: S = max(W, H), pad = (S - side) // 2, pixel = frame * S - pad. Expected pixel
coordinates below are worked out by hand from that rule.
"""

from __future__ import annotations

import pytest
from PIL import Image

from sphinx_mllm.inference.draw import (
    COCO_SKELETON,
    PALETTE,
    SKELETON_COLOR,
    PixelGrounding,
    answer_groundings,
    draw_answer,
    format_groundings,
    keypoint_name,
)
from sphinx_mllm.tasks import COCO_KEYPOINT_NAMES

GREY = (128, 128, 128)


def test_groundings_map_through_the_padded_square_wide_and_tall() -> None:
    # Wide 200x100: S=200, pad_y=50. [0.10,0.30,0.50,0.60] -> x 20..100, y 60-50=10 .. 120-50=70.
    (g,) = answer_groundings("<p>dog</p> [0.10,0.30,0.50,0.60]", 200, 100)
    assert g.phrase == "dog"
    assert g.boxes[0] == pytest.approx((20.0, 10.0, 100.0, 70.0))
    # Tall 100x200: S=200, pad_x=50. The same box -> x 20-50 (clipped to 0) .. 100-50=50, y 60..120.
    (g,) = answer_groundings("<p>dog</p> [0.10,0.30,0.50,0.60]", 100, 200)
    assert g.boxes[0] == pytest.approx((0.0, 60.0, 50.0, 120.0))
    # Points are not clipped; several boxes in one bracket; a bare box has no phrase.
    groundings = answer_groundings("<p>nose</p> [0.50,0.50] <p>cats</p> [0.0,0.25,0.5,0.5;0.5,0.25,1.0,0.75] "
                                   "and more [0.25,0.25,0.75,0.75]", 200, 100)
    assert groundings[0].points[0] == pytest.approx((100.0, 50.0))
    assert groundings[1].boxes[0] == pytest.approx((0.0, 0.0, 100.0, 50.0))
    assert groundings[1].boxes[1] == pytest.approx((100.0, 0.0, 200.0, 100.0))
    assert groundings[2].phrase is None
    assert format_groundings(groundings) == [
        "nose: point (100, 50)", "cats: box (0, 0, 100, 50); box (100, 0, 200, 100)",
        "(no phrase): box (50, 0, 150, 100)",
    ]


def test_box_outline_lands_on_its_edges_in_a_wide_image() -> None:
    image = Image.new("RGB", (200, 100), GREY)
    out = draw_answer(image, "<p>dog</p> [0.10,0.30,0.50,0.60]", line_width=2)  # pixels x 20..100, y 10..70
    color = PALETTE[0]
    assert out.size == (200, 100) and image.getpixel((20, 40)) == GREY  # the input is not modified
    assert out.getpixel((20, 40)) == color and out.getpixel((21, 40)) == color  # left edge, 2 px inside
    assert out.getpixel((99, 40)) == color and out.getpixel((98, 40)) == color  # right edge (last column 99)
    assert out.getpixel((60, 69)) == color  # bottom edge (last row 69)
    assert out.getpixel((19, 40)) == GREY and out.getpixel((100, 40)) == GREY  # just outside
    assert out.getpixel((22, 40)) == GREY and out.getpixel((60, 60)) == GREY  # inside, past the outline
    assert out.getpixel((60, 75)) == GREY


def test_box_outline_lands_on_its_edges_in_a_tall_image() -> None:
    image = Image.new("RGB", (100, 200), GREY)
    out = draw_answer(image, "[0.30,0.10,0.60,0.50]", line_width=1)  # x 60-50=10 .. 120-50=70, y 20..100
    color = PALETTE[0]
    assert out.getpixel((10, 60)) == color and out.getpixel((69, 60)) == color
    assert out.getpixel((40, 20)) == color and out.getpixel((40, 99)) == color
    assert out.getpixel((9, 60)) == GREY and out.getpixel((70, 60)) == GREY and out.getpixel((40, 60)) == GREY


def _keypoint_answer(points: dict[str, tuple[float, float]]) -> str:
    return " ".join(f"<p>{name}</p> [{x:.2f},{y:.2f}]" for name, (x, y) in points.items())


def test_keypoints_and_coco_skeleton_land_on_their_pixels() -> None:
    # Wide 400x200: S=400, pad_y=100 -> pixel (x*400, y*400-100).
    frame = {name: (0.30 + 0.02 * (i % 5), 0.30 + 0.02 * i) for i, name in enumerate(COCO_KEYPOINT_NAMES)}
    frame["left_shoulder"], frame["right_shoulder"] = (0.25, 0.40), (0.75, 0.40)  # pixels (100,60), (300,60)
    image = Image.new("RGB", (400, 200), GREY)
    out = draw_answer(image, _keypoint_answer(frame), line_width=2)
    assert out.getpixel((100, 60)) == (255, 0, 0) and out.getpixel((300, 60)) == (255, 0, 0)
    assert out.getpixel((200, 60)) == SKELETON_COLOR  # the shoulder-shoulder link, half way
    assert out.getpixel((200, 70)) == GREY
    nose = out.getpixel((round(0.30 * 400), round(0.30 * 400 - 100)))
    assert nose == (255, 0, 0)
    assert (6, 7) in COCO_SKELETON  # shoulders are keypoints 6 and 7 (1-based)


def test_keypoint_names_and_people() -> None:
    assert keypoint_name("Left eye") == "left_eye" and keypoint_name("left-eye") == "left_eye"
    assert keypoint_name("dog") is None and keypoint_name(None) is None
    two = _keypoint_answer({"nose": (0.1, 0.1), "left_eye": (0.12, 0.1)}) + " " + \
        _keypoint_answer({"nose": (0.8, 0.8), "left_eye": (0.82, 0.8)})
    image = Image.new("RGB", (100, 100), GREY)
    out = draw_answer(image, two, line_width=1)
    # nose-left_eye is a skeleton link within each person; nothing joins the two people.
    assert out.getpixel((45, 45)) == GREY
    assert isinstance(answer_groundings(two, 100, 100)[0], PixelGrounding)


def test_answer_without_coordinates_draws_nothing() -> None:
    image = Image.new("RGB", (50, 30), GREY)
    out = draw_answer(image, "a grey picture")
    assert out.tobytes() == image.tobytes()
    assert format_groundings(answer_groundings("a grey picture", 50, 30)) == []
