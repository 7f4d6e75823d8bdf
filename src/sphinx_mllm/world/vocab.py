"""The world's closed vocabulary: colours, shape kinds, size classes, poses, words and category ids.

Colours are chosen so that no background can produce one of them: every palette colour has a channel
below `BACKGROUND_RANGE[0]` or above `BACKGROUND_RANGE[1]`, or a large channel spread, while backgrounds
stay inside that range with a small spread. A pixel of exactly a palette colour therefore belongs to an
object (the pixel tests rely on it). Shapes and stick figures are drawn without anti-aliasing, text with
Pillow's `fontmode = "1"`, so every drawn pixel has exactly its object's colour.
"""

from __future__ import annotations

from types import MappingProxyType

RGB = tuple[int, int, int]

COLOURS: MappingProxyType[str, RGB] = MappingProxyType({
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (140, 40, 200),
    "pink": (255, 110, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
})
"""Object colours by name (American spelling in the text: "color" questions, "red" answers)."""

BACKGROUND_RANGE: tuple[int, int] = (80, 190)
"""Every background channel lies in this range..."""
BACKGROUND_SPREAD = 40
"""...and max - min of a background pixel's channels is at most this."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
"""Shape kinds (detection categories 1-6)."""

PERSON = "person"

DETECTION_CATEGORIES: MappingProxyType[str, int] = MappingProxyType(
    {**{kind: i + 1 for i, kind in enumerate(SHAPES)}, PERSON: len(SHAPES) + 1}
)
"""Detection category ids (stable across versions: held-out references use them)."""

SIZE_CLASSES: MappingProxyType[str, tuple[float, float, int]] = MappingProxyType({
    "small": (0.030, 0.042, 6),
    "medium": (0.070, 0.100, 10),
    "large": (0.130, 0.180, 16),
})
"""Size class -> (min, max) of the shape's side as a fraction of the image's long side, and a floor in
pixels. Small shapes (< 4.2% of the side, 13-19 px at 448) are only legible in the high-resolution views;
the classes are at least 1.6x apart so that a size word is never ambiguous."""

POSES: tuple[str, ...] = ("standing", "waving", "cheering", "stretching", "jumping")
"""Stick-figure poses; the name is what captions and answers say the person is doing."""

LAYOUT_CLASSES: MappingProxyType[str, int] = MappingProxyType(
    {"text": 1, "title": 2, "list": 3, "table": 4, "figure": 5}
)
"""Document region classes with PubLayNet's category ids."""

POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
"""Names of the 3 x 3 cells of an image (row, column), the answers of position questions."""

WORDS: tuple[str, ...] = (
    "apple", "bread", "cable", "chair", "cloud", "coast", "crown", "dance", "delta", "eagle", "field",
    "flame", "frost", "glass", "grape", "honey", "house", "index", "jelly", "koala", "lemon", "light",
    "magic", "maple", "metal", "music", "night", "ocean", "olive", "paper", "piano", "plant", "queen",
    "radio", "river", "robot", "salad", "smile", "snake", "sugar", "table", "tiger", "toast", "tower",
    "train", "uncle", "valley", "video", "water", "whale", "wheel", "window", "winter", "world", "zebra",
    "map", "sun", "key", "cup", "hat", "pen", "art", "fox", "owl", "jam", "ink", "oak", "sky", "tea", "van",
)
"""Words written on signs and pages (no colour, shape or position word, so that reading never leaks
an answer of another question)."""

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def count_phrase(count: int, singular: str, plural: str) -> str:
    """`"a red circle"`, `"two red circles"` (articles for 1, words up to nine, digits beyond)."""
    if count == 1:
        return f"{article(singular)} {singular}"
    word = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return f"{word} {plural}"


def article(phrase: str) -> str:
    """"a" or "an" for a phrase (by its first letter)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"
