"""Preprocessing: images/s through our image pipeline (load, pad to square, bicubic resize, CLIP normalisation,
then the views the model cuts) against transformers' LLaVA-NeXT image processor, Pillow path
(`LlavaNextImageProcessorPil`: resize, pad, any-res tiling, normalisation), at the same output: a 448 px square
as 1 global + 2 x 2 tiles of 224 px ([N, 5, 3, 224, 224]). Inputs are 640 x 480 and 480 x 640 photos-like
images, either already decoded (PIL) or JPEG files (decoding included). Runs interleaved, with torch on one
thread (as in DataLoader workers, where training runs preprocessing) and at the bench's thread count; Pillow
and numpy work on one thread either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import BenchContext, command_line, interleaved, main_for, table

NAME = "preprocessing"
IMAGE_SIZE, VIEW, GRID = 448, 224, 2


def synthetic_photos(count: int, folder: Path) -> list[Path]:
    """JPEGs with photo-like content (smooth gradients plus noise, so JPEG decoding does real work)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = (640, 480) if i % 2 == 0 else (480, 640)
        path = folder / f"photo_{i:03d}_{w}x{h}.jpg"
        if not path.is_file():
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
            noise = rng.normal(0, 25, (h, w, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def ours_pipeline(image_size: int) -> Any:
    from sphinx_mllm.processing.image import ImagePreprocessor
    from sphinx_mllm.processing.views import make_views

    pre = ImagePreprocessor(image_size=image_size)

    def call(images: list[Any]) -> torch.Tensor:
        pixels, _ = pre(images)  # [N, 3, S, S]
        return make_views(pixels, VIEW, GRID)  # [N, 5, 3, 224, 224]

    return call


def peer_pipeline() -> Any:
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    proc = LlavaNextImageProcessorPil(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW},
                                      image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])

    def call(images: list[Any]) -> torch.Tensor:
        pil = [im if isinstance(im, Image.Image) else Image.open(im).convert("RGB") for im in images]
        return proc(pil, return_tensors="pt")["pixel_values"]  # [N, 5, 3, 224, 224]

    return call


def run(ctx: BenchContext) -> dict[str, Any]:
    count = 4 if ctx.smoke else 32
    paths = synthetic_photos(count, ctx.work_dir / "photos")
    decoded = []
    for p in paths:
        with Image.open(p) as im:
            decoded.append(im.convert("RGB"))
    ours, peer = ours_pipeline(IMAGE_SIZE), peer_pipeline()
    shapes = {"ours": tuple(ours(decoded[:1]).shape[1:]), "peer": tuple(peer(decoded[:1]).shape[1:])}
    rows = []
    # 1 thread is how preprocessing runs in training (DataLoader workers set torch to one thread each).
    for threads in dict.fromkeys((1, ctx.threads)):
        torch.set_num_threads(threads)
        for source, items in (("decoded PIL", decoded), ("JPEG files", paths)):
            ctx.settle()
            timings = interleaved({"ours": lambda items=items: ours(items), "peer": lambda items=items: peer(items)},
                                  warmup=0 if ctx.smoke else 1, repeats=ctx.reps(full=5, smoke=1))
            for who in ("ours", "peer"):
                rows.append({"input": source, "threads": threads, "model": who, "images": len(items),
                             "output_per_image": list(shapes[who]), "images_per_s": len(items) / timings[who].median,
                             "timing": timings[who].to_dict()})
            rows[-2]["vs_peer"] = rows[-2]["images_per_s"] / rows[-1]["images_per_s"]
    torch.set_num_threads(ctx.threads)
    title = (f"Preprocessing, {count} images 640x480 / 480x640 -> 1 + 2x2 views of 224 px "
             f"(peer: LlavaNextImageProcessorPil; ratio > 1: ours faster)")
    return {"rows": rows, "tables": table(title, rows, ["input", "threads", "model", "images_per_s", "vs_peer"])}


def command(ctx: BenchContext) -> str:
    return command_line("bench.preprocessing", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))
