"""What the world says about an image: referring expressions, positions, relations and captions.

Everything is derived from the labels of a `WorldImage`, so the text is right by construction:
- a referring expression uses the fewest attributes (size, colour, pose, kind) that make its target the
  only match among all objects of the image, else adds a relative position ("on the left", "leftmost")
  that holds with a clear margin, else there is none (`None`) and no question is asked about it;
- absolute positions are the 3 x 3 cells of the image; a question about one is only asked when the
  object's centre is clearly inside a cell;
- captions come in four styles: short (one sentence, three variants used as CIDEr references), detailed
  (every object, its size, colour and place), `synthetic` pre-training captions (clean, complete,
  model-like) and `real` ones (short, partial, noisy alt-text, like web captions).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sphinx_mllm.tasks import pluralize
from sphinx_mllm.world.canvas import PixelBox, Size, box_center
from sphinx_mllm.world.scene import WorldImage
from sphinx_mllm.world.vocab import NUMBER_WORDS, PERSON, POSITIONS, article, count_phrase

CLEAR_MARGIN = 0.10
"""A relative position needs centres this far apart (fraction of the image side along that axis)."""
CELL_MARGIN = 0.04
"""An absolute position needs the centre this far from the cell borders (fraction of the side)."""


@dataclass(frozen=True)
class Thing:
    """An object of a scene as language sees it: a shape (with a size class) or a person (with a pose)."""

    index: int
    noun: str
    colour: str
    size: str | None
    pose: str | None
    box: PixelBox

    @property
    def is_person(self) -> bool:
        return self.noun == PERSON


def things_of(image: WorldImage) -> list[Thing]:
    """Shapes then people of an image, numbered in that order."""
    out = [Thing(i, s.kind, s.colour, s.size, None, s.box) for i, s in enumerate(image.shapes)]
    out += [Thing(len(out) + i, PERSON, p.colour, None, p.pose, p.box) for i, p in enumerate(image.people)]
    return out


# ----------------------------------------------------------------------------- phrases


def phrase(thing: Thing, attrs: Sequence[str], *, noun: bool = True) -> str:
    """"small red circle", "red object" (`noun=False`), "waving person in blue"."""
    if thing.is_person:
        text = f"{thing.pose} person" if "pose" in attrs else "person"
        return f"{text} in {thing.colour}" if "colour" in attrs else text
    words = [str(thing.size)] if "size" in attrs else []
    if "colour" in attrs:
        words.append(thing.colour)
    words.append(thing.noun if noun else "object")
    return " ".join(words)


def full_phrase(thing: Thing) -> str:
    """Every attribute: "small red circle", "person in red waving" (region descriptions)."""
    if thing.is_person:
        return f"person in {thing.colour} {thing.pose}"
    return f"{thing.size} {thing.colour} {thing.noun}"


def name_of(thing: Thing) -> str:
    """A short name: "red circle", "person in red" (relations)."""
    return f"person in {thing.colour}" if thing.is_person else f"{thing.colour} {thing.noun}"


def _attr_sets(thing: Thing, exclude: Sequence[str], noun: bool) -> list[tuple[str, ...]]:
    base = [(), ("colour",), ("pose",), ("pose", "colour")] if thing.is_person else \
        [(), ("colour",), ("size",), ("size", "colour")]
    sets = [s for s in base if not set(s) & set(exclude)]
    return sets if noun else [s for s in sets if s]


def _matches(other: Thing, target: Thing, attrs: Sequence[str], noun: bool) -> bool:
    if noun and other.noun != target.noun:
        return False
    return all(getattr(other, attr) == getattr(target, attr) for attr in attrs)


def _relative(target: Thing, group: Sequence[Thing], size: Size) -> tuple[str, str] | None:
    """("prefix"|"suffix", words) placing `target` among `group` (itself included) with a clear margin."""
    options = []
    for axis, (low, high) in ((0, ("left", "right")), (1, ("top", "bottom"))):
        margin = max(8.0, CLEAR_MARGIN * size[axis])
        mine = box_center(target.box)[axis]
        others = [box_center(t.box)[axis] for t in group if t.index != target.index]
        if all(mine + margin <= o for o in others):
            options.append((min(others) - mine, axis, low))
        elif all(mine - margin >= o for o in others):
            options.append((mine - max(others), axis, high))
    if not options:
        return None
    _, axis, side = max(options)
    if len(group) == 2:
        return "suffix", (f"on the {side}" if axis == 0 else f"at the {side}")
    return "prefix", {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]


def refer(
    target: Thing, things: Sequence[Thing], size: Size, rng: random.Random, *, exclude: Sequence[str] = (),
    noun: bool = True, relative: bool = True, richer: float = 0.3,
) -> str | None:
    """A phrase (no article) that picks out `target` alone, without the attributes in `exclude` (the
    one a question asks about) and, with `noun=False`, without the kind ("red object"). With probability
    `richer` a unique phrase with more attributes is preferred (variety). None when nothing works."""
    sets = _attr_sets(target, exclude, noun)
    unique = [s for s in sets if sum(_matches(t, target, s, noun) for t in things) == 1]
    if unique:
        attrs = unique[-1] if len(unique) > 1 and rng.random() < richer else unique[0]
        return phrase(target, attrs, noun=noun)
    if not relative or not sets:
        return None
    attrs = sets[-1]
    group = [t for t in things if _matches(t, target, attrs, noun)]
    place = _relative(target, group, size)
    if place is None:
        return None
    text = phrase(target, attrs, noun=noun)
    return f"{place[1]} {text}" if place[0] == "prefix" else f"{text} {place[1]}"


# ----------------------------------------------------------------------------- positions and relations


def cell(box: PixelBox, size: Size, margin: float = 0.0) -> str | None:
    """The 3 x 3 cell name ("top left", "center"...) of a box's centre; None when the centre lies within
    `margin` (fraction of the side) of a cell border."""
    index = []
    for axis in (0, 1):
        pos = box_center(box)[axis] / size[axis]
        k = min(2, int(pos * 3))
        if any(abs(pos - edge) < margin for edge in (1 / 3, 2 / 3)):
            return None
        index.append(k)
    return POSITIONS[index[1]][index[0]]


def where(box: PixelBox, size: Size) -> str:
    """"at the top left", "in the center", "on the left", "at the bottom"."""
    name = str(cell(box, size))
    if name == "center":
        return "in the center"
    return f"on the {name}" if name in ("left", "right") else f"at the {name}"


RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


def holds(relation: str, a: PixelBox, b: PixelBox) -> bool:
    """Whether box `a` is wholly `relation` box `b` (no overlap along that axis)."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    raise ValueError(f"unknown relation {relation!r}")


