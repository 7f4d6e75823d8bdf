"""`sphinx-mllm demo-ui --model PATH [--host 127.0.0.1] [--port 7860] [--sam SAM_FOLDER]`: the web demo.

Chat with an image in the browser; boxes and key points of answers are drawn on it. `--sam` names a local
Segment Anything folder (transformers `SamModel` layout) for a mask per box; without it the mask control
is hidden.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sphinx_mllm.serving.settings import LOOPBACK_HOSTS
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SphinxError("the web demo needs the 'demo' extra (pip install 'sphinx-mllm[demo]')") from None
    from sphinx_mllm.inference.chat import GenerationConfig, SphinxChat
    from sphinx_mllm.serving.demo_ui import build_demo, launch_demo
    from sphinx_mllm.serving.sam import SamMasker

    if args.sam is not None and not args.sam.is_dir():
        raise SphinxError(f"SAM folder not found: {args.sam}")
    defaults = GenerationConfig(max_new_tokens=args.max_length, temperature=args.temperature, top_p=args.top_p)
    if args.host not in LOOPBACK_HOSTS:
        logger.warning("binding to %s: the demo has no authentication; anyone who reaches it can use it", args.host)
    chat = SphinxChat.load(args.model, device=args.device, dtype=args.dtype)
    sam = SamMasker.load(args.sam, device=str(chat.device)) if args.sam is not None else None
    demo = build_demo(chat, sam=sam, defaults=defaults)
    logger.info("web demo on http://%s:%d", args.host, args.port)
    launch_demo(demo, host=args.host, port=args.port, block=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-ui", help="web demo: chat with an image, answers drawn on it (Gradio)",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (save_pretrained output or a release folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--sam", type=Path, default=None, help="local SAM folder (transformers SamModel) for box masks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: as stored; fp16 -> bf16 on CPU)")
    p.add_argument("--max-length", type=int, default=512, help="initial max new tokens")
    p.add_argument("--temperature", type=float, default=0.1, help="initial temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.75, help="initial top-p")
    p.set_defaults(func=run)
