"""Binding: the from-scratch LLM learns to read visual tokens from the world's labels before it sees real ones.

SPHINX starts from LLaMA, which already picks out of its context the thing a question names. A small LLM trained
from scratch does not, and learning it behind real, noisy features within the recipe's budget never happened
(docs/world_report.md, rounds one to nine). Here it learns it on *label tokens* first: every kept cell of every view
(`FusionGroup.keep`) becomes the sum of the LLM's own input embeddings of the words that name what the cell holds
("square", "red", "small", "waving", a written word), so the question's words and the image tokens start out in one
space. A CLS token per view stands for the image's aspect ratio. These label tokens go through the model's own
fusion after its projection: its LayerNorm, the kept cells' position embeddings and the views' start/end vectors.

Two phases, measured on the world's VQA (docs/world_report.md, tenth round):

1. *Bare* captions: "square red . large square red . red square top left ...": the answer word follows the word that
   names the object, so picking the token by content is a one-step skill (learned in ~150 steps; behind a question
   template it is a two-step one, and a 4-layer LLM from scratch stays on a plateau for 1000+ steps).
2. Dense dialogs: every candidate VQA / GQA question of a scene (a few per type), with the release's template and
   the tasks' own prompts, several per dialog: the answer position learns to fetch what the named word found.

Scenes are fresh (labels only, no pixels: `world.reading.reading_scenes`), so the stage costs no encoder passes.
`fit_projector` then maps the real encoders' cached features onto the label tokens (ridge regression of the
projection, logistic regression of the cell scorer), so that the real image tokens land where the LLM reads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sphinx_mllm.config import FusionGroup
from sphinx_mllm.data.converters.common import reading_order, typed_task
from sphinx_mllm.fusion import box_phases, cell_centres
from sphinx_mllm.geometry import box_from_pixels, format_box
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import IGNORE_INDEX, SphinxProcessor
from sphinx_mllm.tasks import DetectionTask, RECTask, VQATask
from sphinx_mllm.utils import SphinxError, get_logger
from sphinx_mllm.world import dense
from sphinx_mllm.world.canvas import LANDSCAPE_AND_PORTRAIT
from sphinx_mllm.world.language import cell as cell_name
from sphinx_mllm.world.language import refer, things_of
from sphinx_mllm.world.questions import gqa_candidates, vqa_candidates
from sphinx_mllm.world.scene import PAGE_RATIOS, WorldImage
from sphinx_mllm.world.vocab import COLOURS, POSES, POSITIONS, SHAPES

log = get_logger(__name__)

LABEL_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("thing/category", dense.CATEGORIES), ("thing/colour", tuple(COLOURS)), ("thing/size", dense.SIZE_NAMES),
    ("thing/pose", POSES), ("word/colour", tuple(COLOURS)), ("word/word", (*dense.WORD_VOCAB[:-1], "number")),
)
"""The per-cell labels a label token is made of (`dense.cell_targets` keys, class k -> word `names[k - 1]`)."""
BOX_SCALE = 0.1
"""Scale of a label token's box-phase channels (`FusionGroup.box_frequencies`): about the words' share of its norm."""
ASPECTS: tuple[tuple[int, int], ...] = tuple(dict.fromkeys((*LANDSCAPE_AND_PORTRAIT, *PAGE_RATIOS)))
"""The world's aspect ratios; the CLS label token of each view is learned per aspect (and view)."""


def word_ids(processor: SphinxProcessor) -> Callable[[str], list[int]]:
    """The processor's tokenizer as label tokens and cell positions use it: text -> ids, no special tokens."""
    return lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def aspect_index(size: tuple[int, int]) -> int:
    """The `ASPECTS` entry nearest to an image size (w, h)."""
    ratio = size[0] / size[1]
    return min(range(len(ASPECTS)), key=lambda i: abs(math.log(ratio * ASPECTS[i][1] / ASPECTS[i][0])))


def selecting_group(model: SphinxForConditionalGeneration) -> tuple[FusionGroup, int]:
    """The model's one fusion group with `keep` and its grid (binding needs exactly one)."""
    groups = [(g, grid) for g, grid in model.fusion.groups if g.keep is not None and grid is not None] \
        if model.fusion is not None else []
    if len(model.config.fusion_groups) != 1 or len(groups) != 1:
        raise SphinxError("binding needs a model with a single fusion group that keeps salient cells "
                          "(FusionGroup.keep), like the world-tiny-keep preset")
    return groups[0]


