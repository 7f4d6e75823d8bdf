"""Tasks whose answers are plain text: VQA (short answers), captions (short and detailed), conversation.

Released wordings come first in each template tuple (SPHINX.md section 8); the others are variations in
the same style, so that a model does not tie a task to one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sphinx_mllm.tasks.base import GPT, HUMAN, Task, Turn, choose_index, clean_text, turn
from sphinx_mllm.utils.errors import SphinxError

VQA_TEMPLATES = (
    "{question}\nAnswer the question using a single word or phrase.",
    "{question}\nAnswer with a single word or a short phrase.",
    "{question}\nPlease answer briefly, using a word or a short phrase.",
)
SHORT_CAPTION_TEMPLATES = (
    "Provide a one-sentence caption for the provided image.",
    "Write a short caption for the image.",
    "Describe the image in one sentence.",
    "Summarize the content of the image in a single sentence.",
)
DETAILED_CAPTION_TEMPLATES = (
    "Generate a detailed description about the image.",
    "Describe the image in detail.",
    "Give an elaborate description of everything shown in the image.",
    "Explain what is happening in the image, with as many details as possible.",
)

_IMAGE_TAG = re.compile(r"[ \t]*<image>[ \t]*")


@dataclass(frozen=True)
class VQATask(Task):
    """Short-answer VQA: the question followed by the release's one-word/phrase request."""

    def build(self, question: str, answer: str | None, *, seed: int, key: str) -> list[Turn]:
        """`answer=None` gives a question-only conversation (an evaluation prompt)."""
        q = clean_text(question, "VQA question")
        a = None if answer is None else clean_text(answer, "VQA answer")
        return self.qa(seed, key, a, question=q)


@dataclass(frozen=True)
class CaptionTask(Task):
    """Captions: `templates` ask for one sentence, `detailed_templates` for a long description."""

    detailed_templates: tuple[str, ...] = ()

    def build(self, caption: str | None, *, detailed: bool = False, seed: int, key: str) -> list[Turn]:
        templates = self.detailed_templates if detailed else self.templates
        if not templates:
            raise ValueError(f"task {self.name!r} has no {'detailed' if detailed else 'short'} templates")
        style = "detailed" if detailed else "short"
        turns = [turn(HUMAN, templates[choose_index(len(templates), seed, self.name, style, key)])]
        if caption is not None:
            turns.append(turn(GPT, clean_text(caption, "caption")))
        return turns


def strip_image_tag(text: str) -> str:
    """Remove LLaVA's "<image>" placeholders and tidy the whitespace they leave (SPHINX puts the image
    after BOS, never in the text)."""
    lines = []
    for line in text.split("\n"):
        if "<image>" in line:
            line = _IMAGE_TAG.sub(" ", line).strip()
            if not line:
                continue  # a line that held only the placeholder
        lines.append(line)
    return "\n".join(lines).strip()


@dataclass(frozen=True)
class ConversationTask(Task):
    """Free multi-turn conversation (LLaVA-Instruct): turns are given, only checked and cleaned."""

    def build(self, turns: Sequence[Mapping[str, object]]) -> list[Turn]:
        """Check roles alternate human/gpt from a human turn to a gpt turn; strip "<image>".

        Raises `SphinxError` naming the first problem.
        """
        if not turns:
            raise SphinxError("conversation has no turns")
        if len(turns) % 2:
            raise SphinxError(f"conversation has {len(turns)} turns; it must end with a gpt answer")
        out: list[Turn] = []
        for i, t in enumerate(turns):
            if not isinstance(t, Mapping):
                raise SphinxError(f"turn {i} is not an object")
            expected = HUMAN if i % 2 == 0 else GPT
            if t.get("from") != expected:
                raise SphinxError(f"turn {i} is from {t.get('from')!r}, expected {expected!r}")
            value = t.get("value")
            if not isinstance(value, str):
                raise SphinxError(f"turn {i} has no text value")
            value = strip_image_tag(value)
            if not value:
                raise SphinxError(f"turn {i} is empty")
            out.append(turn(expected, value))
        return out
