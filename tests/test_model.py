"""The model: fusion as the release does it, image-token counts, forward/backward, generation, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from sphinx_mllm.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SphinxConfig
from sphinx_mllm.fusion import align_to_grid, box_phases, cell_centres
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor
from sphinx_mllm.utils.errors import SphinxError


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


# ------------------------------------------------------------------------------------ fusion
def test_convnext_map_is_nearest_upsampled_with_a_mean_cls() -> None:
    spec = SphinxConfig.from_preset("debug").encoder_specs[1]  # ConvNeXt, 8x8 grid
    assert spec.family == "convnext" and spec.grid == 8 and not spec.has_cls
    tokens = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)
    out = align_to_grid(tokens, spec, 16)
    assert out.shape == (2, 257, 3)
    fmap = tokens.reshape(2, 8, 8, 3)
    up = out[:, 1:].reshape(2, 16, 16, 3)
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1), (7, 15), (15, 15), (9, 4)]:
        assert torch.equal(up[:, r, c], fmap[:, r // 2, c // 2])
    assert torch.allclose(out[:, 0], fmap.mean(dim=(1, 2)))


def test_a_smaller_grid_average_pools_each_cell_and_keeps_a_mean_cls() -> None:
    spec = SphinxConfig.from_preset("world-tiny").encoder_specs[1]  # ConvNeXt, 7x7 grid, no CLS
    assert spec.family == "convnext" and spec.grid == 7 and not spec.has_cls
    tokens = torch.randn(2, 49, 5, generator=torch.Generator().manual_seed(0))
    out = align_to_grid(tokens, spec, 3)
    assert out.shape == (2, 10, 5)
    fmap = tokens.reshape(2, 7, 7, 5)
    # Adaptive pooling of 7 to 3: cell i covers rows floor(7i/3) .. ceil(7(i+1)/3) - 1, i.e. 0-2, 2-4, 4-6.
    spans = [(0, 3), (2, 5), (4, 7)]
    pooled = out[:, 1:].reshape(2, 3, 3, 5)
    for r, (r0, r1) in enumerate(spans):
        for c, (c0, c1) in enumerate(spans):
            assert torch.allclose(pooled[:, r, c], fmap[:, r0:r1, c0:c1].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(out[:, 0], pooled.mean(dim=(1, 2)), atol=1e-6)


def test_fusion_grid_validation_names_the_problem() -> None:
    groups = [{"name": "visual_proj", "encoders": ["clip", "convnext", "dinov2"], "grid": 10}]
    with pytest.raises(SphinxError, match="does not divide the common grid 10"):
        SphinxConfig.from_preset("world-tiny", fusion=groups)
    with pytest.raises(SphinxError, match="grid 0 must be >= 1"):
        SphinxConfig.from_preset("world-tiny", fusion=[{**groups[0], "grid": 0}])
    pooled = SphinxConfig.from_preset("world-tiny", fusion=[{**groups[0], "grid": 3}])
    assert pooled.num_image_tokens == 5 * (3 * 3 + 1 + 2)


def test_fusion_keep_selects_the_highest_scoring_cells_in_raster_order_with_their_positions() -> None:
    group = {"name": "visual_proj", "encoders": ["clip", "convnext", "dinov2"], "grid": 7, "keep": 4}
    config = SphinxConfig.from_preset("world-tiny", fusion=[group])
    assert config.num_image_tokens == 5 * (4 + 1 + 2)
    assert config.fusion_groups[0].keep == 4
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(config).eval()
    fusion = model.fusion
    feats = {"clip": torch.randn(10, 50, 128), "convnext": torch.randn(10, 49, 192), "dinov2": torch.randn(10, 50, 192)}
    g = config.fusion_groups[0]
    tokens = fusion.group_tokens(g, 7, feats)  # [10, 50, 512]
    scorer = fusion.scorers["visual_proj"]
    with torch.no_grad():
        scorer.weight.zero_()
        scorer.bias.zero_()
        scorer.weight[0, 200] = 1.0  # the score is channel 200 (a ConvNeXt channel)
        out = fusion(feats)  # [2, 5 * 7, 256]
    assert out.shape == (2, 35, 256)
    proj, table = fusion.projections["visual_proj"], fusion.cell_pos["visual_proj"]
    for n in range(10):
        best = tokens[n, 1:, 200].topk(4).indices.sort().values
        with torch.no_grad():
            want = proj(torch.cat([tokens[n, :1], tokens[n, 1:][best]]))
            want[1:] += table[n % 5, best]
        view = out[n // 5, (n % 5) * 7:(n % 5 + 1) * 7]
        assert torch.equal(view[0], fusion.start_img[0, 0]) and torch.equal(view[-1], fusion.end_img[0, 0])
        assert torch.allclose(view[1:-1], want, atol=1e-5)
    with pytest.raises(SphinxError, match="keep=50 needs 1 <= keep"):
        SphinxConfig.from_preset("world-tiny", fusion=[{**group, "keep": 50}])
    saved = SphinxConfig.from_dict(config.to_dict())
    assert saved.fusion_groups == config.fusion_groups


def test_box_phase_channels_turn_an_extent_around_the_cell_into_absolute_corners() -> None:
    """`box_frequencies`: the projection gives per-corner phases of (corner - cell centre); the fusion multiplies
    them by its cell's sinusoids, and a fixed linear read gives cos / sin of the corner's own phase, in any view."""
    freqs = (0.5, 1.0, 2.0, 4.0)
    group = {"name": "visual_proj", "encoders": ["clip", "convnext", "dinov2"], "grid": 7, "keep": 4,
             "box_frequencies": list(freqs)}
    config = SphinxConfig.from_preset("world-tiny", fusion=[group])
    assert config.fusion_groups[0].box_frequencies == freqs
    assert SphinxConfig.from_dict(config.to_dict()).fusion_groups == config.fusion_groups
    assert "box_frequencies" not in SphinxConfig.from_preset("world-tiny-keep").to_dict()["fusion"][0]
    model = SphinxForConditionalGeneration(config).eval()
    fusion, g = model.fusion, config.fusion_groups[0]
    centres = cell_centres(2, 7)  # [5, 49, 2]
    assert torch.allclose(centres[3, 7], torch.tensor([0.5 / 14, 0.5 + 1.5 / 14], dtype=centres.dtype))
    box = torch.tensor([0.52, 0.61, 0.60, 0.70])
    for view, cell in ((0, 31), (4, 3), (2, 45)):
        z = torch.zeros(1, 5, 256)  # CLS + 4 kept cells, before the LayerNorm
        z[0, 2, :64] = box_phases(box, centres[view, cell].float(), freqs)
        cells = torch.tensor([[0, cell, 47, 48]])
        out = fusion.modulate(g, z.repeat(5, 1, 1), cells.repeat(5, 1))[view, 2]  # item n is view n % 5
        for k in range(4):
            block = out[16 * k: 16 * (k + 1)]
            phase = 2 * math.pi * box[k] * torch.tensor(freqs)
            assert torch.allclose(block[:4] - block[4:8], phase.cos(), atol=1e-5)
            assert torch.allclose(block[8:12] + block[12:], phase.sin(), atol=1e-5)
        assert torch.equal(fusion.modulate(g, z, cells)[0, 0], z[0, 0])  # the CLS is left alone
    with pytest.raises(SphinxError, match="box_frequencies needs keep"):
        SphinxConfig.from_preset("world-tiny", fusion=[{**group, "keep": None}])


def _reference_image_tokens(model: SphinxForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The release's encode_image + wrapping, written out independently for the small presets."""
    cfg = model.config
    enc = model.vision.encoders
    proj = model.fusion.projections
    s = cfg.image_size
    if cfg.view_grid:
        g = cfg.view_grid
        glob = F.interpolate(pixels, size=(224, 224), mode="bicubic")
        big = F.interpolate(pixels, size=(224 * g, 224 * g), mode="bicubic") if 224 * g != s else pixels
        crops = [big[..., r * 224:(r + 1) * 224, c * 224:(c + 1) * 224] for r in range(g) for c in range(g)]
        views = torch.stack([glob, *crops], dim=1).flatten(0, 1)
    else:
        views = pixels
    q = enc["qformer"]
    img = q.vision_model(pixel_values=views).last_hidden_state
    qf = q.qformer(query_embeds=q.query_tokens.expand(views.shape[0], -1, -1), encoder_hidden_states=img)
    clip = enc["clip"].model
    clip_tok = clip.post_layernorm(clip(pixel_values=views).last_hidden_state)
    cn = enc["openclip_convnext_xxl"].model
    fmap = cn.encoder(cn.embeddings(F.interpolate(views, size=(256, 256)))).last_hidden_state
    fmap = cn.layernorm(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # head LayerNorm on the map
    fmap = fmap.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2).flatten(-2).permute(0, 2, 1)
    cn_tok = torch.cat([fmap.mean(dim=1, keepdim=True), fmap], dim=1)
    cm, cs = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    dm, ds = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    dino_tok = enc["dinov2_vitg14"].model(pixel_values=(views * cs + cm - dm) / ds).last_hidden_state
    fused = proj["visual_proj"](torch.cat([clip_tok, cn_tok, dino_tok], dim=2))
    qtok = proj["qformer_proj"](qf.last_hidden_state)
    n = views.shape[0]
    per_view = torch.cat([model.fusion.start_img.expand(n, -1, -1), qtok, fused,
                          model.fusion.end_img.expand(n, -1, -1)], dim=1)
    return per_view.reshape(pixels.shape[0], -1, per_view.shape[-1])


