"""L3: the release's fusion of encoder tokens into the LLM's image tokens.

Per view (SPHINX.md section 3): each fusion group aligns its encoders to a common grid (a spatial map
is nearest-upsampled and gets its mean as a leading "CLS"; a grid smaller than the encoder's, our
addition, average-pools adaptively), concatenates them along channels (config order: CLIP | ConvNeXt |
DINOv2), and projects with Linear + LayerNorm. Groups follow each other along the
sequence (Q-Former first), and every view is wrapped by the learned `start_img` / `end_img` vectors.

A group with `keep` (our addition) keeps each view's `keep` most salient cells: a linear `scorers[group]` on the
concatenated channels ranks the cells, the top ones stay in raster order, and each gets the learned embedding
`cell_pos[group][view, cell]` of where it came from after the projection. The ranking is a hard choice (no
gradient reaches the scorer through it): the scorer is fitted on its own (the world recipe fits it to the cells
that hold an object).

With `box_frequencies` (our addition, with `keep`), the first 16 * F projected channels of each kept cell (before
the LayerNorm) are multiplied by `box_gains`: fixed sinusoids of the cell centre's position in the padded square.
Per box corner k (x1, y1, x2, y2) and frequency f, four channels hold
[cos t cos p, sin t sin p, sin t cos p, cos t sin p], with t = 2 pi f * the centre's x (or y) and
p = 2 pi f * (corner - centre), so cos(t + p) and sin(t + p), the corner's own phases, are a fixed linear read.
The projection then only has to know an object's extent around its cell, which a shared Linear can, and not
where the cell is, which it cannot (docs/world_report.md, eleventh round).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sphinx_mllm.config import EncoderSpec, FusionGroup, SphinxConfig


def align_to_grid(tokens: torch.Tensor, spec: EncoderSpec, grid: int) -> torch.Tensor:
    """[N, T, C] -> [N, 1 + grid*grid, C]: bring the spatial tokens to `grid` x `grid`, keep or make a CLS.

    A larger grid nearest-upsamples (the release); a smaller one average-pools adaptively (each output
    token the mean of the encoder tokens its cell overlaps). A map without CLS gets the mean of the
    aligned map, as the release does for ConvNeXt.
    """
    src = spec.grid
    assert src is not None
    cls, spatial = (tokens[:, :1], tokens[:, 1:]) if spec.has_cls else (None, tokens)
    if src != grid:
        n, _, c = spatial.shape
        fmap = spatial.reshape(n, src, src, c)  # [N, g, g, C]
        if grid > src:
            factor = grid // src
            fmap = fmap.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # [N, G, G, C]
        else:
            fmap = F.adaptive_avg_pool2d(fmap.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)  # [N, G, G, C]
        spatial = fmap.reshape(n, grid * grid, c)
    if cls is None:
        cls = spatial.mean(dim=1, keepdim=True)
    return torch.cat([cls, spatial], dim=1)


def view_windows(view_grid: int) -> list[tuple[float, float, float]]:
    """(x0, y0, side) of every view in the padded square, in the release's order: global, then raster."""
    return [(0.0, 0.0, 1.0)] + [(c / view_grid, r / view_grid, 1.0 / view_grid)
                                for r in range(view_grid) for c in range(view_grid)]


