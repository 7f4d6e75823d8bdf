"""Reading documents: the text-only corpus that teaches a from-scratch LLM to answer from its context.

SPHINX starts from LLaMA, which already answers questions about text it was given; a small LLM trained from
scratch does not, and behind image tokens it then settles on the text prior (docs/world_report.md, third and
fourth rounds). A reading document is a fresh scene of the world written out in words (its `synthetic` caption,
the clean complete description the caption pre-training also teaches) followed by several of the scene's own
task dialogs, packed as in fine-tuning: "Context: an image of a large pink square at the top, ... \\n What
color is the large square?" -> "pink", then more questions about the same scene. Answering from the context
is the skill. Box answers cannot be read from the words (`recipe.READING_TASKS` leaves those tasks out).

Scenes are sampled fresh (never the rendered train or eval images) and only their labels are built, no pixels,
so the corpus costs milliseconds per scene and can be as large as the stage needs. Measured (docs/world_report.md,
fourth round): the recipe's 4-layer LLM reads colour and shape from these documents after a 300-step language
stage, but not from the same stage on the dialogs alone, nor when the documents also carry the box-answer tasks.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from sphinx_mllm.tasks import TASKS
from sphinx_mllm.utils import SphinxError
from sphinx_mllm.world.canvas import derive_seed
from sphinx_mllm.world.language import synthetic_caption
from sphinx_mllm.world.packing import TURN_OVERHEAD, pack_records
from sphinx_mllm.world.records import Annotator
from sphinx_mllm.world.scene import KINDS, WorldImage, sample_image

READING_SPLIT = "reading"
"""Split name of the reading scenes: their seeds and record ids never collide with the world's splits."""
CONTEXT = "Context: {scene}.\n"


def reading_scenes(seed: int, counts: Mapping[str, int], image_size: int) -> list[WorldImage]:
    """`counts[kind]` fresh scenes of each kind (labels only), seeded by `seed`."""
    unknown = set(counts) - set(KINDS)
    if unknown:
        raise SphinxError(f"unknown scene kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    out = []
    for kind in KINDS:
        for i in range(counts.get(kind, 0)):
            rng = random.Random(derive_seed(seed, READING_SPLIT, kind, i))
            out.append(sample_image(kind, rng, image_size, f"{kind}_{i:06d}", 0))
    return out


def reading_documents(
    scenes: list[WorldImage], count_tokens: Callable[[str], int], *, max_tokens: int, prefix_tokens: int,
    ratios: Mapping[str, float] | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    """Text-only records: each scene's dialogs of every task in `TASKS` (a seeded share `ratios[task]`), packed
    into dialogs of at most `max_tokens` tokens behind the scene's description in the first human turn."""
    annotator = Annotator(seed, READING_SPLIT)
    context: dict[str, str] = {}
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for image in scenes:
        path = f"{READING_SPLIT}/{image.name}.png"  # a key only: nothing is rendered
        context[path] = CONTEXT.format(scene=synthetic_caption(image))
        for task, records in annotator.annotate(image, path).items():
            if task in TASKS:
                by_task[task] += [r for r in records if "conversations" in r]
    # the scene's own description takes the place of the image tokens in each dialog's budget
    packed = pack_records(by_task, count_tokens, max_tokens=max_tokens, prefix_tokens=prefix_tokens, ratios=ratios,
                          seed=seed, image_tokens=lambda path: count_tokens(context[path]) + TURN_OVERHEAD)
    out = []
    for record in packed:
        turns = [dict(t) for t in record["conversations"]]
        turns[0]["value"] = context[record["image"]] + turns[0]["value"]
        out.append({**record, "image": None, "conversations": turns})
    random.Random(derive_seed(seed, READING_SPLIT, "order")).shuffle(out)
    return out


__all__ = ["CONTEXT", "READING_SPLIT", "reading_documents", "reading_scenes"]
