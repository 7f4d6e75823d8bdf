"""Pixels, views, bad images, the chat template and labels, and the placeholder count of every preset."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sphinx_mllm.config import CLIP_MEAN, CLIP_STD, SphinxConfig
from sphinx_mllm.processing import (
    IGNORE_INDEX,
    BadImageError,
    ImagePreprocessor,
    SphinxProcessor,
    get_template,
    load_image,
    make_views,
    pad_to_square,
    render,
)
from sphinx_mllm.processing.image import PAD_FILL, normalize
from sphinx_mllm.processing.views import pick_views
from sphinx_mllm.utils.errors import SphinxError

FILL = PAD_FILL


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- pixels
def test_landscape_is_padded_top_and_bottom_with_the_fill_colour() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = np.asarray(pad_to_square(img))
    assert sq.shape == (40, 40, 3)
    assert (sq[:10] == FILL).all() and (sq[30:] == FILL).all()  # (40 - 20) // 2 = 10 rows each side
    assert (sq[10:30] == (255, 0, 0)).all()


def test_portrait_with_odd_pad_puts_the_extra_column_on_the_right() -> None:
    img = Image.new("RGB", (7, 10), (0, 255, 0))
    sq = np.asarray(pad_to_square(img))
    assert sq.shape == (10, 10, 3)
    assert (sq[:, :1] == FILL).all()  # left pad (10 - 7) // 2 = 1
    assert (sq[:, 1:8] == (0, 255, 0)).all()
    assert (sq[:, 8:] == FILL).all()  # right pad 2


def test_fill_colour_normalises_to_about_zero() -> None:
    # The fill is CLIP mean x 255 truncated, so padding is ~0 after normalisation.
    t = normalize(Image.new("RGB", (2, 2), FILL))
    expected = (torch.tensor(FILL) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(t[:, 0, 0], expected)
    assert t.abs().max() < 0.02


def test_preprocessor_output_and_sizes() -> None:
    pixels, sizes = ImagePreprocessor(image_size=448)([Image.new("RGB", (300, 200)), Image.new("RGB", (10, 50))])
    assert pixels.shape == (2, 3, 448, 448) and pixels.dtype == torch.float32
    assert sizes == [(300, 200), (10, 50)]


def test_views_are_global_plus_raster_quadrants() -> None:
    x = torch.randn(2, 3, 448, 448)
    views = make_views(x, view_size=224, grid=2)
    assert views.shape == (2, 5, 3, 224, 224)
    assert torch.equal(views[:, 1], x[..., :224, :224])  # top-left
    assert torch.equal(views[:, 2], x[..., :224, 224:])  # top-right
    assert torch.equal(views[:, 3], x[..., 224:, :224])  # bottom-left
    assert torch.equal(views[:, 4], x[..., 224:, 224:])  # bottom-right
    glob = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    assert torch.equal(views[:, 0], glob)


def test_views_of_a_larger_square_are_cut_from_its_downscale() -> None:
    # Tiny-1k / MoE-1k: 224 encoders see a 448 downscale of the 1024 image cut into quadrants.
    x = torch.randn(1, 3, 1024, 1024)
    views = make_views(x, view_size=224, grid=2)
    down = torch.nn.functional.interpolate(x, size=(448, 448), mode="bicubic", align_corners=False)
    assert torch.equal(views[:, 4], down[..., 224:, 224:])
    v3 = make_views(torch.randn(1, 3, 672, 672), view_size=224, grid=3)
    assert v3.shape[1] == 10


def test_picked_views_equal_the_same_views_of_make_views() -> None:
    # The world's encoder pre-training cuts one view per item; it must be bit-for-bit what the model sees.
    torch.manual_seed(0)
    x = torch.randn(7, 3, 448, 448)
    which = torch.tensor([0, 1, 2, 3, 4, 0, 3])
    for size in (224, 112):
        assert torch.equal(pick_views(x, size, 2, which), make_views(x, size, 2)[torch.arange(7), which])
    assert torch.equal(pick_views(x, 224, 0, torch.zeros(7, dtype=torch.long)), make_views(x, 224, 0)[:, 0])
    with pytest.raises(ValueError, match="view 5 out of range"):
        pick_views(x, 224, 2, torch.tensor([5] * 7))


# ------------------------------------------------------------------------------------ bad images
def test_unreadable_bytes() -> None:
    with pytest.raises(BadImageError, match="not a recognised image format"):
        load_image(b"this is not an image")


def test_missing_file(tmp_path) -> None:
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_truncated_jpeg() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_zero_size_image() -> None:
    with pytest.raises(BadImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb_is_refused_from_the_header() -> None:
    big = _png(Image.new("1", (12000, 12000)))  # 144 Mpx, a few KB on disk
    with pytest.raises(BadImageError, match="pixels, over the limit|decompression bomb"):
        load_image(big)
    with pytest.raises(BadImageError, match="over the limit of 1000"):
        load_image(_png(Image.new("RGB", (50, 50))), max_pixels=1000)


def test_cmyk_palette_alpha_and_16bit_are_converted() -> None:
    cmyk = load_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert load_image(_png(pal)).getpixel((1, 1)) == (10, 20, 30)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(grey16).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)


# ------------------------------------------------------------------------------ template, labels
V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions.")


def test_v1_template_exact_strings() -> None:
    text, spans = render([("user", "q1"), ("assistant", "a1"), ("user", "q2")], get_template("v1"),
                         add_generation_prompt=True)
    assert text == V1 + "\n\n### Human: q1\n### Assistant: a1\n### Human: q2\n### Assistant:"
    assert [text[s:e] for s, e in spans] == [" a1\n###"]


def test_roles_must_alternate() -> None:
    with pytest.raises(SphinxError, match="alternate"):
        render([("user", "a"), ("user", "b")], get_template("v1"))


def test_training_labels_cover_answers_and_their_separator(tokenizer) -> None:
    proc = SphinxProcessor(tokenizer, image_size=224, num_image_tokens=7)
    ids, labels = proc.encode_conversation(
        [("human", "what color is the box"), ("gpt", "red"), ("human", "where"), ("gpt", "[0.12,0.30,0.55,0.91]")],
        has_image=True,
    )
    assert ids[0] == tokenizer.bos_token_id and ids[1:8] == [0] * 7 and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(labels)
    assert labels[:8] == [IGNORE_INDEX] * 8 and labels[-1] == IGNORE_INDEX  # BOS, image, EOS outside the loss
    target = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert target == "red\n### [0.12,0.30,0.55,0.91]\n###"
    # Everything outside the targets decodes to the prompt parts.
    prompt = tokenizer.decode([t for t, lab in zip(ids[8:-1], labels[8:-1]) if lab == IGNORE_INDEX])
    assert prompt == V1 + "\n\n### Human: what color is the box\n### Assistant: Human: where\n### Assistant:"


def test_caption_pretraining_labels(tokenizer) -> None:
    proc = SphinxProcessor(tokenizer, image_size=224, num_image_tokens=3)
    ids, labels = proc.encode_caption("a red box", has_image=True)
    assert labels[:4] == [IGNORE_INDEX] * 4 and labels[4:] == ids[4:] and ids[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------ placeholder count
@pytest.mark.parametrize("preset", ["sphinx", "sphinx-1k", "sphinx-2k", "sphinx-tiny", "sphinx-tiny-1k",
                                    "sphinx-moe", "sphinx-moe-1k", "debug", "debug-1k", "debug-moe"])
def test_processor_emits_num_image_tokens_placeholders(preset: str, tokenizer) -> None:
    config = SphinxConfig.from_preset(preset)
    proc = SphinxProcessor.from_config(config, tokenizer)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 32))},
                                         {"type": "text", "text": "what is this"}]}]
    out = proc.apply_chat_template(msgs, add_generation_prompt=True)
    ids = out["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == config.num_image_tokens
    assert ids[0] == tokenizer.bos_token_id
    assert torch.all(ids[1 : 1 + config.num_image_tokens] == config.image_token_id)  # right after BOS
    assert out["pixel_values"].shape == (1, 3, config.image_size, config.image_size)
    assert out["image_sizes"].tolist() == [[32, 64]]


def test_text_only_and_batched_left_padding(tokenizer) -> None:
    proc = SphinxProcessor(tokenizer, image_size=224, num_image_tokens=5)
    out = proc(text=["hi", "a much longer prompt here"], images=[None, Image.new("RGB", (8, 8))])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 2 and out["pixel_values"].shape[0] == 1
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left padding
    assert int((ids[0] == 0).sum()) == 0 and int((ids[1] == 0).sum()) == 5  # pads are EOS, not <unk>
    with pytest.raises(SphinxError, match="2 prompts and 1 images"):
        proc(text=["a", "b"], images=[Image.new("RGB", (8, 8))])


def test_processor_save_and_load(tmp_path, tokenizer) -> None:
    config = SphinxConfig.from_preset("debug-1k")
    proc = SphinxProcessor.from_config(config, tokenizer)
    proc.save_pretrained(tmp_path)
    again = SphinxProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    text = "### Human: red box [0.12,0.30,0.55,0.91]"
    assert again.tokenizer(text)["input_ids"] == proc.tokenizer(text)["input_ids"]
