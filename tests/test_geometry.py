"""The padded-square frame, formatting and tolerant parsing of `sphinx_mllm.geometry` (numbers by hand)."""

from __future__ import annotations

import math

import pytest

from sphinx_mllm.geometry import (
    Box,
    Grounding,
    Point,
    box_from_int100,
    box_from_int1000,
    box_from_pixels,
    box_to_int100,
    box_to_int1000,
    box_to_pixels,
    coco_xywh_to_xyxy,
    format_box,
    format_boxes,
    format_point,
    parse_boxes,
    parse_grounded,
    parse_points,
    point_from_pixels,
    point_to_pixels,
    xyxy_to_coco_xywh,
)


def approx_box(box: Box, expected: tuple[float, float, float, float]) -> None:
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- frame


def test_landscape_box_round_trip() -> None:
    # 640 x 480: S = 640, pad_x = 0, pad_y = (640 - 480) // 2 = 80.
    box = box_from_pixels([64, 48, 320, 240], 640, 480)
    approx_box(box, (0.1, (48 + 80) / 640, 0.5, (240 + 80) / 640))
    approx_box(box, (0.1, 0.2, 0.5, 0.5))
    assert box_to_pixels(box, 640, 480) == pytest.approx((64, 48, 320, 240))


def test_portrait_box_and_point_round_trip() -> None:
    # 300 x 500: S = 500, pad_x = 100, pad_y = 0.
    box = box_from_pixels([0, 0, 300, 500], 300, 500)
    approx_box(box, (0.2, 0.0, 0.8, 1.0))
    assert box_to_pixels(box, 300, 500) == pytest.approx((0, 0, 300, 500))
    point = point_from_pixels([150, 250], 300, 500)
    assert (point.x, point.y) == pytest.approx((0.5, 0.5))
    assert point_to_pixels(point, 300, 500) == pytest.approx((150, 250))


def test_odd_padding_uses_integer_division() -> None:
    # 301 x 500: pad_x = 199 // 2 = 99 (not 99.5).
    point = point_from_pixels([0, 0], 301, 500)
    assert (point.x, point.y) == pytest.approx((99 / 500, 0.0))
    assert point_to_pixels(Point(0.5, 0.5), 301, 500) == pytest.approx((250 - 99, 250))


def test_square_image_is_plain_division() -> None:
    approx_box(box_from_pixels([10, 20, 30, 40], 100, 100), (0.1, 0.2, 0.3, 0.4))
    assert point_to_pixels(Point(0.25, 0.75), 100, 100) == pytest.approx((25, 75))


def test_box_from_pixels_orders_and_clips_to_image() -> None:
    approx_box(box_from_pixels([50, 40, 10, 20], 100, 100), (0.1, 0.2, 0.5, 0.4))
    approx_box(box_from_pixels([-10, 5, 120, 50], 100, 100), (0.0, 0.05, 1.0, 0.5))
    approx_box(box_from_pixels([-10, 5, 120, 50], 100, 100, clamp=False), (-0.1, 0.05, 1.2, 0.5))
    # Landscape 200 x 100 (pad_y = 50): y is clipped to the image [0, 100] -> frame [0.25, 0.75].
    approx_box(box_from_pixels([0, -30, 200, 130], 200, 100), (0.0, 0.25, 1.0, 0.75))


def test_box_to_pixels_clips_boxes_in_the_padding() -> None:
    # 640 x 480, pad_y = 80: frame y 0..0.1 is -80..-16 px, all padding.
    assert box_to_pixels(Box(0.0, 0.0, 1.0, 0.1), 640, 480) == pytest.approx((0, 0, 640, 0))
    assert box_to_pixels(Box(0.0, 0.0, 1.0, 0.1), 640, 480, clamp=False) == pytest.approx((0, -80, 640, -16))


@pytest.mark.parametrize("size", [(0, 10), (10, -1), ("a", 10)])
def test_bad_image_size_raises(size: tuple) -> None:
    with pytest.raises(ValueError, match="image size"):
        box_from_pixels([0, 0, 1, 1], *size)


def test_wrong_arity_raises() -> None:
    with pytest.raises(ValueError, match="4 values"):
        box_from_pixels([0, 0, 1], 10, 10)
    with pytest.raises(ValueError, match="2 values"):
        point_from_pixels([0, 0, 1], 10, 10)


