"""The release's views, computed on normalised pixel tensors (as the release does, inside the model).

Given the padded square `x` [B, 3, S, S] and a view grid g, the views for one encoder of view size v are:
view 0 = `x` resized to v (global), views 1..g*g = the cells of `x` resized to g*v, raster order
(top-left first, row by row). Resizing is bicubic without antialias, like the release's F.interpolate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_square(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize [N, C, H, W] to [N, C, size, size]; no-op when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)


def make_views(x: torch.Tensor, view_size: int, grid: int) -> torch.Tensor:
    """Global view + grid x grid sub-images, all at `view_size`.

    x: [B, 3, S, S] -> [B, 1 + grid*grid, 3, view_size, view_size]
    """
    views = [resize_square(x, view_size)]  # [B, 3, v, v]
    if grid > 0:
        big = resize_square(x, grid * view_size)  # [B, 3, g*v, g*v]
        for row in range(grid):
            for col in range(grid):
                r0, c0 = row * view_size, col * view_size
                views.append(big[..., r0 : r0 + view_size, c0 : c0 + view_size])
    return torch.stack(views, dim=1)


def pick_views(x: torch.Tensor, view_size: int, grid: int, which: torch.Tensor) -> torch.Tensor:
    """View `which[i]` of item i, numbered as in `make_views`, computing only the views asked for (the same
    values as `make_views(x, ...)[arange(B), which]`; each resize is per item).

    x: [B, 3, S, S], which: [B] -> [B, 3, view_size, view_size]
    """
    out = x.new_empty(x.shape[0], x.shape[1], view_size, view_size)
    for view in torch.unique(which).tolist():
        rows = (which == view).nonzero().flatten()
        if view == 0:
            out[rows] = resize_square(x[rows], view_size)
            continue
        if not 1 <= view <= grid * grid:
            raise ValueError(f"view {view} out of range for a {grid} x {grid} grid")
        r0, c0 = (view - 1) // grid * view_size, (view - 1) % grid * view_size
        big = resize_square(x[rows], grid * view_size)  # [n, 3, g*v, g*v]
        out[rows] = big[..., r0 : r0 + view_size, c0 : c0 + view_size]
    return out
