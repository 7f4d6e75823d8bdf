"""SphinxChat, ChatSession and `sphinx-mllm chat` on a `debug` model with random weights (saved and reloaded):
the answers are nonsense, the plumbing (batching, streaming, seeds, stop strings, cancel, CLI) is checked."""

from __future__ import annotations

import copy
import io
import logging
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures.tiny_chat import save_tiny_chat, write_image
from sphinx_mllm.cli.main import main
from sphinx_mllm.config import PRESETS, SphinxConfig
from sphinx_mllm.formats import save_release
from sphinx_mllm.inference import ChatSession, GenerationConfig, SphinxChat, qas_to_messages
from sphinx_mllm.inference.chat import TextStream, _stable_prefix
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor
from sphinx_mllm.utils.errors import SphinxError

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat(tokenizer, tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> SphinxChat:
    return SphinxChat.load(model_dir, device="cpu")


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """`main()` attaches a stderr handler to the package logger; pytest closes that stream after the test."""
    logger = logging.getLogger("sphinx_mllm")
    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


def _ask(question: str, image: Image.Image | None = None) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sphinx-stream" and t.is_alive()]


def test_load_gives_fp32_cpu_model_and_rejects_missing_folder(chat: SphinxChat, tmp_path: Path) -> None:
    assert chat.device.type == "cpu" and chat.model.dtype == torch.float32
    assert not chat.model.training
    with pytest.raises(SphinxError, match="not found"):
        SphinxChat.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SphinxError, match="neither a sphinx-mllm model folder .* nor a release folder"):
        SphinxChat.load(tmp_path / "empty")


def test_load_reads_a_release_folder(chat: SphinxChat, sp_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = save_release(chat.model, tmp_path / "release", num_shards=2,
                          tokenizer=sp_tokenizer_dir / "tokenizer.model")
    released = SphinxChat.load(folder, device="cpu")
    msgs = _ask("what is in the image", Image.new("RGB", (50, 80), (0, 0, 255)))
    assert released.generate_full([msgs], GREEDY) == chat.generate_full([msgs], GREEDY)


def test_batched_generation_equals_one_by_one(chat: SphinxChat) -> None:
    convs = [_ask("what is this", Image.new("RGB", (64, 40), (200, 10, 10))),
             _ask("describe the picture in detail please"),
             _ask("where is the red box", Image.new("RGB", (30, 90), (10, 200, 10)))]
    batched = chat.generate_full(convs, GREEDY)
    single = [chat.generate_full([c], GREEDY)[0] for c in convs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.text for g in batched)  # the reshaped LM head gives visible words
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert batched[0].prompt_tokens > batched[1].prompt_tokens  # the image's placeholders count
    assert all(g.finish_reason == "length" and g.completion_tokens == 8 for g in batched)


def test_stream_equals_generate_for_greedy(chat: SphinxChat) -> None:
    msgs = _ask("what is in the image", Image.new("RGB", (50, 80), (0, 0, 255)))
    config = GenerationConfig(max_new_tokens=12, temperature=0.0)
    stream = chat.stream(msgs, config)
    assert isinstance(stream, TextStream) and stream.result is None
    deltas = list(stream)
    assert len(deltas) > 1
    full = chat.generate_full([msgs], config)[0]
    assert "".join(deltas) == full.text
    assert stream.result == full and full.finish_reason == "length" and full.completion_tokens == 12
    assert not _stream_threads()


def test_cancel_stops_a_stream_and_closing_joins_the_worker(chat: SphinxChat) -> None:
    msgs = _ask("tell me a story")
    config = GenerationConfig(max_new_tokens=200, temperature=0.0)
    cancel = threading.Event()
    got = []
    stream = chat.stream(msgs, config, cancel=cancel)
    for delta in stream:
        got.append(delta)
        cancel.set()
    full = chat.generate([msgs], GenerationConfig(max_new_tokens=20, temperature=0.0))[0]
    assert 1 <= len(got) <= 3 and len("".join(got)) < len(full)
    assert stream.result is not None and stream.result.finish_reason == "cancelled"
    assert stream.result.text == "".join(got) and stream.result.completion_tokens < 200
    assert not _stream_threads()
    it = chat.stream(msgs, config)
    next(it)
    it.close()  # the consumer went away: the worker must stop and be joined
    assert not _stream_threads() and it.result is None
    it = chat.stream(msgs, config)
    next(it)
    del it  # dropped half way (no reference cycle): closed at once, the worker joined
    assert not _stream_threads()
    chat.stream(msgs, config)  # never iterated: no thread is ever started
    assert not _stream_threads()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(chat: SphinxChat) -> None:
    a, b = _ask("what color", Image.new("RGB", (40, 40), (9, 9, 9))), _ask("hello there")
    config = GenerationConfig(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=7)
    alone = chat.generate([a], config)[0]
    assert chat.generate([b, a], config)[1] == alone  # same seed, same answer, whatever shares the batch
    draws = {chat.generate([b], GenerationConfig(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=s))[0]
             for s in range(3)}
    assert len(draws) > 1  # the seed changes the draw


def test_generate_response_has_the_release_signature(chat: SphinxChat) -> None:
    image = Image.new("RGB", (60, 30), (100, 100, 0))
    qas = [["what is this", "a box"], ["and its color", None]]
    got = chat.generate_response(qas, image, max_gen_len=8, temperature=0.0, top_p=0.75)
    msgs = qas_to_messages(qas, image)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"][0] == {"type": "image", "image": image}
    assert got == chat.generate([msgs], GREEDY)[0]
    with pytest.raises(SphinxError, match="last pair"):
        qas_to_messages([["q", "a"]], None)


def test_bad_generation_settings_are_refused() -> None:
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(SphinxError):
            GenerationConfig(**kwargs)


def test_stable_prefix_holds_back_what_can_still_change() -> None:
    stops = ["\n###", "###"]
    assert _stable_prefix("a box\n#", stops) == "a box"
    assert _stable_prefix("a box ##", stops) == "a box"
    assert _stable_prefix("a box  ", stops) == "a box"
    assert _stable_prefix("caf\ufffd", stops) == "caf"
    assert _stable_prefix("a # b", stops) == "a # b"
    assert _stable_prefix("  red box\n### Human: more", stops) == "red box"  # as post_process cuts it
    # a stop string found, but a longer one that would start earlier may still complete
    assert _stable_prefix("1xab", ["ab", "xabcdef"]) == "1"
    assert _stable_prefix("1xab!", ["ab", "xabcdef"]) == "1x"


class _ScriptedModel(torch.nn.Module):
    """Stands in for the model: `generate` emits scripted tokens through the streamer, honouring the
    stopping criteria, like transformers does."""

    def __init__(self, script: list[int], max_context: int = 4096) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        self.config = type("C", (), {"text_config": type("T", (), {"max_position_embeddings": max_context})()})()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stopping_criteria=(), streamer=None,
                 **_: object) -> torch.Tensor:
        ids = input_ids
        if streamer is not None:
            streamer.put(input_ids)
        for tok in self.script[:max_new_tokens]:
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
            if any(bool(c(ids, None).all()) for c in stopping_criteria):
                break
        if streamer is not None:
            streamer.end()
        return ids


