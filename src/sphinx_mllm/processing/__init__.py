"""L1: pixels (pad, resize, normalise; views), chat template, tokenizer and the processor."""

from sphinx_mllm.processing.image import BadImageError, ImagePreprocessor, load_image, pad_to_square
from sphinx_mllm.processing.processor import IGNORE_INDEX, SphinxProcessor, load_tokenizer
from sphinx_mllm.processing.template import TEMPLATES, ChatTemplate, get_template, render
from sphinx_mllm.processing.views import make_views

__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "BadImageError", "ChatTemplate", "ImagePreprocessor", "SphinxProcessor",
    "get_template", "load_image", "load_tokenizer", "make_views", "pad_to_square", "render",
]
