"""Binding (`world.binding`): label tokens of kept cells, the two phases' texts, training, and the projector fit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.fusion import cell_centres
from sphinx_mllm.geometry import box_from_pixels, format_box
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor, load_tokenizer
from sphinx_mllm.utils import SphinxError
from sphinx_mllm.world.binding import (
    ASPECTS,
    GLOBAL_UNNAMED,
    LABEL_FIELDS,
    BindingPlan,
    LabelTokens,
    aspect_index,
    bare_caption,
    dense_dialog,
    fit_projector,
    init_cell_positions,
    scene_cells,
    train_binding,
    word_ids,
)
from sphinx_mllm.world.dense import CATEGORIES, cell_targets, dense_objects, view_windows
from sphinx_mllm.world.generate import WorldConfig, generate_world
from sphinx_mllm.world.language import things_of
from sphinx_mllm.world.reading import reading_scenes
from sphinx_mllm.world.tokenizer import train_world_tokenizer

SCENES = {"shapes": 6, "people": 2, "signs": 2}
BOX_FREQS = [0.5, 1, 2, 4, 8]


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> SphinxProcessor:
    world = tmp_path_factory.mktemp("world") / "w"
    generate_world(world, WorldConfig(seed=5, size="small", image_size=224))
    tok = train_world_tokenizer(world, tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)
    return SphinxProcessor.from_config(SphinxConfig.from_preset("world-tiny-keep"), load_tokenizer(tok))


def _model(vocab: int) -> SphinxForConditionalGeneration:
    torch.manual_seed(0)
    config = SphinxConfig.from_preset("world-tiny-keep")
    config.text_config.vocab_size = max(vocab, config.text_config.vocab_size)
    return SphinxForConditionalGeneration(config).eval()


def test_kept_cells_hold_every_object_centre_with_its_labels() -> None:
    rng = random.Random(0)
    for image in reading_scenes(1, SCENES, 448):
        objects = dense_objects(image)
        kept = scene_cells(objects, image.size, 2, 7, 8, rng)
        assert kept.labels.shape == (5, 8, len(LABEL_FIELDS)) and kept.cells.shape == (5, 8)
        assert ASPECTS[kept.aspect][0] * image.size[1] == pytest.approx(ASPECTS[kept.aspect][1] * image.size[0],
                                                                         rel=0.05)
        for v, window in enumerate(view_windows(2)):
            t = cell_targets(objects, window, 7)
            held = set(np.nonzero((t["thing/present"][:, 0] > 0) | (t["word/present"][:, 0] > 0))[0].tolist())
            cells = kept.cells[v].tolist()
            assert cells == sorted(set(cells))  # raster order, no repeats
            assert held <= set(cells) or len(held) > 8
            for k, c in enumerate(cells):
                want = [t[key][c, 0] for key, _ in LABEL_FIELDS]
                assert kept.labels[v, k].tolist() == want
                if c not in held:
                    assert not any(want)
    assert aspect_index((448, 252)) == ASPECTS.index((16, 9))


def test_the_global_view_can_leave_shapes_unnamed() -> None:
    """With `global_shapes=False` the global view's label tokens keep a shape's colour, size and box but not its kind
    (its features do not tell shapes apart); by default they keep the kind, and the sub-images always do."""
    named = {"global": set(), "sub": set(), "global_kept": set()}
    for image in reading_scenes(2, {"shapes": 6, "people": 4}, 448):
        objects = dense_objects(image)
        plain = scene_cells(objects, image.size, 2, 7, 8, random.Random(0), global_shapes=False)
        full = scene_cells(objects, image.size, 2, 7, 8, random.Random(0))
        assert (plain.labels[1:] == full.labels[1:]).all() and (plain.labels[0, :, 1:] == full.labels[0, :, 1:]).all()
        assert (plain.boxes[~np.isnan(plain.boxes)] == full.boxes[~np.isnan(full.boxes)]).all()
        named["global"] |= set(plain.labels[0, :, 0].tolist())
        named["global_kept"] |= set(full.labels[0, :, 0].tolist())
        named["sub"] |= set(plain.labels[1:, :, 0].ravel().tolist())
    person = CATEGORIES.index("person") + 1
    assert person in named["global"] and not named["global"] & set(GLOBAL_UNNAMED)
    assert set(GLOBAL_UNNAMED) <= named["global_kept"] and set(GLOBAL_UNNAMED) <= named["sub"]


def test_kept_cells_carry_the_box_of_what_they_hold() -> None:
    """A held cell's box is its object's (the cell holds the box's centre, or a neighbour when two share a cell);
    an empty cell's is NaN."""
    rng = random.Random(1)
    for image in reading_scenes(4, SCENES, 448):
        kept = scene_cells(dense_objects(image), image.size, 2, 7, 8, rng)
        boxes = {tuple(np.round(o.box, 4)) for o in dense_objects(image)}
        centres = cell_centres(2, 7).numpy()  # [5, 49, 2]
        for v in range(5):
            for k, c in enumerate(kept.cells[v]):
                box = kept.boxes[v, k]
                if not kept.labels[v, k].any():
                    assert np.isnan(box).all()
                    continue
                assert tuple(np.round(box.astype(np.float64), 4)) in boxes
                side = 1.0 if v == 0 else 0.5
                mid = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
                assert np.abs(mid - centres[v, c]).max() <= 1.5 * side / 7 + 1e-6


def test_box_label_tokens_put_each_box_in_its_cell(processor: SphinxProcessor) -> None:
    model = _box_model(len(processor.tokenizer))
    tokens = LabelTokens(model, word_ids(processor))
    assert tokens.box_width == 16 * 5
    image = reading_scenes(0, {"shapes": 1}, 448)[0]
    kept = scene_cells(dense_objects(image), image.size, 2, 7, 8, random.Random(0))
    held = int(np.nonzero(kept.labels[1].any(-1))[0][0])  # a cell of view 1 that holds an object
    labels = torch.from_numpy(kept.labels)[None].repeat(2, 1, 1, 1)
    cells = torch.from_numpy(kept.cells)[None].repeat(2, 1, 1)
    boxes = torch.from_numpy(kept.boxes)[None].repeat(2, 1, 1, 1)
    boxes[1, 1, held] += 0.05  # the same object elsewhere
    with torch.no_grad():
        out = tokens(model, labels, cells, torch.tensor([kept.aspect] * 2), boxes)
    differs = (out[0] - out[1]).abs().sum(-1) > 1e-5
    assert differs.nonzero().flatten().tolist() == [11 + 2 + held]  # view 1 starts at 11: start, CLS, cells
    with pytest.raises(SphinxError, match="pass boxes"):
        tokens(model, labels, cells, torch.tensor([kept.aspect] * 2))


def test_bare_captions_and_dense_dialogs_speak_of_the_scene() -> None:
    rng = random.Random(0)
    image = reading_scenes(2, {"shapes": 1}, 448)[0]
    caption = bare_caption(image, rng)
    for thing in things_of(image):
        assert f"{thing.noun} {thing.colour}" in caption or f"{thing.colour} {thing.noun}" in caption
    turns = dense_dialog(image, rng, per_type=2, most=6)
    assert 2 <= len(turns) <= 12 and [r for r, _ in turns[::2]] == ["human"] * (len(turns) // 2)
    assert {r for r, _ in turns[1::2]} == {"gpt"}
    questions = [q.split("\n")[0] for _, q in turns[::2]]
    assert len(set(questions)) == len(questions)
    w, h = image.size
    caption = bare_caption(image, rng, boxes=True)
    for thing in things_of(image):
        box = format_box(box_from_pixels(thing.box, w, h))
        assert f"{thing.noun} {thing.colour} {box}" in caption or f"{thing.colour} {thing.noun} {box}" in caption
    turns = dense_dialog(image, rng, per_type=2, most=20, boxes=True)
    answers = {a for _, a in turns[1::2]}
    assert any(a == format_box(box_from_pixels(t.box, w, h)) for t in things_of(image) for a in answers)


def test_label_tokens_change_only_the_cell_whose_label_changes(processor: SphinxProcessor) -> None:
    model = _model(len(processor.tokenizer))
    tokens = LabelTokens(model, word_ids(processor))
    image = reading_scenes(0, {"shapes": 1}, 448)[0]
    kept = scene_cells(dense_objects(image), image.size, 2, 7, 8, random.Random(0))
    labels = torch.from_numpy(kept.labels)[None].repeat(2, 1, 1, 1)
    cells = torch.from_numpy(kept.cells)[None].repeat(2, 1, 1)
    labels[1, 0, 3, 1] = 1 + (int(labels[1, 0, 3, 1]) % 10)  # another colour in view 0, cell 3
    with torch.no_grad():
        out = tokens(model, labels, cells, torch.tensor([kept.aspect, kept.aspect]))
    assert out.shape == (2, model.config.num_image_tokens, 256)
    differs = (out[0] - out[1]).abs().sum(-1) > 1e-5  # [num_image_tokens]
    assert differs.nonzero().flatten().tolist() == [2 + 3]  # view 0: start, CLS, cells 0..7, end
    with pytest.raises(SphinxError, match="keeps salient cells"):
        LabelTokens(SphinxForConditionalGeneration(SphinxConfig.from_preset("world-tiny")), lambda t: [1])


def _box_model(vocab: int) -> SphinxForConditionalGeneration:
    torch.manual_seed(0)
    base = SphinxConfig.from_preset("world-tiny-keep")
    config = SphinxConfig.from_preset("world-tiny-keep", fusion=[{**base.fusion[0], "box_frequencies": BOX_FREQS}])
    config.text_config.vocab_size = max(vocab, config.text_config.vocab_size)
    return SphinxForConditionalGeneration(config).eval()


def test_binding_trains_the_llm_and_not_the_encoders(processor: SphinxProcessor) -> None:
    model = _model(len(processor.tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scenes = reading_scenes(0, SCENES, 448)
    _, losses = train_binding(model, processor, scenes, BindingPlan(3, 3, batch_size=4, lr=1e-3, warmup=1))
    assert len(losses) == 6 and all(np.isfinite(losses))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("language_model.") for k in changed)
    assert "fusion.cell_pos.visual_proj" in changed
    assert not any(k.startswith("vision.") for k in changed)
    assert not any(k.startswith(("fusion.projections.visual_proj.0.", "fusion.scorers.")) for k in changed)


def test_cell_positions_start_from_the_words_of_where_the_cell_lies(processor: SphinxProcessor) -> None:
    """The global view's top-left cell and the first sub-view's (both "top left") start alike; the global view's
    top-left and bottom-right cells do not; the noise keeps two cells of one region apart."""
    model = _model(len(processor.tokenizer))
    init_cell_positions(model, word_ids(processor), noise=0.1)
    table = model.fusion.cell_pos["visual_proj"].detach()  # [V, 49, dim]
    cos = torch.nn.functional.cosine_similarity
    assert cos(table[0, 0], table[1, 0], dim=0) > 0.9  # top left, in the global view and the top-left sub-view
    assert cos(table[0, 0], table[0, 48], dim=0) < 0.5  # top left against bottom right
    assert not torch.equal(table[0, 0], table[0, 1])  # one region, two cells
    assert table.std().item() == pytest.approx(0.5, rel=0.2)


@pytest.mark.parametrize("boxes", [False, True], ids=["words", "words_and_boxes"])
def test_fit_projector_recovers_a_linear_map_of_the_label_tokens(processor: SphinxProcessor, boxes: bool) -> None:
    model = (_box_model if boxes else _model)(len(processor.tokenizer))
    tokens = LabelTokens(model, word_ids(processor))
    emb = model.get_input_embeddings().weight.detach()
    images = reading_scenes(3, {"shapes": 24, "people": 6}, 448)
    mix = torch.randn(257, 512, generator=torch.Generator().manual_seed(0))
    feats = []
    for image in images:  # features = a fixed linear map of each cell's label token, plus a presence channel
        objects = dense_objects(image)
        views = []
        for v, window in enumerate(view_windows(2)):
            t = cell_targets(objects, window, 7)
            lab = torch.from_numpy(np.stack([t[key][:, 0] for key, _ in LABEL_FIELDS], -1).astype(np.int64))
            x0, y0, side = window
            box = np.where(t["thing/present"][:, :1] > 0, t["thing/box"], t["word/box"]) * side + [x0, y0, x0, y0]
            box[~((t["thing/present"][:, 0] > 0) | (t["word/present"][:, 0] > 0))] = np.nan
            every = (lab.expand(5, -1, -1), torch.from_numpy(box).float().expand(5, -1, -1),
                     torch.arange(49).expand(5, -1))  # cell_z takes views first: this view's row is v
            z = tokens.cell_z(emb, *every)[v] if boxes else tokens.cell_z(emb, lab)  # [49, 256]
            held = torch.from_numpy(((t["thing/present"][:, 0] > 0) | (t["word/present"][:, 0] > 0))
                                    .astype(np.float32))[:, None]
            cls = tokens.cls_z.detach()[v, aspect_index(image.size)][None]
            views.append(torch.cat([torch.cat([cls, z]), torch.cat([torch.zeros(1, 1), held])], -1) @ mix)
        x = torch.stack(views)  # [5, 50, 512]
        feats.append({"clip": x[..., :128], "convnext": x[:, 1:, 128:320], "dinov2": x[..., 320:]})
    fit = fit_projector(model, tokens, feats, images, ridge=1e-6)
    assert fit.r2 > 0.99 and fit.scorer_accuracy > 0.98
    assert fit.cells == len(images) * 5 * 9
    with pytest.raises(SphinxError, match="one feature set per image"):
        fit_projector(model, tokens, feats[:2], images)


def test_binding_plan_refuses_bad_sizes() -> None:
    with pytest.raises(SphinxError, match="bad binding plan"):
        BindingPlan(-1, 3)
