"""Questions about world images, with answers balanced so that the text alone does not give them away.

Every image offers many candidate questions per type; a `Balancer` picks, for each type, the candidate
whose answer has been given least often so far within its tally (question type plus wording form, so
that no form of question leans to an answer either). A text-only model therefore sits near chance:
about 1/10 on colours, 1/6 on shapes, 1/9 on positions, a few options on counts, 1/2 on yes/no.

VQA types: `colour`, `shape`, `count`, `position`, `action` (what a person does), `text` (which word is
written where). GQA (compositional) types: `relate` (colour of the object in a relation to another),
`verify` (is A left of B), `exist`, `compare` (more A than B). Conversation turns reuse them with
full-sentence answers.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sphinx_mllm.tasks import pluralize
from sphinx_mllm.world.canvas import box_center
from sphinx_mllm.world.language import (
    CELL_MARGIN,
    RELATIONS,
    Thing,
    cell,
    holds,
    refer,
    things_of,
)
from sphinx_mllm.world.scene import WorldImage
from sphinx_mllm.world.vocab import COLOURS, NUMBER_WORDS, SHAPES, article, count_phrase

MAX_COUNT = 9
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class Question:
    """A question, its short answer, a full-sentence answer (for conversations), its type and its tally
    key (type plus wording form)."""

    type: str
    form: str
    text: str
    answer: str
    sentence: str

    @property
    def tally(self) -> str:
        return f"{self.type}:{self.form}"


class Balancer:
    """Picks questions whose answers are least used so far, per tally key (deterministic given the rng)."""

    def __init__(self) -> None:
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def pick(self, candidates: Sequence[Question], rng: random.Random) -> Question | None:
        if not candidates:
            return None
        load = [self.counts[q.tally][q.answer] for q in candidates]
        low = min(load)
        chosen = rng.choice([q for q, n in zip(candidates, load) if n == low])
        self.counts[chosen.tally][chosen.answer] += 1
        return chosen

    def answer_shares(self) -> dict[str, dict[str, float]]:
        """Per question type (tallies of one type merged): answer -> share of that type's questions."""
        merged: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for tally, counts in self.counts.items():
            merged[tally.split(":")[0]].update(counts)
        return {t: {a: n / sum(c.values()) for a, n in sorted(c.items())} for t, c in sorted(merged.items())}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _the(ref: str) -> str:
    return f"the {ref}"


# ----------------------------------------------------------------------------- VQA candidates


def colour_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    out = []
    for t in things:
        ref = refer(t, things, image.size, rng, exclude=("colour",))
        if ref is not None:
            out.append(Question("colour", "object", f"What color is {_the(ref)}?", t.colour,
                                f"{_cap(_the(ref))} is {t.colour}."))
    return out


def shape_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    out = []
    for t in things:
        if t.is_person:
            continue
        ref = refer(t, things, image.size, rng, noun=False)
        if ref is not None:
            out.append(Question("shape", "object", f"What shape is {_the(ref)}?", t.noun,
                                f"{_cap(_the(ref))} is a {t.noun}."))
    return out


def _count_sentence(n: int, singular: str, plural: str) -> str:
    if n == 0:
        return f"There are no {plural}."
    if n == 1:
        return f"There is one {singular}."
    return f"There are {count_phrase(n, singular, plural)}."


def count_questions(things: Sequence[Thing], image: WorldImage) -> list[Question]:
    shapes = [t for t in things if not t.is_person]
    out = []
    if image.kind == "people":
        n = len(things) - len(shapes)
        out.append(Question("count", "people", "How many people are there?", str(n),
                            _count_sentence(n, "person", "people")))
    kinds_here = {t.noun for t in shapes}
    plurals = {kind: pluralize(kind) for kind in SHAPES}
    for kind in SHAPES:
        n = sum(t.noun == kind for t in shapes)
        out.append(Question("count", "kind", f"How many {plurals[kind]} are there?", str(n),
                            _count_sentence(n, kind, plurals[kind])))
    if image.kind == "shapes":
        for colour in COLOURS:
            n = sum(t.colour == colour for t in shapes)
            out.append(Question("count", "colour", f"How many {colour} shapes are there?", str(n),
                                _count_sentence(n, f"{colour} shape", f"{colour} shapes")))
        for kind in sorted(kinds_here):
            for colour in COLOURS:
                n = sum(t.colour == colour and t.noun == kind for t in shapes)
                plural = f"{colour} {plurals[kind]}"
                out.append(Question("count", "colour_kind", f"How many {plural} are there?", str(n),
                                    _count_sentence(n, f"{colour} {kind}", plural)))
    return [q for q in out if int(q.answer) <= MAX_COUNT]


def position_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    out = []
    for t in things:
        name = cell(t.box, image.size, margin=CELL_MARGIN)
        ref = refer(t, things, image.size, rng, relative=False)
        if name is None or ref is None:
            continue
        place = "in the center" if name == "center" else f"at the {name}"
        out.append(Question("position", "object", f"Where is {_the(ref)} in the image?", name,
                            f"{_cap(_the(ref))} is {place} of the image."))
    return out


def action_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    out = []
    for t in things:
        if not t.is_person:
            continue
        ref = refer(t, things, image.size, rng, exclude=("pose",))
        if ref is not None:
            out.append(Question("action", "person", f"What is {_the(ref)} doing?", str(t.pose),
                                f"{_cap(_the(ref))} is {t.pose}."))
    return out