def test_stream_and_generate_cut_at_the_stop_string(chat: SphinxChat) -> None:
    tok = chat.processor.tokenizer
    script = tok("red box on the left\n### Human: more", add_special_tokens=False)["input_ids"]
    fake = SphinxChat(_ScriptedModel(script), chat.processor)
    msgs = _ask("where")
    config = GenerationConfig(max_new_tokens=50, temperature=0.0)
    assert fake.generate([msgs], config) == ["red box on the left"]
    deltas = list(fake.stream(msgs, config))
    assert "".join(deltas) == "red box on the left"
    assert not any("#" in d for d in deltas)
    full = fake.generate_full([msgs], config)[0]
    assert full.finish_reason == "stop"
    stream = fake.stream(msgs, config)
    assert "".join(stream) == full.text and stream.result == full


def _pieces(chat: SphinxChat, *parts: str) -> list[int]:
    """Token ids of text parts and single pieces (`<0x49>`), in order."""
    tok, ids = chat.processor.tokenizer, []
    for part in parts:
        if part.startswith("<0x"):
            ids.append(tok.convert_tokens_to_ids(part))
        else:
            ids += tok(part, add_special_tokens=False)["input_ids"]
    return ids


def test_stream_holds_back_byte_pieces_that_a_later_byte_turns_into_replacement_characters(
        chat: SphinxChat) -> None:
    """The bug: `<0x49><0x36>` alone decode to "I6"; followed by `<0x80>` the run is invalid UTF-8 and the whole run
    decodes to three U+FFFD. The old stream yielded "I6" and could not take it back (it then stopped yielding)."""
    tok = chat.processor.tokenizer
    script = _pieces(chat, "red box", "<0x49>", "<0x36>", "<0x80>", "<0x99>", "left", "<0xC3>", "<0xA9>", "top",
                     "<0xE2>", "<0x82>", "<0xAC>", "<0x41>", "blue", "<0xC1>")
    prefix = _pieces(chat, "red box", "<0x49>", "<0x36>")
    assert tok.decode(prefix) == "red boxI6" and "\ufffd" in tok.decode(script)
    fake = SphinxChat(_ScriptedModel(script), chat.processor)
    msgs = _ask("where")
    config = GenerationConfig(max_new_tokens=len(script), temperature=0.0)
    full = fake.generate_full([msgs], config)[0]
    assert full.text == "red box\ufffd\ufffd\ufffd\ufffd left\u00e9 top\u20acA blue\ufffd"
    stream = fake.stream(msgs, config)
    deltas = list(stream)
    assert "".join(deltas) == full.text and not any("I6" in d for d in deltas)
    assert stream.result == full and full.finish_reason == "length" and full.completion_tokens == len(script)