@pytest.mark.parametrize("preset", ["debug", "debug-1k"])
def test_image_tokens_match_a_release_style_reference(preset: str) -> None:
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(SphinxConfig.from_preset(preset)).eval()
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        ours = model.get_image_features(pixels)
        ref = _reference_image_tokens(model, pixels)
    assert ours.shape == (2, model.config.num_image_tokens, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["sphinx", "sphinx-1k", "sphinx-2k", "sphinx-tiny", "sphinx-tiny-1k",
                                    "sphinx-moe", "sphinx-moe-1k"])
def test_release_presets_produce_num_image_tokens_vectors_on_meta(preset: str) -> None:
    config = SphinxConfig.from_preset(preset)
    with torch.device("meta"):
        model = SphinxForConditionalGeneration(config)
        feats = model.get_image_features(torch.empty(2, 3, config.image_size, config.image_size))
    assert feats.shape == (2, config.num_image_tokens, config.text_config.hidden_size)


@pytest.mark.parametrize("preset", ["debug-1k", "debug-moe"])
def test_small_presets_forward_with_images(preset: str, tokenizer) -> None:
    torch.manual_seed(0)
    config = SphinxConfig.from_preset(preset)
    model = SphinxForConditionalGeneration(config).eval()
    proc = SphinxProcessor.from_config(config, tokenizer)
    inputs = proc(images=[_image(90, 60)], text=["what is it"])
    assert model.get_image_features(inputs["pixel_values"]).shape[1] == config.num_image_tokens
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------- forward/backward
def _training_batch(proc: SphinxProcessor, n: int = 2) -> dict[str, torch.Tensor]:
    pairs = [proc.encode_conversation([("human", "what color is the box"), ("gpt", ["red", "blue"][i % 2])], True)
             for i in range(n)]
    batch = proc.collate(pairs)
    batch["pixel_values"] = proc.image_processor([_image(80, 50, i) for i in range(n)])[0]
    return batch


