"""Release folders: the reader's API and merge rules, the key map against the release's exact manifests,
every failure path (unsafe pickle, missing / unexpected / mis-shaped / corrupt tensors, replicas that
disagree, broken folders), round trips ours -> release -> ours, the converter CLI and the tokenizer.

Numerical parity with an independent reference forward lives in test_formats_reference.py.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from sphinx_mllm import SphinxForConditionalGeneration  # the public import registers the release reader
from sphinx_mllm.cli.main import main
from sphinx_mllm.config import RELEASE_LLAMA_TYPES, SphinxConfig
from sphinx_mllm.formats import ReleaseCheckpoint, load_release_model, save_release, split_kind
from sphinx_mllm.formats.keymap import build_plan, is_known_leftover, meta_to_rotate_half, rotate_half_to_meta
from sphinx_mllm.formats.release import merge_pieces, split_tensor
from sphinx_mllm.processing import SphinxProcessor, load_tokenizer
from sphinx_mllm.processing.template import get_template, render
from sphinx_mllm.utils.errors import SphinxError

FIXTURES = Path(__file__).parent / "fixtures"
SP_MODEL = FIXTURES / "llama_format_tokenizer.model"
MANIFEST_OF = {"llama_ens": "llama_ens", "llama_ens5": "llama_ens", "llama_ens10": "llama_ens",
               "llama_ens_light": "llama_ens_light", "llama_ens5_light": "llama_ens_light",
               "mixtral_sparse_ens": "mixtral_sparse_ens", "mixtral_sparse_ens5": "mixtral_sparse_ens"}


def _manifest(llama_type: str) -> list[dict[str, str]]:
    """The release's exact key list (same keys for variants that differ only in views)."""
    path = FIXTURES / f"release_keys_{MANIFEST_OF[llama_type]}.tsv.gz"
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _shape(text: str) -> tuple[int, ...]:
    return () if text == "scalar" else tuple(int(x) for x in text.split("x"))


@pytest.fixture(scope="module")
def debug_model() -> SphinxForConditionalGeneration:
    torch.manual_seed(0)
    return SphinxForConditionalGeneration(SphinxConfig.from_preset("debug")).eval()


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory, debug_model) -> Path:
    """A 2-shard release folder of the debug model (written by our writer; parity with an independently
    written folder is tested in test_formats_reference.py)."""
    return save_release(debug_model, tmp_path_factory.mktemp("rel") / "release", num_shards=2, tokenizer=SP_MODEL)


