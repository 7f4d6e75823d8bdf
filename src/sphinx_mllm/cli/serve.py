"""`sphinx-mllm serve --model PATH [--host 127.0.0.1] [--port 8000]`: the OpenAI-compatible HTTP server.

Binds to 127.0.0.1 unless told otherwise. Images come as `data:` URIs; `--image-root` allows local paths
under one folder, `--allow-url-prefix` allows remote URLs under given prefixes (repeatable).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sphinx_mllm.serving.settings import LOOPBACK_HOSTS, ServerSettings
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The command line -> validated `ServerSettings` (bad values raise `SphinxError`)."""
    return ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name, host=args.host, port=args.port,
        image_root=args.image_root, allowed_url_prefixes=tuple(args.allow_url_prefix or ()),
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_body_bytes=args.max_body_mb * 1024 * 1024, max_image_pixels=args.max_image_pixels,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from sphinx_mllm.serving.app import create_app
    except ImportError as exc:
        raise SphinxError(f"the server needs the 'serve' extra (pip install 'sphinx-mllm[serve]'): {exc}") from None
    from sphinx_mllm.inference.chat import SphinxChat

    settings = settings_from_args(args)
    if settings.host not in LOOPBACK_HOSTS:
        logger.warning("binding to %s: the server has no authentication; anyone who reaches this address can use "
                       "it", settings.host)
    chat = SphinxChat.load(args.model, device=args.device, dtype=args.dtype)
    app = create_app(chat, settings)
    logger.info("serving %s as %r on http://%s:%d/v1", args.model, settings.model_name, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level_uvicorn,
                timeout_graceful_shutdown=5, limit_concurrency=args.max_connections)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (save_pretrained output or a release folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the folder's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: as stored; fp16 -> bf16 on CPU)")
    p.add_argument("--image-root", type=Path, default=None, help="folder local image paths may point into")
    p.add_argument("--allow-url-prefix", action="append", metavar="URL",
                   help="remote image URLs under this prefix are fetched (repeatable; none by default)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests answered by one generate call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to gather a batch")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests before answering 429")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument("--max-body-mb", type=int, default=20, help="largest request body, in MiB")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest image (width x height)")
    p.add_argument("--max-connections", type=int, default=256, help="open connections before uvicorn answers 503")
    p.add_argument("--log-level-uvicorn", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run)
