"""Oracle label features (`world.oracle`) and the teacher-forced exact answers of `world.measure`, without a run
(the run-level test is in test_world_recipe.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sphinx_mllm.processing import IGNORE_INDEX
from sphinx_mllm.utils import SphinxError
from sphinx_mllm.world.dense import CATEGORIES, DenseObject
from sphinx_mllm.world.measure import _batch_loss, _swap_images
from sphinx_mllm.world.oracle import ORACLE_FIELDS, ORACLE_SCALE, oracle_features, oracle_width


def test_each_cell_holds_one_hots_of_what_covers_it_and_its_row_and_column() -> None:
    star = DenseObject("thing", CATEGORIES.index("star"), (0.05, 0.05, 0.20, 0.20), colour=3, size=2)
    word = DenseObject("word", CATEGORIES.index("word"), (0.60, 0.80, 0.90, 0.85), colour=5, word=7)
    feats = oracle_features([star, word], view_grid=2, grid=7, width=192)  # [5, 49, 192]
    assert feats.shape == (5, 49, 192)
    offsets, at = {}, 0
    for slot, name, n in ORACLE_FIELDS:
        offsets[f"{slot}/{name}"] = at
        at += n
    cell = 0 * 7 + 0  # global view: the star's centre (0.125, 0.125) is in row 0, column 0
    assert feats[0, cell, offsets["thing/category"] + star.category + 1] == ORACLE_SCALE
    assert feats[0, cell, offsets["thing/colour"] + 3] == ORACLE_SCALE
    assert feats[0, cell, offsets["thing/size"] + 2] == ORACLE_SCALE
    assert feats[0, cell, at + 0] == ORACLE_SCALE / 2 and feats[0, cell, at + 7 + 0] == ORACLE_SCALE / 2
    word_cell = 5 * 7 + 5  # centre (0.75, 0.825)
    assert feats[0, word_cell, offsets["word/word"] + 7] == ORACLE_SCALE
    assert feats[0, word_cell, offsets["thing/category"]:offsets["word/category"]].count_nonzero() == 0
    # the star lies in the first sub-image only (top-left quarter, at twice the scale)
    assert feats[1, :, :offsets["word/category"]].count_nonzero() > 0
    assert feats[4, :, :offsets["word/category"]].count_nonzero() == 0
    assert feats[:, :, oracle_width(7):].count_nonzero() == 0  # channels past the oracle's stay zero
    with pytest.raises(SphinxError, match="channels"):
        oracle_features([star], view_grid=2, grid=7, width=oracle_width(7) - 1)


def test_an_item_is_exact_only_when_every_answer_token_is_the_top_choice() -> None:
    vocab = 6
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, IGNORE_INDEX],  # both answer tokens right
                           [IGNORE_INDEX, 2, 4, IGNORE_INDEX],  # second one wrong
                           [IGNORE_INDEX] * 4])  # no answer tokens
    predicted = torch.tensor([[2, 3, 5], [2, 3, 5], [0, 0, 0]])  # argmax at positions 0..2 predict labels 1..3
    logits = torch.full((3, 4, vocab), -5.0)
    logits[:, :3].scatter_(-1, predicted.unsqueeze(-1), 5.0)

    def model(**_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=logits)

    batch = {"labels": labels, "input_ids": torch.zeros(3, 4, dtype=torch.long),
             "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    loss, tokens, exact = _batch_loss(model, batch)  # type: ignore[arg-type]
    assert exact == [True, False, False] and tokens == 4
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits[:2, :2].reshape(-1, vocab), labels[:2, 1:3].reshape(-1), reduction="sum")))


def test_swapped_images_come_from_another_image_file_not_a_neighbour_on_the_same_one() -> None:
    # Held-out VQA files hold consecutive questions about one image: a plain rotation would hand such an item its
    # own image and hide a model that reads it.
    images = ["a.png", "a.png", "b.png", "c.png", "c.png"]
    items = [{"image": im, "encoder_features": {"enc": torch.full((1,), float(i))}} for i, im in enumerate(images)]
    swapped = _swap_images(items)
    donors = [int(it["encoder_features"]["enc"]) for it in swapped]
    assert donors == [2, 2, 3, 0, 0]
    assert all(images[d] != im for d, im in zip(donors, images))
    assert [it["image"] for it in swapped] == images  # only the pixels / features move
    alone = _swap_images([{"image": "a.png", "pixel_values": torch.zeros(1)}, {"image": "a.png",
                                                                               "pixel_values": torch.ones(1)}])
    assert [float(it["pixel_values"]) for it in alone] == [0.0, 1.0]  # no other image: each keeps its own