def _copy_release(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _shard(folder: Path, rank: int = 0, total: int = 2) -> Path:
    return folder / f"consolidated.{rank:02d}-of-{total:02d}.model.pth"


def _edit_shards(folder: Path, edit) -> None:
    """Apply edit(rank, state_dict) to every shard, in place."""
    shards = sorted(folder.glob("consolidated.*.model.pth"))
    for rank, path in enumerate(shards):
        sd = torch.load(path, weights_only=True)["model"]
        edit(rank, sd)
        torch.save({"model": sd}, path)


# ============================================================================== manifests and key map
@pytest.mark.parametrize("llama_type", sorted(set(MANIFEST_OF.values())))
def test_split_kind_agrees_with_the_release_manifests(llama_type: str) -> None:
    kinds = {"column dim0": "column", "row dim1": "row", "embedding dim1": "embedding", "replicated": "replicated"}
    rows = _manifest(llama_type)
    assert len(rows) in (2349, 1152, 2309)
    for row in rows:
        expected = "moe_expert" if row["tp_split"].startswith("moe_expert") else kinds[row["tp_split"]]
        assert split_kind(row["key"]) == expected, row["key"]


# One preset per manifest in the default run; the variants that differ only in views are marked slow.
_KEYMAP_CASES = [pytest.param(p, t, marks=() if p in ("sphinx", "sphinx-tiny", "sphinx-moe") else pytest.mark.slow)
                 for p, t in sorted(RELEASE_LLAMA_TYPES.items())]


@pytest.mark.parametrize(("preset", "llama_type"), _KEYMAP_CASES)
def test_key_map_gives_exactly_the_release_keys_and_shapes(preset: str, llama_type: str) -> None:
    """Our full-size presets, mapped to the release's names on the meta device, are the release's manifest
    key for key and shape for shape, except the CLIP text-tower leftovers we drop on purpose."""
    config = SphinxConfig.from_preset(preset)
    with torch.device("meta"):
        model = SphinxForConditionalGeneration(config)
    state = model.state_dict()
    produced = {}
    for rule in build_plan(config, list(state)):
        for key, tensor in zip(rule.release, rule.to_release([state[k] for k in rule.ours])):
            produced[key] = tuple(tensor.shape)
    manifest = {row["key"]: _shape(row["shape"]) for row in _manifest(llama_type)}
    dropped = {k for k in manifest if k not in produced}
    assert not set(produced) - set(manifest)
    assert all(is_known_leftover(k) for k in dropped)
    assert dropped == (set() if "light" in llama_type else {
        "llma.clip.positional_embedding", "llma.clip.text_projection", "llma.clip.logit_scale", "llma.clip.visual.proj",
        "llma.clip.token_embedding.weight", "llma.clip.ln_final.weight", "llma.clip.ln_final.bias"})
    assert {k: produced[k] for k in produced} == {k: manifest[k] for k in produced}


def test_rope_permutation_turns_adjacent_pairs_into_halves() -> None:
    """Row 2j / 2j+1 of a Meta head (a RoPE pair) become rows j / j + hd/2 of the rotate-half head."""
    heads, hd = 2, 8
    w = torch.arange(heads * hd, dtype=torch.float32).view(-1, 1).expand(-1, 3).contiguous()
    hf = meta_to_rotate_half(w, heads)
    for h in range(heads):
        for j in range(hd // 2):
            assert hf[h * hd + j, 0] == h * hd + 2 * j
            assert hf[h * hd + hd // 2 + j, 0] == h * hd + 2 * j + 1
    assert torch.equal(rotate_half_to_meta(hf, heads), w)


def test_merge_rules_by_split_kind() -> None:
    a, b = torch.arange(12.0).view(4, 3), torch.arange(12.0, 24.0).view(4, 3)
    assert torch.equal(merge_pieces("llma.layers.0.attention.wq.weight", [a, b]), torch.cat([a, b], 0))
    assert torch.equal(merge_pieces("llma.layers.3.feed_forward.w2.weight", [a, b]), torch.cat([a, b], 1))
    assert torch.equal(merge_pieces("llma.tok_embeddings.weight", [a, b]), torch.cat([a, b], 1))
    assert torch.equal(merge_pieces("llma.clip.visual.proj", [a, a]), a)
    # fused experts: 2 experts x 2 rows per shard; expert e's rows stay together after the merge
    merged = merge_pieces("llma.layers.0.feed_forward.w1", [a, b], num_experts=2)
    assert torch.equal(merged, torch.cat([a[:2], b[:2], a[2:], b[2:]], 0))
    assert all(torch.equal(x, y) for x, y in zip(split_tensor("llma.layers.0.feed_forward.w1", merged, 2, 2), [a, b]))


# ============================================================================== the reader
def test_reader_api_merges_one_tensor_at_a_time(release_dir: Path, debug_model) -> None:
    with ReleaseCheckpoint(release_dir) as ckpt:
        assert ckpt.llama_type == "llama_ens" and ckpt.num_shards == 2
        assert ckpt.llm_args["dim"] == 64 and ckpt.llm_args["n_heads"] == 4
        assert len(ckpt.keys()) == len(ckpt) and "llma.output.weight" in ckpt
        assert ckpt.shape("llma.tok_embeddings.weight") == (32000, 64)
        assert ckpt.dtype("llma.norm.weight") == torch.float32
        ours = debug_model.state_dict()
        assert torch.equal(ckpt.get("llma.tok_embeddings.weight"), ours["language_model.model.embed_tokens.weight"])
        assert torch.equal(ckpt.get("llma.layers.1.feed_forward.w2.weight"),
                           ours["language_model.model.layers.1.mlp.down_proj.weight"])
        assert ckpt.tokenizer_path is not None
        half = torch.load(_shard(release_dir), weights_only=True)["model"]["llma.output.weight"]
        assert half.shape == (16000, 64)  # column-parallel on disk
    with pytest.raises(SphinxError, match="closed"):
        ckpt.get("llma.norm.weight")


def test_bare_state_dict_shards_are_accepted(release_dir: Path, tmp_path: Path) -> None:
    folder = _copy_release(release_dir, tmp_path / "bare")
    for path in folder.glob("consolidated.*"):
        torch.save(torch.load(path, weights_only=True)["model"], path)
    with ReleaseCheckpoint(folder) as ckpt:
        assert ckpt.shape("llma.output.weight") == (32000, 64)


def test_a_pickle_that_would_run_code_is_refused(release_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = _copy_release(release_dir, tmp_path / "evil")
    sd = torch.load(_shard(folder, 1), weights_only=True)["model"]
    torch.save({"model": sd, "extra": Payload()}, _shard(folder, 1))
    with pytest.raises(SphinxError, match=r"consolidated\.01-of-02\.model\.pth: refused.*needs code"):
        SphinxForConditionalGeneration.from_pretrained(folder)
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_and_foreign_shards_are_named(release_dir: Path, tmp_path: Path) -> None:
    folder = _copy_release(release_dir, tmp_path / "trunc")
    data = _shard(folder).read_bytes()
    _shard(folder).write_bytes(data[: len(data) // 2])
    with pytest.raises(SphinxError, match=r"consolidated\.00-of-02\.model\.pth: cannot read"):
        ReleaseCheckpoint(folder)
    torch.save([torch.zeros(2)], _shard(folder))
    with pytest.raises(SphinxError, match="expected a state dict"):
        ReleaseCheckpoint(folder)
    torch.save({"model": {"llma.norm.weight": torch.zeros(2), "step": 3}}, _shard(folder))
    with pytest.raises(SphinxError, match="not tensors.*step"):
        ReleaseCheckpoint(folder)


def test_missing_unexpected_misshaped_and_non_float_tensors_are_all_listed(release_dir: Path, tmp_path: Path,
                                                                           caplog) -> None:
    folder = _copy_release(release_dir, tmp_path / "bad")

    def edit(rank: int, sd: dict) -> None:
        del sd["llma.layers.0.attention.wq.weight"], sd["llma.dinov2_vitg14.mask_token"]
        sd["llma.layers.7.attention.wq.weight"] = torch.zeros(8, 64)
        sd["llma.visual_proj.0.bias"] = torch.zeros(65)
        sd["llma.norm.weight"] = torch.ones(64, dtype=torch.int64)
        sd["llma.clip.logit_scale"] = torch.tensor(4.6)  # a known leftover: dropped, not an error

    _edit_shards(folder, edit)
    with caplog.at_level(logging.DEBUG, logger="sphinx_mllm"), pytest.raises(SphinxError) as err:
        SphinxForConditionalGeneration.from_pretrained(folder)
    msg = str(err.value)
    assert "missing (2): llma.dinov2_vitg14.mask_token, llma.layers.0.attention.wq.weight" in msg
    assert "unexpected (1): llma.layers.7.attention.wq.weight" in msg
    assert "mis-shaped (1): llma.visual_proj.0.bias [65] (model needs [64])" in msg
    assert "not floating point (1): llma.norm.weight (torch.int64)" in msg
    assert "logit_scale" not in msg and "llma.clip.logit_scale" in caplog.text  # said at debug level


def test_replicas_that_disagree_are_named(release_dir: Path, tmp_path: Path) -> None:
    folder = _copy_release(release_dir, tmp_path / "replicas")
    _edit_shards(folder, lambda rank, sd: sd["llma.visual_proj.1.weight"].add_(rank))
    with pytest.raises(SphinxError, match=r"replicated tensor 'llma.visual_proj.1.weight' differs between "
                                          r"consolidated.00-of-02.model.pth and consolidated.01-of-02.model.pth"):
        load_release_model(folder)
    assert load_release_model(folder, check_replicas=False) is not None  # shard 0's copy, when asked


def test_non_finite_tensors_are_reported_as_corrupt(release_dir: Path, tmp_path: Path) -> None:
    folder = _copy_release(release_dir, tmp_path / "nan")

    def edit(rank: int, sd: dict) -> None:
        sd["llma.layers.1.attention.wv.weight"][0, 0] = float("nan")
        sd["llma.start_img"][0, 0, 3] = float("inf")

    _edit_shards(folder, edit)
    with pytest.raises(SphinxError, match=r"corrupt tensors.*llma.layers.1.attention.wv.weight, llma.start_img"):
        load_release_model(folder)


def test_broken_folders_say_what_is_wrong(release_dir: Path, tmp_path: Path) -> None:
    folder = _copy_release(release_dir, tmp_path / "broken")
    _shard(folder, 1).unlink()
    with pytest.raises(SphinxError, match=r"missing \['consolidated.01-of-02.model.pth'\]"):
        ReleaseCheckpoint(folder)
    folder = _copy_release(release_dir, tmp_path / "keysets")
    sd = torch.load(_shard(folder, 1), weights_only=True)["model"]
    del sd["llma.end_img"]
    torch.save({"model": sd}, _shard(folder, 1))
    with pytest.raises(SphinxError, match=r"consolidated.01-of-02.model.pth: lacks \['llma.end_img'\]"):
        ReleaseCheckpoint(folder)
    folder = _copy_release(release_dir, tmp_path / "args")
    args = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(args, n_heads=8, norm_eps=1e-6)))
    with pytest.raises(SphinxError, match=r"config.json disagrees.*n_heads=8 \(config: 4\).*norm_eps"):
        load_release_model(folder)
    (folder / "meta.json").write_text(json.dumps({"llama_type": "llama_ens7"}))
    (folder / "sphinx_mllm.json").unlink()
    with pytest.raises(SphinxError, match="unknown llama_type 'llama_ens7'"):
        load_release_model(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(SphinxError, match="no meta.json"):
        ReleaseCheckpoint(folder)


# ============================================================================== loading and writing
@pytest.mark.parametrize(("preset", "dtype"), [
    ("debug", torch.float32), ("debug-moe", torch.bfloat16),
    pytest.param("debug", torch.bfloat16, marks=pytest.mark.slow),
    pytest.param("debug-moe", torch.float32, marks=pytest.mark.slow)])
def test_ours_to_release_to_ours_is_bit_identical(tmp_path: Path, preset: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = SphinxForConditionalGeneration(SphinxConfig.from_preset(preset)).to(dtype).eval()
    folder = save_release(model, tmp_path / "release", num_shards=2)
    back = SphinxForConditionalGeneration.from_pretrained(folder, dtype="auto")
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == dtype and torch.equal(before[key], after[key]), key
    fresh = SphinxForConditionalGeneration(model.config)  # computed buffers: RoPE frequencies, position ids
    for (name, a), (_, b) in zip(fresh.named_buffers(), back.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.config.to_dict() == model.config.to_dict()
    assert not back.training and not any(p.requires_grad for p in back.vision.parameters())
    assert all(p.requires_grad for p in back.language_model.parameters())


def test_release_shards_hold_the_release_layout(release_dir: Path, debug_model) -> None:
    """The q rows on disk are in Meta's layout: the reader gives them back permuted per head."""
    meta = json.loads((release_dir / "meta.json").read_text())
    args = json.loads((release_dir / "config.json").read_text())
    assert meta == {"llama_type": "llama_ens"}
    assert args["dim"] == 64 and args["n_kv_heads"] == 2
    shard = torch.load(_shard(release_dir), weights_only=True)
    assert set(shard) == {"model"}
    wq = torch.cat([torch.load(_shard(release_dir, r), weights_only=True)["model"]["llma.layers.0.attention.wq.weight"]
                    for r in range(2)])
    ours = debug_model.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(meta_to_rotate_half(wq, 4), ours) and not torch.equal(wq, ours)
    assert hashlib.sha256((release_dir / "tokenizer.model").read_bytes()).digest() == \
        hashlib.sha256(SP_MODEL.read_bytes()).digest()


def test_from_pretrained_honours_the_dtype(release_dir: Path) -> None:
    model = SphinxForConditionalGeneration.from_pretrained(release_dir, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in load_release_model(release_dir).parameters()} == {torch.float32}


def test_the_writer_refuses_what_the_release_cannot_load(debug_model, tmp_path: Path, caplog) -> None:
    with pytest.raises(SphinxError, match="do not divide"):
        save_release(debug_model, tmp_path / "r3", num_shards=3)
    with caplog.at_level(logging.WARNING, logger="sphinx_mllm"):
        folder = save_release(debug_model, tmp_path / "r1", num_shards=1)
    assert not (folder / "tokenizer.model").exists() and "no SentencePiece tokenizer.model" in caplog.text
    with pytest.raises(SphinxError, match="already exists"):
        save_release(debug_model, folder, num_shards=1)


def test_a_failed_write_leaves_no_release_folder(debug_model, tmp_path: Path, monkeypatch) -> None:
    calls = []
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_release(debug_model, tmp_path / "out", num_shards=2)
    assert list(tmp_path.iterdir()) == []


# ============================================================================== tokenizer and processor
def test_the_llama_sentencepiece_file_works_through_load_tokenizer(tmp_path: Path) -> None:
    import sentencepiece

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
    (folder / "config.json").write_text(json.dumps({"dim": 5120, "n_layers": 40}))  # LLM args, not HF
    tok = load_tokenizer(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 32000) == (sp.bos_id(), sp.eos_id(),
                                                                               sp.vocab_size())
    turns = [("human", "Where is the red box? [0.12,0.30,0.55,0.91]"), ("gpt", "On the <p>left</p> [0.1,0.2,0.3,0.4]."),
             ("human", "Und jetzt?  Zwei  Leerzeichen\nund ein Umbruch, 🙂 ok")]
    text, _ = render(turns, get_template("v1"), add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text == sp.decode(ids)


def test_processor_from_a_release_folder(release_dir: Path, tmp_path: Path) -> None:
    proc = SphinxProcessor.from_pretrained(release_dir)  # our extra file: the debug config
    assert proc.num_image_tokens == SphinxConfig.from_preset("debug").num_image_tokens
    ids, labels = proc.encode_conversation([("human", "What is it?"), ("gpt", "A box.")], has_image=True)
    assert ids[0] == 1 and ids[-1] == 2 and proc.pad_token_id == 2
    text_ids = ids[1 + proc.num_image_tokens:-1]
    rendered, _ = render([("human", "What is it?"), ("gpt", "A box.")], get_template("v1"), False)
    assert proc.decode(text_ids) == rendered
    assert proc.decode([t for t in labels if t != -100]) == "A box.\n###"
    folder = _copy_release(release_dir, tmp_path / "plain")
    (folder / "sphinx_mllm.json").unlink()
    (folder / "meta.json").write_text(json.dumps({"llama_type": "llama_ens5"}))
    proc = SphinxProcessor.from_pretrained(folder)  # no extra file: the preset of the llama_type
    assert (proc.num_image_tokens, proc.image_processor.image_size) == (1455, 448)


# ============================================================================== CLI
def test_convert_help_explains_both_directions(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--to release" in out and "--shards" in out and "consolidated.NN-of-MM.model.pth" in out
    assert "Hugging Face" in out and "--dtype" in out


def test_convert_both_ways_with_cli(release_dir: Path, tmp_path: Path, capsys) -> None:
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(release_dir), str(hf), "--dtype", "bfloat16"]) == 0
    model = SphinxForConditionalGeneration.from_pretrained(hf)
    assert next(model.parameters()).dtype == torch.bfloat16 or model.dtype == torch.bfloat16
    assert SphinxProcessor.from_pretrained(hf).num_image_tokens == model.config.num_image_tokens
    assert (hf / "tokenizer.model").read_bytes() == SP_MODEL.read_bytes()
    assert main(["convert", "--to", "release", str(hf), str(back), "--shards", "2"]) == 0
    assert sorted(p.name for p in back.glob("consolidated.*")) == [f"consolidated.0{i}-of-02.model.pth"
                                                                   for i in range(2)]
    resharded = tmp_path / "resharded"  # a release folder can be re-sharded directly
    assert main(["convert", "--to", "release", str(release_dir), str(resharded)]) == 0
    with ReleaseCheckpoint(resharded) as one, ReleaseCheckpoint(release_dir) as two:
        assert one.num_shards == 1 and one.keys() == two.keys()
        assert all(torch.equal(one.get(k), two.get(k)) for k in one)
    assert main(["convert", str(release_dir), str(hf)]) == 2  # exists
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert main(["convert", str(release_dir), str(tmp_path / "y"), "--shards", "2"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "not a release folder" in err and "--shards applies to --to release" in err
