"""Pre-training the world preset's vision encoders on world images, each by a different paradigm, before
they are frozen (SPHINX's mixing of visual embeddings: different architectures, objectives, granularity).

- `convnext` (ConvNeXt, 224 px views): dense *supervised semantics*. Every cell of its 7 x 7 map learns
  what object sits there: category, colour, size, pose and which word is written, for two slots (things,
  words), with the fields weighted (`FIELD_WEIGHTS`), on the cell that holds the object's centre. Most steps
  train only the category, on the middle token of small windows, each centred on one shape or person at the
  offset the views give it (`ObjectWindows`); every few steps train every field on every cell of whole views.
- `dinov2` (a DINOv2 ViT, 112 px views): *masked dense geometry*. With 15% of its patches masked, every
  cell learns where its object is: box corners and the 17 keypoints of a person, each as a distribution
  over the hundredths "0.00".."1.00" the LLM writes (so a coordinate is linearly readable from a token).
- `clip` (a CLIP ViT, 112 px views): *contrastive image-text*. Its class token is matched against a small
  text transformer over the world's synthetic captions (InfoNCE both ways), CLIP's own objective.

Labels come from the generator (`sphinx_mllm.world.dense`); pixels go through exactly the processor's
pipeline and the model's view cutting, so the encoders see in training what they see in the model.
Everything is seeded: the same seed and data give the same weights on the same machine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sphinx_mllm.config import EncoderSpec, SphinxConfig
from sphinx_mllm.processing import ImagePreprocessor
from sphinx_mllm.processing.image import PAD_FILL, normalize_pixels
from sphinx_mllm.processing.views import make_views, pick_views, resize_square
from sphinx_mllm.utils import SphinxError, get_logger
from sphinx_mllm.vision.encoders import VisionEncoder, build_encoder
from sphinx_mllm.world.canvas import derive_seed
from sphinx_mllm.world.dense import (
    CATEGORIES,
    NUM_KEYPOINTS,
    SLOTS,
    TARGET_FIELDS,
    WORD_VOCAB,
    DenseObject,
    cell_targets,
    dense_objects,
    view_windows,
)
from sphinx_mllm.world.generate import WorldConfig, load_manifest
from sphinx_mllm.world.language import synthetic_caption
from sphinx_mllm.world.scene import KINDS, WorldImage, sample_image
from sphinx_mllm.world.vocab import COLOURS, POSES, SHAPES

log = get_logger(__name__)

BINS = 101
"""Coordinate classes: the hundredths 0.00 .. 1.00 of the LLM's text."""
CLASS_FIELDS: dict[str, int] = {
    "category": len(CATEGORIES) + 1, "colour": len(COLOURS) + 1, "size": 4, "pose": len(POSES) + 1,
    "word": len(WORD_VOCAB) + 1,
}
"""Per-cell classification targets of the semantic encoder (class 0: none)."""
FIELD_WEIGHTS: dict[str, float] = {"category": 1.0, "colour": 1.0, "size": 0.3, "pose": 0.3, "word": 0.3}
"""Loss weights of the semantic fields: what and which colour is where drive the VQA and REC answers; the
harder, rarer fields (sizes, poses, the 300-way word) would otherwise take most of the shared gradient."""


# ----------------------------------------------------------------------------- data


def world_config_of(root: str | Path) -> WorldConfig:
    """The `WorldConfig` a world folder was generated from (its manifest)."""
    m = load_manifest(root)
    return WorldConfig(seed=m["seed"], size=m["size"], image_size=m["image_size"], ocr_max_words=m["ocr_max_words"],
                       counts=m["counts"])


def sample_split(config: WorldConfig, split: str) -> list[WorldImage]:
    """The images of a split with their labels, in generation order, without drawing them (the generator
    seeds each image from the world seed and its identity alone)."""
    images = []
    for kind in KINDS:
        for i in range(config.counts[split].get(kind, 0)):
            name = f"{kind}_{i:06d}"
            rng = random.Random(derive_seed(config.seed, split, kind, i))
            images.append(sample_image(kind, rng, config.image_size, name, 0))
    return images


