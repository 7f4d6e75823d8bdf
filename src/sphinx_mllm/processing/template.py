"""Chat templates as data, and the one function that renders a conversation to text + loss spans.

The release's "v1" template (SPHINX.md section 6): `system + "\\n\\n###"`, then `" Human: " + q + "\\n###"`
and `" Assistant: " + a + "\\n###"` per turn; the generation prompt ends with `" Assistant:"`. The loss
covers each assistant answer plus its trailing `"\\n###"` (the span starts at the space after the colon, so
the answer's first SentencePiece token, which carries that space, is inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sphinx_mllm.utils.errors import SphinxError

V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    system_suffix: str
    user_prefix: str
    assistant_prefix: str  # up to and including the colon; the answer follows after one space
    turn_suffix: str
    stop_strings: tuple[str, ...]

    @property
    def generation_prompt(self) -> str:
        return self.assistant_prefix


TEMPLATES: dict[str, ChatTemplate] = {
    "v1": ChatTemplate(
        name="v1",
        system=V1_SYSTEM,
        system_suffix="\n\n###",
        user_prefix=" Human: ",
        assistant_prefix=" Assistant:",
        turn_suffix="\n###",
        stop_strings=("\n###", "###"),
    ),
}

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise SphinxError(f"unknown chat template {name!r}; available: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render(
    turns: list[tuple[str, str]], template: ChatTemplate, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render (role, text) turns -> (text, character spans of the loss targets).

    Roles are "user"/"human" and "assistant"/"gpt", alternating and starting with the user. A "system"
    turn first replaces the template's system text.
    """
    system = template.system
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    parts = [system + template.system_suffix]
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    for i, (role, content) in enumerate(turns):
        expect_user = i % 2 == 0
        if (role in USER_ROLES) != expect_user or role not in USER_ROLES + ASSISTANT_ROLES:
            raise SphinxError(f"turn {i}: role {role!r} out of order; turns must alternate user/assistant, "
                              "starting with the user")
        if role in USER_ROLES:
            piece = template.user_prefix + content + template.turn_suffix
        else:
            target = " " + content + template.turn_suffix
            piece = template.assistant_prefix + target
            spans.append((pos + len(template.assistant_prefix), pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        if turns and turns[-1][0] in ASSISTANT_ROLES:
            raise SphinxError("add_generation_prompt needs the conversation to end with a user turn")
        parts.append(template.generation_prompt)
    return "".join(parts), spans


def strip_stop(text: str, template: ChatTemplate) -> str:
    """Cut a generated answer at the first stop string and trim the space the template puts before it."""
    cut = len(text)
    for stop in template.stop_strings:
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut].strip()