@dataclass
class SceneCells:
    """The kept cells of one image: labels [V, keep, len(LABEL_FIELDS)] (0: none), raster cells [V, keep], aspect,
    which of all the grid's cells hold an object ([V, grid * grid] bool), and the box of what each kept cell holds
    ([V, keep, 4] in the padded square, NaN for none; a thing's box before a word's)."""

    labels: np.ndarray
    cells: np.ndarray
    aspect: int
    held: np.ndarray
    boxes: np.ndarray


GLOBAL_UNNAMED: tuple[int, ...] = tuple(dense.CATEGORIES.index(k) + 1 for k in SHAPES)
"""Category classes the global view's label tokens leave out with `scene_cells(global_shapes=False)`
(`BindingPlan.global_shapes`): the shapes. On the global view's 7 x 7 cells (64 px of the square, shapes at half
size) the ConvNeXt tells shapes apart at chance (0.15; sub-images 0.96). The recipe's default plan does this: on two
seeds it raised VQA, GQA and detection (docs/world_report.md, twelfth round)."""
_CATEGORY_FIELD = [key for key, _ in LABEL_FIELDS].index("thing/category")
"""Column of the category in a `SceneCells.labels` row."""


def scene_cells(objects: Sequence[dense.DenseObject], size: tuple[int, int], view_grid: int, grid: int, keep: int,
                rng: random.Random, global_shapes: bool = True) -> SceneCells:
    """Per view: the cells that hold an object's centre (`dense.cell_targets`, raster order, the first `keep`), filled
    up with random empty cells: what a perfect cell scorer would keep. With `global_shapes=False` the global
    view's labels leave the shape categories out (`GLOBAL_UNNAMED`; colour, size and box stay)."""
    labels, cells, masks, boxes = [], [], [], []
    for v, window in enumerate(dense.view_windows(view_grid)):
        t = dense.cell_targets(objects, window, grid)
        mask = (t["thing/present"][:, 0] > 0) | (t["word/present"][:, 0] > 0)
        held = np.nonzero(mask)[0].tolist()[:keep]
        empty = [c for c in range(grid * grid) if c not in held]
        chosen = sorted(held + rng.sample(empty, keep - len(held)))
        lab = np.stack([t[key][chosen, 0] for key, _ in LABEL_FIELDS], -1)  # [keep, F]
        if v == 0 and not global_shapes:
            lab[np.isin(lab[:, _CATEGORY_FIELD], GLOBAL_UNNAMED), _CATEGORY_FIELD] = 0
        labels.append(lab)
        cells.append(chosen)
        masks.append(mask)
        x0, y0, side = window
        box = np.where(t["thing/present"][chosen, :1] > 0, t["thing/box"][chosen], t["word/box"][chosen])
        box = box * side + np.array([x0, y0, x0, y0], np.float32)  # view frame -> padded square
        box[~mask[chosen]] = np.nan
        boxes.append(box)
    return SceneCells(np.stack(labels).astype(np.int64), np.asarray(cells, np.int64), aspect_index(size),
                      np.stack(masks), np.stack(boxes).astype(np.float32))


