"""Weight mixing (`sphinx_mllm.merging`, `sphinx-mllm mix`): the merge methods on hand-computed tensors, the
streaming mixer on checkpoints written here in the real formats (Hugging Face safetensors shards + index,
release `consolidated.NN-of-MM.model.pth` folders), the module policy, the YAML form and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from sphinx_mllm.cli.main import main
from sphinx_mllm.merging import MixConfig, dare, linear, mix, plot_sweep, slerp, sweep_values, task_arithmetic, ties
from sphinx_mllm.merging.methods import drop_and_rescale, trim_by_magnitude
from sphinx_mllm.merging.policy import EXCLUDED, KEEP, MIX
from sphinx_mllm.utils import SphinxError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- checkpoints in the real formats ---------------------------------------------------------------

def write_hf(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1, extra_files: bool = True) -> Path:
    """A save_pretrained-style folder: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    if shards == 1:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: tensors[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if extra_files:
        (folder / "config.json").write_text(json.dumps({"model_type": "sphinx", "name": folder.name}))
        (folder / "tokenizer_config.json").write_text("{}")
    return folder


def read_hf(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, read with the safetensors library (independent of our reader)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    return out


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(
        x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def tiny_model(seed: int, dtype: torch.dtype = torch.float32, encoder_seed: int = 0) -> dict[str, torch.Tensor]:
    """Our key layout in miniature: LLM, fusion, encoders (encoders drawn from `encoder_seed`)."""
    g = torch.Generator().manual_seed(seed)
    ge = torch.Generator().manual_seed(encoder_seed)
    llm = {
        "language_model.model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "language_model.model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),
        "language_model.lm_head.weight": torch.randn(16, 8, generator=g),
        "fusion.projections.visual_proj.0.weight": torch.randn(8, 6, generator=g),
        "fusion.start_img": torch.randn(1, 1, 8, generator=g),
    }
    enc = {
        "vision.encoders.clip.model.embeddings.patch_embedding.weight": torch.randn(6, 3, 2, 2, generator=ge),
        "vision.encoders.clip.model.post_layernorm.bias": torch.randn(6, generator=ge),
        "vision.encoders.dinov2_vitg14.model.embeddings.cls_token": torch.randn(1, 1, 6, generator=ge),
    }
    out = {k: v.to(dtype) for k, v in {**llm, **enc}.items()}
    out["language_model.model.rotary_emb.steps"] = torch.arange(4)  # a non-float tensor
    return out


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    a, b = tiny_model(1), tiny_model(2)
    return write_hf(tmp_path / "A", a, shards=3), write_hf(tmp_path / "B", b), a, b


# ---- methods on hand-computed tensors --------------------------------------------------------------

def test_linear_endpoints_are_bit_identical_and_half_is_the_average() -> None:
    a = torch.tensor([-0.0, 1.5, -2.25, 3.0]).to(torch.bfloat16)
    b = torch.tensor([1.0, float("nan"), float("inf"), -7.0]).to(torch.bfloat16)
    assert same_bits(linear(a, b, 1.0).to(torch.bfloat16), a)  # -0.0 stays -0.0, nan/inf in b do not leak
    assert same_bits(linear(a, b, 0.0).to(torch.bfloat16), b)
    x, y = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 1.0])
    assert torch.equal(linear(x, y, 0.5), torch.tensor([2.0, 1.0, -1.5]))
    assert torch.allclose(linear(x, y, 0.25), torch.tensor([2.5, 0.5, -0.25]))


def test_slerp_hand_computed() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    r = math.sqrt(0.5)
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([r, r]), atol=1e-6)
    # a third of the 90-degree arc: 30 degrees from a
    assert torch.allclose(slerp(a, b, 1 / 3), torch.tensor([math.cos(math.pi / 6), 0.5]), atol=1e-6)
    # unequal norms: the weights sin((1-t)θ)/sinθ and sin(tθ)/sinθ apply to the raw tensors
    assert torch.allclose(slerp(torch.tensor([2.0, 0.0]), b, 0.5), torch.tensor([2 * r, r]), atol=1e-6)
    # colinear -> linear interpolation (0.75 a + 0.25 b)
    assert torch.allclose(slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), 0.25), torch.tensor([1.25, 2.5]))
    # a zero tensor -> linear interpolation
    assert torch.allclose(slerp(torch.zeros(2), b, 0.5), torch.tensor([0.0, 0.5]))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)


