"""The web demo: `build_demo(chat) -> gr.Blocks` (Gradio), like the release's demo (SPHINX.md section 10).

Upload an image, chat about it (answers stream in), set max length / temperature / top-p, start from the
task prompts of SPHINX.md section 8, and see the answer drawn on the original image: boxes with their
phrases, keypoints joined by the COCO skeleton, and, when a local SAM checkpoint is given, a mask per box
(without one, the mask control is hidden). A new image starts a new conversation.

The turn logic is `answer_turn`, a plain generator with no Gradio in it (tested directly); `build_demo`
only wires it to components. Nothing is fetched from the internet: system fonts, no analytics, no SSR.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr
from PIL import Image

from sphinx_mllm.inference.chat import GenerationConfig, SphinxChat, qas_to_messages
from sphinx_mllm.inference.draw import PALETTE, answer_groundings, draw_answer, format_groundings
from sphinx_mllm.processing import load_image
from sphinx_mllm.serving.sam import SamMasker, overlay_masks
from sphinx_mllm.tasks.language import DETAILED_CAPTION_TEMPLATES, SHORT_CAPTION_TEMPLATES, VQA_TEMPLATES
from sphinx_mllm.tasks.spatial import (
    DETECTION_TEMPLATES,
    GROUNDED_CAPTION_TEMPLATES,
    KEYPOINT_TEMPLATES,
    OCR_TEMPLATES,
    REC_TEMPLATES,
)
from sphinx_mllm.utils.errors import SphinxError

CHART_PROMPT = "Convert this chart to a table."  # SPHINX.md section 8; no chart task in sphinx_mllm.tasks
MAX_LENGTH_LIMIT = 2048


def task_prompts() -> list[str]:
    """The release's instruction wordings (SPHINX.md section 8), filled with example arguments."""
    return [
        REC_TEMPLATES[0].format(expression="the person on the left"),
        GROUNDED_CAPTION_TEMPLATES[0],
        DETECTION_TEMPLATES[0].format(category="people"),
        KEYPOINT_TEMPLATES[0].format(box="[0.20,0.10,0.80,0.95]"),
        OCR_TEMPLATES[0],
        CHART_PROMPT,
        VQA_TEMPLATES[0].format(question="What is the main object in the image?"),
        SHORT_CAPTION_TEMPLATES[0],
        DETAILED_CAPTION_TEMPLATES[0],
    ]


@dataclass
class TurnUpdate:
    """What one step of a turn changes: the chat (Gradio "messages"), the (question, answer) history, and,
    at the end of the turn, the annotated image and the pixel coordinates (None: leave as it is)."""

    messages: list[dict[str, str]]
    history: list[tuple[str, str]]
    annotated: Image.Image | None = None
    groundings: str | None = None
    done: bool = False


def display_text(answer: str) -> str:
    """Answer text for the chat window: `<p>phrase</p>` becomes bold (raw tags would be read as HTML)."""
    return re.sub(r"<p>(.*?)</p>", r"**\1**", answer).replace("<", "&lt;")