def cell_centres(view_grid: int, grid: int) -> torch.Tensor:
    """[V, grid * grid, 2]: (x, y) of every view's cell centres in the padded square (raster cells)."""
    idx = torch.arange(grid * grid, dtype=torch.float64)
    rows = [torch.stack([x0 + (idx % grid + 0.5) / grid * side, y0 + (idx // grid + 0.5) / grid * side], dim=-1)
            for x0, y0, side in view_windows(view_grid)]
    return torch.stack(rows)


def box_gains(view_grid: int, grid: int, frequencies: tuple[float, ...]) -> torch.Tensor:
    """[V, grid * grid, 16 F]: per view and cell, per corner (x1, y1, x2, y2), [cos t, sin t, sin t, cos t] of
    t = 2 pi f * the cell centre's x (corners x1, x2) or y (y1, y2), each block of F frequencies."""
    freqs = torch.tensor(frequencies, dtype=torch.float64)
    centres = cell_centres(view_grid, grid)  # [V, G*G, 2]
    blocks = []
    for k in range(4):
        t = 2 * math.pi * centres[..., k % 2, None] * freqs  # [V, G*G, F]
        blocks.append(torch.cat([t.cos(), t.sin(), t.sin(), t.cos()], dim=-1))
    return torch.cat(blocks, dim=-1).float()


def box_phases(boxes: torch.Tensor, centres: torch.Tensor, frequencies: tuple[float, ...]) -> torch.Tensor:
    """What the projection should give for `box_gains` to make a box: per corner, [cos p, sin p, cos p, sin p] of
    p = 2 pi f * (corner - cell centre). boxes [..., 4], centres [..., 2] (padded square) -> [..., 16 F]"""
    freqs = torch.tensor(frequencies, dtype=boxes.dtype, device=boxes.device)
    blocks = []
    for k in range(4):
        p = 2 * math.pi * (boxes[..., k] - centres[..., k % 2])[..., None] * freqs
        blocks.append(torch.cat([p.cos(), p.sin(), p.cos(), p.sin()], dim=-1))
    return torch.cat(blocks, dim=-1)


class Projection(nn.Sequential):
    """Linear(in -> dim, bias) then LayerNorm(dim): keys `.0.weight`, `.0.bias`, `.1.weight`, `.1.bias`."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__(nn.Linear(in_features, dim), nn.LayerNorm(dim))


class Fusion(nn.Module):
    """Encoder features of all views -> image tokens [B, V * tokens_per_view, dim]."""

    def __init__(self, config: SphinxConfig) -> None:
        super().__init__()
        dim = config.text_config.hidden_size
        self.num_views = config.num_views
        self.specs = {s.name: s for s in config.encoder_specs}
        self.groups: list[tuple[FusionGroup, int | None]] = [(g, config.group_grid(g)) for g in config.fusion_groups]
        self.projections = nn.ModuleDict({g.name: Projection(config.group_width(g), dim) for g, _ in self.groups})
        selecting = [(g, grid) for g, grid in self.groups if g.keep is not None and grid is not None]
        self.scorers = nn.ModuleDict({g.name: nn.Linear(config.group_width(g), 1) for g, _ in selecting})
        self.cell_pos = nn.ParameterDict({g.name: nn.Parameter(torch.randn(self.num_views, grid * grid, dim) * 0.5)
                                          for g, grid in selecting})
        # group -> (grid, frequencies): the gains are a function of the config, computed when used (not weights)
        self.box_gains = {g.name: (grid, g.box_frequencies) for g, grid in selecting if g.box_frequencies is not None}
        self.view_grid = config.view_grid
        # Shared by all views; the release initialises them uniform in [0, 1).
        self.start_img = nn.Parameter(torch.rand(1, 1, dim))
        self.end_img = nn.Parameter(torch.rand(1, 1, dim))
        self.tokens_per_view = config.tokens_per_view

    def group_tokens(self, group: FusionGroup, grid: int | None, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate one group's encoders along channels. -> [N, T_g, sum C_e]"""
        members = [feats[name] for name in group.encoders]
        if len(members) == 1 and (group.grid is None or self.specs[group.encoders[0]].grid is None):
            return members[0]
        assert grid is not None
        aligned = [align_to_grid(f, self.specs[n], grid) for n, f in zip(group.encoders, members)]
        return torch.cat(aligned, dim=-1)

    def select_cells(self, group: FusionGroup, tokens: torch.Tensor) -> torch.Tensor:
        """The raster indices of the `group.keep` highest-scoring cells of each view. [N, 1 + G*G, C] -> [N, keep]"""
        scorer = self.scorers[group.name]
        scores = scorer(tokens[:, 1:].to(scorer.weight.dtype))[..., 0]  # [N, G*G]
        assert group.keep is not None
        return scores.topk(group.keep, dim=1).indices.sort(dim=1).values

    @staticmethod
    def keep_cells(tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The CLS and the given cells of each view. tokens [N, 1 + G*G, C], cells [N, keep] -> [N, 1 + keep, C]"""
        kept = tokens[:, 1:].gather(1, cells[..., None].expand(-1, -1, tokens.shape[-1]))
        return torch.cat([tokens[:, :1], kept], dim=1)

    def modulate(self, group: FusionGroup, z: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Multiply the box-phase channels of the kept cells by their cell's gains (identity without
        `box_frequencies`). z [N, 1 + keep, dim] before the LayerNorm (CLS first), cells [N, keep] -> same"""
        if group.name not in self.box_gains:
            return z
        grid, frequencies = self.box_gains[group.name]
        table = box_gains(self.view_grid, grid, frequencies).to(z.device)  # [V, G*G, 16F]
        views = torch.arange(z.shape[0], device=cells.device) % self.num_views
        gain = table[views[:, None], cells].to(z.dtype)  # [N, keep, 16F]
        width = gain.shape[-1]
        body = torch.cat([z[:, 1:, :width] * gain, z[:, 1:, width:]], dim=-1)
        return torch.cat([z[:, :1], body], dim=1)

    def place_cells(self, group: FusionGroup, projected: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Add each kept cell's position embedding. projected [N, 1 + keep, dim] (CLS first), cells [N, keep]
        (raster indices; item n is view n % V) -> [N, 1 + keep, dim]"""
        table = self.cell_pos[group.name]  # [V, G*G, dim]
        views = torch.arange(projected.shape[0], device=cells.device) % self.num_views
        pos = table[views[:, None], cells]  # [N, keep, dim]
        return torch.cat([projected[:, :1], projected[:, 1:] + pos.to(projected.dtype)], dim=1)

    def wrap_views(self, body: torch.Tensor) -> torch.Tensor:
        """Put `start_img` / `end_img` around each view and lay the views of an image out in sequence.
        body [B * V, T, dim] -> [B, V * (T + 2), dim]"""
        n = body.shape[0]
        view_tokens = torch.cat([self.start_img.expand(n, -1, -1), body, self.end_img.expand(n, -1, -1)], dim=1)
        return view_tokens.reshape(n // self.num_views, self.num_views * view_tokens.shape[1], -1)  # view 0 first

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """{encoder: [B * V, T_e, C_e]} -> [B, V * tokens_per_view, dim]"""
        seq = []
        for group, grid in self.groups:
            proj = self.projections[group.name]
            tokens = self.group_tokens(group, grid, feats)
            cells = self.select_cells(group, tokens) if group.name in self.scorers else None  # [N, keep]
            if cells is not None:
                tokens = self.keep_cells(tokens, cells)  # [N, 1 + keep, C]
            if cells is None:
                seq.append(proj(tokens.to(proj[0].weight.dtype)))  # [N, T_g, dim]
                continue
            z = self.modulate(group, proj[0](tokens.to(proj[0].weight.dtype)), cells)  # [N, 1 + keep, dim]
            seq.append(self.place_cells(group, proj[1](z), cells))
        return self.wrap_views(torch.cat(seq, dim=1))  # body [N, sum T_g, dim]