def test_task_arithmetic_hand_computed() -> None:
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    # deltas [1, 0, -1] and [0, 2, 0]; weights 1 and 0.5
    assert torch.equal(task_arithmetic(base, [m1, m2], [1.0, 0.5]), torch.tensor([2.0, 2.0, 0.0]))


def test_ties_trim_elect_disjoint_mean_hand_computed() -> None:
    base = torch.zeros(4)
    m1, m2 = torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, 2.0, 1.0, -4.0])
    assert torch.equal(trim_by_magnitude(m1, 0.5), torch.tensor([3.0, 0.0, 0.0, -2.0]))
    # trimmed: [3, 0, 0, -2], [0, 2, 0, -4]; signs +, +, + (nothing left), -;
    # disjoint means: 3/1, 2/1, 0, (-2 - 4)/2
    assert torch.equal(ties(base, [m1, m2], [1.0, 1.0], 0.5), torch.tensor([3.0, 2.0, 0.0, -3.0]))
    # weighted (2, 1): [6, 0, 0, -4] + [0, 2, 0, -4] over agreeing weights [2, 1, -, 3]
    assert torch.allclose(ties(base, [m1, m2], [2.0, 1.0], 0.5), torch.tensor([3.0, 2.0, 0.0, -8.0 / 3.0]))
    # no trimming: a sign conflict is won by the larger total, the loser is left out
    got = ties(torch.ones(2), [torch.tensor([4.0, 0.0]), torch.tensor([0.0, 3.0])], [1.0, 1.0], 1.0)
    assert torch.equal(got, torch.tensor([4.0, 3.0]))  # deltas [3, -1], [-1, 2] -> +, + -> 1 + 3, 1 + 2


def test_dare_drop_rescale_and_combine() -> None:
    delta = torch.linspace(1.0, 2.0, 10_000)
    dropped = drop_and_rescale(delta, 0.25, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert torch.equal(dropped[kept], delta[kept] * 4.0)  # kept entries rescaled by 1/p
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 2.0, 0.0]), torch.tensor([-2.0, -2.0, 1.0])
    g = torch.Generator()
    # density 1: nothing dropped; linear = task arithmetic: [1, 1, -1] + [-3, -3, 0]
    assert torch.equal(dare(base, [m1, m2], [1.0, 1.0], 1.0, g, "linear"), torch.tensor([-1.0, -1.0, 0.0]))
    # ties combination: elected signs -, -, - ; only agreeing deltas summed (no division): [-3, -3, -1]
    assert torch.equal(dare(base, [m1, m2], [1.0, 1.0], 1.0, g, "ties"), torch.tensor([-2.0, -2.0, 0.0]))
    # seeded: same generator state -> same result
    r1 = dare(torch.zeros(50), [torch.ones(50)], [1.0], 0.5, torch.Generator().manual_seed(3))
    r2 = dare(torch.zeros(50), [torch.ones(50)], [1.0], 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and set(r1.tolist()) == {0.0, 2.0}


def test_method_parameters_are_validated(tmp_path: Path) -> None:
    ok = {"models": ["a", "b"], "output": str(tmp_path / "o")}
    with pytest.raises(SphinxError, match="needs 'beta'"):
        MixConfig.from_dict(ok)
    with pytest.raises(SphinxError, match="does not take"):
        MixConfig.from_dict({**ok, "beta": 0.5, "density": 0.3})
    with pytest.raises(SphinxError, match="needs a base"):
        MixConfig.from_dict({**ok, "method": "ties", "density": 0.5})
    with pytest.raises(SphinxError, match="exactly 2"):
        MixConfig.from_dict({**ok, "models": ["a", "b", "c"], "method": "slerp", "t": 0.5})
    with pytest.raises(SphinxError, match=r"beta must be in \[0, 1\]"):
        MixConfig.from_dict({**ok, "beta": 1.5})
    with pytest.raises(SphinxError, match="2 models but 3 weights"):
        MixConfig.from_dict({**ok, "method": "task_arithmetic", "base": "c", "weights": [1, 1, 1]})
    with pytest.raises(SphinxError, match="unknown merge method"):
        MixConfig.from_dict({**ok, "method": "average"})
    with pytest.raises(SphinxError, match="'beta' must be a number"):
        MixConfig.from_dict({**ok, "beta": "half"})
    assert sweep_values("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(sweep_values("0:1:0.1")) == 11


# ---- the streaming mixer ---------------------------------------------------------------------------

def test_beta_half_is_the_average_and_carries_files(pair: tuple, tmp_path: Path) -> None:
    a_dir, b_dir, a, b = pair
    out = tmp_path / "M"
    report = mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5))
    got = read_hf(out)
    assert set(got) == set(a)
    for key, t in got.items():
        if key.startswith(("language_model.model.layers", "language_model.model.embed", "language_model.lm_head",
                           "fusion.")):
            assert torch.equal(t, (a[key] + b[key]) / 2), key
        else:  # encoders and the int tensor are copied
            assert same_bits(t, a[key]), key
    assert report.counts == {MIX: 6, KEEP: 4, EXCLUDED: 0} and report.total == len(a)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mix_info.json", "model.safetensors",
                                                     "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["name"] == "A"  # files come from A
    info = json.loads((out / "mix_info.json").read_text())
    assert info["params"] == {"beta": 0.5} and info["counts"][MIX] == 6