def test_forward_backward_trains_llm_and_projector_only(tokenizer) -> None:
    torch.manual_seed(0)
    config = SphinxConfig.from_preset("debug")
    model = SphinxForConditionalGeneration(config)
    model.train()
    assert not model.vision.training  # frozen encoders stay in eval mode
    proc = SphinxProcessor.from_config(config, tokenizer)
    out = model(**_training_batch(proc))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.fusion.projections["visual_proj"][0].weight.grad is not None
    assert model.fusion.start_img.grad is not None
    assert model.language_model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())


def test_loss_falls_on_one_batch(tokenizer) -> None:
    torch.manual_seed(0)
    config = SphinxConfig.from_preset("debug")
    model = SphinxForConditionalGeneration(config).train()
    proc = SphinxProcessor.from_config(config, tokenizer)
    batch = _training_batch(proc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -------------------------------------------------------------------------------------- generation
def _prompt(proc: SphinxProcessor, question: str, image: Image.Image | None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}])


def test_greedy_generate_with_cache_equals_without(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    inputs = _prompt(proc, "what is in the image", _image(64, 48))
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        b = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        # And a hand-written greedy loop without any cache.
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(a, b)
    assert torch.equal(a, ids)


def test_batched_generation_equals_one_by_one(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    questions = ["what", "describe the image in detail please", "where is the red box"]
    images = [_image(64, 48, 1), None, _image(30, 90, 2)]
    with torch.no_grad():
        single = []
        for q, im in zip(questions, images):
            inp = _prompt(proc, q, im)
            out = model.generate(**inp, max_new_tokens=5, do_sample=False)
            single.append(out[0, inp["input_ids"].shape[1]:].tolist())
        convs = [[{"role": "user", "content": ([{"type": "image", "image": im}] if im is not None else [])
                   + [{"type": "text", "text": q}]}] for q, im in zip(questions, images)]
        batch = proc.apply_chat_template(convs)
        assert batch["attention_mask"][:, 0].tolist().count(0) >= 1  # really left padded
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out[:, batch["input_ids"].shape[1]:].tolist() == single


def test_stop_string_ends_generation(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    inputs = _prompt(proc, "hi", None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, stop_strings=proc.stop_strings,
                             tokenizer=proc.tokenizer)
    text = proc.decode(out[0, inputs["input_ids"].shape[1]:])
    assert proc.post_process(text + "\n### Human: more") == text.strip()


# ------------------------------------------------------------------------------------ equivalences
def test_text_only_equals_the_bare_transformers_llm(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    bare = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    bare.load_state_dict(model.language_model.state_dict())
    inputs = _prompt(proc, "no image here", None)
    assert "pixel_values" not in inputs
    with torch.no_grad():
        ours = model(**inputs).logits
        ref = bare(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(ours, ref)


def test_mixed_batch_with_and_without_images_matches_single_rows(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    batch = proc(text=["one", "two"], images=[_image(40, 40), None], padding_side="right")
    with torch.no_grad():
        both = model(**batch).logits
        first = model(**proc(text=["one"], images=[_image(40, 40)])).logits
        second = model(**proc(text=["two"])).logits
    torch.testing.assert_close(both[0, : first.shape[1]], first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1, : second.shape[1]], second[0], rtol=1e-4, atol=1e-4)


def test_placeholder_mismatch_names_both_counts(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    inputs = _prompt(proc, "what", _image(32, 32))
    ids = inputs["input_ids"][:, 3:]  # drop two placeholders (and BOS)
    with pytest.raises(SphinxError, match=r"265 placeholder tokens.*267 fused image vectors"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(SphinxError, match="267 image placeholder tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(SphinxError, match=r"pixel_values must be \[num_images, 3, 224, 224\]"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 100, 100))


# ----------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_and_auto_classes(tmp_path, debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    proc.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded safetensors
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SphinxForConditionalGeneration) and isinstance(loaded_proc, SphinxProcessor)
    inputs = _prompt(loaded_proc, "round trip", _image(50, 70))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert all(not p.requires_grad for p in loaded.vision.parameters())


def test_bf16_forward_runs(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    half = SphinxForConditionalGeneration(model.config).to(torch.bfloat16).eval()
    inputs = _prompt(proc, "bf16", _image(40, 30))
    with torch.no_grad():
        out = half(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_encoder_features_give_the_same_logits_as_pixels(debug_model_and_processor) -> None:
    model, proc = debug_model_and_processor
    inputs = _prompt(proc, "cached", _image(50, 40))
    with torch.no_grad():
        feats = model.vision(inputs["pixel_values"])
        live = model(**inputs).logits
        cached = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       encoder_features=feats).logits
    assert torch.equal(live, cached)
    with pytest.raises(SphinxError, match="lack the encoders"):
        model.get_image_features(encoder_features={"clip": feats["clip"]})


def test_loads_in_threads_leave_transformers_init_and_tying_intact(tmp_path, debug_model_and_processor) -> None:
    """transformers swaps process-wide init/tie functions for no-ops while it loads; concurrent loads (the world
    recipe's two arms) must not leave the no-ops behind, or every later model comes out untied and uninitialised."""
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    model, _ = debug_model_and_processor
    model.save_pretrained(tmp_path / "m")
    tie, normal = PreTrainedModel.tie_weights, torch.nn.init.normal_
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(3):
                SphinxForConditionalGeneration.from_pretrained(tmp_path / "m")
                SphinxForConditionalGeneration(model.config)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert PreTrainedModel.tie_weights is tie and torch.nn.init.normal_ is normal
    tied = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=True)
    llm = LlamaForCausalLM(tied)
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