def main_relation(a: PixelBox, b: PixelBox) -> str | None:
    """The relation of `a` to `b` along the axis where they are furthest apart; None if they overlap on
    both axes."""
    gaps = [(b[0] - a[2], "left of"), (a[0] - b[2], "right of"), (b[1] - a[3], "above"), (a[1] - b[3], "below")]
    gap, name = max(gaps)
    return name if gap >= 0 else None


# ----------------------------------------------------------------------------- captions of scenes

BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "speckled"}


def background_phrase(image: WorldImage) -> str:
    style = image.background.style if image.background is not None else "plain"
    return f"a {BACKGROUND_WORDS[style]} background"


def _group_phrases(things: Sequence[Thing], sizes: bool) -> list[str]:
    """"a small red circle", "two blue squares", "a person in red waving", in reading order of the
    groups' first member."""
    groups: dict[tuple[str, str], list[Thing]] = {}
    for t in sorted(things, key=lambda t: (t.box[1], t.box[0])):
        groups.setdefault((t.noun, t.colour), []).append(t)
    out = []
    for (noun, colour), members in groups.items():
        if noun == PERSON:
            out += [f"a person in {colour} {m.pose}" for m in members]
        elif len(members) == 1:
            size = members[0].size if sizes and members[0].size != "medium" else None
            words = " ".join(w for w in (size, colour, noun) if w)
            out.append(f"{article(words)} {words}")
        else:
            out.append(count_phrase(len(members), f"{colour} {noun}", f"{colour} {pluralize(noun)}"))
    return out