# ----------------------------------------------------------------------------- Box


def test_box_validates() -> None:
    with pytest.raises(ValueError, match="ordered"):
        Box(0.5, 0.0, 0.2, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Box(0.0, 0.0, math.nan, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Point(math.inf, 0.0)


def test_box_area_iou_clamp_degenerate() -> None:
    a, b = Box(0.0, 0.0, 0.5, 0.5), Box(0.25, 0.25, 0.75, 0.75)
    assert a.area() == pytest.approx(0.25)
    # intersection 0.0625, union 0.25 + 0.25 - 0.0625 = 0.4375
    assert a.iou(b) == pytest.approx(0.0625 / 0.4375)
    assert a.iou(a) == 1.0
    assert a.iou(Box(0.6, 0.6, 0.9, 0.9)) == 0.0
    flat = Box(0.1, 0.1, 0.1, 0.5)
    assert flat.is_degenerate() and flat.iou(flat) == 0.0
    assert not a.is_degenerate()
    assert Box(0.1, 0.1, 0.15, 0.5).is_degenerate(min_size=0.05)
    approx_box(Box(-0.2, 0.1, 1.3, 0.4).clamp(), (0.0, 0.1, 1.0, 0.4))


# ----------------------------------------------------------------------------- formatting


def test_format_box_boxes_point() -> None:
    box = Box(0.123, 0.3, 0.554, 0.91)
    assert format_box(box) == "[0.12,0.30,0.55,0.91]"
    assert format_box(box, decimals=3) == "[0.123,0.300,0.554,0.910]"
    assert format_boxes([box]) == "[0.12,0.30,0.55,0.91]"
    assert format_boxes([box, Box(0, 0, 1, 1)]) == "[0.12,0.30,0.55,0.91;0.00,0.00,1.00,1.00]"
    assert format_point(Point(0.5, 0.049)) == "[0.50,0.05]"
    assert format_box(Box(-0.001, 0.0, 0.5, 0.5)) == "[0.00,0.00,0.50,0.50]"  # never "-0.00"
    with pytest.raises(ValueError, match="at least one"):
        format_boxes([])


def test_format_then_parse_round_trip() -> None:
    boxes = [Box(0.1, 0.2, 0.3, 0.4), Box(0.5, 0.5, 0.9, 1.0)]
    assert parse_boxes(format_boxes(boxes)) == boxes
    assert parse_points(format_point(Point(0.25, 0.75))) == [Point(0.25, 0.75)]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.1,0.2,0.3,0.4]", [(0.1, 0.2, 0.3, 0.4)]),
        ("It is at [ 0.1 , 0.2,0.3,0.4 ].", [(0.1, 0.2, 0.3, 0.4)]),
        ("[0,0,1,1]", [(0.0, 0.0, 1.0, 1.0)]),
        ("[.1,.2,.3,.4]", [(0.1, 0.2, 0.3, 0.4)]),
        ("[0.3,0.4,0.1,0.2]", [(0.1, 0.2, 0.3, 0.4)]),  # swapped corners
        ("[1.02,-0.01,0.5,0.3]", [(0.5, 0.0, 1.0, 0.3)]),  # slightly out: clamped
        ("[1.2,0.1,0.5,0.3]", []),  # far out: ignored
        ("[0.1,0.2,0.3,0.4;0.5,0.5,0.6,0.6]", [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.6)]),
        ("[0.1,0.2,0.3,0.4; garbage ;0.5,0.5,0.6,0.6]", [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.6)]),
        ("[a, b] and [1,2,3] and [0.1,0.2,0.3] [nan,0.1,0.2,0.3]", []),
        ("two [0.1,0.1,0.2,0.2] boxes [0.3,0.3,0.4,0.4]", [(0.1, 0.1, 0.2, 0.2), (0.3, 0.3, 0.4, 0.4)]),
        ("[0.1,0.1,0.1,0.5]", [(0.1, 0.1, 0.1, 0.5)]),  # degenerate kept as written
        ("[[0.1,0.2,0.3,0.4]]", [(0.1, 0.2, 0.3, 0.4)]),
        ("[0.1,0.2,0.3,0.4", []),  # unclosed
        ("[0.5,0.5]", []),  # a point is not a box
        ("", []),
    ],
)
def test_parse_boxes(text: str, expected: list[tuple[float, ...]]) -> None:
    got = [(b.x1, b.y1, b.x2, b.y2) for b in parse_boxes(text)]
    assert got == [pytest.approx(e) for e in expected]