def test_sweep_endpoints_return_the_inputs_bit_for_bit(tmp_path: Path) -> None:
    a, b = tiny_model(1, torch.bfloat16), tiny_model(2, torch.bfloat16)
    a_dir, b_dir = write_hf(tmp_path / "A", a, shards=2), write_hf(tmp_path / "B", b, shards=3)
    out = tmp_path / "sweep"
    report = mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), sweep="0:1:0.5"))
    assert sorted(p.name for p in out.iterdir()) == ["beta_0.00", "beta_0.50", "beta_1.00"]
    assert [p["beta"] for p in report.params] == [0.0, 0.5, 1.0]
    one, zero, half = read_hf(out / "beta_1.00"), read_hf(out / "beta_0.00"), read_hf(out / "beta_0.50")
    for key in a:
        assert same_bits(one[key], a[key]), key
        expected_b = b[key] if key.startswith(("language_model.model.layers", "fusion", "language_model.lm",
                                                "language_model.model.embed")) else a[key]
        assert same_bits(zero[key], expected_b), key
        assert half[key].dtype == a[key].dtype
    key = "language_model.lm_head.weight"
    assert torch.equal(half[key], ((a[key].float() + b[key].float()) / 2).to(torch.bfloat16))


def test_mismatched_inputs_fail_with_the_full_list(tmp_path: Path) -> None:
    a, b = tiny_model(1), tiny_model(2)
    b.pop("fusion.start_img")
    b.pop("vision.encoders.clip.model.post_layernorm.bias")
    b["language_model.extra.weight"] = torch.zeros(2)
    b["language_model.lm_head.weight"] = torch.zeros(17, 8)
    b["language_model.model.layers.0.input_layernorm.weight"] = torch.zeros(9)
    a_dir, b_dir = write_hf(tmp_path / "A", a), write_hf(tmp_path / "B", b)
    out = tmp_path / "M"
    with pytest.raises(SphinxError) as err:
        mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5))
    msg = str(err.value)
    assert "5 problems" in msg
    assert "fusion.start_img: missing in B" in msg
    assert "vision.encoders.clip.model.post_layernorm.bias: missing in B" in msg
    assert "language_model.extra.weight: missing in A" in msg
    assert "language_model.lm_head.weight: shapes differ (A [16, 8], B [17, 8])" in msg
    assert "language_model.model.layers.0.input_layernorm.weight: shapes differ (A [8], B [9])" in msg
    assert not out.exists()


