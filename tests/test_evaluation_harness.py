"""Harness adapters: lmms-eval's "simple" model requests and VLMEvalKit's `generate_inner` protocol.

lmms-eval (0.7) is not a dependency and does not install cleanly here (it pulls torchvision and timm), so the
adapter is tested with stand-in request objects that have the documented `Instance.args` layout; when
`lmms_eval` IS importable, the real `Instance`, the real `lmms` base class and the real model registry are
exercised too. VLMEvalKit is not on PyPI: its documented message format is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fixtures.tiny_chat import save_tiny_chat, write_image
from sphinx_mllm.evaluation.harness import LmmsAdapter, SphinxVLMEval, continuation_logprob, lmms_eval_manifest
from sphinx_mllm.inference import GenerationConfig, SphinxChat
from sphinx_mllm.utils.errors import SphinxError


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat(tokenizer, tmp_path_factory.mktemp("tiny_chat_harness"))


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> SphinxChat:
    return SphinxChat.load(model_dir, device="cpu")


@dataclass
class _Request:
    """The part of lmms_eval.api.instance.Instance that models read."""

    args: tuple


DOCS = {"toy": {"test": {0: {"image": Image.new("RGB", (64, 32), (250, 0, 0)), "question": "What color?"},
                         1: {"image": None, "question": "Say hi."}}}}


def _visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]] if doc["image"] is not None else []


def _adapter(chat: SphinxChat) -> LmmsAdapter:
    adapter = LmmsAdapter()
    adapter.chat, adapter.task_dict = chat, DOCS
    return adapter


def test_lmms_generate_until_reads_docs_and_honours_until(chat: SphinxChat) -> None:
    adapter = _adapter(chat)
    full = chat.generate([[{"role": "user", "content": [{"type": "image", "image": DOCS["toy"]["test"][0]["image"]},
                                                          {"type": "text", "text": "What color?"}]}]],
                         GenerationConfig(max_new_tokens=6, temperature=0.0))[0]
    assert len(full) > 3
    reqs = [_Request(("<image>\nWhat color?", {"max_new_tokens": 6, "temperature": 0}, _visual, 0, "toy", "test")),
            _Request(("What color?", {"max_new_tokens": 6, "until": [full[2:4]]}, _visual, 0, "toy", "test")),
            _Request(("Say hi.", {"max_new_tokens": 4}, _visual, 1, "toy", "test"))]
    out = adapter.generate_until(reqs)
    assert out[0] == full
    assert out[1] == full[:2]
    assert isinstance(out[2], str)
    assert adapter.generate_until_multi_round(reqs[:1]) == out[:1]


def test_lmms_loglikelihood_is_a_log_probability(chat: SphinxChat) -> None:
    adapter = _adapter(chat)
    reqs = [_Request(("What color?", "red", _visual, 0, "toy", "test")),
            _Request(("What color?", "red box on the left", _visual, 0, "toy", "test")),
            _Request(("Say hi.", lambda doc: "hello", _visual, 1, "toy", "test"))]
    (lp_short, _), (lp_long, _), (lp_text, greedy_text) = adapter.loglikelihood(reqs)
    assert lp_short < 0 and lp_long < lp_short  # every extra token adds a negative log-probability
    assert lp_text < 0 and isinstance(greedy_text, bool)
    # The same call through the library function, with the image of doc 0, gives the same number.
    image_msgs = [{"role": "user", "content": [{"type": "image", "image": DOCS["toy"]["test"][0]["image"]},
                                               {"type": "text", "text": "What color?"}]}]
    assert continuation_logprob(chat, image_msgs, "red")[0] == pytest.approx(lp_short)


def test_vlmevalkit_wrapper_follows_the_message_protocol(chat: SphinxChat, tmp_path: Path) -> None:
    image = write_image(tmp_path / "q.png", 40, 60)
    model = SphinxVLMEval(chat=chat, max_new_tokens=5)
    typed = [{"type": "image", "value": str(image)}, {"type": "text", "value": "What is shown?"}]
    answer = model.generate_inner(typed, dataset="MMBench_DEV_EN")
    assert answer == model.generate([str(image), "What is shown?"])  # plain strings: paths become images
    direct = chat.generate([[{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                          {"type": "text", "text": "What is shown?"}]}]],
                           GenerationConfig(max_new_tokens=5, temperature=0.0))[0]
    assert answer == direct
    assert model.INTERLEAVE is False and model.use_custom_prompt("MMVet") is False
    with pytest.raises(SphinxError, match="unsupported"):
        model.generate([{"type": "video", "value": "x.mp4"}])
    with pytest.raises(SphinxError, match="model_path"):
        SphinxVLMEval()


def test_real_lmms_eval_registry_and_instances(model_dir: Path) -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval is optional and not installed here")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    cls = registry.get_model_class("sphinx_mllm")  # validates: an lmms subclass with is_simple=True
    assert issubclass(cls, lmms) and registry.resolve("sphinx").model_id == "sphinx_mllm"
    model = cls.create_from_arg_string(f"pretrained={model_dir},device=cpu")
    model.task_dict = DOCS
    req = Instance("generate_until", ("What color?", {"max_new_tokens": 3}, _visual, 0, "toy", "test"), 0,
                   {"task": "toy", "doc_id": 0, "repeats": 1})
    (answer,) = model.generate_until([req])
    assert isinstance(answer, str)
