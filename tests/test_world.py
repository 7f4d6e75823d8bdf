"""The synthetic world: determinism, labels checked on the saved pixels, record validity, mixtures, answer
balance, held-out split, caption domains, metric references, CLI.

One small world (448 px, ~100 images) is generated once for the module; determinism uses a tinier one.
Pixel checks read the PNG files the generator wrote and compare them with labels rebuilt independently
(`world_image`, and Pillow's own text drawing for words).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from sphinx_mllm.cli import main as cli_main
from sphinx_mllm.cli import world as cli_world
from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.data.records import RecordFile
from sphinx_mllm.tasks import COCO_KEYPOINT_NAMES, TASKS
from sphinx_mllm.tasks.metrics import score
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.world import (
    KINDS,
    WorldConfig,
    WorldImage,
    ensure_world,
    generate_world,
    load_manifest,
    render,
    verify_world,
    world_image,
)
from sphinx_mllm.world.shapes import SHAPE_GRID
from sphinx_mllm.world.vocab import COLOURS, DETECTION_CATEGORIES, LAYOUT_CLASSES, SIZE_CLASSES

CONFIG = WorldConfig(seed=0, size="small", image_size=448)
TINY = {"train": {"shapes": 3, "people": 2, "signs": 2, "document": 2},
        "eval": {"shapes": 2, "people": 1, "signs": 1, "document": 1}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, CONFIG)
    return root


@functools.cache
def _image(split: str, kind: str, index: int) -> WorldImage:
    return world_image(CONFIG, split, kind, index)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _images(split: str, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, int]]:
    return [(k, i) for k in kinds for i in range(CONFIG.counts[split][k])]


def _pixels(root: Path, split: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / split / f"{name}.png").convert("RGB"))


def _colour_box(pixels: np.ndarray, rgb: tuple[int, int, int], region: tuple[int, int, int, int]) -> tuple | None:
    """Tight box (exclusive ends) of the pixels of exactly `rgb` inside `region` (clipped to the image)."""
    h, w = pixels.shape[:2]
    x1, y1, x2, y2 = max(0, region[0]), max(0, region[1]), min(w, region[2]), min(h, region[3])
    hit = np.all(pixels[y1:y2, x1:x2] == rgb, axis=-1)
    if not hit.any():
        return None
    ys, xs = np.nonzero(hit)
    return (x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1)


def _grow(box: tuple[int, int, int, int], by: int = 1) -> tuple[int, int, int, int]:
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- determinism, manifest


def test_same_seed_gives_identical_files_in_any_worker_count_and_another_seed_differs(tmp_path: Path) -> None:
    base = WorldConfig(seed=0, size="tiny", image_size=160, counts=TINY)
    generate_world(tmp_path / "a", base)
    generate_world(tmp_path / "b", base, workers=2)
    generate_world(tmp_path / "c", WorldConfig(seed=1, size="tiny", image_size=160, counts=TINY))
    a, b, c = (_file_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert set(a) == set(c)  # same layout ...
    changed = [k for k in a if a[k] != c[k]]
    assert all(f"images/train/{k}_000000.png" in changed for k in KINDS)  # ... other pixels
    assert "train/vqa.jsonl" in changed and "manifest.json" in changed
    # ensure_world keeps a matching world and replaces one made from another config
    stamp = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    assert ensure_world(tmp_path / "a", base)["seed"] == 0
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == stamp
    other = WorldConfig(seed=1, size="tiny", image_size=160, counts=TINY)
    assert ensure_world(tmp_path / "a", other)["seed"] == 1
    assert _file_hashes(tmp_path / "a") == c


def test_manifest_lists_every_file_with_counts_and_detects_tampering(world: Path, tmp_path: Path) -> None:
    manifest = verify_world(world)
    assert manifest["version"] and manifest["seed"] == 0 and manifest["image_size"] == 448
    for split in ("train", "eval"):
        assert manifest[split]["images"] == sum(CONFIG.counts[split].values())
        assert manifest[split]["skipped"] == {}
        for stem, n in manifest["records"][split].items():
            assert len(_records(world / split / f"{stem}.jsonl")) == n
            assert f"{split}/{stem}.jsonl" in manifest["files"]
    assert (world / "manifest.json").stat().st_mtime >= max(p.stat().st_mtime for p in world.rglob("*.jsonl"))
    # a world without its manifest (interrupted) is refused; a changed file is found
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "train").mkdir()
    with pytest.raises(SphinxError, match="no manifest.json"):
        load_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "train" / "vqa.jsonl").write_text("{}\n")
    with pytest.raises(SphinxError, match="missing|changed"):
        verify_world(copy)
    for rel in manifest["files"]:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((world / rel).read_bytes())
    with pytest.raises(SphinxError, match="image .* is missing"):
        verify_world(copy)
    with pytest.raises(SphinxError, match="already exists"):
        generate_world(world, CONFIG)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(SphinxError, match="unknown world size"):
        WorldConfig(size="huge")
    with pytest.raises(SphinxError, match="image size"):
        WorldConfig(image_size=16)
    with pytest.raises(SphinxError, match="counts"):
        WorldConfig(counts={"train": {"shapes": 1}, "eval": {"planets": 1}})
    with pytest.raises(SphinxError, match="no index"):
        world_image(CONFIG, "train", "shapes", 10_000)


# ----------------------------------------------------------------------------- records and mixtures


def test_every_task_file_validates_and_every_mixture_loads(world: Path) -> None:
    for split in ("train", "eval"):
        for task in TASKS:
            records = RecordFile(world / split / f"{task}.jsonl", world)
            assert len(records) > 0 and records.report.num_skipped == 0, (split, task, records.report.summary())
            assert all(r["task"] == task for r in records)
        for domain in ("real", "synthetic"):
            records = RecordFile(world / split / f"caption_{domain}.jsonl", world)
            assert records.report.num_skipped == 0
            assert {(r["task"], r["domain"]) for r in records} == {("caption_pretrain", domain)}
    counts = load_manifest(world)["records"]
    for yaml_path in sorted((world / "mixtures").glob("*.yaml")):
        dataset = MixtureDataset.from_yaml(yaml_path)
        assert sum(r.kept for r in dataset.skip_reports) == len(dataset) > 0
        assert Path(dataset[0]["image"]).is_file()
    finetune = MixtureDataset.from_yaml(world / "mixtures" / "finetune.yaml")
    assert len(finetune) == sum(counts["train"][t] for t in TASKS)
    assert {src.spec.path.stem for src in finetune.sources} == set(TASKS)
    assert len(MixtureDataset.from_yaml(world / "mixtures" / "pretrain_real.yaml")) == counts["train"]["caption_real"]


def test_held_out_images_are_not_training_images(world: Path) -> None:
    def images(split: str) -> tuple[set[str], set[str]]:
        paths = {r["image"] for f in (world / split).glob("*.jsonl") for r in _records(f)}
        return paths, {hashlib.sha256((world / p).read_bytes()).hexdigest() for p in paths}

    (train_paths, train_hashes), (eval_paths, eval_hashes) = images("train"), images("eval")
    assert all(p.startswith("images/train/") for p in train_paths)
    assert all(p.startswith("images/eval/") for p in eval_paths)
    assert not train_hashes & eval_hashes
    assert len(eval_paths) == sum(CONFIG.counts["eval"].values())


def test_ground_truth_answers_score_perfectly_with_the_project_metrics(world: Path) -> None:
    """`meta` holds the references `score` reads: the gold answers themselves score (nearly) 1."""
    results = {}
    for task in ("vqa", "gqa", "rec", "relation", "grounded_caption", "ocr", "detection", "layout", "keypoints"):
        records = _records(world / "eval" / f"{task}.jsonl")
        refs = [{"id": r["id"], "width": r["width"], "height": r["height"], **r["meta"]} for r in records]
        preds = [{"id": r["id"], "text": r["conversations"][-1]["value"]} for r in records]
        results[task] = score(TASKS[task].metric or task, preds, refs)
    for task in ("vqa", "gqa", "relation"):
        assert results[task]["accuracy"] == 1.0
    assert results["rec"]["accuracy"] >= 0.95  # boxes are written with two decimals
    assert results["grounded_caption"]["phrase_recall"] >= 0.9
    assert results["ocr"]["word_recall"] >= 0.9
    assert results["detection"]["AP50"] >= 0.9 and results["layout"]["AP50"] >= 0.9
    assert results["keypoints"]["AP"] >= 0.8


# ----------------------------------------------------------------------------- labels on pixels


def test_shape_and_person_boxes_are_tight_around_their_pixels(world: Path) -> None:
    small = 0
    detection = {r["id"]: r for r in _records(world / "train" / "detection.jsonl")}
    for kind, i in _images("train", ("shapes", "people")):
        image = _image("train", kind, i)
        pixels = _pixels(world, "train", image.name)
        assert np.array_equal(pixels, np.asarray(render(image)))  # the file is the described image
        objects = [(s.colour, s.box) for s in image.shapes] + [(p.colour, p.box) for p in image.people]
        for k, (colour, box) in enumerate(objects):
            assert _colour_box(pixels, COLOURS[colour], _grow(box, 2)) == box
            for _, other in objects[k + 1:]:  # no occlusion: boxes keep a gap
                assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1]
        for name, rgb in COLOURS.items():  # every palette pixel belongs to an object of that colour
            hit = np.all(pixels == rgb, axis=-1)
            for colour, box in objects:
                if colour == name:
                    hit[box[1]:box[3], box[0]:box[2]] = False
            assert not hit.any(), (image.name, name)
        long_side = max(image.size)
        for s in image.shapes:
            side = max(s.box[2] - s.box[0], s.box[3] - s.box[1])
            assert side <= SIZE_CLASSES[s.size][1] * long_side + 1
            small += s.size == "small" and side < 0.045 * long_side
        queries = detection[f"train-{image.name}-detection-0"]["meta"]["queries"]
        by_category = {q["category_id"]: sorted(map(tuple, q["boxes"])) for q in queries}
        expected = defaultdict(list)
        for s in image.shapes:
            expected[DETECTION_CATEGORIES[s.kind]].append(s.box)
        for p in image.people:
            expected[DETECTION_CATEGORIES["person"]].append(p.box)
        assert by_category == {c: sorted(b) for c, b in expected.items()}
    assert small >= 5  # shapes under 4.5% of the side: only legible in the high-resolution views


def test_shapes_are_centred_on_the_cells_of_the_views_token_grid(world: Path) -> None:
    cells_used: set[tuple[int, int]] = set()
    for kind, i in _images("train", ("shapes", "people")):
        image = _image("train", kind, i)
        square = max(image.size)
        cell = square / SHAPE_GRID
        pad_x, pad_y = (square - image.size[0]) // 2, (square - image.size[1]) // 2
        for s in image.shapes:
            cx, cy = s.x + s.side / 2 + pad_x, s.y + s.side / 2 + pad_y  # drawing square's centre, padded square
            col, row = round(cx / cell - 0.5), round(cy / cell - 0.5)
            assert abs(cx - (col + 0.5) * cell) <= 0.5 and abs(cy - (row + 0.5) * cell) <= 0.5, (image.name, s)
            bx, by = (s.box[0] + s.box[2]) / 2 + pad_x, (s.box[1] + s.box[3]) / 2 + pad_y  # what was drawn
            assert abs(bx - (col + 0.5) * cell) <= cell / 4 and abs(by - (row + 0.5) * cell) <= cell / 4
            cells_used.add((col, row))
    assert len(cells_used) >= 40  # still many positions


def test_keypoints_lie_on_their_person_limbs(world: Path) -> None:
    seen: Counter[float] = Counter()
    records = {r["id"]: r for r in _records(world / "train" / "keypoints.jsonl")}
    for _, i in _images("train", ("people",)):
        image = _image("train", "people", i)
        pixels = _pixels(world, "train", image.name)
        for k, person in enumerate(image.people):
            flat = person.keypoints
            assert len(flat) == 3 * len(COCO_KEYPOINT_NAMES)
            rgb = COLOURS[person.colour]
            for j in range(len(COCO_KEYPOINT_NAMES)):
                x, y, v = flat[3 * j: 3 * j + 3]
                seen[v] += 1
                if v == 2:
                    assert tuple(pixels[int(y), int(x)]) == rgb, (image.name, COCO_KEYPOINT_NAMES[j])
                    assert person.box[0] <= x <= person.box[2] and person.box[1] <= y <= person.box[3]
                elif v == 1:  # hidden face point: inside the image, near the head
                    assert 0 <= x < image.width and 0 <= y < image.height
                else:
                    assert (x, y) == (0, 0)
            rid = f"train-{image.name}-keypoints-{k}"
            if rid in records:
                meta = records[rid]["meta"]
                x1, y1, x2, y2 = person.box
                assert meta["keypoints"] == list(flat) and meta["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert seen[2] > 100 and seen[1] > 0  # some faces in profile


def _ink(size: tuple[int, int], word: Any) -> np.ndarray:
    """The word drawn alone with Pillow's own API (independent of the generator's measuring code)."""
    mask = Image.new("L", size)
    draw = ImageDraw.Draw(mask)
    draw.fontmode = "1"
    draw.text(word.origin, word.text, font=ImageFont.load_default(size=word.size), fill=255)
    return np.asarray(mask) > 0


def test_ocr_word_boxes_hold_their_ink_and_nothing_of_other_words(world: Path) -> None:
    ocr = {r["id"]: r for r in _records(world / "train" / "ocr.jsonl")}
    checked = 0
    for kind, i in _images("train", ("signs", "document")):
        image = _image("train", kind, i)
        words = [s.word for s in image.words] if kind == "signs" else list(image.page.words)
        pixels = _pixels(world, "train", image.name)
        inks = [_ink(image.size, w) for w in words]
        for k, (word, ink) in enumerate(zip(words, inks)):
            ys, xs = np.nonzero(ink)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == word.box, (image.name, word.text)
            x1, y1, x2, y2 = word.box
            for j, other in enumerate(inks):
                assert j == k or not other[y1:y2, x1:x2].any(), (image.name, word.text, words[j].text)
            assert _colour_box(pixels, word.colour, word.box) == word.box  # the saved ink fills the box
            checked += 1
        rid = f"train-{image.name}-ocr-0"
        if rid in ocr:
            assert sorted((w["text"], tuple(w["box"])) for w in ocr[rid]["meta"]["words"]) == \
                sorted((w.text, w.box) for w in words)
    assert checked > 100


def test_layout_regions_contain_their_content(world: Path) -> None:
    layout = {r["id"]: r for r in _records(world / "train" / "layout.jsonl")}
    for _, i in _images("train", ("document",)):
        image = _image("train", "document", i)
        page = image.page
        pixels = _pixels(world, "train", image.name)
        ink = ~np.all(pixels == page.paper, axis=-1)
        covered = np.zeros_like(ink)
        for k, region in enumerate(page.regions):
            x1, y1, x2, y2 = region.box
            covered[y1:y2, x1:x2] = True
            inside = ink[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            for word in region.words:
                assert x1 <= word.box[0] and y1 <= word.box[1] and word.box[2] <= x2 and word.box[3] <= y2
            for other in page.regions[k + 1:]:
                assert region.box[3] <= other.box[1]  # stacked, disjoint
        assert not (ink & ~covered).any(), image.name  # no ink outside the regions
        meta = layout[f"train-{image.name}-layout-0"]["meta"]["queries"]
        got = {q["category_id"]: sorted(map(tuple, q["boxes"])) for q in meta}
        want = defaultdict(list)
        for region in page.regions:
            want[LAYOUT_CLASSES[region.kind]].append(region.box)
        assert got == {c: sorted(b) for c, b in want.items()}


# ----------------------------------------------------------------------------- what the text says


def test_vqa_answers_are_balanced_and_not_given_by_the_question(world: Path) -> None:
    for split in ("train", "eval"):
        by_type: dict[str, Counter[str]] = defaultdict(Counter)
        by_text: dict[str, Counter[str]] = defaultdict(Counter)
        for r in _records(world / split / "vqa.jsonl"):
            answer = r["meta"]["answers"][0]
            by_type[r["meta"]["question_type"]][answer] += 1
            by_text[r["conversations"][0]["value"].split("\n")[0]][answer] += 1
        assert {"colour", "shape", "count", "position", "action", "text"} <= set(by_type)
        for qtype, counts in by_type.items():
            if sum(counts.values()) >= 10:
                assert max(counts.values()) / sum(counts.values()) <= 0.4, (split, qtype, counts)
        for text, counts in by_text.items():  # a repeated question does not keep its answer
            if sum(counts.values()) >= 8:
                assert max(counts.values()) / sum(counts.values()) <= 0.6, (text, counts)
    gqa = Counter(r["meta"]["answer"] for r in _records(world / "train" / "gqa.jsonl") if r["meta"]["answer"] in
                  ("yes", "no"))
    assert abs(gqa["yes"] - gqa["no"]) <= 0.2 * sum(gqa.values())


def test_referring_expressions_pick_out_one_object(world: Path) -> None:
    for r in _records(world / "train" / "rec.jsonl"):
        name = r["id"].split("-")[1]
        kind, index = name.rsplit("_", 1)
        image = _image("train", kind, int(index))
        expression = r["meta"]["expression"]
        things = [(s.colour, s.kind, s.size, s.box) for s in image.shapes] + \
            [(p.colour, "person", None, p.box) for p in image.people]
        target = [t for t in things if list(t[3]) == r["meta"]["box"]]
        assert len(target) == 1
        colour, noun, size, _ = target[0]
        assert noun in expression and (size is None or size in expression or "small" not in expression)
        # any object the words (colour, noun) also fit is told apart by size or by a position word
        same = [t for t in things if t[1] == noun and (t[0] == colour or colour not in expression)]
        if len(same) > 1:
            assert size in expression or any(w in expression for w in ("left", "right", "top", "bottom", "most"))


def test_caption_domains_differ_as_web_and_model_captions(world: Path) -> None:
    real = {r["image"]: r["caption"] for r in _records(world / "train" / "caption_real.jsonl")}
    synthetic = {r["image"]: r["caption"] for r in _records(world / "train" / "caption_synthetic.jsonl")}
    assert real.keys() == synthetic.keys()
    words = lambda texts: sum(len(t.split()) for t in texts) / len(texts)  # noqa: E731
    assert words(list(real.values())) * 2.5 < words(list(synthetic.values()))
    for _, i in _images("train", ("shapes",)):
        image = _image("train", "shapes", i)
        caption = synthetic[f"images/train/{image.name}.png"]
        for s in image.shapes:  # complete: every object with size, colour and shape
            assert f"{s.size} {s.colour} {s.kind}" in caption
        assert caption.count(" at the ") + caption.count(" in the center") + caption.count(" on the ") == \
            len(image.shapes)


# ----------------------------------------------------------------------------- CLI


def _meta_boxes(meta: Any) -> list[list[float]]:
    """Every pixel box under a "box" or "boxes" key of a record's meta, at any depth."""
    if isinstance(meta, list):
        return [b for item in meta for b in _meta_boxes(item)]
    if not isinstance(meta, dict):
        return []
    found = [meta["box"]] if "box" in meta else []
    found += list(meta.get("boxes", []))
    return found + [b for k, v in meta.items() if k not in ("box", "boxes") for b in _meta_boxes(v)]


def _cli(argv: list[str]) -> int:
    """`sphinx-mllm ARGV` through the world area alone (the full parser imports every area: slow)."""
    parser = argparse.ArgumentParser(prog="sphinx-mllm")
    cli_world.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SphinxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_cli_generates_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "sphinx_mllm.cli.world" in cli_main._AREAS
    out = tmp_path / "cli_world"
    assert _cli(["world", "generate", "--out", str(out), "--size", "small", "--image-size", "96", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 3 and summary["images"]["train"] == sum(CONFIG.counts["train"].values())
    assert load_manifest(out)["image_size"] == 96
    assert max(Image.open(next((out / "images" / "train").glob("*.png"))).size) == 96
    for path in out.glob("*/*.jsonl"):  # at 96 px too, every labelled box lies in its image
        for r in _records(path):
            for box in _meta_boxes(r.get("meta", {})):
                assert 0 <= box[0] < box[2] <= r["width"] and 0 <= box[1] < box[3] <= r["height"], (r["id"], box)
    assert _cli(["world", "generate", "--out", str(out), "--size", "small"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _cli(["world", "generate", "--out", str(tmp_path / "x"), "--workers", "0"]) == 2
