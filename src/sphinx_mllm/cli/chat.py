"""`sphinx-mllm chat`: talk to a model about an image in the terminal, or answer one `--prompt` and exit.

Answers stream as they are generated; the boxes and points they contain are then listed in pixels of the
original image, and `--draw OUT.png` saves the image with them drawn (after every answer). In the loop,
`/image PATH` switches images (and clears the history), `/reset` clears the history, `/quit` (or end of
input) leaves.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_write_bytes

if TYPE_CHECKING:  # torch is slow to import: the CLI imports inference lazily
    from sphinx_mllm.inference import ChatSession, GenerationConfig

HELP = "commands: /image PATH (new image, clears history), /reset (clear history), /quit"


def add_generation_args(parser: argparse.ArgumentParser, temperature: float = 0.1) -> None:
    """--model, --device, --dtype and the sampling options shared by chat, infer and eval run."""
    parser.add_argument("--model", required=True, help="model folder (ours, or a release consolidated.*.pth folder)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.75, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same answer)")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    from sphinx_mllm.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)


def _save_drawing(session: ChatSession, answer: str, out: Path) -> None:
    from PIL import Image

    from sphinx_mllm.inference import draw_answer

    drawn = draw_answer(session.image, answer)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise SphinxError(f"--draw {out}: unknown image extension {out.suffix!r} (use .png or .jpg)")
    buf = io.BytesIO()
    drawn.save(buf, format=fmt)
    atomic_write_bytes(out, buf.getvalue())


def _answer(session: ChatSession, question: str, args: argparse.Namespace, stdout: TextIO) -> None:
    from sphinx_mllm.inference import answer_groundings, format_groundings

    parts = []
    for delta in session.ask_stream(question):
        parts.append(delta)
        stdout.write(delta)
        stdout.flush()
    answer = "".join(parts)
    stdout.write("\n")
    if session.image is not None:
        for line in format_groundings(answer_groundings(answer, *session.image.size)):
            stdout.write(f"  {line}\n")
        if args.draw is not None:
            _save_drawing(session, answer, Path(args.draw))
            stdout.write(f"  (drawn to {args.draw})\n")
    stdout.flush()


def _loop(session: ChatSession, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    interactive = stdin.isatty()
    if interactive:
        stdout.write(HELP + "\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
        elif text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                session.set_image(path or None)
                stdout.write(f"(image: {path or 'none'}" + (f", {session.image_size[0]}x{session.image_size[1]})\n"
                                                             if session.image is not None else ")\n"))
            except SphinxError as exc:
                stdout.write(f"error: {exc}\n")
        elif text.startswith("/"):
            stdout.write(HELP + "\n")
        else:
            _answer(session, text, args, stdout)


def _chat(args: argparse.Namespace) -> int:
    from sphinx_mllm.inference import ChatSession, SphinxChat

    if args.draw is not None and args.image is None:
        raise SphinxError("--draw needs --image")
    config = generation_config(args)
    chat = SphinxChat.load(args.model, device=args.device, dtype=args.dtype)
    session = ChatSession(chat, config)
    session.set_image(args.image)
    if args.prompt is not None:
        _answer(session, args.prompt, args, sys.stdout)
    else:
        _loop(session, args, sys.stdin, sys.stdout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("chat", help="chat with a model about an image in the terminal",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(parser)
    parser.add_argument("--image", default=None, help="image file to talk about")
    parser.add_argument("--prompt", default=None, help="answer this one question and exit (no loop)")
    parser.add_argument("--draw", default=None, help="save the image with the last answer's boxes/points drawn")
    parser.set_defaults(func=_chat)