def test_encoder_mismatch_is_reported_then_allowed_or_included(tmp_path: Path) -> None:
    a, b = tiny_model(1), tiny_model(2, encoder_seed=5)  # every encoder tensor differs
    b["vision.encoders.dinov2_vitg14.model.embeddings.cls_token"] = a[
        "vision.encoders.dinov2_vitg14.model.embeddings.cls_token"].clone()  # ... but this one
    a_dir, b_dir = write_hf(tmp_path / "A", a), write_hf(tmp_path / "B", b)
    models = (str(a_dir), str(b_dir))
    with pytest.raises(SphinxError) as err:
        mix(MixConfig(models=models, output=str(tmp_path / "M"), beta=0.5))
    msg = str(err.value)
    assert msg.startswith("2 tensors that are not mixed")
    assert ("vision.encoders.clip (2 tensors): vision.encoders.clip.model.embeddings.patch_embedding.weight, "
            "vision.encoders.clip.model.post_layernorm.bias") in msg
    assert "dinov2" not in msg and not (tmp_path / "M").exists()
    report = mix(MixConfig(models=models, output=str(tmp_path / "M1"), beta=0.5, allow_encoder_mismatch=True))
    got = read_hf(tmp_path / "M1")
    assert len(report.differing_kept) == 2
    key = "vision.encoders.clip.model.post_layernorm.bias"
    assert same_bits(got[key], a[key])
    report = mix(MixConfig(models=models, output=str(tmp_path / "M2"), beta=0.5, include=("vision.encoders.clip.*",)))
    got = read_hf(tmp_path / "M2")
    assert torch.equal(got[key], (a[key] + b[key]) / 2) and report.counts[MIX] == 8


def test_exclude_copies_from_a_and_counts_add_up(pair: tuple, tmp_path: Path) -> None:
    a_dir, b_dir, a, _ = pair
    cfg = MixConfig(models=(str(a_dir), str(b_dir)), output=str(tmp_path / "M"), beta=0.5,
                    exclude=("language_model.lm_head.*", "fusion.*"))
    report = mix(cfg)
    got = read_hf(tmp_path / "M")
    assert same_bits(got["language_model.lm_head.weight"], a["language_model.lm_head.weight"])
    assert same_bits(got["fusion.start_img"], a["fusion.start_img"])
    assert report.counts == {MIX: 3, KEEP: 4, EXCLUDED: 3}
    assert sum(report.counts.values()) == len(a) == len(got)
    with pytest.raises(SphinxError, match=r"match no tensor: \['lm_head\.\*'\]"):
        mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(tmp_path / "M3"), beta=0.5, exclude=("lm_head.*",)))


def test_completeness_check_names_what_was_lost(pair: tuple) -> None:
    from types import SimpleNamespace

    from sphinx_mllm.merging.mixing import _check_complete
    from sphinx_mllm.merging.sources import SafetensorsSource

    a_dir, _, a, _ = pair
    sources = {"A": SafetensorsSource(a_dir)}
    keys = list(a)
    counts = {MIX: 6, KEEP: 4, EXCLUDED: 0}
    _check_complete(sources, counts, [SimpleNamespace(written=keys, folder="out")])  # complete: no error
    with pytest.raises(SphinxError, match=r"not written: \['fusion.start_img'\]"):
        _check_complete(sources, counts, [SimpleNamespace(written=[k for k in keys if k != "fusion.start_img"],
                                                          folder="out")])
    with pytest.raises(SphinxError, match="10 tensors, 9 handled"):
        _check_complete(sources, {MIX: 5, KEEP: 4, EXCLUDED: 0}, [SimpleNamespace(written=keys, folder="out")])


