"""L6 inference: `SphinxChat` (load, batched generate, stream, the release's `generate_response`), a
multi-turn `ChatSession`, and drawing of an answer's boxes and keypoints on the original image."""

from sphinx_mllm.inference.chat import (
    ChatSession,
    Generation,
    GenerationConfig,
    SphinxChat,
    TextStream,
    qas_to_messages,
)
from sphinx_mllm.inference.draw import PixelGrounding, answer_groundings, draw_answer, format_groundings

__all__ = [
    "ChatSession", "Generation", "GenerationConfig", "PixelGrounding", "SphinxChat", "TextStream", "answer_groundings",
    "draw_answer", "format_groundings", "qas_to_messages",
]