def join_list(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _object_count(things: Sequence[Thing]) -> str:
    people = sum(t.is_person for t in things)
    shapes = len(things) - people
    parts = []
    if people:
        parts.append(count_phrase(people, "person", "people"))
    if shapes:
        parts.append(count_phrase(shapes, "shape", "shapes"))
    return " and ".join(parts)


def short_captions(image: WorldImage) -> list[str]:
    """Three one-sentence captions of a scene, page or sign (the first is the most complete)."""
    if image.page is not None:
        return page_short_captions(image)
    if image.words:
        return sign_short_captions(image)
    things = things_of(image)
    if not things:
        return [_sentence(f"an empty image with {background_phrase(image)}")]
    listed = join_list(_group_phrases(things, sizes=True))
    return [
        _sentence(f"{listed} on {background_phrase(image)}"),
        _sentence(f"{_object_count(things)}: {listed}"),
        _sentence(join_list(_group_phrases(things, sizes=False))),
    ]


def _thing_sentence(t: Thing, size: Size) -> str:
    if t.is_person:
        return _sentence(f"a person in {t.colour} is {t.pose} {where(t.box, size)}")
    return _sentence(f"a {t.size} {t.colour} {t.noun} is {where(t.box, size)}")


def detailed_caption(image: WorldImage) -> str:
    """Several sentences naming every object with its size, colour and place."""
    if image.page is not None:
        return page_detailed_caption(image)
    if image.words:
        return sign_detailed_caption(image)
    things = sorted(things_of(image), key=lambda t: (t.box[1], t.box[0]))
    head = _sentence(f"the image shows {_object_count(things) or 'nothing'} on {background_phrase(image)}")
    return " ".join([head, *(_thing_sentence(t, image.size) for t in things)])


def synthetic_caption(image: WorldImage) -> str:
    """A clean, complete caption in the style of a captioning model (the `synthetic` domain)."""
    if image.page is not None:
        return page_detailed_caption(image).lower().rstrip(".")
    if image.words:
        items = [f'the word "{s.word.text}" in {s.size} {s.colour} letters {where(s.word.box, image.size)}'
                 for s in image.words]
        return f"an image of {join_list(items)}, on {background_phrase(image)}"
    things = sorted(things_of(image), key=lambda t: (t.box[1], t.box[0]))
    items = [
        f"a person in {t.colour} {t.pose} {where(t.box, image.size)}" if t.is_person
        else f"{article(str(t.size))} {t.size} {t.colour} {t.noun} {where(t.box, image.size)}"
        for t in things
    ]
    return f"an image of {join_list(items)}, on {background_phrase(image)}"


# ----------------------------------------------------------------------------- pages and signs


def _region_counts(image: WorldImage) -> Counter[str]:
    return Counter(r.kind for r in image.page.regions) if image.page is not None else Counter()


_REGION_NOUNS = {
    "title": ("title", "titles"), "text": ("paragraph of text", "paragraphs of text"),
    "list": ("list", "lists"), "table": ("table", "tables"), "figure": ("figure", "figures"),
}


def _region_list(image: WorldImage) -> str:
    counts = _region_counts(image)
    order = ("title", "text", "list", "table", "figure")
    return join_list([count_phrase(counts[k], *_REGION_NOUNS[k]) for k in order if counts[k]])


def page_short_captions(image: WorldImage) -> list[str]:
    listed = _region_list(image) or "nothing on it"
    return [
        _sentence(f"a document page with {listed}"),
        _sentence(f"a page with {listed}"),
        _sentence(f"a document with {listed}"),
    ]


def page_detailed_caption(image: WorldImage) -> str:
    parts = []
    for region in image.page.regions if image.page is not None else ():
        if region.kind == "title":
            parts.append(f'a title that reads "{" ".join(w.text for w in region.words)}"')
        elif region.kind == "text":
            lines = len({w.origin[1] for w in region.words})
            parts.append("a paragraph of text" + (f" with {NUMBER_WORDS[lines]} lines" if lines > 1 else ""))
        elif region.kind == "list":
            parts.append(f"a list of {NUMBER_WORDS[sum(m.shape == 'disc' for m in region.marks)]} items")
        elif region.kind == "table":
            rows = sum(m.xy[1] == m.xy[3] for m in region.marks) - 1
            cols = sum(m.xy[0] == m.xy[2] for m in region.marks) - 1
            parts.append(f"a table with {NUMBER_WORDS[rows]} rows and {NUMBER_WORDS[cols]} columns")
        else:
            parts.append("a figure with a bar chart")
    if not parts:
        return "An empty document page."
    return _sentence(f"a document page. From top to bottom it holds {join_list(parts)}")


def _quoted(image: WorldImage) -> list[str]:
    return [f'"{s.word.text}"' for s in sorted(image.words, key=lambda s: (s.word.box[1], s.word.box[0]))]


def sign_short_captions(image: WorldImage) -> list[str]:
    quoted = join_list(_quoted(image))
    coloured = join_list([f'"{s.word.text}" in {s.colour}' for s in image.words])
    noun = "word" if len(image.words) == 1 else "words"
    return [
        _sentence(f"the {noun} {quoted} written on {background_phrase(image)}"),
        _sentence(f"the {noun} {coloured}"),
        _sentence(f"text that reads {quoted}"),
    ]


def sign_detailed_caption(image: WorldImage) -> str:
    words = sorted(image.words, key=lambda s: (s.word.box[1], s.word.box[0]))
    count = count_phrase(len(words), "word", "words")
    head = _sentence(f"the image shows {count} on {background_phrase(image)}")
    body = [_sentence(f'"{s.word.text}" is written in {s.size} {s.colour} letters {where(s.word.box, image.size)}')
            for s in words]
    return " ".join([head, *body])


# ----------------------------------------------------------------------------- real (noisy) captions

_FILLERS_BEFORE = ("pic of", "image of", "photo", "stock image", "wallpaper", "vector", "abstract", "cool",
                   "nice", "free download", "hd", "art", "design", "illustration")
_FILLERS_AFTER = ("hd", "png", "jpg", "wallpaper", "free", "art", "design", "background", "stock", "thing",
                  "graphic", "4k", "pattern", "cute", "simple")


def _noisy(words: list[str], rng: random.Random) -> list[str]:
    """Drop an attribute word or shuffle the phrase sometimes (web alt-text word order)."""
    if len(words) > 1 and rng.random() < 0.3:
        words.pop(rng.randrange(len(words) - 1))
    if rng.random() < 0.3:
        rng.shuffle(words)
    return words


def real_caption(image: WorldImage, rng: random.Random) -> str:
    """A short, partial, noisy alt-text: a few objects, some words dropped or out of order, fillers."""
    if image.page is not None:
        counts = _region_counts(image)
        kinds = [k for k in ("table", "figure", "list", "title") if counts[k]]
        core = ["document"] + rng.sample(kinds, k=min(len(kinds), rng.randint(0, 2)))
        core += [rng.choice(("page", "template", "pdf", "report", "paper", "doc"))]
    elif image.words:
        picked = rng.sample(list(image.words), k=min(len(image.words), rng.randint(1, 3)))
        core = [w for s in picked for w in _noisy([s.colour, s.word.text], rng)]
        core.append(rng.choice(("text", "typography", "sign", "lettering", "font", "words")))
    else:
        things = things_of(image)
        if not things:
            return rng.choice(_FILLERS_BEFORE) + " background"
        picked = rng.sample(things, k=min(len(things), rng.randint(1, 3)))
        core = []
        for t in picked:
            base = [t.colour, "person" if t.is_person else t.noun]
            if t.is_person and rng.random() < 0.5:
                base.append(str(t.pose))
            elif t.size in ("small", "large") and rng.random() < 0.3:
                base.insert(0, "tiny" if t.size == "small" else "big")
            core += _noisy(base, rng)
    words = ([rng.choice(_FILLERS_BEFORE)] if rng.random() < 0.6 else []) + core
    if rng.random() < 0.5:
        words.append(rng.choice(_FILLERS_AFTER))
    return " ".join(words)