def test_task_arithmetic_ties_dare_through_the_mixer(tmp_path: Path) -> None:
    base, m1, m2 = tiny_model(0), tiny_model(1), tiny_model(2)
    dirs = [write_hf(tmp_path / n, sd) for n, sd in (("base", base), ("m1", m1), ("m2", m2))]
    models, key = (str(dirs[1]), str(dirs[2])), "fusion.projections.visual_proj.0.weight"
    mix(MixConfig(models=models, base=str(dirs[0]), output=str(tmp_path / "ta"), method="task_arithmetic",
                  weights=(0.5, 0.25)))
    expected = base[key] + 0.5 * (m1[key] - base[key]) + 0.25 * (m2[key] - base[key])
    assert torch.allclose(read_hf(tmp_path / "ta")[key], expected, atol=1e-6)
    mix(MixConfig(models=models, base=str(dirs[0]), output=str(tmp_path / "ties"), method="ties", density=0.5))
    assert torch.equal(read_hf(tmp_path / "ties")[key], ties(base[key], [m1[key], m2[key]], [1.0, 1.0], 0.5))
    for run in ("d1", "d2"):
        mix(MixConfig(models=models, base=str(dirs[0]), output=str(tmp_path / run), method="dare", density=0.5,
                      seed=7, combine="ties"))
    d1, d2 = read_hf(tmp_path / "d1"), read_hf(tmp_path / "d2")
    assert all(torch.equal(d1[k], d2[k]) for k in d1)  # seeded per tensor name: reproducible
    assert not torch.equal(d1[key], base[key])


def test_dtype_and_shards(pair: tuple, tmp_path: Path) -> None:
    a_dir, b_dir, a, _ = pair
    out = tmp_path / "M"
    report = mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5, dtype="bfloat16",
                           max_shard_size="300B"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert report.shards_per_output == len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got = read_hf(out)
    assert set(got) == set(a) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert got["language_model.lm_head.weight"].dtype == torch.bfloat16
    assert got["language_model.model.rotary_emb.steps"].dtype == torch.int64  # not a float: unchanged
    # ~970 B of bf16 tensors (the largest 256 B) in shards of at most 300 B
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= 300


def test_failure_midway_leaves_no_output(pair: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_dir, b_dir, _, _ = pair
    from sphinx_mllm.merging import methods

    calls = {"n": 0}
    real = methods.linear

    def failing(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(a, b, beta)

    monkeypatch.setattr(methods, "linear", failing)
    out = tmp_path / "M"
    with pytest.raises(RuntimeError, match="disk on fire"):
        mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5, max_shard_size="300B"))
    assert calls["n"] == 4
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B"]  # no partial folder left beside it
    with pytest.raises(FileExistsError):  # an existing output is not replaced without overwrite
        (tmp_path / "M").mkdir()
        mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5))


# ---- release folders -------------------------------------------------------------------------------

def release_model(seed: int) -> dict[str, torch.Tensor]:
    """Release key names (SPHINX.md section 7) with small shapes; bf16 as released."""
    g = torch.Generator().manual_seed(seed)
    ge = torch.Generator().manual_seed(0)  # encoders shared
    sd = {
        "llma.tok_embeddings.weight": torch.randn(12, 8, generator=g),
        "llma.layers.0.attention.wq.weight": torch.randn(8, 8, generator=g),
        "llma.layers.0.attention.wo.weight": torch.randn(8, 8, generator=g),
        "llma.layers.0.feed_forward.w1.weight": torch.randn(16, 8, generator=g),
        "llma.layers.0.feed_forward.w2.weight": torch.randn(8, 16, generator=g),
        "llma.layers.0.attention_norm.weight": torch.randn(8, generator=g),
        "llma.output.weight": torch.randn(12, 8, generator=g),
        "llma.visual_proj.0.weight": torch.randn(8, 6, generator=g),
        "llma.start_img": torch.randn(1, 1, 8, generator=g),
        "llma.clip.visual.conv1.weight": torch.randn(6, 3, 2, 2, generator=ge),
        "llma.qformer.query_tokens": torch.randn(1, 4, 6, generator=ge),
    }
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


