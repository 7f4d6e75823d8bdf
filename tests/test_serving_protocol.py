"""Request validation, stop strings and image-source rules of the server, without a server or a model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from sphinx_mllm.serving.images import resolve_image, url_allowed
from sphinx_mllm.serving.protocol import APIError, StopFilter, apply_stop, parse_chat_request
from sphinx_mllm.serving.settings import ServerSettings
from sphinx_mllm.utils.errors import SphinxError

SETTINGS = ServerSettings(model_name="m", max_tokens_limit=100, default_max_tokens=20)


def parse(**body):
    return parse_chat_request({"model": "m", **body}, SETTINGS)


def test_defaults_aliases_and_greedy_top_p() -> None:
    req = parse(messages=[{"role": "user", "content": "hi"}])
    assert (req.max_tokens, req.temperature, req.top_p, req.stream, req.stop) == (20, 1.0, 1.0, False, ())
    assert parse(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7).max_tokens == 7
    greedy = parse(messages=[{"role": "user", "content": "hi"}], top_p=0, temperature=0.8)
    assert greedy.temperature == 0.0 and greedy.top_p == 1.0  # top_p 0 keeps one token: greedy
    assert parse(messages=[{"role": "user", "content": "hi"}], seed=-1).seed == 2**32 - 1
    assert parse(messages=[{"role": "user", "content": "hi"}], stop="###").stop == ("###",)
    stream = parse(messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True})
    assert stream.stream and stream.include_usage


def test_messages_merge_roles_and_keep_the_image() -> None:
    req = parse(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "low"}}]},
        {"role": "user", "content": "and answer", "name": "ann"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "again"},
    ])
    assert [(m.role, m.text) for m in req.messages] == [
        ("system", "be brief"), ("user", "look\nand answer"), ("assistant", "ok"), ("user", "again")]
    assert req.messages[1].image_url == "data:image/png;base64,AAAA" and req.image_url == req.messages[1].image_url


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "a", "extra": 1}]}, "messages[0].extra"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "user", "content": "a"}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": float("nan")}, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": 2**70}, "seed"),
])
def test_bad_arguments_name_their_param(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse(**body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_defaults_of_unsupported_arguments_are_accepted() -> None:
    req = parse(messages=[{"role": "user", "content": "a"}], frequency_penalty=0, presence_penalty=0.0,
                logprobs=False, tools=[], tool_choice="none", response_format={"type": "text"}, n=1,
                reasoning_effort="medium", metadata={"k": "v"}, store=False, user="u")
    assert req.max_tokens == 20


@pytest.mark.parametrize(("stops", "pieces", "sent", "stopped"), [
    (("END",), ["abc E", "N", "D tail"], ["abc ", "", ""], True),
    (("END",), ["abc E", "x"], ["abc ", "Ex"], False),
    (("\n###",), ["one\n", "##", "#"], ["one", "", ""], True),
    ((), ["a", "b"], ["a", "b"], False),
])
def test_stop_filter_never_sends_past_a_stop(stops, pieces, sent, stopped) -> None:
    filt = StopFilter(stops)
    assert [filt.feed(p) for p in pieces] == sent
    assert filt.stopped is stopped
    tail = filt.flush()
    assert "".join(sent) + tail == apply_stop("".join(pieces), stops)[0]


def test_apply_stop_cuts_at_the_earliest() -> None:
    assert apply_stop("a STOP b END", ("END", "STOP")) == ("a ", True)
    assert apply_stop("plain", ("END",)) == ("plain", False)


def test_url_allow_list() -> None:
    prefixes = ("https://images.example.org/public/",)
    assert url_allowed("https://images.example.org/public/cat.png", prefixes)
    assert not url_allowed("https://images.example.org/private/cat.png", prefixes)
    assert not url_allowed("https://images.example.org.evil.net/public/cat.png", prefixes)
    assert not url_allowed("https://images.example.org/public/../private/cat.png", prefixes)
    assert not url_allowed("https://user:pw@images.example.org/public/cat.png", prefixes)
    assert not url_allowed("https://images.example.org/public/cat.png", ())


def test_data_uri_decodes_with_line_breaks_and_checks_size(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    wrapped = "\n".join(b64[i:i + 40] for i in range(0, len(b64), 40))
    img = resolve_image(f"data:image/png;base64,{wrapped}", SETTINGS)
    assert img.size == (30, 20) and img.getpixel((0, 0)) == (1, 2, 3)
    small = ServerSettings(model_name="m", max_image_bytes=50)
    with pytest.raises(APIError, match="over the limit of 50 bytes"):
        resolve_image(f"data:image/png;base64,{b64}", small)


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(SphinxError, match="max_queue"):
        ServerSettings(max_queue=0)
    with pytest.raises(SphinxError, match="default_max_tokens"):
        ServerSettings(max_tokens_limit=10, default_max_tokens=11)
    with pytest.raises(SphinxError, match="allowed URL prefix"):
        ServerSettings(allowed_url_prefixes=("https://example.org",))
    with pytest.raises(SphinxError, match="image root"):
        ServerSettings(image_root=tmp_path / "missing")
    assert ServerSettings(image_root=tmp_path).image_root == tmp_path.resolve()
