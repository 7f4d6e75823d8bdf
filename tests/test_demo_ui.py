"""The web demo without a browser: the turn logic (`answer_turn`), drawing on the original image's pixels,
the task prompts, the SAM control (hidden without SAM; masks with a tiny random local SamModel), the CLI.

The model is the `debug` preset with a scripted answer (a random model writes no boxes), so the drawn
pixels can be checked by hand: a 200x100 image is a 200-px padded square with pad_y = 50.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from sphinx_mllm.inference.chat import GenerationConfig, SphinxChat  # noqa: E402
from sphinx_mllm.inference.draw import PALETTE, SKELETON_COLOR  # noqa: E402
from sphinx_mllm.serving.demo_ui import answer_turn, build_demo, display_text, task_prompts  # noqa: E402
from sphinx_mllm.serving.sam import SamMasker, overlay_masks  # noqa: E402
from sphinx_mllm.utils.errors import SphinxError  # noqa: E402

ANSWER = ("<p>red box</p> [0.10,0.30,0.50,0.60] with <p>nose</p> [0.70,0.40] "
          "<p>left_shoulder</p> [0.65,0.50] <p>right_shoulder</p> [0.75,0.50]")
WHITE = (255, 255, 255)
DEFAULT_CONFIG = GenerationConfig()


class ScriptedChat(SphinxChat):
    """The real processor checks each conversation; the answer is `ANSWER`, streamed in 5-char pieces."""

    def __init__(self, base: SphinxChat, answer: str = ANSWER) -> None:
        super().__init__(base.model, base.processor)
        self.answer = answer
        self.seen: list[list[dict[str, Any]]] = []

    def stream(self, messages: Any, config: GenerationConfig = DEFAULT_CONFIG,
               cancel: threading.Event | None = None) -> Iterator[str]:
        self.prepare([messages])
        self.seen.append(messages)
        return iter([self.answer[i:i + 5] for i in range(0, len(self.answer), 5)])


@pytest.fixture(scope="module")
def scripted(debug_model_and_processor) -> ScriptedChat:
    model, processor = debug_model_and_processor
    return ScriptedChat(SphinxChat(model, processor))


def expected_pixels(img: Image.Image) -> None:
    """Box [0.10,0.30,0.50,0.60] on 200x100 -> pixels (20, 10)-(100, 70), outline 2 px inside the box;
    nose (140, 30) red; the shoulders (130, 50)-(150, 50) joined by the skeleton colour."""
    px = img.convert("RGB").load()
    box = PALETTE[0]
    assert px[20, 50] == box and px[21, 50] == box  # left edge, below the phrase tag
    assert px[99, 40] == box and px[98, 40] == box  # right edge (last covered column is 99)
    assert px[60, 69] == box  # bottom edge
    assert px[19, 50] == WHITE and px[100, 40] == WHITE and px[60, 70] == WHITE  # just outside
    assert px[60, 45] == WHITE  # inside the box
    assert px[140, 30] == (255, 0, 0)  # keypoint
    assert px[140, 50] == SKELETON_COLOR  # shoulder-to-shoulder bone, between the two points


def test_turn_streams_then_draws_on_original_pixels(scripted: ScriptedChat) -> None:
    image = Image.new("RGB", (200, 100), WHITE)
    updates = list(answer_turn(scripted, "  Detect all people shown in the image. ", [], image,
                               GenerationConfig(max_new_tokens=8)))
    assert updates[0].messages == [{"role": "user", "content": "Detect all people shown in the image."}]
    assert len(updates) > 3 and not any(u.done for u in updates[:-1])
    final = updates[-1]
    assert final.done and final.history == [("Detect all people shown in the image.", ANSWER)]
    assert final.messages[-1] == {"role": "assistant", "content": display_text(ANSWER)}
    assert "**red box** [0.10,0.30,0.50,0.60]" in final.messages[-1]["content"]
    assert final.annotated is not None and final.annotated.size == (200, 100)
    expected_pixels(final.annotated)
    assert final.groundings.splitlines()[0] == "red box: box (20, 10, 100, 70)"
    assert "nose: point (140, 30)" in final.groundings
    assert image.getpixel((20, 50)) == WHITE  # the upload itself is not drawn on


def test_history_and_text_only_turns(scripted: ScriptedChat) -> None:
    first = list(answer_turn(scripted, "hello", [], None, GenerationConfig()))[-1]
    assert first.annotated is None and first.groundings == "(no image)"
    second = list(answer_turn(scripted, "and then?", first.history, None, GenerationConfig()))[-1]
    assert [m["role"] for m in scripted.seen[-1]] == ["user", "assistant", "user"]
    assert scripted.seen[-1][1]["content"] == ANSWER
    assert len(second.history) == 2 and len(second.messages) == 4
    with pytest.raises(SphinxError, match="type a question"):
        list(answer_turn(scripted, "   ", [], None, GenerationConfig()))


def test_task_prompts_are_the_release_wordings() -> None:
    prompts = task_prompts()
    assert "Please provide the bounding box coordinate of the region this sentence describes: " \
           "the person on the left." in prompts
    assert "Describe the image concisely. Include the bounding box for each mentioned object." in prompts
    assert "Detect all people shown in the image." in prompts
    assert "Detect the key points of the person in the region [0.20,0.10,0.80,0.95]." in prompts
    assert "Please detect all texts and provide their bounding box coordinate." in prompts
    assert "Convert this chart to a table." in prompts
    assert any(p.endswith("\nAnswer the question using a single word or phrase.") for p in prompts)


def _component(demo: Any, elem_id: str) -> Any:
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_sam_control_hidden_without_sam(scripted: ScriptedChat) -> None:
    demo = build_demo(scripted)
    assert _component(demo, "use-sam").visible is False
    assert _component(demo, "max-length").maximum == 2048
    assert _component(demo, "temperature").value == pytest.approx(0.1)
    assert _component(demo, "top-p").value == pytest.approx(0.75)


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SamModel in the transformers folder layout (no SAM weights ship with any package)."""
    import torch
    from transformers import SamConfig, SamModel
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=256,
                  patch_size=16, mlp_dim=64, window_size=4, global_attn_indexes=[1], num_pos_feats=16)
    config = SamConfig(vision_config=vision, prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
                       mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                iou_head_hidden_dim=32))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam")
    SamModel(config).eval().save_pretrained(path)
    SamImageProcessorPil(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256}).save_pretrained(path)
    return path


