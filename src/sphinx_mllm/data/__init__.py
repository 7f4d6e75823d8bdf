"""Data: converters from public data set formats to the project's conversation JSONL (`data.converters`).

Record layout (one JSON object a line): `{"id", "image", "width", "height", "task", "conversations":
[{"from": "human" | "gpt", "value"}], "meta"?}`; caption pre-training records carry `"caption"` and
`"domain"` instead of conversations. Coordinates in text are in the release's padded-square frame.
`meta` holds the ground truth in the reference fields of `sphinx_mllm.tasks.metrics` (pixel boxes), so
`{"id", "width", "height", **meta}` is a record's evaluation reference.
"""

from sphinx_mllm.data.converters import FORMATS, ConversionReport, convert, get_format

__all__ = ["FORMATS", "ConversionReport", "convert", "get_format"]