def test_stream_equals_generate_when_random_weights_emit_invalid_utf8(tokenizer) -> None:
    """Regression on a real model: a `debug` model with the test tokenizer's vocabulary emits byte pieces; seeds
    and prompts are searched for an answer with replacement characters, then every case tried must stream
    exactly what `generate_full` answers."""
    text_config = dict(copy.deepcopy(PRESETS["debug"]["text_config"]), vocab_size=len(tokenizer))
    config = SphinxConfig.from_preset("debug", text_config=text_config)
    greedy = GenerationConfig(max_new_tokens=12, temperature=0.0)
    tried = []
    for seed in range(4):
        torch.manual_seed(seed)
        chat = SphinxChat(SphinxForConditionalGeneration(config), SphinxProcessor.from_config(config, tokenizer))
        for prompt in ("Describe the image.", "what is this", "where is the red box"):
            full = chat.generate_full([_ask(prompt)], greedy)[0]
            stream = chat.stream(_ask(prompt), greedy)
            tried.append((full, "".join(stream), stream.result))
            if "\ufffd" in full.text:
                break
        if "\ufffd" in tried[-1][0].text:
            break
    assert "\ufffd" in tried[-1][0].text, "no answer with replacement characters found"
    for full, streamed, result in tried:
        assert streamed == full.text
        assert result == full


def test_stream_reports_stop_at_eos_with_the_tokens_before_it(chat: SphinxChat) -> None:
    eos = chat.processor.tokenizer.eos_token_id
    script = _pieces(chat, "red box", "<0xC3>", "<0xA9>") + [eos] + _pieces(chat, " never")
    fake = SphinxChat(_ScriptedModel(script), chat.processor)
    config = GenerationConfig(max_new_tokens=40, temperature=0.0)
    full = fake.generate_full([_ask("where")], config)[0]
    stream = fake.stream(_ask("where"), config)
    assert "".join(stream) == full.text == "red box\u00e9"
    assert stream.result == full and full.finish_reason == "stop" and full.completion_tokens == script.index(eos)


def test_prompt_longer_than_the_context_is_a_clear_error(chat: SphinxChat) -> None:
    fake = SphinxChat(_ScriptedModel([5], max_context=20), chat.processor)
    with pytest.raises(SphinxError, match="context"):
        fake.generate([_ask("a long question " * 10)], GREEDY)


def test_chat_session_keeps_history_and_resets_on_new_image(chat: SphinxChat, tmp_path: Path) -> None:
    session = ChatSession(chat, GREEDY)
    session.set_image(write_image(tmp_path / "a.png", 80, 40))
    assert session.image_size == (80, 40)
    first = session.ask("what is this")
    second = "".join(session.ask_stream("and then"))
    assert session.history == [("what is this", first), ("and then", second)]
    assert session.messages("next")[1] == {"role": "assistant", "content": first}
    session.set_image(None)
    assert session.history == [] and session.image is None
    with pytest.raises(SphinxError, match="not found"):
        session.set_image(tmp_path / "missing.png")


def test_chat_cli_one_shot_prints_answer_and_draws(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = write_image(tmp_path / "in.png", 90, 60)
    out = tmp_path / "drawn.png"
    code = main(["chat", "--model", str(model_dir), "--image", str(image), "--prompt", "describe",
                 "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu", "--draw", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.strip() and f"drawn to {out}" in printed
    assert Image.open(out).size == (90, 60)


def test_chat_cli_loop_commands(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    image = write_image(tmp_path / "in.png", 40, 40)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\n/image {tmp_path / 'nope.png'}\n/image {image}\n"
                                                 "/reset\n/help\n/quit\nnever asked\n"))
    code = main(["chat", "--model", str(model_dir), "--max-new-tokens", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "error: image file not found" in printed
    assert "(image: " in printed and "40x40" in printed
    assert "(history cleared)" in printed and "/image PATH" in printed


def test_chat_cli_bad_input_is_one_line_error(model_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["chat", "--model", str(model_dir), "--prompt", "hi", "--draw", str(tmp_path / "x.png")]) == 2
    assert "--draw needs --image" in capsys.readouterr().err
