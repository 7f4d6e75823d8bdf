"""The `Task` interface: instruction wordings, seeded choice among them, conversation turns, metric name.

A task turns typed inputs (a question, a `Box`, a category and its boxes...) into LLaVA-style turns
`[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]`. Which wording a record gets is a
pure function of `(seed, task name, key)` through SHA-256, so a data set converted twice is identical,
on any machine and Python version (the built-in `hash` of a string is salted per process).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from sphinx_mllm.utils.errors import SphinxError

Turn = dict[str, str]
"""One conversation turn: `{"from": "human" | "gpt", "value": str}`."""

HUMAN = "human"
GPT = "gpt"


def choose_index(count: int, seed: int, *parts: object) -> int:
    """A reproducible index in `range(count)` from `seed` and any identifying parts (task, record id)."""
    if count <= 0:
        raise ValueError("choose_index needs at least one option")
    text = "\x1f".join([str(seed), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def turn(role: str, value: str) -> Turn:
    """A turn dict; `role` is "human" or "gpt"."""
    if role not in (HUMAN, GPT):
        raise ValueError(f"a turn's role is 'human' or 'gpt', not {role!r}")
    return {"from": role, "value": value}


def clean_text(text: object, what: str) -> str:
    """Collapse whitespace; raise `SphinxError` naming `what` when nothing is left."""
    if not isinstance(text, str):
        raise SphinxError(f"{what} must be a string, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise SphinxError(f"{what} is empty")
    return cleaned


def strip_final_period(text: str) -> str:
    """Drop trailing periods/spaces so a template that ends with '.' does not produce '..'."""
    return text.rstrip(" .")


_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "foot": "feet",
    "tooth": "teeth", "mouse": "mice", "goose": "geese", "knife": "knives", "leaf": "leaves",
    "shelf": "shelves", "wolf": "wolves", "sheep": "sheep", "deer": "deer", "fish": "fish",
    "skis": "skis", "scissors": "scissors", "glasses": "glasses", "broccoli": "broccoli",
    "series": "series", "species": "species", "tv": "tvs", "formula": "formulas", "text": "texts",
}


def pluralize(noun: str) -> str:
    """English plural of a category name; multi-word names pluralise their last word ("hot dog")."""
    words = noun.strip().split(" ")
    last = words[-1]
    lower = last.lower()
    if lower in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[lower]
    elif re.search(r"(s|x|z|ch|sh)$", lower):
        plural = last + "es"
    elif re.search(r"[^aeiou]y$", lower):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return " ".join([*words[:-1], plural])


@dataclass(frozen=True)
class Task:
    """A task: a name, instruction templates (the release's wording first) and the metric that scores it.

    Subclasses add a `build(...)` taking the task's typed inputs and returning its turns. Templates are
    `str.format` strings; every template of a task uses the same fields.
    """

    name: str
    metric: str | None
    templates: tuple[str, ...]
    description: str = ""
    _fields: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = {_template_fields(t) for t in self.templates}
        if len(fields) > 1:
            raise ValueError(f"task {self.name!r}: templates use different fields {sorted(map(sorted, fields))}")
        object.__setattr__(self, "_fields", next(iter(fields), frozenset()))

    def template(self, seed: int, key: str) -> str:
        """The template chosen for record `key` under `seed`."""
        if not self.templates:
            raise ValueError(f"task {self.name!r} has no instruction template (its turns are given)")
        return self.templates[choose_index(len(self.templates), seed, self.name, key)]

    def instruction(self, seed: int, key: str, **values: str) -> str:
        """The chosen template filled with `values` (exactly the template's fields)."""
        if set(values) != self._fields:
            raise ValueError(f"task {self.name!r} needs fields {sorted(self._fields)}, got {sorted(values)}")
        return self.template(seed, key).format(**values)

    def qa(self, seed: int, key: str, answer: str | None, **values: str) -> list[Turn]:
        """A human instruction and, when `answer` is not None, the gpt answer."""
        turns = [turn(HUMAN, self.instruction(seed, key, **values))]
        if answer is not None:
            turns.append(turn(GPT, answer))
        return turns


def _template_fields(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


def join_turns(parts: Sequence[list[Turn]]) -> list[Turn]:
    """Concatenate several question/answer pairs into one multi-turn conversation."""
    out: list[Turn] = []
    for part in parts:
        out.extend(part)
    return out
