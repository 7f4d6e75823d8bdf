"""Dense labels of world images for encoder pre-training: every object as numbers, and per-cell targets of
each view the model sees.

An object's geometry is in the release's padded-square frame (`sphinx_mllm.geometry`), the frame of every
coordinate the LLM writes. A view is a square window of that frame (the global view is the whole square,
sub-image (r, c) of a g x g grid is `[c/g, (c+1)/g] x [r/g, (r+1)/g]`); targets are in the view's own
frame, cut into `grid` x `grid` cells. Each cell has two slots, `thing` (shapes, people, layout regions)
and `word` (sign and page words); an object goes to the slot of the cell holding its centre, or to the
nearest free cell around it when two centres share a cell (smaller objects are placed first). With
`cover=True` the attribute fields (category, colour, size, pose, word) also go to every other cell whose centre
lies inside an object's box (the smallest such object wins), a denser supervision of what is where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sphinx_mllm.fusion import view_windows
from sphinx_mllm.geometry import box_from_pixels, point_from_pixels
from sphinx_mllm.world.scene import WorldImage
from sphinx_mllm.world.vocab import COLOURS, LAYOUT_CLASSES, POSES, SHAPES, WORDS

CATEGORIES: tuple[str, ...] = (*SHAPES, "person", *LAYOUT_CLASSES, "word")
"""Classes of the `category` target (index + 1; 0 is "nothing here")."""
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
WORD_VOCAB: tuple[str, ...] = (*WORDS, "<number>")
"""Classes of the `word` target (index + 1; 0: no word). Titles are words in title case: same class."""
NUM_KEYPOINTS = 17
SLOTS: tuple[str, ...] = ("thing", "word")


@dataclass(frozen=True)
class DenseObject:
    """An object of an image: category index (into `CATEGORIES`), box in the square frame, attributes
    (index + 1, 0 when the object has none) and keypoints ([17, 3]: x, y in the square frame, visibility)."""

    slot: str
    category: int
    box: tuple[float, float, float, float]
    colour: int = 0
    size: int = 0
    pose: int = 0
    word: int = 0
    keypoints: tuple[tuple[float, float, float], ...] = ()

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _word_class(text: str) -> int:
    low = text.lower()
    if low in WORDS:
        return WORDS.index(low) + 1
    return len(WORDS) + 1  # numbers of tables


def dense_objects(image: WorldImage) -> list[DenseObject]:
    """Every labelled object of `image` in the padded-square frame."""
    w, h = image.size
    colours = list(COLOURS)
    out: list[DenseObject] = []
    for s in image.shapes:
        out.append(DenseObject("thing", CATEGORIES.index(s.kind), _box(s.box, w, h), colours.index(s.colour) + 1,
                               SIZE_NAMES.index(s.size) + 1))
    for p in image.people:
        flat = p.keypoints
        kps = []
        for i in range(NUM_KEYPOINTS):
            x, y, v = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
            pt = point_from_pixels((x, y), w, h) if v > 0 else None
            kps.append((pt.x, pt.y, float(v)) if pt is not None else (0.0, 0.0, 0.0))
        out.append(DenseObject("thing", CATEGORIES.index("person"), _box(p.box, w, h), colours.index(p.colour) + 1,
                               pose=POSES.index(p.pose) + 1, keypoints=tuple(kps)))
    for sign in image.words:
        out.append(DenseObject("word", CATEGORIES.index("word"), _box(sign.word.box, w, h),
                               colours.index(sign.colour) + 1, SIZE_NAMES.index(sign.size) + 1,
                               word=_word_class(sign.word.text)))
    if image.page is not None:
        for region in image.page.regions:
            out.append(DenseObject("thing", CATEGORIES.index(region.kind), _box(region.box, w, h)))
            for word in region.words:
                out.append(DenseObject("word", CATEGORIES.index("word"), _box(word.box, w, h),
                                       word=_word_class(word.text)))
    return out


def _box(px: Sequence[int], w: int, h: int) -> tuple[float, float, float, float]:
    b = box_from_pixels(px, w, h)
    return (b.x1, b.y1, b.x2, b.y2)


TARGET_FIELDS: dict[str, int] = {
    "present": 1, "category": 1, "colour": 1, "size": 1, "pose": 1, "word": 1, "box": 4, "keypoints": 3 * NUM_KEYPOINTS,
}
"""Per slot and cell: name -> number of values. Boxes and keypoints are in the view's frame."""