def _chat_messages(history: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for question, answer in history:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": display_text(answer)}]
    return out


def annotate(image: Image.Image, answer: str, sam: SamMasker | None = None) -> tuple[Image.Image, str]:
    """(the answer drawn on `image`, one line per phrase with its boxes / points in pixels)."""
    groundings = answer_groundings(answer, *image.size)
    base = image
    if sam is not None:
        boxes, colors = [], []
        for i, g in enumerate(groundings):
            boxes += list(g.boxes)
            colors += [PALETTE[i % len(PALETTE)]] * len(g.boxes)
        if boxes:
            base = overlay_masks(image, sam.masks(image, boxes), colors)
    lines = format_groundings(groundings)
    return draw_answer(base, answer), "\n".join(lines) if lines else "(no boxes or points in the answer)"


def answer_turn(
    chat: SphinxChat, question: str, history: Sequence[tuple[str, str]], image: Image.Image | None,
    config: GenerationConfig, sam: SamMasker | None = None, cancel: threading.Event | None = None,
) -> Iterator[TurnUpdate]:
    """One chat turn: stream the answer, then draw it on the image. Raises `SphinxError` for bad input."""
    question = question.strip()
    if not question:
        raise SphinxError("type a question first")
    if image is not None:
        image = load_image(image, chat.processor.image_processor.max_pixels)
    pairs = [[q, a] for q, a in history] + [[question, None]]
    messages = qas_to_messages(pairs, image)
    past = list(history)
    answer = ""
    yield TurnUpdate(_chat_messages(past) + [{"role": "user", "content": question}], past)
    stream = chat.stream(messages, config, cancel)
    try:
        for delta in stream:
            answer += delta
            yield TurnUpdate(_chat_messages([*past, (question, answer)]), past)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops generation when the turn is abandoned (Stop button, closed page)
    done = [*past, (question, answer)]
    if image is None:
        yield TurnUpdate(_chat_messages(done), done, None, "(no image)", done=True)
        return
    annotated, coords = annotate(image, answer, sam)
    yield TurnUpdate(_chat_messages(done), done, annotated, coords, done=True)


def build_demo(chat: SphinxChat, sam: SamMasker | None = None, defaults: GenerationConfig | None = None) -> Any:
    """The Gradio app (`gr.Blocks`); launch it with `launch_demo` (127.0.0.1, no sharing)."""
    defaults = defaults or GenerationConfig()
    running: dict[str, threading.Event] = {}  # session -> cancel event of its generation (for Stop)

    def respond(question: str, history: list[tuple[str, str]], image: Image.Image | None, max_length: float,
                temperature: float, top_p: float, use_sam: bool, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        cancel = running[request.session_hash or ""] = threading.Event()
        try:
            config = GenerationConfig(max_new_tokens=int(max_length), temperature=float(temperature),
                                      top_p=float(top_p))
            turn = answer_turn(chat, question or "", history or [], image, config, sam if use_sam else None, cancel)
            for up in turn:
                yield (up.messages, up.history, gr.skip() if up.annotated is None else up.annotated,
                       gr.skip() if up.groundings is None else up.groundings, "")
        except SphinxError as exc:
            raise gr.Error(str(exc)) from None
        finally:
            running.pop(request.session_hash or "", None)

    def stop_generation(request: gr.Request) -> None:
        event = running.get(request.session_hash or "")
        if event is not None:
            event.set()

    def reset() -> tuple[Any, ...]:
        return [], [], None, ""

    with gr.Blocks(title="SPHINX", analytics_enabled=False) as demo:
        history = gr.State([])
        gr.Markdown("## SPHINX\nUpload an image, ask about it, or start from a task prompt below. Boxes and "
                    "key points in the answer are drawn on the image.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="input-image",
                                 height=300)
                annotated = gr.Image(type="pil", format="png", label="Answer drawn on the image", interactive=False,
                                     elem_id="annotated-image", height=300)
                coords = gr.Textbox(label="Boxes and points, in pixels of the original image", lines=4,
                                    interactive=False, elem_id="groundings")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=380)
                prompt = gr.Textbox(label="Message", placeholder="Ask about the image...", lines=2, elem_id="prompt")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Generation", open=True):
                    max_length = gr.Slider(1, MAX_LENGTH_LIMIT, value=min(defaults.max_new_tokens, MAX_LENGTH_LIMIT),
                                           step=1, label="Max length (new tokens)", elem_id="max-length")
                    temperature = gr.Slider(0.0, 1.0, value=defaults.temperature, step=0.05,
                                            label="Temperature (0 = greedy)", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
                    use_sam = gr.Checkbox(value=sam is not None, visible=sam is not None, elem_id="use-sam",
                                          label="Masks for boxes (SAM)")
                gr.Examples(examples=[[p] for p in task_prompts()], inputs=[prompt], label="Task prompts (SPHINX)")
        inputs = [prompt, history, image, max_length, temperature, top_p, use_sam]
        outputs = [chatbot, history, annotated, coords, prompt]
        events = [send.click(respond, inputs, outputs), prompt.submit(respond, inputs, outputs)]
        stop.click(stop_generation, None, None, cancels=events, concurrency_limit=None)
        clear.click(reset, None, [chatbot, history, annotated, coords])
        image.change(reset, None, [chatbot, history, annotated, coords])
    return demo


def launch_demo(demo: Any, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the demo locally (no share link, no server-side rendering, system fonts only)."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.queue(default_concurrency_limit=1)  # one model: one generation at a time
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                       prevent_thread_lock=not block, theme=theme, max_file_size="20mb", quiet=True,
                       mcp_server=False, footer_links=[])
