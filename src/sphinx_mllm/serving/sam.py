"""Optional masks for the boxes of an answer, from a local Segment Anything (SAM) checkpoint.

SAM comes from transformers (`SamModel`) with weights from a local folder (`save_pretrained` layout:
`config.json`, `model.safetensors`, `preprocessor_config.json`); nothing is downloaded. Pre-processing uses
transformers' Pillow image processor (`SamImageProcessorPil`), so torchvision is not needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)

PixelBox = tuple[float, float, float, float]


class SamMasker:
    """Boxes in pixels of an image -> one boolean mask per box (`[N, H, W]`)."""

    def __init__(self, model: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.image_processor = image_processor

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> SamMasker:
        """From a local folder; `SphinxError` naming what is missing otherwise."""
        folder = Path(path)
        missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).is_file()]
        if not folder.is_dir() or missing:
            raise SphinxError(f"SAM folder {folder} is not usable: missing {missing or 'the folder'}")
        try:
            from transformers import SamModel
            from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
        except ImportError as exc:
            raise SphinxError(f"this transformers has no SAM support: {exc}") from None
        try:
            model = SamModel.from_pretrained(str(folder), local_files_only=True).to(device)
            processor = SamImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SphinxError(f"cannot load SAM from {folder}: {exc}") from None
        logger.info("loaded SAM from %s", folder)
        return cls(model, processor)

    def masks(self, image: Image.Image, boxes: Sequence[PixelBox]) -> np.ndarray:
        """One mask per box, at the image's size (boxes are `(x1, y1, x2, y2)` pixels)."""
        import torch

        width, height = image.size
        if not boxes:
            return np.zeros((0, height, width), dtype=bool)
        inputs = self.image_processor(images=image.convert("RGB"), return_tensors="pt")
        # The processor resizes the longest side to `longest_edge` (rounded); boxes follow, axis by axis.
        scale = self.image_processor.size["longest_edge"] / max(width, height)
        sx, sy = int(width * scale + 0.5) / width, int(height * scale + 0.5) / height
        prompt = torch.tensor([[[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]],
                              dtype=torch.float32)  # [1, N, 4]
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(device), input_boxes=prompt.to(device),
                             multimask_output=False)
        masks = self.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]  # [N, 1, H, W]
        return masks[:, 0].numpy().astype(bool)


def overlay_masks(image: Image.Image, masks: np.ndarray, colors: Sequence[tuple[int, int, int]],
                  alpha: float = 0.45) -> Image.Image:
    """`image` with each mask tinted in its colour (cycled), blended at `alpha`."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, mask in enumerate(masks):
        color = np.asarray(colors[i % len(colors)], dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
