"""Pieces of the world recipe: tokenizer, dense labels, packing, encoder pre-training determinism, report
logic and the `world run` command line. The full recipe runs in test_world_recipe.py."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from sphinx_mllm.cli.main import main as cli_main
from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.geometry import box_from_pixels, point_from_pixels
from sphinx_mllm.processing import SphinxProcessor, load_tokenizer
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.world import WorldConfig, generate_world, world_image
from sphinx_mllm.world.dense import CATEGORIES, DenseObject, cell_targets, dense_objects, view_windows
from sphinx_mllm.world.encoders import (
    WINDOW_CATEGORIES,
    Budget,
    EncoderPretraining,
    ObjectWindows,
    WorldImageSet,
    pretrain_encoders,
    probe_encoders,
    sample_split,
)
from sphinx_mllm.world.packing import pack_records
from sphinx_mllm.world.recipe import (
    ARMS,
    BIND_LR,
    BIND_PRESET,
    BINDINGS,
    PLANS,
    READING_LR,
    READING_SCENES,
    READING_TASKS,
    RecipeOptions,
    WorldRecipe,
    choose_beta,
    plan_for_binding,
    plan_for_llm,
    plan_for_reading,
)
from sphinx_mllm.world.report import _encoder_checks, check_targets
from sphinx_mllm.world.tokenizer import COORDINATE_TOKENS, train_world_tokenizer

CONFIG = WorldConfig(seed=5, size="small", image_size=224)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, CONFIG)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_world_tokenizer(world, tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)


def _records(world: Path, split: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (world / split / f"{task}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_coordinates(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 400 + len(COORDINATE_TOKENS) + 2  # BPE + coordinates + <p>, </p>
    ids = tok("[0.95,0.43,1.00,0.06]", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[", "0.95", ",", "0.43", ",", "1.00", ",", "0.06", "]"]
    ids = tok("<p>red box</p>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "<p>" and tok.convert_ids_to_tokens(ids)[-1] == "</p>"


def test_tokenizer_round_trips_world_text_and_labels_answers(world: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    for task in ("rec", "ocr", "keypoints", "vqa"):
        for record in _records(world, "train", task)[:5]:
            for turn in record["conversations"]:
                ids = tok(turn["value"], add_special_tokens=False)["input_ids"]
                assert tok.decode(ids) == turn["value"]
    processor = SphinxProcessor(tok, image_size=224, num_image_tokens=3)
    ids, labels = processor.encode_conversation([("human", "Where?"), ("gpt", "[0.10,0.20,0.30,0.40]")], True)
    assert ids[:4] == [1, 0, 0, 0] and ids[-1] == 2
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == " [0.10,0.20,0.30,0.40]\n###"


def test_tokenizer_rejects_a_tiny_vocabulary(world: Path, tmp_path: Path) -> None:
    with pytest.raises(SphinxError, match="too small"):
        train_world_tokenizer(world, tmp_path / "t", vocab_size=100)


# ----------------------------------------------------------------------------- dense labels


def test_sample_split_rebuilds_the_generators_images() -> None:
    images = sample_split(CONFIG, "train")
    assert len(images) == sum(CONFIG.counts["train"].values())
    for image in images[::7]:
        kind, index = image.name.rsplit("_", 1)
        ref = world_image(CONFIG, "train", kind, int(index))
        assert (image.size, image.shapes, image.people, image.words, image.page) == \
               (ref.size, ref.shapes, ref.people, ref.words, ref.page)


def test_dense_objects_agree_with_the_records(world: Path) -> None:
    by_name = {im.name: im for im in sample_split(CONFIG, "train")}
    checked = 0
    for record in _records(world, "train", "rec"):
        image = by_name[Path(record["image"]).stem]
        want = box_from_pixels(record["meta"]["box"], record["width"], record["height"])
        boxes = [o.box for o in dense_objects(image) if o.slot == "thing"]
        assert (want.x1, want.y1, want.x2, want.y2) in boxes
        checked += 1
    for record in _records(world, "train", "keypoints"):
        image = by_name[Path(record["image"]).stem]
        people = [o for o in dense_objects(image) if o.category == CATEGORIES.index("person")]
        kp = record["meta"]["keypoints"]
        nose = point_from_pixels((kp[0], kp[1]), record["width"], record["height"])
        assert any(p.keypoints[0][:2] == (nose.x, nose.y) for p in people) or kp[2] == 0
        checked += 1
    assert checked > 10


def test_cell_targets_put_objects_in_their_cells_in_the_view_frame() -> None:
    a = DenseObject("thing", 0, (0.10, 0.10, 0.20, 0.20), colour=3, size=1)  # centre (0.15, 0.15)
    b = DenseObject("thing", 1, (0.60, 0.70, 0.90, 0.80), colour=5, size=3)  # centre (0.75, 0.75)
    c = DenseObject("thing", 2, (0.12, 0.12, 0.16, 0.16), colour=1, size=1)  # same cell as a, smaller
    t = cell_targets([a, b, c], (0.0, 0.0, 1.0), grid=4)
    present = t["thing/present"][:, 0]
    assert present.sum() == 3
    assert t["thing/category"][0, 0] == 3  # the smaller object c keeps its own cell (0, 0)
    assert t["thing/category"][1, 0] == 1 or t["thing/category"][4, 0] == 1 or t["thing/category"][5, 0] == 1
    assert t["thing/box"][3 * 4 + 3].tolist() == pytest.approx([0.60, 0.70, 0.90, 0.80])
    # sub-image (1, 1) of a 2 x 2 grid is the window [0.5, 1] x [0.5, 1]: b is inside, a and c are not
    windows = view_windows(2)
    assert windows[4] == (0.5, 0.5, 0.5)
    sub = cell_targets([a, b, c], windows[4], grid=4)
    assert sub["thing/present"].sum() == 1
    k = int(sub["thing/present"][:, 0].argmax())
    assert sub["thing/box"][k].tolist() == pytest.approx([0.2, 0.4, 0.8, 0.6])
    assert sub["thing/colour"][k, 0] == 5 and sub["thing/size"][k, 0] == 3


def test_cover_targets_spread_attributes_over_the_cells_a_box_covers() -> None:
    big = DenseObject("thing", 4, (0.05, 0.05, 0.70, 0.45), colour=2, size=3)  # centre (0.375, 0.25): cell (1, 1)
    small = DenseObject("thing", 1, (0.55, 0.30, 0.65, 0.40), colour=7, size=1)  # centre (0.6, 0.35): cell (1, 2)
    plain = cell_targets([big, small], (0.0, 0.0, 1.0), grid=4)
    t = cell_targets([big, small], (0.0, 0.0, 1.0), grid=4, cover=True)
    for key in ("thing/present", "thing/box", "thing/keypoints"):  # presence and geometry stay at centres
        assert (t[key] == plain[key]).all()
    centres = plain["thing/present"][:, 0] > 0  # what the geometry paradigm reads agrees there
    assert (t["thing/category"][centres] == plain["thing/category"][centres]).all()
    # cell centres at 0.125, 0.375, 0.625, 0.875: big covers rows 0-1 x columns 0-2
    covered = {k for k in range(16) if t["thing/category"][k, 0] > 0}
    assert covered == {0, 1, 2, 4, 5, 6}
    assert t["thing/category"][6, 0] == 2 and t["thing/colour"][6, 0] == 7  # small's own centre cell
    assert all(t["thing/category"][k, 0] == 5 and t["thing/colour"][k, 0] == 2 for k in covered - {6})
    assert plain["thing/category"][0, 0] == 0  # without cover, a cell without a centre has no label


# ----------------------------------------------------------------------------- packing


def _conv(rid: str, image: str, question: str, answer: str) -> dict:
    return {"id": rid, "image": image, "width": 10, "height": 10, "task": "vqa",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_pack_records_fills_dialogs_per_image_within_the_budget() -> None:
    records = {"vqa": [_conv(f"q{i}", f"img{i % 3}.png", "a b c d", "e f") for i in range(12)],
               "rec": [_conv(f"r{i}", f"img{i % 3}.png", "g h", "i") for i in range(6)]}
    count = lambda text: len(text.split())  # noqa: E731
    # a vqa record costs 4 + 2 + 2 * 6 = 18 tokens, a rec one 2 + 1 + 12 = 15; budget 100 - 30 - 10 = 60
    packed = pack_records(records, count, max_tokens=100, image_tokens=30, prefix_tokens=10, seed=1)
    assert sum(len(p["meta"]["tasks"]) for p in packed) == 18
    for p in packed:
        assert len({rid for rid in p["meta"]["ids"]}) == len(p["meta"]["ids"])
        assert all(rid[1:].isdigit() and int(rid[1:]) % 3 == int(p["image"][3]) for rid in p["meta"]["ids"])
        cost = sum(count(t["value"]) + 6 for t in p["conversations"])
        assert cost <= 60
        assert [t["from"] for t in p["conversations"]] == ["human", "gpt"] * (len(p["conversations"]) // 2)
    assert packed == pack_records(records, count, max_tokens=100, image_tokens=30, prefix_tokens=10, seed=1)
    half = pack_records(records, count, max_tokens=100, image_tokens=30, prefix_tokens=10, ratios={"vqa": 0.5})
    assert sum(p["meta"]["tasks"].count("vqa") for p in half) == 6


def test_packed_world_mixture_loads(world: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    from sphinx_mllm.world.packing import pack_mixture_files

    tok = load_tokenizer(tokenizer_dir)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    files = {t: world / "train" / f"{t}.jsonl" for t in ("vqa", "rec", "detection")}
    mixture = pack_mixture_files(files, tmp_path / "packed", count, max_tokens=600, image_tokens=260, prefix_tokens=32,
                                 images_root=world)
    data = MixtureDataset.from_yaml(mixture)
    assert (len(data) > 0 and (world / data[0]["image"]).is_file()) or Path(data[0]["image"]).is_file()
    total = sum(len(_records(world, "train", t)) for t in files)
    assert sum(len(data[i]["meta"]["tasks"]) for i in range(len(data))) == total


# ----------------------------------------------------------------------------- encoders


def _pretrain(world: Path, tokenizer_dir: Path, seed: int, probe: bool = False) -> dict[str, torch.Tensor]:
    config = SphinxConfig.from_preset("world-tiny")
    data = WorldImageSet.load(world, config.image_size, "train", limit=6)
    tok = load_tokenizer(tokenizer_dir)

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # four semantic steps: three on object windows, one on whole views
    budgets = {"convnext": Budget(4, 3, 1e-3), "dinov2": Budget(2, 3, 1e-3), "clip": Budget(2, 4, 1e-3)}
    pre = pretrain_encoders(config, data, tokenize, len(tok), EncoderPretraining(budgets, seed=seed))
    assert set(pre.encoders) == {"clip", "convnext", "dinov2"}
    assert {k: len(v) for k, v in pre.losses.items()} == {"convnext": 4, "dinov2": 2, "clip": 2}
    assert all(x == x for v in pre.losses.values() for x in v)
    if probe:  # the held-out check the recipe records for its report
        modes = {n: (e.training, pre.heads[n].training) for n, e in pre.encoders.items()}
        seen: list[bool] = []
        hooks = [e.register_forward_pre_hook(lambda m, _: seen.append(m.training)) for e in pre.encoders.values()]
        held = probe_encoders(pre, config, WorldImageSet.load(world, config.image_size, "eval", limit=8), tokenize)
        for hook in hooks:
            hook.remove()
        assert seen and not any(seen)  # probed in eval mode, as the frozen tower runs them
        assert {n: (e.training, pre.heads[n].training) for n, e in pre.encoders.items()} == modes  # left as they were
        assert {"thing_category", "thing_category_shapes", "thing_colour"} <= set(held["convnext"])
        keys = list(held["convnext"])
        per_class = [k for k in keys if k.startswith("thing_category/")]
        assert per_class and keys[-len(per_class):] == per_class  # last, in the categories' order
        order = [CATEGORIES.index(k.split("/")[1]) for k in per_class]
        assert order == sorted(order)
        assert "thing_box_iou50_global" in held["dinov2"] and "retrieval_top1" in held["clip"]
        assert all(0.0 <= v <= 1.0 for rates in held.values() for v in rates.values())
        assert _encoder_checks(held)[2].startswith("| encoder |")
    return {f"{n}.{k}": v.clone() for n, e in pre.encoders.items() for k, v in e.state_dict().items()}


def test_category_recalls_count_each_class_and_the_shapes_apart() -> None:
    from sphinx_mllm.world.encoders import _category_recalls

    circle, star, person = (CATEGORIES.index(k) + 1 for k in ("circle", "star", "person"))
    target = torch.tensor([[circle, circle, star, person, person, 0]])
    pred = torch.tensor([[circle, person, person, person, person, 5]])
    rates: dict[str, list[float]] = {}

    def add(key: str, hits: torch.Tensor) -> None:
        rates.setdefault(key, []).extend(hits.float().tolist())

    _category_recalls(pred, target, add)
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    assert mean == {"thing_category_shapes": pytest.approx(1 / 3), "thing_category/circle": 0.5,
                    "thing_category/star": 0.0, "thing_category/person": 1.0}


def test_world_image_set_pixels_are_the_processors_tensors(world: Path) -> None:
    from PIL import Image

    from sphinx_mllm.processing.image import normalize

    data = WorldImageSet.load(world, 448, "train", limit=3)
    pixels = data.pixels(torch.tensor([2, 0]))  # [2, 3, 448, 448]
    for row, k in enumerate((2, 0)):
        assert torch.equal(pixels[row], normalize(Image.fromarray(data.squares[k].numpy())))


def test_object_windows_centre_each_shape_and_person_on_the_views_cells(world: Path) -> None:
    from sphinx_mllm.processing.image import PAD_FILL, normalize_pixels
    from sphinx_mllm.processing.views import resize_square

    # All 48 training images: with shapes centred on cells (`shapes.SHAPE_GRID`) only a few objects sit in an edge cell.
    data = WorldImageSet.load(world, 448, "train")
    windows = ObjectWindows.build(data, view_size=224, view_grid=2, grid=7)  # cells of 32 px, windows of 96
    wanted = sum(o.slot == "thing" and o.category in WINDOW_CATEGORIES for objs in data.objects for o in objs)
    assert 0 < len(windows) <= wanted and len(windows) >= wanted - 2  # a few centres on a border may drop
    assert (windows.corners % 32 == 0).all()  # on the sub-views' cell grid
    category = windows.targets["thing/category"][:, 0, 0].long()
    assert (windows.targets["thing/present"][:, 0, 0] == 1).all()
    for n in range(len(windows)):
        x0, y0 = windows.corners[n].tolist()
        here = [o for o in data.objects[int(windows.items[n])] if o.slot == "thing" and o.category + 1 == category[n]
                and x0 + 32 <= o.center[0] * 448 < x0 + 64 and y0 + 32 <= o.center[1] * 448 < y0 + 64]
        assert here, f"window {n}: no object of its category centred in the middle cell"
    pixels = windows.pixels(data, torch.arange(len(windows)))  # [N, 3, 96, 96]
    assert pixels.shape == (len(windows), 3, 96, 96)
    inside = next(n for n in range(len(windows)) if min(windows.corners[n]) >= 0 and max(windows.corners[n]) <= 352)
    x0, y0 = windows.corners[inside].tolist()
    crop = data.squares[int(windows.items[inside]), y0:y0 + 96, x0:x0 + 96]
    assert torch.equal(pixels[inside], normalize_pixels(crop.clone()))
    small = WorldImageSet.load(world, 224, "train")  # smaller squares: resized as the views resize them
    item = windows.items[inside : inside + 1]
    expected = resize_square(small.pixels(item), 448)[0, :, y0:y0 + 96, x0:x0 + 96]
    assert torch.equal(windows.pixels(small, torch.tensor([inside]))[0], expected)
    edge = [n for n in range(len(windows)) if min(windows.corners[n]) < 0]
    assert edge  # objects near the border: the window's corner lies outside the square, in the pad colour
    fill = normalize_pixels(torch.tensor(PAD_FILL, dtype=torch.uint8).view(1, 1, 3))[:, 0, 0]
    assert all(torch.equal(pixels[n, :, 0, 0], fill) for n in edge)
    assert all(torch.equal(windows.pixels(small, torch.tensor([n]))[0, :, 0, 0], fill) for n in edge)
    with pytest.raises(SphinxError, match="odd number of cells"):
        ObjectWindows.build(data, view_size=224, view_grid=2, grid=7, cells=2)


def test_encoder_pretraining_is_deterministic_per_seed(world: Path, tokenizer_dir: Path) -> None:
    first = _pretrain(world, tokenizer_dir, seed=0, probe=True)
    again = _pretrain(world, tokenizer_dir, seed=0)
    other = _pretrain(world, tokenizer_dir, seed=1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ----------------------------------------------------------------------------- report and CLI


def test_check_targets_compares_with_the_blind_twin() -> None:
    sighted = {"vqa": {"accuracy": 0.7}, "rec": {"accuracy": 0.2}}
    blind = {"vqa": {"accuracy": 0.4}, "rec": {"accuracy": 0.0}}
    rows = check_targets({"vqa.accuracy - blind": 0.25, "rec.accuracy": 0.15, "ocr.word_recall": 0.3}, sighted, blind)
    assert [(r["metric"], r["met"]) for r in rows] == [("vqa.accuracy - blind", True), ("rec.accuracy", True),
                                                      ("ocr.word_recall", False)]
    assert rows[0]["value"] == pytest.approx(0.3) and rows[2]["value"] is None


def test_world_run_rejects_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["world", "run", "--plan", "huge"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_coordinate_embeddings_are_nearest_to_their_own_value() -> None:
    from sphinx_mllm.world.tokenizer import coordinate_embeddings

    table = coordinate_embeddings(64, scale=1.0)  # [101, 64]
    sims = table @ table.T
    assert torch.equal(sims.argmax(1), torch.arange(101))  # each value is closest to itself
    # a near value is more alike than a far one, everywhere
    rows = torch.arange(100)
    assert bool((sims[rows, rows + 1] > sims[rows, (rows + 50) % 101]).all())
    with pytest.raises(ValueError, match="width"):
        coordinate_embeddings(16)


def test_init_coordinate_embeddings_sets_only_the_coordinate_rows(tokenizer_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sphinx_mllm.world.tokenizer import coordinate_embeddings, init_coordinate_embeddings

    tok = load_tokenizer(tokenizer_dir)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    before_in = llm.get_input_embeddings().weight.detach().clone()
    init_coordinate_embeddings(llm, tok, scale=0.5, seed=3)
    ids = tok.convert_tokens_to_ids(list(COORDINATE_TOKENS))
    table = coordinate_embeddings(32, scale=0.5, seed=3)
    assert torch.equal(llm.get_input_embeddings().weight[ids], table)
    assert torch.equal(llm.get_output_embeddings().weight[ids], table)
    others = torch.ones(len(before_in), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(llm.get_input_embeddings().weight[others], before_in[others])


# ----------------------------------------------------------------------------- --reading


def _run_folder(world: Path, tokenizer_dir: Path, tmp_path: Path) -> Path:
    """A run folder whose world and tokenizer steps are done (the module's world and tokenizer)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "world").symlink_to(world)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out


def test_reading_plan_lowers_the_llm_lr_and_needs_the_tiny_llm() -> None:
    plan = plan_for_reading(PLANS["quick"])
    assert plan.reading == READING_SCENES["quick"] and 0 < plan.rehearsal < 1
    assert {plan.pretrain_real.lr, plan.pretrain_synthetic.lr, plan.finetune.lr} == {READING_LR}
    assert plan.projector == PLANS["quick"].projector and plan.language == PLANS["quick"].language
    with pytest.raises(SphinxError, match="already does"):
        plan_for_reading(plan_for_llm(PLANS["quick"], "smollm2"))


def test_reading_data_step_writes_reading_documents_and_rehearsal_mixtures(
        world: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _run_folder(world, tokenizer_dir, tmp_path)
    plan = replace(plan_for_reading(PLANS["quick"]), reading={"shapes": 6, "people": 2, "signs": 1, "document": 1},
                   image_size=CONFIG.image_size)
    recipe = WorldRecipe(RecipeOptions(out, plan, bind=False), runner=lambda argv: None)
    recipe.make_data()
    docs = [json.loads(line) for line in (out / "data" / "language" / "text.jsonl").read_text().splitlines()]
    assert docs and all(d["image"] is None for d in docs)
    assert all(d["conversations"][0]["value"].startswith(("Context: an image of", "Context: a document page"))
               for d in docs)
    assert {t for d in docs for t in d["meta"]["tasks"]} <= set(READING_TASKS)
    for arm in ARMS:
        for stage in ("pretrain_real", "pretrain_synthetic", "finetune"):
            path = recipe.stage_mixture(arm, stage)
            assert path.parent == out / "data" / "rehearsal" / arm
            meta = yaml.safe_load(path.read_text())["META"]
            assert meta[-1]["type"] == "text" and meta[:-1] == [
                {**m, **{k: os.path.relpath(os.path.abspath(recipe.arm_paths(arm)[stage].parent / m[k]), path.parent)
                         for k in ("path", "root") if k in m}}
                for m in yaml.safe_load(recipe.arm_paths(arm)[stage].read_text())["META"]]
            data = MixtureDataset.from_yaml(path)
            images = sum(1 for i in range(len(data)) if data[i]["image"] is not None)
            texts = len(data) - images
            assert texts == len(docs) and images > 0
            share = meta[-1]["weight"] * texts / (meta[-1]["weight"] * texts + images)
            assert share == pytest.approx(plan.rehearsal, abs=1e-4)
            image = next(data[i]["image"] for i in range(len(data)) if data[i]["image"] is not None)
            assert Path(image).is_file()  # image paths still resolve from the new folder
    # without the option, the stages read the arms' own mixtures
    plain = WorldRecipe(RecipeOptions(tmp_path / "plain", PLANS["quick"]), runner=lambda argv: None)
    assert plain.stage_mixture("sighted", "finetune") == plain.arm_paths("sighted")["finetune"]


def test_world_run_refuses_to_export_a_reading_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["world", "run", "--reading", "--fresh", "--out", str(tmp_path / "r"), "--export", str(tmp_path / "x")]
    (tmp_path / "r").mkdir()
    assert cli_main(argv) == 2
    assert "--reading" in capsys.readouterr().err and (tmp_path / "r").is_dir()  # refused before --fresh
    argv = ["world", "run", "--reading", "--llm", "smollm2", "--fresh", "--out", str(tmp_path / "r")]
    assert cli_main(argv) == 2
    assert "already does" in capsys.readouterr().err and (tmp_path / "r").is_dir()


# ----------------------------------------------------------------------------- binding (the default)


def test_binding_is_the_tiny_llms_default_and_replaces_the_language_stage(tmp_path: Path) -> None:
    assert RecipeOptions(tmp_path, PLANS["quick"]).bind is True
    assert RecipeOptions(tmp_path, PLANS["quick"], reading=True).bind is False
    assert RecipeOptions(tmp_path, PLANS["quick"], llm="smollm2").bind is False
    with pytest.raises(SphinxError, match="replaces --reading"):
        RecipeOptions(tmp_path, PLANS["quick"], reading=True, bind=True)
    with pytest.raises(SphinxError, match="pretrained LLM"):
        RecipeOptions(tmp_path, PLANS["quick"], llm="smollm2", bind=True)
    recipe = WorldRecipe(RecipeOptions(tmp_path, PLANS["quick"]), runner=lambda argv: None)
    plan = recipe.plan
    assert plan == plan_for_binding(PLANS["quick"]) and plan.language is None and plan.binding == BINDINGS["quick"]
    assert {plan.pretrain_real.lr, plan.pretrain_synthetic.lr, plan.finetune.lr} == {BIND_LR}
    config = recipe.model_config()
    assert config.num_image_tokens == SphinxConfig.from_preset(BIND_PRESET, image_size=448).num_image_tokens
    assert [g.keep for g in config.fusion_groups] == [8]
    unbound = WorldRecipe(RecipeOptions(tmp_path, PLANS["quick"], bind=False), runner=lambda argv: None)
    assert unbound.plan.binding is None and unbound.plan.language == PLANS["quick"].language
    assert all(g.keep is None for g in unbound.model_config().fusion_groups)


def test_a_run_refuses_to_resume_with_the_other_binding_and_to_export_without_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "options.json").write_text(json.dumps({"seed": 0, "llm": "tiny", "reading": False, "bind": False,
                                                  "plan": {"name": "quick"}}))
    (out / "steps.json").write_text(json.dumps({"tokenizer": {"seconds": 0.1, "result": {}}}))
    assert cli_main(["world", "run", "--quick", "--out", str(out)]) == 2
    assert "Resume it with --no-bind" in capsys.readouterr().err
    assert cli_main(["world", "run", "--no-bind", "--fresh", "--out", str(out), "--export", str(tmp_path / "x")]) == 2
    assert "--no-bind" in capsys.readouterr().err and (out / "options.json").is_file()  # refused before --fresh
    assert cli_main(["world", "run", "--bind", "--reading", "--out", str(out)]) == 2
    assert "replaces --reading" in capsys.readouterr().err


# ----------------------------------------------------------------------------- beta chosen on validation captions


def test_choose_beta_takes_the_best_worst_domain_margin() -> None:
    specialists = {"real": {"real": 3.0, "synthetic": 7.0}, "synthetic": {"real": 7.0, "synthetic": 2.0}}
    # means: real 5.0, synthetic 4.5; margins (worse domain): 0.5 -> 0.2, 0.6 -> 0.7, 0.7 -> -0.1
    mixed = {0.5: {"real": 4.8, "synthetic": 3.5}, 0.6: {"real": 4.3, "synthetic": 3.8},
             0.7: {"real": 3.6, "synthetic": 4.6}}
    assert choose_beta(specialists, mixed) == 0.6
    assert choose_beta(specialists, {0.4: mixed[0.6], 0.6: mixed[0.6]}) in (0.4, 0.6)  # a tie: nearer 0.5
    with pytest.raises(SphinxError, match="at least one"):
        choose_beta(specialists, {})


def test_validation_captions_are_held_out_of_both_arms_caption_stages(
        world: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _run_folder(world, tokenizer_dir, tmp_path)
    plan = replace(PLANS["quick"], beta_grid=(0.5, 0.7), validation_images=3, image_size=CONFIG.image_size)
    recipe = WorldRecipe(RecipeOptions(out, plan), runner=lambda argv: None)
    recipe.make_data()
    for arm in ARMS:
        paths = recipe.arm_paths(arm)
        for domain in ("real", "synthetic"):
            val = MixtureDataset.from_yaml(paths[f"val_caption_{domain}"])
            train = MixtureDataset.from_yaml(paths[f"pretrain_{domain}"])
            assert len(val) == 3 and len(train) == len(
                (world / "train" / f"caption_{domain}.jsonl").read_text().splitlines()) - 3
            if arm == "sighted":
                held = {val[i]["image"] for i in range(len(val))}
                assert len(held) == 3 and not held & {train[i]["image"] for i in range(len(train))}
                assert all(Path(p).is_file() for p in held)
            else:
                assert {val[i]["image"] for i in range(len(val))} == {str(out / "blind" / "data" / "blank.png")}
    # the same images in both domains
    ids = {d: {json.loads(line)["image"] for line in (out / "data" / f"val_caption_{d}.jsonl").open()}
           for d in ("real", "synthetic")}
    assert ids["real"] == ids["synthetic"]
    # without a grid, the caption stages read the world's own mixtures and there is no validation split
    plain = WorldRecipe(RecipeOptions(tmp_path / "plain", replace(PLANS["quick"], beta_grid=())),
                        runner=lambda argv: None)
    assert plain.arm_paths("sighted")["pretrain_real"] == plain.world / "mixtures" / "pretrain_real.yaml"
