"""`ServerSettings`: every bound the server enforces, in one validated dataclass.

The defaults suit a single-model server on one machine: small batches, a short queue, loopback only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sphinx_mllm.utils.errors import SphinxError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of the OpenAI-compatible server (see `create_app`)."""

    # -- identity and binding -------------------------------------------------------------------
    model_name: str = "sphinx"  # the id `/v1/models` lists and requests must name
    host: str = "127.0.0.1"
    port: int = 8000
    # -- request bounds -------------------------------------------------------------------------
    max_body_bytes: int = 20 * 1024 * 1024  # checked on Content-Length and while reading, before parsing
    max_image_pixels: int = 40_000_000  # width * height of one decoded image (decompression-bomb guard)
    max_image_bytes: int = 15 * 1024 * 1024  # decoded bytes of one image (data URI, file or download)
    max_messages: int = 64
    max_message_chars: int = 32_000  # text of one message
    max_total_chars: int = 100_000  # text of all messages together
    max_tokens_limit: int = 2048  # the largest `max_tokens` a request may ask for
    default_max_tokens: int = 512  # when the request gives none
    max_stop_sequences: int = 4
    # -- images from outside the body -----------------------------------------------------------
    image_root: Path | None = None  # local paths (`file://` or plain) are served only from under this folder
    allowed_url_prefixes: tuple[str, ...] = ()  # remote image URLs must start with one of these (empty: none)
    fetch_timeout_s: float = 10.0
    # -- scheduling ----------------------------------------------------------------------------
    max_batch_size: int = 8  # non-streaming requests answered by one `generate` call
    batch_wait_ms: float = 10.0  # how long the scheduler collects requests for a batch
    max_queue: int = 32  # requests waiting (not yet running); more are answered 429
    queue_timeout_s: float = 120.0  # a request that waited this long without starting is answered 503
    disconnect_poll_s: float = 0.25  # how often a waiting request checks whether its client left
    extra_model_ids: tuple[str, ...] = field(default=())  # further names accepted for `model`

    def __post_init__(self) -> None:
        positive = {
            "port": self.port, "max_body_bytes": self.max_body_bytes, "max_image_pixels": self.max_image_pixels,
            "max_image_bytes": self.max_image_bytes, "max_messages": self.max_messages,
            "max_message_chars": self.max_message_chars, "max_total_chars": self.max_total_chars,
            "max_tokens_limit": self.max_tokens_limit, "default_max_tokens": self.default_max_tokens,
            "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
            "queue_timeout_s": self.queue_timeout_s, "fetch_timeout_s": self.fetch_timeout_s,
            "disconnect_poll_s": self.disconnect_poll_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SphinxError(f"server setting {name} must be > 0, got {value}")
        if not 0 < self.port < 65536:
            raise SphinxError(f"server setting port must be in 1..65535, got {self.port}")
        if self.batch_wait_ms < 0:
            raise SphinxError(f"server setting batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SphinxError(f"default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                              f"({self.max_tokens_limit})")
        if not self.model_name:
            raise SphinxError("server setting model_name must not be empty")
        for prefix in self.allowed_url_prefixes:
            if not prefix.startswith(("https://", "http://")) or prefix.count("/") < 3:
                raise SphinxError(f"allowed URL prefix {prefix!r} must be a full http(s) URL with a path, "
                                  "e.g. https://images.example.org/")
        if self.image_root is not None:
            root = Path(self.image_root)
            if not root.is_dir():
                raise SphinxError(f"image root is not a folder: {root}")
            object.__setattr__(self, "image_root", root.resolve())

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_name, *self.extra_model_ids)
