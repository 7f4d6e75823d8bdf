"""`sphinx-mllm world run --quick` end to end, as CI runs it: every step through the project's CLI, the
blind twin, the report, resuming, and the demo on the trained model. (Pieces: test_world_recipe_parts.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from sphinx_mllm.cli.main import main as cli_main
from sphinx_mllm.world.recipe import ARMS, BIND_FROZEN, BINDINGS, LABEL_TOKENS, PLANS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world-run") / "run"
    assert cli_main(["world", "run", "--quick", "--out", str(out)]) == 0
    return out


def _steps(run: Path) -> dict:
    return json.loads((run / "steps.json").read_text())


def test_every_step_ran_through_the_cli_for_both_arms(quick_run: Path) -> None:
    steps = _steps(quick_run)
    for arm in ARMS:
        for stage in ("features", "fit", "pretrain_real", "pretrain_synthetic", "mix", "caption_losses",
                      "finetune", "evaluate"):
            assert f"{arm}/{stage}" in steps, f"{arm}/{stage} missing"
        assert (quick_run / arm / "finetune" / "final" / "config.json").is_file()
    commands = (quick_run / "commands.sh").read_text().splitlines()
    verbs = {line.split()[1] for line in commands}
    assert {"cache-features", "train", "mix", "eval"} <= verbs
    # the default recipe binds (no text-only language stage): one binding stage on label tokens serves both arms,
    # each arm fits its projection onto them, then trains 3 stages with it frozen and evaluates every held-out task
    assert "language" not in steps and "bind" in steps
    bound = quick_run / "bind" / "final"
    assert (bound / "config.json").is_file() and (bound / LABEL_TOKENS).is_file()
    assert steps["bind"]["result"]["steps"] == BINDINGS["quick"].bare_steps + BINDINGS["quick"].dialog_steps
    assert sum(line.startswith("sphinx-mllm train ") for line in commands) == 3 * len(ARMS)
    assert steps["sighted/fit"]["result"]["r2"] > steps["blind/fit"]["result"]["r2"]  # blank features fit nothing
    config = yaml.safe_load((quick_run / "configs" / "sighted" / "finetune.yaml").read_text())
    assert config["frozen"] == list(BIND_FROZEN)
    evals = sum(line.startswith("sphinx-mllm eval run") for line in commands)
    assert evals == len(ARMS) * len(PLANS["quick"].eval_limits)
    # the blind twin saw only the blank image
    blind_records = (quick_run / "blind" / "data" / "finetune.jsonl").read_text().splitlines()
    assert blind_records and all(json.loads(r)["image"] == "blank.png" for r in blind_records)


def test_report_has_targets_metrics_of_both_arms_and_plots(quick_run: Path) -> None:
    summary = json.loads((quick_run / "report.json").read_text())
    assert [row["metric"] for row in summary["targets"]] == ["vqa.accuracy - blind", "rec.accuracy"]
    for row in summary["targets"]:
        assert row["value"] is not None and row["met"] == (row["value"] >= row["target"])
    for arm in ARMS:
        for task in PLANS["quick"].eval_limits:
            assert 0.0 <= summary["metrics"][arm][task]["accuracy"] <= 1.0
    report = (quick_run / "report.md").read_text()
    assert "## Targets" in report and "blind twin" in report and "## Shuffle check" in report
    for name in ("loss_curves.png", "encoders.png", "metrics.png", "examples.png"):
        assert (quick_run / "plots" / name).read_bytes().startswith(PNG), name


def test_caption_specialists_specialise_and_the_mix_is_no_worse_than_their_mean(quick_run: Path) -> None:
    """SPHINX's weight-mixing claim (the issue's criterion, both arms), measured on held-out captions of each
    domain; each specialist best on its own domain in the sighted arm. (The quick plan's caption stages are short:
    the blind twin's specialists need not specialise. The default plan's do, in both arms: docs/world_report.md.)"""
    steps = _steps(quick_run)
    losses = steps["sighted/caption_losses"]["result"]["losses"]
    assert losses["real"]["real"] < losses["synthetic"]["real"]
    assert losses["synthetic"]["synthetic"] < losses["real"]["synthetic"]
    for arm in ARMS:
        assert steps[f"{arm}/caption_losses"]["result"]["mixed_not_worse_than_mean"] == {"real": True,
                                                                                        "synthetic": True}


NOT_YET = pytest.mark.xfail(
    strict=True, reason="issue 7: within the quick budget the from-scratch LLM does not use the image yet "
    "(docs/world_report.md); strict, so the suite flags the day it does")


@NOT_YET
def test_quick_run_reaches_the_issues_bars(quick_run: Path) -> None:
    summary = json.loads((quick_run / "report.json").read_text())
    assert all(row["met"] for row in summary["targets"]), summary["targets"]


@NOT_YET
def test_swapping_images_between_items_raises_the_answer_loss(quick_run: Path) -> None:
    check = _steps(quick_run)["shuffle_check"]["result"]
    assert check["tokens"] > 100
    assert check["shuffled_loss"] > check["loss"] + 0.05


def test_a_rerun_resumes_after_the_last_finished_step(quick_run: Path) -> None:
    before = _steps(quick_run)
    start = time.perf_counter()
    assert cli_main(["world", "run", "--quick", "--out", str(quick_run)]) == 0
    assert time.perf_counter() - start < 60  # nothing retrained: only the report is rewritten
    assert _steps(quick_run) == before
    # the report's time is the run's, not the resuming call's (which only rewrote the report)
    assert json.loads((quick_run / "report.json").read_text())["seconds"] >= sum(
        before[s]["seconds"] for s in ("world", "encoders", "bind"))


def test_world_demo_answers_held_out_questions(quick_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    draw = quick_run / "demo"
    assert cli_main(["world", "demo", "--run", str(quick_run), "--n", "2", "--draw", str(draw)]) == 0
    out = capsys.readouterr().out
    assert out.count("  truth:") == 4 and out.count("  model:") == 4 and out.count("  blind:") == 4
    drawn = sorted(draw.glob("*.png"))
    assert len(drawn) == 2 and all(p.read_bytes().startswith(PNG) for p in drawn)


def test_world_demo_without_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["world", "demo", "--run", str(tmp_path / "nothing")]) == 2
    assert "world run" in capsys.readouterr().err
    assert cli_main(["world", "demo", "--model", str(tmp_path)]) == 2
    assert "world export" in capsys.readouterr().err


def test_export_ships_the_fine_tuned_model_and_its_card_checks_out(
        quick_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`world export` on a finished run: bfloat16 weights under the size bound, examples, a card whose numbers
    a regenerated world reproduces; the demo runs on the exported folder."""
    from sphinx_mllm.world.shipped import MAX_BYTES, check_checkpoint, read_card

    ship = tmp_path / "ship"
    assert cli_main(["world", "export", "--run", str(quick_run), "--out", str(ship)]) == 0
    card = read_card(ship)
    assert card["source"]["plan"] == "quick" and set(card["metrics"]) == {"vqa", "rec"}
    # the bf16 round trip may flip a few answers (the card keeps both numbers for that): a model that reads its
    # image keeps each view's top-scoring cells, and rounding can swap two near-equal ones (4 of 64 measured)
    flips = abs(card["metrics"]["vqa"]["accuracy"] - card["recipe_metrics"]["sighted"]["vqa"]["accuracy"])
    items = card["eval"]["vqa"]["items"]
    assert flips * items <= max(2, 0.08 * items) + 1e-6
    assert card["bytes"] == sum(p.stat().st_size for p in ship.rglob("*") if p.is_file() and p.name != "shipped.json")
    assert card["bytes"] < MAX_BYTES
    header = json.loads((ship / "model.safetensors").read_bytes()[8:][: int.from_bytes(
        (ship / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    found = check_checkpoint(ship, tmp_path / "check", tasks=["vqa"], runner=_runner)
    assert found["vqa"] == card["metrics"]["vqa"]
    capsys.readouterr()
    assert cli_main(["world", "demo", "--model", str(ship)]) == 0
    out = capsys.readouterr().out
    assert out.count("  truth:") == 6 and "blind twin" in out and "sphinx-mllm chat --model" in out


def _runner(argv: list[str]) -> None:
    assert cli_main(argv) == 0


def test_export_refuses_an_unfinished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "steps.json").write_text("{}")
    (tmp_path / "options.json").write_text('{"seed": 0, "plan": {"name": "quick"}}')
    assert cli_main(["world", "export", "--run", str(tmp_path), "--out", str(tmp_path / "ship")]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert not (tmp_path / "ship").exists()


def test_oracle_features_hold_the_labels_and_the_probe_reads_them(
        quick_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`world oracle-features` writes the world's labels as a cache the run's models accept (same fingerprint);
    `world probe` measures a model on it and on the real cache; a second write without --overwrite is refused."""
    from sphinx_mllm.training.feature_cache import FeatureCache, file_sha256
    from sphinx_mllm.world.dense import dense_objects, view_windows
    from sphinx_mllm.world.encoders import sample_split, world_config_of
    from sphinx_mllm.world.measure import load_for_loss
    from sphinx_mllm.world.oracle import ORACLE_FIELDS, ORACLE_SCALE

    out = tmp_path / "oracle"
    assert cli_main(["world", "oracle-features", "--run", str(quick_run), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nTrain on it")[0])
    assert summary["encoder"] == "convnext" and summary["images"] == sum(
        sum(kinds.values()) for kinds in PLANS["quick"].world.values())
    model, _ = load_for_loss(quick_run / "sighted" / "finetune" / "final")
    cache = FeatureCache(out)
    cache.check(model)  # the run's models take it in place of the real cache
    # a held-out thing alone in the global-view cell of its centre: its colour one-hot sits on that cell
    assert view_windows(2)[0] == (0.0, 0.0, 1.0)

    def centre_cell(o: object) -> int:
        return min(int(o.center[1] * 7), 6) * 7 + min(int(o.center[0] * 7), 6)  # type: ignore[attr-defined]

    image, thing = next(
        (im, t) for im in sample_split(world_config_of(quick_run / "world"), "eval") if im.shapes
        for things in [[o for o in dense_objects(im) if o.slot == "thing"]] for t in things
        if [centre_cell(o) for o in things].count(centre_cell(t)) == 1)
    feats = cache.features_for_image(str(quick_run / "world" / "images" / "eval" / f"{image.name}.png"))
    cell = centre_cell(thing)
    colour_at = ORACLE_FIELDS[0][2]  # the colour block follows the thing's category block
    assert feats["convnext"][0, cell, colour_at + thing.colour].item() == ORACLE_SCALE
    assert feats["convnext"][0, cell, colour_at:colour_at + ORACLE_FIELDS[1][2]].count_nonzero() == 1
    assert feats["clip"].abs().sum() == 0 and feats["dinov2"].abs().sum() == 0
    assert file_sha256(quick_run / "world" / "images" / "eval" / f"{image.name}.png") in cache

    assert cli_main(["world", "oracle-features", "--run", str(quick_run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["world", "oracle-features", "--run", str(tmp_path)]) == 2
    assert "not a `world run` folder" in capsys.readouterr().err

    final = quick_run / "sighted" / "finetune" / "final"
    mixture = quick_run / "data" / "shuffle_check.yaml"
    for features in (out, quick_run / "features"):
        assert cli_main(["world", "probe", "--model", str(final), "--mixture", str(mixture), "--feature-cache",
                         str(features), "--limit", "24", "--json"]) == 0
        probe = json.loads(capsys.readouterr().out)
        assert probe["items"] == 24 and 0.0 <= probe["accuracy"] <= 1.0 and 0.0 <= probe["shuffled_accuracy"] <= 1.0
        assert sum(n for _, _, n in probe["groups"].values()) == 24
        assert any(g.startswith("vqa:") for g in probe["groups"]) and probe["shuffled_loss"] is not None
    assert cli_main(["world", "probe", "--model", str(final), "--mixture", str(mixture), "--batch-size", "1"]) == 2
    assert "--batch-size must be >= 2" in capsys.readouterr().err
    assert cli_main(["world", "probe", "--model", str(tmp_path), "--mixture", str(mixture)]) == 2
    assert "not a saved model folder" in capsys.readouterr().err