SPLIT_DIM = {"llma.tok_embeddings.weight": 1, "llma.layers.0.attention.wq.weight": 0,
             "llma.layers.0.attention.wo.weight": 1, "llma.layers.0.feed_forward.w1.weight": 0,
             "llma.layers.0.feed_forward.w2.weight": 1, "llma.output.weight": 0}


def write_release(folder: Path, sd: dict[str, torch.Tensor], tp: int = 2) -> Path:
    """`consolidated.NN-of-MM.model.pth` per tensor-parallel rank ({"model": state_dict}), the release's
    split rules applied by hand, plus config.json, meta.json, tokenizer.model."""
    folder.mkdir(parents=True)
    for rank in range(tp):
        part = {k: (v.chunk(tp, dim=SPLIT_DIM[k])[rank].clone() if k in SPLIT_DIM else v.clone())
                for k, v in sd.items()}
        torch.save({"model": part}, folder / f"consolidated.{rank:02d}-of-{tp:02d}.model.pth")
    (folder / "config.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2}))
    (folder / "meta.json").write_text(json.dumps({"llama_type": "llama_ens"}))
    (folder / "tokenizer.model").write_bytes(b"\x0a\x03sp")
    return folder


def test_release_inputs(tmp_path: Path) -> None:
    a, b = release_model(1), release_model(2)
    a_dir, b_dir = write_release(tmp_path / "relA", a), write_release(tmp_path / "relB", b, tp=1)
    out = tmp_path / "M"
    report = mix(MixConfig(models=(str(a_dir), str(b_dir)), output=str(out), beta=0.5))
    got = read_hf(out)
    assert set(got) == set(a)
    assert report.counts == {MIX: 9, KEEP: 2, EXCLUDED: 0}
    for key in a:
        if key.startswith(("llma.clip.", "llma.qformer.")):
            assert same_bits(got[key], a[key]), key
        else:  # merged across the two TP shards, then mixed; bf16 kept
            assert torch.equal(got[key], ((a[key].float() + b[key].float()) / 2).to(torch.bfloat16)), key
    assert {"config.json", "meta.json", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.pth"))
    hf = write_hf(tmp_path / "hf", tiny_model(1))
    with pytest.raises(SphinxError, match="different formats"):
        mix(MixConfig(models=(str(a_dir), str(hf)), output=str(tmp_path / "M2"), beta=0.5))


# ---- CLI, YAML, plot -------------------------------------------------------------------------------

def test_cli_mix_and_yaml_form(pair: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_dir, b_dir, a, b = pair
    rc = main(["mix", str(a_dir), str(b_dir), "--beta", "0.25", "-o", str(tmp_path / "cli"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and (
        "6 mixed: fusion.projections (1), fusion.start_img (1), language_model.lm_head (1), language_model.model (3)"
    ) in out
    assert "4 copied (identical in every input): language_model.model (1), vision.encoders.clip (2)" in out
    key = "language_model.lm_head.weight"
    assert torch.allclose(read_hf(tmp_path / "cli")[key], 0.25 * a[key] + 0.75 * b[key])

    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(a_dir), str(b_dir)], "output": str(tmp_path / "yaml"),
                                   "method": "slerp", "t": 0.5, "exclude": ["fusion.*"]}))
    rc = main(["mix", "--config", str(cfg), "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["method"] == "slerp" and report["counts"][EXCLUDED] == 2
    assert torch.allclose(read_hf(tmp_path / "yaml")[key], slerp(a[key], b[key], 0.5))
    # a flag beside --config wins over the YAML
    rc = main(["mix", "--config", str(cfg), "--t", "0", "-o", str(tmp_path / "yaml0"), "--no-progress"])
    assert rc == 0 and torch.equal(read_hf(tmp_path / "yaml0")[key], a[key])

    cfg.write_text(yaml.safe_dump({"models": [str(a_dir), str(b_dir)], "output": "x", "beta": 0.5, "betta": 1}))
    assert main(["mix", "--config", str(cfg)]) == 2
    assert "unknown keys ['betta']" in capsys.readouterr().err


def test_cli_eval_needs_a_sweep_and_a_sweep_writes_every_value(pair: tuple, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    a_dir, b_dir, _, _ = pair
    rc = main(["mix", "--beta", "0.5", str(a_dir), str(b_dir), "-o", str(tmp_path / "s"), "--eval", "vqav2"])
    assert rc == 2 and "give --sweep too" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    rc = main(["mix", "--sweep", "0:1:0.1", str(a_dir), str(b_dir), "-o", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0 and len(list((tmp_path / "s").iterdir())) == 11
    assert (tmp_path / "s" / "beta_0.30" / "model.safetensors").is_file()


def test_cli_sweep_is_scored_by_the_evaluation_runner(debug_model_and_processor, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    model, processor = debug_model_and_processor
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    model.save_pretrained(a_dir)
    processor.save_pretrained(a_dir)
    other = type(model).from_pretrained(a_dir)
    with torch.no_grad():
        for p in other.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(b_dir)
    processor.save_pretrained(b_dir)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({
        "id": "q1", "image": "red.png", "width": 40, "height": 30, "task": "vqa",
        "conversations": [{"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "red"}],
        "meta": {"question_id": 1, "answers": ["red"] * 10}}) + "\n")
    out = tmp_path / "sweep"
    rc = main(["mix", "--sweep", "0:1:0.5", str(a_dir), str(b_dir), "-o", str(out), "--no-progress",
               "--eval", str(bench), "--eval-images-root", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    scores = json.loads((out / "sweep_scores.json").read_text())
    assert set(scores["scores"]) == {"0.0", "0.5", "1.0"} and scores["param"] == "beta"
    assert all(0.0 <= v <= 1.0 for v in scores["scores"].values())
    assert (out / "beta_0.50" / "eval" / "metrics.json").is_file()
    with Image.open(out / "sweep.png") as plot:
        assert plot.size[0] > 100


def test_shipped_example_config_is_valid() -> None:
    data = yaml.safe_load((CONFIGS / "mix.yaml").read_text())
    cfg = MixConfig.from_dict(data)
    assert cfg.method == "linear" and cfg.beta == 0.5 and len(cfg.models) == 2


def test_plot_sweep(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "sweep.png"
    plot_sweep({0.0: 0.41, 0.5: 0.55, 1.0: 0.48, 0.25: 0.52}, out, metric="VQAv2 accuracy")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["sweep.png"]  # no temporary file left
    with pytest.raises(SphinxError, match="no scores"):
        plot_sweep({}, tmp_path / "empty.png")
    with pytest.raises(SphinxError, match="finite"):
        plot_sweep({0.5: float("nan")}, tmp_path / "nan.png")


def test_a_real_model_mix_loads_with_from_pretrained(debug_model_and_processor, tmp_path: Path) -> None:
    from sphinx_mllm.modeling import SphinxForConditionalGeneration

    model, _ = debug_model_and_processor
    model.save_pretrained(tmp_path / "A", max_shard_size="2MB")
    # B: the same model with every LLM weight shifted by 1 (the shared fixture is not touched)
    saved = read_hf(tmp_path / "A")
    shifted = {k: (t + 1.0 if k.startswith("language_model.") else t) for k, t in saved.items()}
    write_hf(tmp_path / "B", shifted, extra_files=False)
    (tmp_path / "B" / "config.json").write_bytes((tmp_path / "A" / "config.json").read_bytes())
    mix(MixConfig(models=(str(tmp_path / "A"), str(tmp_path / "B")), output=str(tmp_path / "M"), beta=0.5))
    mixed = SphinxForConditionalGeneration.from_pretrained(tmp_path / "M").state_dict()
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(mixed[key], saved[key] + 0.5, atol=1e-6)
    enc = next(k for k in saved if k.startswith("vision.encoders."))
    assert torch.equal(mixed[enc], saved[enc])
