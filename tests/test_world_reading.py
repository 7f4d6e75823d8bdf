"""Reading documents of the language stage (`world.reading`): fresh scenes in words, then their own dialogs."""

from __future__ import annotations

import pytest

from sphinx_mllm.utils import SphinxError
from sphinx_mllm.world.generate import WorldConfig, world_image
from sphinx_mllm.world.language import synthetic_caption
from sphinx_mllm.world.reading import CONTEXT, reading_documents, reading_scenes

COUNTS = {"shapes": 12, "people": 4, "signs": 3, "document": 3}


def _words(text: str) -> int:
    return len(text.split())


def test_scenes_are_seeded_fresh_and_counted() -> None:
    a = reading_scenes(3, COUNTS, 448)
    assert [s.kind for s in a].count("shapes") == 12 and len(a) == sum(COUNTS.values())
    assert [synthetic_caption(s) for s in a] == [synthetic_caption(s) for s in reading_scenes(3, COUNTS, 448)]
    assert [synthetic_caption(s) for s in a] != [synthetic_caption(s) for s in reading_scenes(4, COUNTS, 448)]
    # never the world's own images of the same seed (the eval split must stay unseen)
    world = WorldConfig(seed=3, size="t", image_size=448, counts={"train": {"shapes": 12}, "eval": {"shapes": 12}})
    drawn = {synthetic_caption(world_image(world, split, "shapes", i))
             for split in ("train", "eval") for i in range(12)}
    assert not drawn & {synthetic_caption(s) for s in a}
    with pytest.raises(SphinxError, match="unknown scene kinds"):
        reading_scenes(0, {"planets": 2}, 448)


def test_documents_put_the_scene_in_words_before_its_own_dialogs() -> None:
    scenes = reading_scenes(0, COUNTS, 448)
    captions = {f"reading/{s.name}.png": synthetic_caption(s) for s in scenes}
    docs = reading_documents(scenes, _words, max_tokens=120, prefix_tokens=4, seed=0)
    assert docs and {d["image"] for d in docs} == {None}
    colour_answers = 0
    for doc in docs:
        source = doc["meta"]["ids"][0].split("-")[1]  # reading-<kind>_<index>-<task>-<k>
        context = CONTEXT.format(scene=captions[f"reading/{source}.png"])
        first = doc["conversations"][0]["value"]
        assert first.startswith(context), first
        assert all(i.split("-")[1] == source for i in doc["meta"]["ids"])  # one scene per document
        assert doc["conversations"][0]["from"] == "human" and len(doc["conversations"]) % 2 == 0
        if len(doc["meta"]["ids"]) > 1:  # packed: within the budget
            assert 4 + sum(_words(t["value"]) + 6 for t in doc["conversations"]) <= 120 + 6
        for question, answer in zip(doc["conversations"][::2], doc["conversations"][1::2]):
            asked = question["value"].removeprefix(context).split("\n")[0]
            if asked.startswith("What color is"):  # "red", or "The small square is red."
                assert f" {answer['value'].rstrip('.').split()[-1]} " in context  # the answer is there to read
                colour_answers += 1
    assert colour_answers >= 5
    # a task's share: 0 drops it everywhere
    no_vqa = reading_documents(scenes, _words, max_tokens=120, prefix_tokens=4, seed=0, ratios={"vqa": 0.0})
    assert all("vqa" not in d["meta"]["tasks"] for d in no_vqa) and any("vqa" in d["meta"]["tasks"] for d in docs)
    assert reading_documents(scenes, _words, max_tokens=120, prefix_tokens=4, seed=0) == docs
