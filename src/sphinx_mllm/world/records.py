"""The records of every task for one world image, in the project's conversation JSONL layout.

Records are built with the tasks' own `build` (the release-style wordings) and `make_record` of the
converters, so they are exactly what the converters produce from public data. `meta` holds the ground
truth in the reference fields of `sphinx_mllm.tasks.metrics` (pixel boxes `[x1, y1, x2, y2]`), so
`{"id", "width", "height", **meta}` is a record's evaluation reference.

Training and held-out records differ where the converters' defaults do: detection and layout are one
multi-turn record per image for training (one turn per category present) and one record per (image,
category) held out, as `score` wants; held-out captions are the short ones, with three references each.
Caption pre-training records (`caption_real`, `caption_synthetic`) carry `caption` and `domain`.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sphinx_mllm.data.converters.common import Record, make_record, reading_order, typed_task
from sphinx_mllm.data.records import InvalidRecord, validate_record
from sphinx_mllm.geometry import Box, Grounding, box_from_pixels, point_from_pixels
from sphinx_mllm.tasks import (
    COCO_KEYPOINT_NAMES,
    CaptionTask,
    ConversationTask,
    DetectionTask,
    GroundedCaptionTask,
    KeypointsTask,
    LayoutTask,
    OCRTask,
    RECTask,
    REGTask,
    RelationTask,
    VQATask,
)
from sphinx_mllm.tasks.base import Turn, join_turns, pluralize
from sphinx_mllm.world.canvas import PixelBox, derive_seed
from sphinx_mllm.world.language import (
    Thing,
    background_phrase,
    detailed_caption,
    full_phrase,
    main_relation,
    name_of,
    real_caption,
    refer,
    short_captions,
    synthetic_caption,
    things_of,
)
from sphinx_mllm.world.questions import Balancer, Question, gqa_candidates, vqa_candidates
from sphinx_mllm.world.scene import WorldImage
from sphinx_mllm.world.text import Word
from sphinx_mllm.world.vocab import DETECTION_CATEGORIES, LAYOUT_CLASSES, PERSON, article, count_phrase

CAPTION_DOMAINS: tuple[str, ...] = ("real", "synthetic")
RECORDS_PER_IMAGE = {"rec": 2, "reg": 2, "gqa": 2, "relation": 1}
"""How many records of these tasks one image gives at most (the others: one per question type, per
person, or one)."""


@dataclass
class Annotator:
    """Builds the records of the images of one split, in order; holds the answer balancers of the split."""

    seed: int
    split: str
    ocr_max_words: int = 40
    held_out: bool = False
    vqa: Balancer = field(default_factory=Balancer)
    gqa: Balancer = field(default_factory=Balancer)
    relations: Balancer = field(default_factory=Balancer)
    skipped: Counter[str] = field(default_factory=Counter)

    def annotate(self, image: WorldImage, path: str) -> dict[str, list[Record]]:
        """Records by file stem (task name, or `caption_real` / `caption_synthetic`)."""
        ctx = _Context(self, image, path, random.Random(derive_seed(self.seed, self.split, image.name, "text")))
        things = things_of(image)
        questions = vqa_candidates(image, ctx.rng)
        _vqa(ctx, questions)
        _captions(ctx)
        if image.page is not None:
            _layout(ctx)
        if image.words or image.page is not None:
            _ocr(ctx)
        if things:
            _gqa(ctx)
            _rec_and_reg(ctx, things)
            _grounded(ctx, things)
            _detection(ctx, things)
            _relation(ctx, things)
            _conversation(ctx, questions)
        if image.people:
            _keypoints(ctx)
        return dict(ctx.out)


@dataclass
class _Context:
    annotator: Annotator
    image: WorldImage
    path: str
    rng: random.Random
    out: defaultdict[str, list[Record]] = field(default_factory=lambda: defaultdict(list))

    def rid(self, task: str, k: int | str = 0) -> str:
        return f"{self.annotator.split}-{self.image.name}-{task}-{k}"

    def add(self, task: str, rid: str, turns: list[Turn], meta: Mapping[str, Any]) -> None:
        """Keep the record if `records.validate_record` accepts it (a box too thin to survive two decimals
        would not); count it by reason otherwise."""
        record = make_record(rid, self.path, self.image.size, task, turns, {"image_id": self.image.image_id, **meta})
        try:
            validate_record(record, None)
        except InvalidRecord as err:
            self.annotator.skipped[f"{task}:{err.reason}"] += 1
            return
        self.out[task].append(record)

    def box(self, px: PixelBox) -> Box:
        return box_from_pixels(px, *self.image.size)

    @property
    def seed(self) -> int:
        return self.annotator.seed


# ----------------------------------------------------------------------------- answers in words


def _vqa(ctx: _Context, questions: Mapping[str, list[Question]]) -> None:
    task = typed_task("vqa", VQATask)
    for qtype, candidates in sorted(questions.items()):
        question = ctx.annotator.vqa.pick(candidates, ctx.rng)
        if question is None:
            continue
        rid = ctx.rid("vqa", qtype)
        turns = task.build(question.text, question.answer, seed=ctx.seed, key=rid)
        ctx.add("vqa", rid, turns, {"answers": [question.answer], "question_type": qtype})


def _gqa(ctx: _Context) -> None:
    task = typed_task("gqa", VQATask)
    candidates = gqa_candidates(ctx.image, ctx.rng)
    types = sorted(candidates)
    for qtype in ctx.rng.sample(types, k=min(RECORDS_PER_IMAGE["gqa"], len(types))):
        question = ctx.annotator.gqa.pick(candidates[qtype], ctx.rng)
        if question is None:
            continue
        rid = ctx.rid("gqa", qtype)
        turns = task.build(question.text, question.answer, seed=ctx.seed, key=rid)
        ctx.add("gqa", rid, turns, {"answer": question.answer, "question_type": qtype})


def _captions(ctx: _Context) -> None:
    task = typed_task("caption", CaptionTask)
    shorts = short_captions(ctx.image)
    rid = ctx.rid("caption", "short")
    caption = shorts[0] if ctx.annotator.held_out else ctx.rng.choice(shorts)
    ctx.add("caption", rid, task.build(caption, seed=ctx.seed, key=rid), {"captions": shorts})
    if not ctx.annotator.held_out:
        rid = ctx.rid("caption", "detailed")
        detailed = detailed_caption(ctx.image)
        ctx.add("caption", rid, task.build(detailed, detailed=True, seed=ctx.seed, key=rid), {"captions": [detailed]})
    for domain in CAPTION_DOMAINS:
        text = synthetic_caption(ctx.image) if domain == "synthetic" else real_caption(ctx.image, ctx.rng)
        ctx.out[f"caption_{domain}"].append({
            "id": ctx.rid(f"caption_{domain}"), "image": ctx.path, "width": ctx.image.width,
            "height": ctx.image.height, "task": "caption_pretrain", "caption": text, "domain": domain,
        })


# ----------------------------------------------------------------------------- regions


def _rec_and_reg(ctx: _Context, things: Sequence[Thing]) -> None:
    rec, reg = typed_task("rec", RECTask), typed_task("reg", REGTask)
    order = list(things)
    ctx.rng.shuffle(order)
    made = 0
    for t in order:
        if made == RECORDS_PER_IMAGE["rec"]:
            break
        expression = refer(t, things, ctx.image.size, ctx.rng)
        if expression is None:
            continue
        rid = ctx.rid("rec", made)
        turns = rec.build(f"the {expression}", ctx.box(t.box), seed=ctx.seed, key=rid)
        ctx.add("rec", rid, turns, {"box": list(t.box), "expression": f"the {expression}"})
        made += 1
    for k, t in enumerate(order[: RECORDS_PER_IMAGE["reg"]]):
        rid = ctx.rid("reg", k)
        description = full_phrase(t)
        turns = reg.build(ctx.box(t.box), description, seed=ctx.seed, key=rid)
        ctx.add("reg", rid, turns, {"captions": [description, name_of(t)], "box": list(t.box)})


def _groups(things: Sequence[Thing]) -> list[tuple[str, list[Thing]]]:
    """Phrases of a grounded caption: one per (kind, colour) of shapes (plural when several), one per
    person; the groups in reading order of their first member."""
    groups: dict[tuple[str, str, int], list[Thing]] = {}
    for t in sorted(things, key=lambda t: (t.box[1], t.box[0])):
        groups.setdefault((t.noun, t.colour, t.index if t.is_person else -1), []).append(t)
    out = []
    for (noun, colour, _), members in groups.items():
        if noun == PERSON:
            text = f"a person in {colour}"
        elif len(members) == 1:
            words = " ".join(w for w in (members[0].size, colour, noun) if w and w != "medium")
            text = f"{article(words)} {words}"
        else:
            text = count_phrase(len(members), f"{colour} {noun}", f"{colour} {pluralize(noun)}")
        out.append((text, members))
    return out


def _grounded(ctx: _Context, things: Sequence[Thing]) -> None:
    task = typed_task("grounded_caption", GroundedCaptionTask)
    spans: list[str | Grounding] = []
    phrases = []
    groups = _groups(things)
    for k, (text, members) in enumerate(groups):
        if k:
            spans.append("and" if k == len(groups) - 1 else ",")
        text = text[:1].upper() + text[1:] if k == 0 else text
        ordered = reading_order([(ctx.box(m.box), m.box) for m in members])
        spans.append(Grounding(text, tuple(b for b, _ in ordered)))
        phrases.append({"phrase": text, "boxes": [list(px) for _, px in ordered]})
    spans.append(f"on {background_phrase(ctx.image)}.")
    rid = ctx.rid("grounded_caption")
    ctx.add("grounded_caption", rid, task.build(spans, seed=ctx.seed, key=rid), {"phrases": phrases})


def _box_queries(
    ctx: _Context, task_name: str, items: Sequence[tuple[str, int, PixelBox]]
) -> None:
    """Detection or layout records from (category name, category id, pixel box) items."""
    task = typed_task(task_name, DetectionTask if task_name == "detection" else LayoutTask)
    by_cat: dict[tuple[int, str], list[PixelBox]] = defaultdict(list)
    for name, cid, px in items:
        by_cat[(cid, name)].append(px)
    queries = []
    for (cid, name), pixels in sorted(by_cat.items()):
        ordered = reading_order([(ctx.box(p), p) for p in pixels])
        meta = {"category_id": cid, "category": name, "boxes": [list(p) for _, p in ordered],
                "iscrowd": [0] * len(ordered)}
        queries.append((name, cid, [b for b, _ in ordered], meta))
    if ctx.annotator.held_out:
        for name, cid, boxes, meta in queries:
            rid = ctx.rid(task_name, cid)
            ctx.add(task_name, rid, task.build(name, boxes, seed=ctx.seed, key=rid), meta)
        return
    rid = ctx.rid(task_name)
    turns = join_turns([task.build(name, boxes, seed=ctx.seed, key=f"{rid}#{cid}") for name, cid, boxes, _ in queries])
    ctx.add(task_name, rid, turns, {"queries": [meta for *_, meta in queries]})


def _detection(ctx: _Context, things: Sequence[Thing]) -> None:
    _box_queries(ctx, "detection", [(t.noun, DETECTION_CATEGORIES[t.noun], t.box) for t in things])


def _layout(ctx: _Context) -> None:
    page = ctx.image.page
    if page is not None and page.regions:
        _box_queries(ctx, "layout", [(r.kind, LAYOUT_CLASSES[r.kind], r.box) for r in page.regions])


def _keypoints(ctx: _Context) -> None:
    task = typed_task("keypoints", KeypointsTask)
    for k, person in enumerate(ctx.image.people):
        flat = person.keypoints
        points = {
            name: point_from_pixels((flat[3 * i], flat[3 * i + 1]), *ctx.image.size)
            for i, name in enumerate(COCO_KEYPOINT_NAMES) if flat[3 * i + 2] > 0
        }
        if not points:
            continue
        x1, y1, x2, y2 = person.box
        rid = ctx.rid("keypoints", k)
        turns = task.build(ctx.box(person.box), points, seed=ctx.seed, key=rid)
        meta = {"ann_id": k, "keypoints": list(flat), "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
        ctx.add("keypoints", rid, turns, meta)


def _ocr_words(ctx: _Context) -> list[Word]:
    if ctx.image.page is not None:
        return list(ctx.image.page.words)
    ordered = reading_order([(ctx.box(s.word.box), s.word) for s in ctx.image.words])
    return [w for _, w in ordered]


def _ocr(ctx: _Context) -> None:
    words = _ocr_words(ctx)
    if not words or len(words) > ctx.annotator.ocr_max_words:
        return
    task = typed_task("ocr", OCRTask)
    rid = ctx.rid("ocr")
    turns = task.build([(w.text, ctx.box(w.box)) for w in words], seed=ctx.seed, key=rid)
    ctx.add("ocr", rid, turns, {"words": [{"text": w.text, "box": list(w.box)} for w in words]})


def _relation(ctx: _Context, things: Sequence[Thing]) -> None:
    task = typed_task("relation", RelationTask)
    candidates = []
    for a in things:
        for b in things:
            rel = None if a.index == b.index else main_relation(a.box, b.box)
            if rel is not None:
                # balanced on the predicate; `text` holds the pair, `sentence` the full answer
                answer = f"{name_of(a)} {rel} {name_of(b)}"
                candidates.append(Question("relation", "pair", f"{a.index}:{b.index}", rel, answer))
    question = ctx.annotator.relations.pick(candidates, ctx.rng)
    if question is None:
        return
    a, b = (things[int(i)] for i in question.text.split(":"))
    rid = ctx.rid("relation")
    turns = task.build(name_of(a), ctx.box(a.box), question.answer, name_of(b), ctx.box(b.box), seed=ctx.seed, key=rid)
    ctx.add("relation", rid, turns, {"answer": question.sentence, "predicate": question.answer})


# ----------------------------------------------------------------------------- conversation

_OVERVIEW = ("What objects are in the image?", "What can you see in this picture?", "Describe what is in the image.")


def _conversation(ctx: _Context, candidates: Mapping[str, list[Question]]) -> None:
    """Three or four question/answer pairs: an overview, then questions of two or three types (any
    candidate, not only the balanced pick) with full-sentence answers."""
    task = typed_task("conversation", ConversationTask)
    overview = short_captions(ctx.image)[2]
    turns: list[Mapping[str, object]] = [
        {"from": "human", "value": ctx.rng.choice(_OVERVIEW)}, {"from": "gpt", "value": overview},
    ]
    types = sorted(candidates)
    for qtype in ctx.rng.sample(types, k=min(len(types), ctx.rng.randint(2, 3))):
        question = ctx.rng.choice(candidates[qtype])
        turns += [{"from": "human", "value": question.text}, {"from": "gpt", "value": question.sentence}]
    rid = ctx.rid("conversation")
    ctx.add("conversation", rid, task.build(turns), {})