def test_parse_boxes_with_scale() -> None:
    assert parse_boxes("[100,200,300,400]") == []  # 0-1000 output is not misread as 0-1
    approx_box(parse_boxes("[100,200,300,400]", scale=1000)[0], (0.1, 0.2, 0.3, 0.4))
    approx_box(parse_boxes("<box>[10, 20, 30, 40]</box>", scale=100)[0], (0.1, 0.2, 0.3, 0.4))
    with pytest.raises(ValueError, match="scale"):
        parse_boxes("[0,0,1,1]", scale=0)


def test_parse_points() -> None:
    text = "<p>nose</p> [0.41,0.22] <p>left_eye</p> [ 0.4 , 0.2 ] box [0.1,0.1,0.2,0.2] [1.5,0.2] [x,y]"
    assert parse_points(text) == [Point(0.41, 0.22), Point(0.4, 0.2)]
    assert parse_points("[0.1,0.2;0.3,0.4]") == [Point(0.1, 0.2), Point(0.3, 0.4)]


def test_parse_grounded_caption() -> None:
    text = (
        "<p>A man</p> [0.10,0.20,0.30,0.40] rides <p> a  brown\nhorse </p>[0.3,0.2,0.5,0.4;0,0,1,1] "
        "near <p>the fence</p>. Extra [0.5,0.5] and [a, b]."
    )
    assert parse_grounded(text) == [
        Grounding("A man", (Box(0.1, 0.2, 0.3, 0.4),)),
        Grounding("a brown horse", (Box(0.3, 0.2, 0.5, 0.4), Box(0.0, 0.0, 1.0, 1.0))),
        Grounding("the fence"),
        Grounding(None, (), (Point(0.5, 0.5),)),
    ]


def test_parse_grounded_bracket_runs_and_bare_boxes() -> None:
    text = "[0.1,0.1,0.2,0.2] <p>dogs</p> [0.1,0.1,0.3,0.3], [0.5,0.5,0.7,0.7] sit; then [0.8,0.8,0.9,0.9]"
    assert parse_grounded(text) == [
        Grounding(None, (Box(0.1, 0.1, 0.2, 0.2),)),
        Grounding("dogs", (Box(0.1, 0.1, 0.3, 0.3), Box(0.5, 0.5, 0.7, 0.7))),
        Grounding(None, (Box(0.8, 0.8, 0.9, 0.9),)),
    ]
    # Text between the phrase and the bracket: the bracket is not the phrase's.
    assert parse_grounded("<p>cat</p> is at [0.1,0.1,0.2,0.2]") == [
        Grounding("cat"),
        Grounding(None, (Box(0.1, 0.1, 0.2, 0.2),)),
    ]
    # A bracket of prose right after a phrase gives the phrase nothing.
    assert parse_grounded("<p>cat</p> [see note]") == [Grounding("cat")]


def test_parse_grounded_keypoints() -> None:
    got = parse_grounded("<p>nose</p> [0.41,0.22] <p>left_eye</p>[0.40,0.20]")
    assert got == [Grounding("nose", (), (Point(0.41, 0.22),)), Grounding("left_eye", (), (Point(0.40, 0.20),))]


# ----------------------------------------------------------------------------- other conventions


def test_coco_conversions() -> None:
    assert coco_xywh_to_xyxy([10, 20, 30, 40]) == (10, 20, 40, 60)
    assert xyxy_to_coco_xywh([10, 20, 40, 60]) == (10, 20, 30, 40)
    with pytest.raises(ValueError):
        coco_xywh_to_xyxy([1, 2, 3])


def test_integer_frames() -> None:
    box = Box(0.1234, 0.5, 0.9996, 1.0)
    assert box_to_int1000(box) == (123, 500, 1000, 1000)
    assert box_to_int100(box) == (12, 50, 100, 100)
    approx_box(box_from_int1000([100, 250, 300, 400]), (0.1, 0.25, 0.3, 0.4))
    approx_box(box_from_int100([30, 40, 10, 20]), (0.1, 0.2, 0.3, 0.4))  # reordered
    assert box_to_int1000(Box(-0.1, 0.0, 1.2, 0.5)) == (0, 0, 1000, 500)  # clamped first
