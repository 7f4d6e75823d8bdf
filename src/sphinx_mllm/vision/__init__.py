"""L2: vision encoders (one adapter per family) and the tower that runs them over all views."""

from sphinx_mllm.vision.encoders import ENCODER_CLASSES, VisionEncoder, build_encoder
from sphinx_mllm.vision.tower import VisionTower

__all__ = ["ENCODER_CLASSES", "VisionEncoder", "VisionTower", "build_encoder"]