class LabelTokens(nn.Module):
    """Label tokens of kept cells through the model's fusion (its LayerNorm, cell positions and view wrappers).

    `cls_z` [V, len(ASPECTS), dim] is the pre-LayerNorm CLS token of each view per aspect; everything else is the
    model's: the LLM's input embeddings name the labels, so their gradient trains the words the questions use too.
    """

    def __init__(self, model: SphinxForConditionalGeneration, tokenize: Callable[[str], list[int]]) -> None:
        super().__init__()
        group, grid = selecting_group(model)
        self.group = group
        dim = model.config.text_config.hidden_size
        self.frequencies = group.box_frequencies or ()
        self.box_width = 16 * len(self.frequencies)  # the leading box-phase channels; 0: none
        self.register_buffer("centres", cell_centres(model.config.view_grid, grid).float(), persistent=False)
        self.cls_z = nn.Parameter(torch.randn(model.config.num_views, len(ASPECTS), dim) * 0.02)
        rows = [[[]] + [tokenize(" " + name) for name in names] for _, names in LABEL_FIELDS]
        width = max(len(r) for field in rows for r in field)
        classes = max(len(field) for field in rows)
        ids = torch.zeros(len(rows), classes, width, dtype=torch.long)
        mask = torch.zeros(len(rows), classes, width)
        for f, field in enumerate(rows):
            for k, toks in enumerate(field):
                ids[f, k, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                mask[f, k, : len(toks)] = 1.0
        self.register_buffer("name_ids", ids, persistent=False)  # [F, classes, width]
        self.register_buffer("name_mask", mask, persistent=False)

    def cell_z(self, embeddings: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None = None,
               cells: torch.Tensor | None = None) -> torch.Tensor:
        """The label token of each cell before the fusion's box gains and LayerNorm. labels [..., V, keep, F];
        with `box_frequencies`, boxes [..., V, keep, 4] (NaN: none) and cells [..., V, keep] -> [..., V, keep, dim]"""
        z = embeddings.new_zeros((*labels.shape[:-1], embeddings.shape[1]))
        for f in range(labels.shape[-1]):
            ids, mask = self.name_ids[f][labels[..., f]], self.name_mask[f][labels[..., f]]  # [..., width]
            z = z + (embeddings[ids] * mask[..., None].to(embeddings.dtype)).sum(-2)
        if self.box_width:
            if boxes is None or cells is None:
                raise SphinxError("this model's label tokens hold boxes (FusionGroup.box_frequencies): "
                                  "pass boxes, cells")
            centres = self.centres.to(z.dtype)[torch.arange(labels.shape[-3], device=cells.device)[:, None], cells]
            present = ~torch.isnan(boxes[..., :1])  # [..., V, keep, 1]
            phases = box_phases(torch.nan_to_num(boxes).to(z.dtype), centres, self.frequencies)  # [..., 16F]
            z = torch.cat([phases * present * BOX_SCALE, z[..., self.box_width:]], dim=-1)
        return z

    def forward(self, model: SphinxForConditionalGeneration, labels: torch.Tensor, cells: torch.Tensor,
                aspects: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """labels [B, V, keep, F], cells [B, V, keep], aspects [B], boxes [B, V, keep, 4] (with box channels)
        -> image tokens [B, num_image_tokens, dim]"""
        assert model.fusion is not None
        b, v, keep, _ = labels.shape
        z = self.cell_z(model.get_input_embeddings().weight, labels, boxes, cells)  # [B, V, keep, dim]
        cls = self.cls_z[torch.arange(v)[None, :], aspects[:, None]]  # [B, V, dim]
        z = torch.cat([cls[:, :, None], z], dim=2).reshape(b * v, keep + 1, -1)
        flat = cells.reshape(b * v, keep)
        norm = model.fusion.projections[self.group.name][1]
        body = model.fusion.place_cells(self.group, norm(model.fusion.modulate(self.group, z, flat)), flat)
        return model.fusion.wrap_views(body)


# ----------------------------------------------------------------------------- the two phases' texts


def bare_caption(image: WorldImage, rng: random.Random, per_thing: int = 4, boxes: bool = False) -> str:
    """Pairs and triples whose last word is read off the token the previous words name, in both orders; with
    `boxes`, also each thing's and sign word's box after its name ("red square [0.10,0.12,0.18,0.20]")."""
    parts = []
    w, h = image.size
    for t in things_of(image):
        if boxes:
            box = format_box(box_from_pixels(t.box, w, h))
            parts.append(rng.choice([f"{t.colour} {t.noun} {box}", f"{t.noun} {t.colour} {box}"]))
        where = cell_name(t.box, image.size)
        extra = t.size if t.size else t.pose
        forms = [f"{t.noun} {t.colour}", f"{extra} {t.noun} {t.colour}", f"{t.noun} {where} {t.colour}",
                 f"{t.colour} {t.noun}", f"{extra} {t.colour} {t.noun}", f"{t.colour} {t.noun} {where}",
                 f"{t.colour} {t.noun} {extra}"]
        parts += rng.sample(forms, min(per_thing, len(forms)))
    for sign in image.words:
        parts.append(f"{sign.colour} word {sign.word.text.lower()}")
        if boxes:
            parts.append(f"word {sign.word.text.lower()} {format_box(box_from_pixels(sign.word.box, w, h))}")
    rng.shuffle(parts)
    return " . ".join(parts) + " ." if parts else "nothing ."


def dense_dialog(image: WorldImage, rng: random.Random, per_type: int = 4, most: int = 8, boxes: bool = False
                 ) -> list[tuple[str, str]]:
    """Up to `most` distinct VQA and GQA questions of a scene (at most `per_type` of each type), as chat turns with
    the tasks' own prompts; with `boxes`, also up to `per_type` REC and detection questions (their tasks' prompts),
    at most a third of the dialog."""
    pool: list[tuple[str, Any]] = []
    if boxes:
        things = things_of(image)
        rec = typed_task("rec", RECTask)
        for t in rng.sample(things, min(per_type, len(things))):
            expression = refer(t, things, image.size, rng)
            if expression is not None:
                pool.append(("rec", rec.build(f"the {expression}", box_from_pixels(t.box, *image.size),
                                              seed=rng.randrange(1 << 30), key=expression)))
        detection = typed_task("detection", DetectionTask)
        kinds = sorted({t.noun for t in things})
        for noun in rng.sample(kinds, min(per_type, len(kinds))):  # every box of a kind, in reading order
            ordered = reading_order([(box_from_pixels(t.box, *image.size), t.box) for t in things if t.noun == noun])
            pool.append(("detection", detection.build(noun, [b for b, _ in ordered], seed=rng.randrange(1 << 30),
                                                      key=noun)))
    for task, candidates in (("vqa", vqa_candidates(image, rng)), ("gqa", gqa_candidates(image, rng))):
        for questions in candidates.values():
            seen: set[str] = set()
            for q in rng.sample(questions, len(questions)):
                if q.text not in seen and len(seen) < per_type:
                    seen.add(q.text)
                    pool.append((task, q))
    boxed = [p for p in pool if p[0] in ("rec", "detection")]
    worded = [p for p in pool if p[0] not in ("rec", "detection")]
    rng.shuffle(boxed)
    rng.shuffle(worded)
    pool = boxed[: most // 3] + worded  # box questions take up to a third of a dialog
    pool = pool[:most]
    rng.shuffle(pool)
    turns: list[tuple[str, str]] = []
    for task, q in pool[:most]:
        built = q if task in ("rec", "detection") else typed_task(task, VQATask).build(
            q.text, q.answer, seed=rng.randrange(1 << 30), key=q.text)
        turns += [(t["from"], t["value"]) for t in built]
    return turns


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class BindingPlan:
    """Steps of each phase, scenes per step, peak lr; `threads` for torch (None: leave as is)."""

    bare_steps: int = 400
    dialog_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    position_words: bool = True  # start the kept cells' position embeddings from their 3 x 3 position's words
    global_shapes: bool = True  # the global view's label tokens name shapes (`GLOBAL_UNNAMED`, `scene_cells`)

    def __post_init__(self) -> None:
        if self.bare_steps < 0 or self.dialog_steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise SphinxError(f"bad binding plan {self}: steps >= 0, batch_size >= 1, lr > 0")


def _batch(items: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


class BindingData:
    """Training items of both phases from a list of scenes (labels only), drawn in order, cycling."""

    def __init__(self, model: SphinxForConditionalGeneration, processor: SphinxProcessor,
                 scenes: Sequence[WorldImage], seed: int, global_shapes: bool = True) -> None:
        if not scenes:
            raise SphinxError("binding needs at least one scene")
        group, grid = selecting_group(model)
        assert group.keep is not None
        self.processor, self.scenes, self.keep, self.grid = processor, list(scenes), group.keep, grid
        self.view_grid = model.config.view_grid
        self.boxes = group.box_frequencies is not None  # box forms in both phases' texts
        self.rng = random.Random(seed)
        self.global_shapes = global_shapes
        self.next = 0

    def item(self, image: WorldImage, dialog: bool) -> tuple[list[int], list[int], SceneCells]:
        cells = scene_cells(dense.dense_objects(image), image.size, self.view_grid, self.grid, self.keep, self.rng,
                            self.global_shapes)
        if dialog:
            turns = dense_dialog(image, self.rng, boxes=self.boxes)
            if turns:
                ids, labels = self.processor.encode_conversation(turns, True)
                return ids, labels, cells
        ids, labels = self.processor.encode_caption(bare_caption(image, self.rng, boxes=self.boxes), True)
        return ids, labels, cells

    def batch(self, size: int, dialog: bool) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(size):
            items.append(self.item(self.scenes[self.next % len(self.scenes)], dialog))
            self.next += 1
        ids, labels, mask = _batch([(i, lab) for i, lab, _ in items], self.processor.tokenizer.eos_token_id)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "cell_labels": torch.from_numpy(np.stack([c.labels for _, _, c in items])),
                "cells": torch.from_numpy(np.stack([c.cells for _, _, c in items])),
                "boxes": torch.from_numpy(np.stack([c.boxes for _, _, c in items])),
                "aspects": torch.tensor([c.aspect for _, _, c in items])}


def binding_loss(model: SphinxForConditionalGeneration, tokens: LabelTokens, batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """The answer / caption loss of a batch whose images are label tokens."""
    image = tokens(model, batch["cell_labels"], batch["cells"], batch["aspects"], batch["boxes"])
    embeds = model.embed_inputs(batch["input_ids"], None, image_features=image)
    return model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss


def init_cell_positions(model: SphinxForConditionalGeneration, tokenize: Callable[[str], list[int]],
                        scale: float = 0.5, noise: float = 0.25, seed: int = 0) -> None:
    """Set the kept cells' position embeddings (`fusion.cell_pos`) to the LLM's embeddings of the words naming
    where the cell lies in the image ("top left", "center": the position questions' answers, in the square frame),
    standardised to `scale` per channel, plus `noise` so that cells of one region stay apart. Position is then
    read like colour; it comes after the projection, so real features carry it as the label tokens do."""
    group, grid = selecting_group(model)
    assert model.fusion is not None
    table = model.fusion.cell_pos[group.name]  # [V, G*G, dim]
    emb = model.get_input_embeddings().weight.detach().float()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for x0, y0, side in dense.view_windows(model.config.view_grid):
        for cell in range(grid * grid):
            x = x0 + (cell % grid + 0.5) / grid * side
            y = y0 + (cell // grid + 0.5) / grid * side
            name = POSITIONS[min(2, int(y * 3))][min(2, int(x * 3))]
            rows.append(emb[tokenize(" " + name)].sum(0))
    words = torch.stack(rows)  # [V * G*G, dim]
    words = (words - words.mean(-1, keepdim=True)) / words.std(-1, keepdim=True).clamp_min(1e-6) * scale
    with torch.no_grad():
        table.copy_((words.reshape(table.shape) + noise * torch.randn(table.shape, generator=gen)).to(table.dtype))


def train_binding(model: SphinxForConditionalGeneration, processor: SphinxProcessor, scenes: Sequence[WorldImage],
                  plan: BindingPlan, seed: int = 0, bf16: bool = True) -> tuple[LabelTokens, list[float]]:
    """Both phases on `model` in place (the LLM and the fusion's LayerNorm, cell positions and view vectors train;
    the encoders, the projection's Linear and the scorer do not). Returns the label tokens and the loss curve."""
    torch.manual_seed(seed)
    tokenize = word_ids(processor)
    tokens = LabelTokens(model, tokenize)
    if plan.position_words:
        init_cell_positions(model, tokenize, seed=seed)
    data = BindingData(model, processor, scenes, seed, plan.global_shapes)
    assert model.fusion is not None
    group = tokens.group
    fusion_params = [*model.fusion.projections[group.name][1].parameters(), model.fusion.cell_pos[group.name],
                     model.fusion.start_img, model.fusion.end_img]
    params = [*model.language_model.parameters(), *fusion_params, tokens.cls_z]
    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    total, start = plan.bare_steps + plan.dialog_steps, time.perf_counter()
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = plan.lr * min(1.0, (step + 1) / max(1, plan.warmup))
        batch = data.batch(plan.batch_size, dialog=step >= plan.bare_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = binding_loss(model, tokens, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == total:
            phase = "bare" if step < plan.bare_steps else "dialogs"
            log.info("binding (%s) step %d/%d loss %.4f (%.1fs)", phase, step + 1, total,
                     sum(losses[-50:]) / len(losses[-50:]), time.perf_counter() - start)
    model.eval()
    return tokens, losses


# ----------------------------------------------------------------------------- real features onto label tokens


@dataclass
class ProjectorFit:
    """What `fit_projector` measured: R^2 of the projection on its training cells, the scorer's cell accuracy."""

    r2: float
    scorer_accuracy: float
    cells: int


def fit_projector(model: SphinxForConditionalGeneration, tokens: LabelTokens,
                  features: Sequence[dict[str, torch.Tensor]], images: Sequence[WorldImage], seed: int = 0,
                  ridge: float = 10.0, scorer_steps: int = 100, global_shapes: bool = True) -> ProjectorFit:
    """Set the projection's Linear so that real features land on the label tokens, and the cell scorer to the cells
    that hold an object.

    `features[i]` are image i's cached encoder outputs ({encoder: [V, T, C]}). The projection is a ridge regression
    (on standardised channels, folded back) from each view's CLS and label-kept cells to their pre-LayerNorm label
    tokens; the scorer a logistic regression of "holds an object" on every cell. A constant (blank) cache gives the
    mean token. `global_shapes` as in `scene_cells` (the binding plan's).
    """
    if len(features) != len(images) or not images:
        raise SphinxError(f"fit_projector needs one feature set per image, got {len(features)} and {len(images)}")
    group, grid = selecting_group(model)
    assert model.fusion is not None and group.keep is not None
    rng = random.Random(seed)
    emb = model.get_input_embeddings().weight.detach().float()
    xs, zs, present, all_cells = [], [], [], []
    with torch.no_grad():
        for feats, image in zip(features, images):
            fused = model.fusion.group_tokens(group, grid, {k: v.float() for k, v in feats.items()})  # [V, 1+G*G, C]
            cells = scene_cells(dense.dense_objects(image), image.size, model.config.view_grid, grid, group.keep, rng,
                                global_shapes)
            v = fused.shape[0]
            lab = torch.from_numpy(cells.labels)
            kept = model.fusion.keep_cells(fused, torch.from_numpy(cells.cells))  # [V, 1 + keep, C]
            xs.append(kept.reshape(-1, fused.shape[-1]))
            cls = tokens.cls_z.detach()[torch.arange(v), cells.aspect]  # [V, dim]
            z = tokens.cell_z(emb, lab, torch.from_numpy(cells.boxes), torch.from_numpy(cells.cells))  # [V, keep, dim]
            zs.append(torch.cat([cls[:, None], z], 1).reshape(-1, emb.shape[1]))
            present.append(torch.from_numpy(cells.held.astype(np.float32)).reshape(-1))
            all_cells.append(fused[:, 1:].reshape(-1, fused.shape[-1]))
    x, z = torch.cat(xs).double(), torch.cat(zs).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-4)
    xn = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.linalg.solve(xn.T @ xn + ridge * torch.eye(xn.shape[1], dtype=x.dtype), xn.T @ z)  # [C + 1, dim]
    r2 = 1 - float(((xn @ w - z) ** 2).sum() / ((z - z.mean(0)) ** 2).sum().clamp_min(1e-12))
    linear = model.fusion.projections[group.name][0]
    with torch.no_grad():
        weight = (w[:-1] / sd[:, None]).T  # [dim, C]
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_((w[-1] - (mu / sd) @ w[:-1]).to(linear.bias.dtype))
    # the scorer: logistic regression on standardised channels, folded back into the raw-channel Linear
    cells_x = torch.cat(all_cells).float()
    target = torch.cat(present)
    cmu, csd = cells_x.mean(0), cells_x.std(0).clamp_min(1e-4)
    cx = (cells_x - cmu) / csd
    sw = torch.zeros(cx.shape[1], requires_grad=True)
    sb = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([sw, sb], lr=0.05)
    for _ in range(scorer_steps):
        loss = F.binary_cross_entropy_with_logits(cx @ sw + sb, target) + 1e-4 * (sw * sw).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float(((cx @ sw + sb > 0).float() == target).float().mean())
        scorer = model.fusion.scorers[group.name]
        scorer.weight.copy_((sw / csd)[None].to(scorer.weight.dtype))
        scorer.bias.copy_((sb - (cmu / csd) @ sw).reshape(1).to(scorer.bias.dtype))
    return ProjectorFit(r2=r2, scorer_accuracy=accuracy, cells=len(x))


__all__ = ["ASPECTS", "GLOBAL_UNNAMED", "LABEL_FIELDS", "BindingData", "BindingPlan", "LabelTokens", "ProjectorFit",
           "SceneCells", "aspect_index", "bare_caption", "binding_loss", "dense_dialog", "fit_projector",
           "init_cell_positions", "scene_cells", "selecting_group", "train_binding", "word_ids"]
