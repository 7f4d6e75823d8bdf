"""The frozen-encoder feature cache: content, keys, resumability, the fingerprint check, training from it."""

# ruff: noqa: F811  (pytest fixtures imported from test_training_data are redefined as parameters)
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sphinx_mllm.cli.main import main
from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import ImagePreprocessor
from sphinx_mllm.training import FeatureCache, build_feature_cache, encoder_fingerprint, load_config, train
from sphinx_mllm.utils import SphinxError
from test_training_data import (  # noqa: F401  (fixtures)
    _one_thread,
    caption_cache,
    reference_config,
    reference_run,
    train_data,
)


def _model(preset: str = "debug", seed: int = 0) -> SphinxForConditionalGeneration:
    torch.manual_seed(seed)  # what `sphinx-mllm train` / `cache-features` do for a preset
    return SphinxForConditionalGeneration(SphinxConfig.from_preset(preset)).eval()


def test_cache_holds_every_view_of_every_image_keyed_by_content(train_data, caption_cache) -> None:
    cache = FeatureCache(caption_cache)
    model = _model()
    assert cache.fingerprint == encoder_fingerprint(model) and cache.preset == "debug"
    assert len(cache) == 8  # 16 records, 8 distinct images
    image = train_data.images / "green_circle.png"
    key = hashlib.sha256(image.read_bytes()).hexdigest()
    assert key in cache
    feats = cache.features_for_image(str(image))
    pixels, _ = ImagePreprocessor(224)([image])
    with torch.no_grad():
        live = model.vision(pixels)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"clip": (1, 257, 32), "openclip_convnext_xxl": (1, 64, 48),
                                                          "dinov2_vitg14": (1, 257, 32), "qformer": (1, 8, 32)}
    for name, tensor in live.items():
        assert torch.allclose(feats[name], tensor, atol=1e-5), name
    index = json.loads((caption_cache / "index.json").read_text())
    assert index["encoders"]["qformer"] == [8, 32] and index["num_views"] == 1 and index["dtype"] == "float32"
    assert not [p for p in caption_cache.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_rerun_skips_cached_images_and_an_interrupted_build_completes(train_data, caption_cache, tmp_path,
                                                                      capsys) -> None:
    assert main(["cache-features", "--model", "debug", "--mixture", str(train_data.captions),
                 "--output", str(caption_cache)]) == 0
    assert "8 distinct images, 8 already cached, 0 computed" in capsys.readouterr().out
    config = tmp_path / "train.yaml"  # the same through a training config (model, seed, mixture, cache folder)
    config.write_text(json.dumps({"data": {"mixture": str(train_data.captions), "feature_cache": str(caption_cache)},
                                  "run": {"output_dir": str(tmp_path / "unused")}}))
    assert main(["cache-features", "--config", str(config)]) == 0
    assert "8 already cached, 0 computed" in capsys.readouterr().out
    model = _model()
    images = sorted(str(p) for p in train_data.images.glob("*.png"))
    shutil.copy(images[0], tmp_path / "same_bytes_other_name.png")
    first = build_feature_cache(model, images[:3], tmp_path / "c", batch_size=2)  # "killed" after 3 images
    assert (first.computed, first.shards_written) == (3, 1)
    rest = build_feature_cache(model, [*images, str(tmp_path / "same_bytes_other_name.png")], tmp_path / "c")
    assert (rest.images, rest.already_cached, rest.computed, rest.shards_written) == (8, 3, 5, 1)
    cache = FeatureCache(tmp_path / "c")
    assert len(cache) == 8 and len(cache.index["shards"]) == 2
    for name, tensor in cache.features_for_image(images[5]).items():
        assert torch.equal(tensor, FeatureCache(caption_cache).features_for_image(images[5])[name])


def test_unreadable_images_are_skipped_and_counted(train_data, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = build_feature_cache(_model(), [str(bad), str(train_data.images / "red_square.png")], tmp_path / "c")
    assert (report.bad_images, report.computed) == (1, 1)


def test_a_cache_of_other_encoders_is_refused_naming_both(train_data, caption_cache, sp_tokenizer_dir,
                                                         tmp_path) -> None:
    other = _model(seed=1)
    with pytest.raises(SphinxError, match=r"made by other encoders \(preset 'debug', encoder fingerprint "
                                          r"[0-9a-f]{16}\) than this model's \(preset 'debug', encoder fingerprint"):
        FeatureCache(caption_cache).check(other)
    with pytest.raises(SphinxError, match="already caches other encoders"):
        build_feature_cache(other, [str(train_data.images / "red_square.png")], caption_cache)
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "run", data={"feature_cache": str(caption_cache)},
                           run={"seed": 1})
    with pytest.raises(SphinxError, match="was made by other encoders"):
        train(load_config(base=cfg))
    with pytest.raises(SphinxError, match="is not a feature cache"):
        FeatureCache(tmp_path)
    with pytest.raises(SphinxError, match=r"not in the feature cache .*run `sphinx-mllm cache-features`"):
        FeatureCache(caption_cache).features_for_image(str(_new_image(tmp_path / "new.png")))


def _new_image(path: Path) -> Path:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def test_training_from_the_cache_gives_the_live_encoders_losses(reference_run, train_data, caption_cache,
                                                                sp_tokenizer_dir, tmp_path) -> None:
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "cached",
                           data={"feature_cache": str(caption_cache), "num_workers": 1},
                           run={"max_steps": 0, "epochs": 1, "save_every": 0})
    result = train(load_config(base=cfg))  # one epoch = 16 records / 4 = 4 steps; a worker process reads the cache
    assert result.losses == pytest.approx(reference_run.losses[:4], rel=1e-4)


def test_multi_view_features_round_trip_through_the_cache(train_data, tmp_path) -> None:
    model = _model("debug-1k")  # 448 px: a global view + 2 x 2 sub-images
    image = train_data.images / "yellow_square.png"
    build_feature_cache(model, [str(image)], tmp_path / "c")
    feats = FeatureCache(tmp_path / "c").features_for_image(str(image))
    assert feats["clip"].shape == (5, 257, 32)
    pixels, _ = ImagePreprocessor(448)([image])
    ids = torch.tensor([[1] + [0] * model.config.num_image_tokens + [5, 6]])
    with torch.no_grad():
        live = model(input_ids=ids, pixel_values=pixels).logits
        cached = model(input_ids=ids, encoder_features=feats).logits
    assert torch.allclose(live, cached, atol=1e-5)