def test_sam_masks_for_boxes_and_visible_control(scripted: ScriptedChat, sam_dir: Path) -> None:
    sam = SamMasker.load(sam_dir)
    image = Image.new("RGB", (200, 100), WHITE)
    masks = sam.masks(image, [(20, 10, 100, 70), (120, 20, 160, 90)])
    assert masks.shape == (2, 100, 200) and masks.dtype == bool
    assert sam.masks(image, []).shape == (0, 100, 200)
    final = list(answer_turn(scripted, "Detect all people shown in the image.", [], image, GenerationConfig(),
                             sam=sam))[-1]
    assert final.annotated is not None and final.annotated.size == (200, 100)
    demo = build_demo(scripted, sam=sam)
    assert _component(demo, "use-sam").visible is True


def test_overlay_tints_exactly_the_mask() -> None:
    image = Image.new("RGB", (4, 2), (100, 100, 100))
    mask = np.zeros((1, 2, 4), dtype=bool)
    mask[0, 1, 2] = True
    out = overlay_masks(image, mask, [(200, 0, 0)], alpha=0.5)
    assert out.getpixel((2, 1)) == (150, 50, 50)
    assert out.getpixel((0, 0)) == (100, 100, 100) and out.getpixel((3, 1)) == (100, 100, 100)


def test_sam_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SphinxError, match="SAM folder"):
        SamMasker.load(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SphinxError, match="preprocessor_config.json"):
        SamMasker.load(tmp_path)


def test_demo_ui_cli_errors_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sphinx_mllm.cli.main import main

    assert main(["demo-ui", "--model", str(tmp_path), "--sam", str(tmp_path / "nope")]) == 2
    assert "SAM folder not found" in capsys.readouterr().err
    assert main(["demo-ui", "--model", str(tmp_path / "absent")]) == 2
    assert "model folder not found" in capsys.readouterr().err