@dataclass
class WorldImageSet:
    """Training images in memory: padded squares as uint8 `[N, S, S, 3]`, labels and captions."""

    squares: torch.Tensor
    objects: list[list[DenseObject]]
    captions: list[str]

    def __len__(self) -> int:
        return int(self.squares.shape[0])

    @classmethod
    def load(cls, root: str | Path, image_size: int, split: str = "train", limit: int | None = None) -> WorldImageSet:
        """The split's images through the processor's square (pad, resize to `image_size`); `limit` keeps an
        evenly spread subset."""
        root = Path(root)
        config = world_config_of(root)
        images = sample_split(config, split)
        if limit is not None and limit < len(images):
            step = len(images) / limit
            images = [images[int(k * step)] for k in range(limit)]
        pre = ImagePreprocessor(image_size=image_size)
        squares = torch.empty(len(images), image_size, image_size, 3, dtype=torch.uint8)
        for k, image in enumerate(images):
            path = root / "images" / split / f"{image.name}.png"
            if not path.is_file():
                raise SphinxError(f"world image {path} is missing")
            square, _ = pre.square(path)
            squares[k] = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())
        return cls(squares, [dense_objects(im) for im in images], [synthetic_caption(im) for im in images])

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised squares [B, 3, S, S] of the given items: the processor's tensors."""
        return normalize_pixels(self.squares[index])


def view_targets(objects: Sequence[Sequence[DenseObject]], view_grid: int, grid: int, cover: bool = False
                 ) -> dict[str, torch.Tensor]:
    """Per image and view: `{f"{slot}/{field}": [N, V, grid * grid, n]}` (`cover`: see `dense.cell_targets`)."""
    windows = view_windows(view_grid)
    keys = [f"{slot}/{name}" for slot in SLOTS for name in TARGET_FIELDS]
    per_key: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for objs in objects:
        views = [cell_targets(objs, w, grid, cover) for w in windows]
        for k in keys:
            per_key[k].append(np.stack([v[k] for v in views]))
    return {k: torch.from_numpy(np.stack(v)) for k, v in per_key.items()}


# ----------------------------------------------------------------------------- training loop


@dataclass(frozen=True)
class Budget:
    """Optimizer steps, images per step and peak learning rate of one encoder's pre-training."""

    steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise SphinxError(f"bad encoder budget {self}: steps and batch_size >= 1, lr > 0")