ATTRIBUTES: tuple[str, ...] = ("category", "colour", "size", "pose", "word")
"""The fields that `cover=True` spreads over an object's cells."""


def cell_targets(objects: Sequence[DenseObject], window: tuple[float, float, float], grid: int, cover: bool = False
                 ) -> dict[str, np.ndarray]:
    """Targets of one view: `{f"{slot}/{field}": float32 array [grid * grid, n]}` (raster cells)."""
    x0, y0, side = window
    out = {f"{slot}/{name}": np.zeros((grid * grid, n), np.float32) for slot in SLOTS
           for name, n in TARGET_FIELDS.items()}
    for slot in SLOTS:
        taken = np.zeros((grid, grid), bool)
        mine = [o for o in objects if o.slot == slot]
        for obj in sorted(mine, key=lambda o: o.area):
            cx, cy = (obj.center[0] - x0) / side, (obj.center[1] - y0) / side
            if not (0.0 <= cx < 1.0 and 0.0 <= cy < 1.0):
                continue
            cell = _free_cell(taken, cx * grid, cy * grid)
            if cell is None:
                continue
            r, c = cell
            taken[r, c] = True
            k = r * grid + c
            _fill(out, slot, k, obj, window)
        if cover:
            _cover(out, slot, mine, window, grid)
    return out


def _cover(out: dict[str, np.ndarray], slot: str, objects: Sequence[DenseObject], window: tuple[float, float, float],
           grid: int) -> None:
    """Attribute fields on the cells inside each object's box that hold no object centre (largest first)."""
    x0, y0, side = window
    centres = (out[f"{slot}/present"][:, 0] > 0).reshape(grid, grid)
    mids = (np.arange(grid) + 0.5) / grid
    for obj in sorted(objects, key=lambda o: -o.area):
        b = obj.box
        xs = (mids >= (b[0] - x0) / side) & (mids <= (b[2] - x0) / side)
        ys = (mids >= (b[1] - y0) / side) & (mids <= (b[3] - y0) / side)
        cells = (ys[:, None] & xs[None, :] & ~centres).reshape(-1)
        for name in ATTRIBUTES:
            out[f"{slot}/{name}"][cells, 0] = getattr(obj, name) + (1 if name == "category" else 0)


def _free_cell(taken: np.ndarray, gx: float, gy: float) -> tuple[int, int] | None:
    """The free cell nearest to grid point (gx, gy) within one cell of the cell holding it."""
    grid = taken.shape[0]
    r0, c0 = min(int(gy), grid - 1), min(int(gx), grid - 1)
    if not taken[r0, c0]:
        return r0, c0
    best, best_d = None, float("inf")
    for r in range(max(0, r0 - 1), min(grid, r0 + 2)):
        for c in range(max(0, c0 - 1), min(grid, c0 + 2)):
            d = (c + 0.5 - gx) ** 2 + (r + 0.5 - gy) ** 2
            if not taken[r, c] and d < best_d:
                best, best_d = (r, c), d
    return best


def _fill(out: dict[str, np.ndarray], slot: str, k: int, obj: DenseObject, window: tuple[float, float, float]) -> None:
    x0, y0, side = window
    out[f"{slot}/present"][k, 0] = 1.0
    out[f"{slot}/category"][k, 0] = obj.category + 1
    out[f"{slot}/colour"][k, 0] = obj.colour
    out[f"{slot}/size"][k, 0] = obj.size
    out[f"{slot}/pose"][k, 0] = obj.pose
    out[f"{slot}/word"][k, 0] = obj.word
    b = obj.box
    out[f"{slot}/box"][k] = [(b[0] - x0) / side, (b[1] - y0) / side, (b[2] - x0) / side, (b[3] - y0) / side]
    if obj.keypoints:
        kp = out[f"{slot}/keypoints"][k].reshape(NUM_KEYPOINTS, 3)
        for i, (x, y, v) in enumerate(obj.keypoints):
            if v > 0:
                kp[i] = ((x - x0) / side, (y - y0) / side, 1.0)


__all__ = [
    "ATTRIBUTES", "CATEGORIES", "NUM_KEYPOINTS", "SIZE_NAMES", "SLOTS", "TARGET_FIELDS", "WORD_VOCAB", "DenseObject",
    "cell_targets", "dense_objects", "view_windows",
]