def sign_questions(image: WorldImage) -> dict[str, list[Question]]:
    """Reading (`text`) and word colour (`colour`) questions about a sign."""
    colours = Counter(s.colour for s in image.words)
    reading, colour = [], []
    for s in image.words:
        text = s.word.text
        if colours[s.colour] == 1:
            reading.append(Question("text", "colour", f"What word is written in {s.colour}?", text,
                                    f'The word written in {s.colour} is "{text}".'))
        name = cell(s.word.box, image.size, margin=CELL_MARGIN)
        if name is not None and sum(cell(o.word.box, image.size) == name for o in image.words) == 1:
            place = "in the center" if name == "center" else f"at the {name}"
            reading.append(Question("text", "position", f"What word is written {place}?", text,
                                    f'The word {place} is "{text}".'))
        colour.append(Question("colour", "word", f'What color is the word "{text}"?', s.colour,
                               f'The word "{text}" is written in {s.colour}.'))
    return {"text": reading, "colour": colour}


def vqa_candidates(image: WorldImage, rng: random.Random) -> dict[str, list[Question]]:
    """Candidate questions by type (types with no candidate are left out)."""
    if image.words:
        out = sign_questions(image)
    elif image.page is not None:
        return {}
    else:
        things = things_of(image)
        out = {
            "colour": colour_questions(things, image, rng),
            "shape": shape_questions(things, image, rng),
            "count": count_questions(things, image),
            "position": position_questions(things, image, rng),
            "action": action_questions(things, image, rng),
        }
    return {k: v for k, v in out.items() if v}


# ----------------------------------------------------------------------------- GQA candidates


def _side(rel: str, a: Thing, b: Thing) -> bool:
    """Whether `a`'s centre lies on the `rel` side of `b`'s centre."""
    (ax, ay), (bx, by) = box_center(a.box), box_center(b.box)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def relate_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    """"What color is the circle to the left of the red square?" when exactly one circle is wholly left
    of it and every other circle lies on the other side."""
    out = []
    for anchor in things:
        ref = refer(anchor, things, image.size, rng, relative=False)
        if ref is None:
            continue
        for rel in RELATIONS:
            for noun in sorted({t.noun for t in things if t.index != anchor.index}):
                same = [t for t in things if t.noun == noun and t.index != anchor.index]
                hits = [t for t in same if holds(rel, t.box, anchor.box)]
                if len(hits) != 1 or any(_side(rel, t, anchor) for t in same if t is not hits[0]):
                    continue
                target = hits[0]
                text = f"the {noun} {_RELATION_WORDS[rel]} the {ref}"
                out.append(Question("relate", "colour", f"What color is {text}?", target.colour,
                                    f"{_cap(text)} is {target.colour}."))
    return out


def verify_questions(things: Sequence[Thing], image: WorldImage, rng: random.Random) -> list[Question]:
    out = []
    refs = {t.index: refer(t, things, image.size, rng, relative=False) for t in things}
    for a in things:
        for b in things:
            ra, rb = refs[a.index], refs[b.index]
            if a.index == b.index or ra is None or rb is None:
                continue
            for rel in RELATIONS:
                if not holds(rel, a.box, b.box):
                    continue
                for asked, answer in ((rel, "yes"), (_OPPOSITE[rel], "no")):
                    words = _RELATION_WORDS[asked]
                    verb = "is" if answer == "yes" else "is not"
                    out.append(Question("verify", "relation", f"Is the {ra} {words} the {rb}?", answer,
                                        f"{_cap(answer)}, the {ra} {verb} {words} the {rb}."))
    return out


def exist_questions(things: Sequence[Thing], rng: random.Random) -> list[Question]:
    present = {(t.colour, t.noun) for t in things if not t.is_person}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    out = []
    for (colour, kind), answer in [*((p, "yes") for p in sorted(present)),
                                   *((a, "no") for a in rng.sample(absent, k=min(4, len(absent))))]:
        thing = f"{article(colour)} {colour} {kind}"
        sentence = f"Yes, there is {thing} in the image." if answer == "yes" else \
            f"No, there is no {colour} {kind} in the image."
        out.append(Question("exist", "colour_kind", f"Is there {thing} in the image?", answer, sentence))
    return out


def compare_questions(things: Sequence[Thing]) -> list[Question]:
    counts = Counter(t.noun for t in things if not t.is_person)
    out = []
    for a in SHAPES:
        for b in SHAPES:
            if a == b or counts[a] == counts[b] or max(counts[a], counts[b]) == 0:
                continue
            answer = "yes" if counts[a] > counts[b] else "no"
            pa, pb = pluralize(a), pluralize(b)
            out.append(Question("compare", "kinds", f"Are there more {pa} than {pb}?", answer,
                                f"{_cap(answer)}, there are {NUMBER_WORDS[counts[a]]} {pa} and "
                                f"{NUMBER_WORDS[counts[b]]} {pb}."))
    return out


def gqa_candidates(image: WorldImage, rng: random.Random) -> dict[str, list[Question]]:
    if image.page is not None or image.words:
        return {}
    things = things_of(image)
    out = {
        "relate": relate_questions(things, image, rng),
        "verify": verify_questions(things, image, rng),
        "exist": exist_questions(things, rng),
        "compare": compare_questions(things),
    }
    return {k: v for k, v in out.items() if v}
