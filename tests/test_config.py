"""Config and presets: the image-token count, the public LLM sizes, validation, serialisation."""

from __future__ import annotations

import pytest
import torch

from sphinx_mllm.config import PRESETS, SphinxConfig, available_presets
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.utils.errors import SphinxError

RELEASE_TOKENS = {
    "sphinx": 291, "sphinx-1k": 1455, "sphinx-2k": 2910, "sphinx-tiny": 259,
    "sphinx-tiny-1k": 1295, "sphinx-moe": 291, "sphinx-moe-1k": 1455,
}
RELEASE_VIEWS = {"sphinx": 1, "sphinx-1k": 5, "sphinx-2k": 10, "sphinx-tiny": 1, "sphinx-tiny-1k": 5,
                 "sphinx-moe": 1, "sphinx-moe-1k": 5}


@pytest.mark.parametrize("preset", list(RELEASE_TOKENS))
def test_release_num_image_tokens(preset: str) -> None:
    config = SphinxConfig.from_preset(preset)
    assert config.num_image_tokens == RELEASE_TOKENS[preset]
    assert config.num_views == RELEASE_VIEWS[preset]


# Public parameter counts: LLaMA-2-13B, TinyLlama-1.1B, Mixtral-8x7B.
@pytest.mark.parametrize(("preset", "expected"), [
    ("sphinx", 13_015_864_320), ("sphinx-tiny", 1_100_048_384), ("sphinx-moe", 46_702_792_704),
])
def test_llm_parameter_counts_on_meta(preset: str, expected: int) -> None:
    with torch.device("meta"):
        model = SphinxForConditionalGeneration(SphinxConfig.from_preset(preset))
    counts = model.parameter_counts()
    assert counts["llm"] == expected
    assert next(model.parameters()).device.type == "meta"


def test_encoder_parameter_counts_match_release_manifest() -> None:
    # SPHINX.md section 7: ConvNeXt-XXL 0.843B, DINOv2-g 1.136B, Q-Former side 1.091B, CLIP visual ~0.304B
    # (the release's 0.304B includes the 0.79M output projection that SPHINX does not use).
    with torch.device("meta"):
        counts = SphinxForConditionalGeneration(SphinxConfig.from_preset("sphinx")).parameter_counts()["encoders"]
    assert round(counts["openclip_convnext_xxl"] / 1e9, 3) == 0.843
    assert round(counts["dinov2_vitg14"] / 1e9, 3) == 1.136
    assert round(counts["qformer"] / 1e9, 3) == 1.091
    assert round((counts["clip"] + 1024 * 768) / 1e9, 3) == 0.304


def test_every_preset_validates_and_round_trips(tmp_path) -> None:
    for name in available_presets():
        config = SphinxConfig.from_preset(name)
        config.save_pretrained(tmp_path / name)
        again = SphinxConfig.from_pretrained(tmp_path / name)
        assert again.num_image_tokens == config.num_image_tokens
        assert again.encoder_specs == config.encoder_specs
        assert again.fusion_groups == config.fusion_groups
        assert type(again.text_config) is type(config.text_config)
        assert again.preset == name


def test_small_presets_keep_the_full_structure() -> None:
    for name in ("debug", "debug-1k", "debug-moe"):
        config = SphinxConfig.from_preset(name)
        assert {s.family for s in config.encoder_specs} == {"clip_vit", "convnext", "dinov2", "blip2_qformer"}
        assert [g.name for g in config.fusion_groups] == ["qformer_proj", "visual_proj"]
    assert SphinxConfig.from_preset("debug-1k").num_views == 5
    assert SphinxConfig.from_preset("debug-moe").text_config.model_type == "mixtral"


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(SphinxError, match="unknown preset 'nope'.*sphinx-1k"):
        SphinxConfig.from_preset("nope")


def test_invalid_fusion_is_refused() -> None:
    kwargs = dict(PRESETS["debug"])
    with pytest.raises(SphinxError, match="unknown encoders"):
        SphinxConfig(**{**kwargs, "fusion": [{"name": "visual_proj", "encoders": ["clip", "ghost"]}]})
    with pytest.raises(SphinxError, match="not in any fusion group"):
        SphinxConfig(**{**kwargs, "fusion": [{"name": "visual_proj", "encoders": ["clip"]}]})


def test_freeze_encoders_switch() -> None:
    frozen = SphinxForConditionalGeneration(SphinxConfig.from_preset("debug")).train()
    assert not frozen.vision.training and not any(p.requires_grad for p in frozen.vision.parameters())
    free = SphinxForConditionalGeneration(SphinxConfig.from_preset("debug", freeze_encoders=False)).train()
    assert free.vision.training and all(p.requires_grad for p in free.vision.parameters())