@dataclass(frozen=True)
class EncoderPretraining:
    """Budgets of the three paradigms (named by encoder), the seed and bf16 autocast."""

    budgets: dict[str, Budget] = field(default_factory=lambda: {
        "convnext": Budget(400, 32, 3e-3), "dinov2": Budget(400, 32, 1e-3), "clip": Budget(200, 64, 1e-3)})
    seed: int = 0
    bf16: bool = True


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _optimise(params: list[nn.Parameter], budget: Budget, loss_fn: Callable[[int, torch.Tensor], torch.Tensor],
              n_items: int, seed: int, bf16: bool, name: str) -> list[float]:
    """AdamW over `params` for `budget.steps` steps; `loss_fn(step, item_indices)` returns the loss."""
    opt = torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.98), weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_items, generator=gen)
    losses, pos, start = [], 0, time.perf_counter()
    for step in range(budget.steps):
        if pos + budget.batch_size > n_items:
            order, pos = torch.randperm(n_items, generator=gen), 0
        idx = order[pos : pos + budget.batch_size]
        pos += budget.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr(step, budget.steps, budget.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == budget.steps:
            log.info("%s step %d/%d loss %.4f (%.1fs)", name, step + 1, budget.steps,
                     sum(losses[-50:]) / len(losses[-50:]), time.perf_counter() - start)
    return losses


def _soft_bins(values: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Coordinates [...] in [0, 1] -> Gaussian soft labels over the BINS hundredths [..., BINS]."""
    centers = torch.arange(BINS, dtype=torch.float32) / (BINS - 1)
    d = (values.clamp(0, 1).unsqueeze(-1) - centers) * (BINS - 1) / sigma
    w = torch.exp(-0.5 * d * d)
    return w / w.sum(-1, keepdim=True)


def _class_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked cells (0 when none)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), target[mask].long())


def _soft_ce(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft labels over the last dim."""
    return -(soft * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def _soft_loss(logits: torch.Tensor, soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`_soft_ce` over the masked entries (0 when none)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return _soft_ce(logits[mask], soft[mask])


def _random_views(data: WorldImageSet, idx: torch.Tensor, spec: EncoderSpec, view_grid: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view (global or a sub-image) per item: pixels [B, 3, v, v] and the view numbers [B]."""
    pick = torch.randint(0, 1 + view_grid * view_grid, (len(idx),), generator=gen)
    return pick_views(data.pixels(idx), spec.view_size, view_grid, pick), pick


# ----------------------------------------------------------------------------- paradigm 1: dense semantics


class SemanticHeads(nn.Module):
    """Linear per-cell classifiers on a token map: presence and `CLASS_FIELDS` for each slot."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({f"{slot}_{name}": nn.Linear(width, n) for slot in SLOTS
                                    for name, n in {"present": 1, **CLASS_FIELDS}.items()})

    def loss(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor], fields: Sequence[str] = tuple(CLASS_FIELDS)
             ) -> torch.Tensor:
        """tokens [B, T, C]; targets `{f"{slot}/{field}": [B, T, n]}` -> summed mean losses of presence and
        `fields`."""
        total = tokens.new_zeros((), dtype=torch.float32)
        for slot in SLOTS:
            present = targets[f"{slot}/present"][..., 0]  # [B, T]
            logit = self.heads[f"{slot}_present"](tokens)[..., 0].float()
            total = total + F.binary_cross_entropy_with_logits(logit, present)
            for name in fields:
                target = targets[f"{slot}/{name}"][..., 0]
                total = total + FIELD_WEIGHTS[name] * _class_loss(self.heads[f"{slot}_{name}"](tokens), target,
                                                                  target > 0)
        return total


WINDOW_CATEGORIES: tuple[int, ...] = tuple(CATEGORIES.index(k) for k in (*SHAPES, "person"))
"""The categories that object windows centre on: the shapes and people the VQA and REC questions name."""


def _middle_cell(cells: int) -> int:
    """Raster index of the middle cell of a `cells` x `cells` window."""
    return (cells // 2) * (cells + 1)


@dataclass
class ObjectWindows:
    """`cells` x `cells`-cell windows of the full-resolution square, each centred (to the cell) on one shape or
    person: the item, the window's top-left pixel and the targets of its middle cell."""

    items: torch.Tensor  # [N] indices into the WorldImageSet
    corners: torch.Tensor  # [N, 2] (x, y) pixel of the window's top-left in the views' square (may be < 0)
    targets: dict[str, torch.Tensor]  # {f"{slot}/{field}": [N, 1, n]} of the middle cell (centre labels)
    cells: int
    cell_px: int
    side: int  # the square the sub-views are cut from: view_size * view_grid

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def middle(self) -> int:
        """Raster index of the middle cell among a window's `cells * cells` tokens."""
        return _middle_cell(self.cells)

    @classmethod
    def build(cls, data: WorldImageSet, view_size: int, view_grid: int, grid: int, cells: int = 3) -> ObjectWindows:
        """One window per shape or person of `data`, aligned to the sub-views' cell grid (cells of
        `view_size / grid` pixels of the `view_size * view_grid` square): the encoder meets each object at the
        sub-cell offset the model's views give it."""
        if cells % 2 != 1 or not 1 <= cells <= grid:
            raise SphinxError(f"object windows need an odd number of cells in 1..{grid}, got {cells}")
        side = view_size * view_grid
        cell_px, half, middle = view_size // grid, cells // 2, _middle_cell(cells)
        items, corners, rows = [], [], []
        for i, objs in enumerate(data.objects):
            for obj in objs:
                if obj.slot != "thing" or obj.category not in WINDOW_CATEGORIES:
                    continue
                col = min(int(obj.center[0] * side) // cell_px, side // cell_px - 1)
                row = min(int(obj.center[1] * side) // cell_px, side // cell_px - 1)
                x0, y0 = (col - half) * cell_px, (row - half) * cell_px
                tgt = cell_targets(objs, (x0 / side, y0 / side, cells * cell_px / side), cells)
                if tgt["thing/present"][middle, 0] == 0:  # a centre on a cell border, rounded the other way
                    continue
                items.append(i)
                corners.append((x0, y0))
                rows.append({k: v[middle : middle + 1] for k, v in tgt.items()})
        if not items:
            raise SphinxError("object windows: the images hold no shape or person")
        targets = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        return cls(torch.tensor(items), torch.tensor(corners), targets, cells, cell_px, side)

    def pixels(self, data: WorldImageSet, index: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised windows [B, 3, w, w] of the square the sub-views are cut from; what lies outside it is
        the processor's pad colour. Images of another size are resized first, as the views resize them."""
        pad = torch.tensor(PAD_FILL, dtype=torch.uint8).view(1, 1, 3)
        if data.squares.shape[1] == self.side:  # crop uint8 in place, then normalise only the windows
            return normalize_pixels(self._crop(data.squares, self.items[index], index, pad[0, 0]))
        squares = resize_square(data.pixels(self.items[index]), self.side).permute(0, 2, 3, 1)  # [B, S, S, 3]
        fill = normalize_pixels(pad)[:, 0, 0]
        return self._crop(squares, torch.arange(len(index)), index, fill).permute(0, 3, 1, 2).contiguous()

    def _crop(self, squares: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, fill: torch.Tensor
              ) -> torch.Tensor:
        """Window `index[k]` of square `squares[rows[k]]` ([N, S, S, 3]) -> [B, w, w, 3], `fill` [3] outside."""
        w = self.cells * self.cell_px
        out = fill.expand(len(index), w, w, 3).clone()
        for k, (row, n) in enumerate(zip(rows.tolist(), index.tolist(), strict=True)):
            x0, y0 = (int(v) for v in self.corners[n])
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, self.side), min(y0 + w, self.side)
            out[k, ya - y0 : yb - y0, xa - x0 : xb - x0] = squares[row, ya:yb, xa:xb]
        return out


def pretrain_semantic(encoder: VisionEncoder, data: WorldImageSet, targets: dict[str, torch.Tensor], view_grid: int,
                      budget: Budget, seed: int, bf16: bool = True, view_every: int = 4, window_cells: int = 3,
                      window_fields: Sequence[str] = ("category",)) -> tuple[list[float], SemanticHeads]:
    """Dense supervised semantics (see the module docstring), in two kinds of steps: most steps train presence and
    `window_fields` on the middle token of `2 * batch_size` object windows (`ObjectWindows`), every
    `view_every`-th step trains every field on every cell of `batch_size` whole random views (`targets`). A
    stride-32 net learns "which shape" on whole views only very slowly, since each object sits at a different
    sub-cell offset and most cells are empty or a person; the windows give it one object per example, and the
    view steps carry that to the views the model cuts (docs/world_report.md, sixth round). Every field trained
    beside the category costs shape recall, hence the category alone on windows (seventh round). `view_every=1`
    trains on whole views alone."""
    spec = encoder.spec
    if spec.grid is None or spec.input_size != spec.view_size:
        raise SphinxError(f"encoder {spec.name!r}: semantic pre-training needs a spatial map at its view size")
    if view_every < 1:
        raise SphinxError(f"view_every must be >= 1, got {view_every}")
    heads = SemanticHeads(spec.width)
    gen = torch.Generator().manual_seed(derive_seed(seed, spec.name) % (1 << 63))
    windows = ObjectWindows.build(data, spec.view_size, view_grid, spec.grid, window_cells) if view_every > 1 else None

    def loss_fn(step: int, idx: torch.Tensor) -> torch.Tensor:
        if windows is None or step % view_every == view_every - 1:
            views, which = _random_views(data, idx, spec, view_grid, gen)
            return heads.loss(encoder.encode(views), {k: t[idx, which] for k, t in targets.items()})
        pick = torch.randint(0, len(windows), (2 * len(idx),), generator=gen)
        tokens = encoder.encode(windows.pixels(data, pick))[:, windows.middle : windows.middle + 1]  # [2B, 1, C]
        return heads.loss(tokens, {k: t[pick] for k, t in windows.targets.items()}, window_fields)

    params = [*encoder.parameters(), *heads.parameters()]
    return _optimise(params, budget, loss_fn, len(data), seed, bf16, f"{spec.name} (semantics)"), heads


# ----------------------------------------------------------------------------- paradigm 2: masked geometry


class GeometryHeads(nn.Module):
    """Per-cell presence, category, box corners and keypoints (as BINS-way distributions) of each slot."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.present = nn.Linear(width, len(SLOTS))
        self.category = nn.Linear(width, len(SLOTS) * (len(CATEGORIES) + 1))
        self.box = nn.Linear(width, len(SLOTS) * 4 * BINS)
        self.keypoints = nn.Linear(width, NUM_KEYPOINTS * 2 * BINS)

    def loss(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """tokens [B, T, C]; the box and keypoint heads run only on the cells that hold an object."""
        present = torch.stack([targets[f"{s}/present"][..., 0] for s in SLOTS], -1)  # [B, T, n]
        total = F.binary_cross_entropy_with_logits(self.present(tokens).float(), present)
        n = len(SLOTS)
        for k, slot in enumerate(SLOTS):
            mask = present[..., k] > 0
            if not bool(mask.any()):
                continue
            cells = tokens[mask]  # [M, C]
            cat = self.category(cells).view(len(cells), n, -1)[:, k]
            total = total + F.cross_entropy(cat.float(), targets[f"{slot}/category"][mask][:, 0].long())
            box = self.box(cells).view(len(cells), n, 4, BINS)[:, k]
            total = total + _soft_ce(box, _soft_bins(targets[f"{slot}/box"][mask]))
        kp = targets["thing/keypoints"].view(*tokens.shape[:2], NUM_KEYPOINTS, 3)
        person = kp[..., 2].amax(-1) > 0  # [B, T]
        if bool(person.any()):
            points = kp[person]  # [P, 17, 3]
            logits = self.keypoints(tokens[person]).view(len(points), NUM_KEYPOINTS, 2, BINS)
            total = total + _soft_loss(logits, _soft_bins(points[..., :2]), points[..., 2] > 0)
        return total


def pretrain_geometry(encoder: VisionEncoder, data: WorldImageSet, targets: dict[str, torch.Tensor], view_grid: int,
                      budget: Budget, seed: int, bf16: bool = True, mask_ratio: float = 0.15
                      ) -> tuple[list[float], GeometryHeads]:
    """Masked dense geometry on whole random views (a ViT: absolute positions come from its embeddings)."""
    spec = encoder.spec
    if spec.family != "dinov2" or spec.grid is None:
        raise SphinxError(f"encoder {spec.name!r}: geometry pre-training needs a DINOv2 ViT")
    heads = GeometryHeads(spec.width)
    gen = torch.Generator().manual_seed(derive_seed(seed, spec.name) % (1 << 63))
    model = encoder.model

    def loss_fn(step: int, idx: torch.Tensor) -> torch.Tensor:
        views, which = _random_views(data, idx, spec, view_grid, gen)
        tgt = {k: t[idx, which] for k, t in targets.items()}
        masked = torch.rand(len(idx), spec.grid * spec.grid, generator=gen) < mask_ratio
        tokens = model(pixel_values=encoder.prepare(views), bool_masked_pos=masked).last_hidden_state
        return heads.loss(tokens[:, 1:], tgt)

    params = [*encoder.parameters(), *heads.parameters()]
    return _optimise(params, budget, loss_fn, len(data), seed, bf16, f"{spec.name} (masked geometry)"), heads


# ----------------------------------------------------------------------------- paradigm 3: contrastive


class CaptionEncoder(nn.Module):
    """A small text transformer: token + position embeddings, `layers` pre-norm blocks, mean pooling."""

    def __init__(self, vocab: int, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] -> [B, width]"""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveHeads(nn.Module):
    """The text tower and both projections of the contrastive objective, with CLIP's learned temperature."""

    def __init__(self, width: int, vocab: int, dim: int = 64) -> None:
        super().__init__()
        self.text = CaptionEncoder(vocab)
        self.image_proj = nn.Linear(width, dim, bias=False)
        self.text_proj = nn.Linear(self.text.embed.embedding_dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, encoder: VisionEncoder, data: WorldImageSet, idx: torch.Tensor, caption_ids: list[list[int]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and caption embeddings [B, dim] of the items (the image's global view)."""
        views = make_views(data.pixels(idx), encoder.spec.view_size, 0)[:, 0]
        cls = encoder.model(pixel_values=encoder.prepare(views)).pooler_output  # post-LN class token
        ids, mask = _caption_batch([caption_ids[int(i)] for i in idx], self.text.max_len)
        return (F.normalize(self.image_proj(cls).float(), dim=-1),
                F.normalize(self.text_proj(self.text(ids, mask)).float(), dim=-1))


def _caption_batch(ids: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(max_len, max(len(t) for t in ids))
    out = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, t in enumerate(ids):
        t = t[:width]
        out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
    return out, mask


def pretrain_contrastive(encoder: VisionEncoder, data: WorldImageSet, caption_ids: list[list[int]], vocab: int,
                         budget: Budget, seed: int, bf16: bool = True, dim: int = 64
                         ) -> tuple[list[float], ContrastiveHeads]:
    """CLIP's objective: the image's class token against its caption, InfoNCE over the batch both ways."""
    spec = encoder.spec
    if spec.family != "clip_vit":
        raise SphinxError(f"encoder {spec.name!r}: contrastive pre-training needs a CLIP ViT")
    torch.manual_seed(derive_seed(seed, spec.name, "text") % (1 << 63))
    heads = ContrastiveHeads(spec.width, vocab, dim)

    def loss_fn(step: int, idx: torch.Tensor) -> torch.Tensor:
        a, b = heads.embed(encoder, data, idx, caption_ids)
        logits = a @ b.T * heads.logit_scale.exp().clamp(max=100)
        labels = torch.arange(len(idx))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    params = [*encoder.parameters(), *heads.parameters()]
    return _optimise(params, budget, loss_fn, len(data), seed, bf16, f"{spec.name} (contrastive)"), heads


# ----------------------------------------------------------------------------- all of them


PARADIGMS: dict[str, str] = {"convnext": "dense semantics", "dinov2": "masked dense geometry",
                             "clip_vit": "contrastive image-text"}
"""Encoder family -> its pre-training paradigm in the world recipe."""


@dataclass
class PretrainedEncoders:
    """Trained adapters by encoder name, their objectives' heads, loss curves and seconds spent."""

    encoders: dict[str, VisionEncoder]
    heads: dict[str, nn.Module]
    losses: dict[str, list[float]]
    seconds: dict[str, float]


def shared_grid(specs: Sequence[EncoderSpec]) -> int:
    """The one token grid side of the world encoders (those with a grid); refuses several."""
    grids = {s.grid for s in specs if s.grid is not None}
    if len(grids) != 1:
        raise SphinxError(f"world encoders must share one token grid, got {sorted(grids)}")
    return grids.pop()


def pretrain_encoders(config: SphinxConfig, data: WorldImageSet, tokenize: Callable[[str], list[int]], vocab: int,
                      settings: EncoderPretraining = EncoderPretraining()) -> PretrainedEncoders:
    """Pre-train every encoder of `config` by its family's paradigm (`PARADIGMS`) on `data`."""
    specs = config.encoder_specs
    missing = sorted({s.name for s in specs} - set(settings.budgets))
    if missing:
        raise SphinxError(f"no pre-training budget for encoder(s) {missing}")
    # Centre labels for both dense paradigms. Geometry reads only object-centre cells, where cover and centre
    # labels agree (tests/test_world_recipe_parts.py). Semantics learned fewer shapes on cover labels (a stick
    # figure's box puts `person` on many cells; docs/world_report.md, seventh round).
    targets = view_targets(data.objects, config.view_grid, shared_grid(specs))
    caption_ids = [tokenize(c) for c in data.captions]
    out = PretrainedEncoders({}, {}, {}, {})
    for spec in specs:
        torch.manual_seed(derive_seed(settings.seed, spec.name, "init") % (1 << 63))
        encoder = build_encoder(spec)
        encoder.train()
        budget, start = settings.budgets[spec.name], time.perf_counter()
        heads: nn.Module
        if spec.family == "convnext":
            losses, heads = pretrain_semantic(encoder, data, targets, config.view_grid, budget, settings.seed,
                                              settings.bf16)
        elif spec.family == "dinov2":
            losses, heads = pretrain_geometry(encoder, data, targets, config.view_grid, budget, settings.seed,
                                              settings.bf16)
        elif spec.family == "clip_vit":
            losses, heads = pretrain_contrastive(encoder, data, caption_ids, vocab, budget, settings.seed,
                                                 settings.bf16)
        else:
            raise SphinxError(f"encoder {spec.name!r}: no world pre-training for the {spec.family} family")
        encoder.eval().requires_grad_(False)
        out.encoders[spec.name] = encoder
        out.heads[spec.name] = heads.eval().requires_grad_(False)
        out.losses[spec.name] = losses
        out.seconds[spec.name] = time.perf_counter() - start
        log.info("pre-trained %s (%s) in %.1fs", spec.name, PARADIGMS[spec.family], out.seconds[spec.name])
    return out


# ----------------------------------------------------------------------------- held-out probes


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes [..., 4] (x1, y1, x2, y2) pairwise along the leading dims."""
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


class _Tally:
    """Hit rates by name."""

    def __init__(self) -> None:
        self.counts: dict[str, list[float]] = {}

    def add(self, key: str, hits: torch.Tensor) -> None:
        acc = self.counts.setdefault(key, [0.0, 0.0])
        acc[0] += float(hits.float().sum())
        acc[1] += hits.numel()

    def rates(self) -> dict[str, float]:
        return {k: s / max(n, 1.0) for k, (s, n) in self.counts.items()}


@torch.no_grad()
def probe_encoders(pre: PretrainedEncoders, config: SphinxConfig, data: WorldImageSet,
                   tokenize: Callable[[str], list[int]], batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Held-out quality of each encoder through its own objective's heads: semantic accuracies, box IoU of the
    geometry cells (global view) and caption retrieval among 64 of the contrastive one. `pre` is what
    `pretrain_encoders` returns: encoders and heads already frozen in eval mode, as the model's tower runs them."""
    specs = {s.name: s for s in config.encoder_specs}
    grid = shared_grid(list(specs.values()))
    targets = view_targets(data.objects, config.view_grid, grid)
    caption_ids = [tokenize(c) for c in data.captions]
    out: dict[str, dict[str, float]] = {}
    for name, encoder in pre.encoders.items():
        heads, spec, tally = pre.heads[name], specs[name], _Tally()
        if isinstance(heads, ContrastiveHeads):
            for start in range(0, len(data) - 1, 64):
                idx = torch.arange(start, min(len(data), start + 64))
                a, b = heads.embed(encoder, data, idx, caption_ids)
                tally.add("retrieval_top1", (a @ b.T).argmax(-1) == torch.arange(len(idx)))
        else:
            for start in range(0, len(data), batch_size):
                idx = torch.arange(start, min(len(data), start + batch_size))
                views = make_views(data.pixels(idx), spec.view_size, config.view_grid).flatten(0, 1)
                tokens = encoder(views)
                tokens = tokens[:, 1:] if spec.has_cls else tokens  # [B * V, g*g, C]
                tgt = {k: t[idx].flatten(0, 1) for k, t in targets.items()}
                _probe_batch(heads, tokens, tgt, config.num_views, tally.add)
        rates = tally.rates()  # per-category recalls last, in `CATEGORIES` order
        out[name] = dict(sorted(rates.items(), key=lambda kv: (
            "/" in kv[0], CATEGORIES.index(kv[0].split("/", 1)[1]) if "/" in kv[0] else 0)))
    return out


_SHAPE_CLASSES = torch.tensor([CATEGORIES.index(k) + 1 for k in SHAPES])


def _category_recalls(pred: torch.Tensor, target: torch.Tensor, add: Callable[[str, torch.Tensor], None]) -> None:
    """Per-category recall of the thing slot, and over the shapes alone: the mean `thing_category` hides a head
    that answers the most frequent category (person) everywhere, and VQA questions name shapes."""
    shapes = torch.isin(target, _SHAPE_CLASSES)
    if bool(shapes.any()):
        add("thing_category_shapes", pred[shapes] == target[shapes])
    for c in target[target > 0].unique().tolist():
        cells = target == c
        add(f"thing_category/{CATEGORIES[c - 1]}", pred[cells] == c)


def _probe_batch(heads: nn.Module, tokens: torch.Tensor, tgt: dict[str, torch.Tensor], views: int,
                 add: Callable[[str, torch.Tensor], None]) -> None:
    if isinstance(heads, SemanticHeads):
        for slot in SLOTS:
            present = tgt[f"{slot}/present"][..., 0] > 0
            add(f"{slot}_present", (heads.heads[f"{slot}_present"](tokens)[..., 0] > 0) == present)
            for name in ("category", "colour", "word") if slot == "word" else ("category", "colour", "size", "pose"):
                target = tgt[f"{slot}/{name}"][..., 0]
                mask = target > 0
                if bool(mask.any()):
                    pred = heads.heads[f"{slot}_{name}"](tokens).argmax(-1)
                    add(f"{slot}_{name}", pred[mask] == target[mask].long())
                    if slot == "thing" and name == "category":
                        _category_recalls(pred, target.long(), add)
    elif isinstance(heads, GeometryHeads):
        b, t, _ = tokens.shape
        boxes = heads.box(tokens).view(b, t, len(SLOTS), 4, BINS).argmax(-1).float() / (BINS - 1)
        is_global = (torch.arange(b) % views == 0).view(b, 1)
        for k, slot in enumerate(SLOTS):
            mask = (tgt[f"{slot}/present"][..., 0] > 0) & is_global
            if bool(mask.any()):
                iou = _box_iou(boxes[:, :, k][mask], tgt[f"{slot}/box"][mask])
                add(f"{slot}_box_iou50_global", iou >= 0.5)
                add(f"{slot}_box_iou70_global", iou >= 0.7)
        kp = tgt["thing/keypoints"].view(b, t, NUM_KEYPOINTS, 3)
        vis = kp[..., 2] > 0
        if bool(vis.any()):
            pred = heads.keypoints(tokens).view(b, t, NUM_KEYPOINTS, 2, BINS).argmax(-1).float() / (BINS - 1)
            err = (pred - kp[..., :2]).abs().max(-1).values[vis]
            add("keypoint_within_0.02", err <= 0.02)
