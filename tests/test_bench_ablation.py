"""`cav bench ablation --quick`: every row trained and scored in a reduced way; outputs, JSON shape, parameters."""

import json
import math
from pathlib import Path

import pytest

from cav.bench.ablation import (
    DEFAULT_RECIPE,
    METRICS,
    bootstrap,
    format_markdown,
    load_settings,
    rescore,
    run_ablation,
    write_outputs,
)
from cav.errors import CavError

ROW_NAMES = ["base (no adapter)", "No AA", "S-LoRA AA", "TI AA", "Both AA", "MotionDirector r2", "MotionDirector r4"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAV_LPIPS", str(out / "no-such-lpips.safetensors"))  # the same answer with or without a cache
        result = run_ablation(DEFAULT_RECIPE, quick=True, out=out, log=lambda line: None)
    paths = write_outputs(result, out / "report")
    return result, paths, out


def _rows(result):
    return {r["name"]: r for r in result["rows"]}


def test_outputs_exist(quick):
    result, paths, out = quick
    for key in ("json", "markdown"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert (out / "partial.json").is_file()
    assert len(list((out / "references").glob("*.mp4"))) == 1
    assert len(list((out / "sheets").glob("*.png"))) == 1
    for run in result["runs"]:
        if run["run"] is not None:
            assert (out / "runs").is_dir() and (Path(run["run"]) / "t_lora").is_dir()
    assert paths["markdown"].read_text() == format_markdown(result) + "\n"
    assert json.loads(paths["json"].read_text())["rows"][0]["name"] == ROW_NAMES[0]


def test_json_shape(quick):
    result, _, _ = quick
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert set(result) >= {"rows", "command", "wall_seconds", "settings"}
    assert "--quick" in result["command"] and result["wall_seconds"] > 0 and result["complete"] is True
    assert [r["name"] for r in result["rows"]] == ROW_NAMES
    s = result["settings"]
    assert s["quick"] is True and s["completed_references"] == s["n_references"] == 1
    n_videos = s["n_references"] * s["prompts_per_reference"] * s["seeds"]
    for row in result["rows"]:
        assert row["n_videos"] == n_videos, row["name"]
        for metric in METRICS:
            assert metric in row, (row["name"], metric)
            stat = row[metric]
            if stat is None:
                continue
            lo, hi = stat["ci95"]
            assert lo - 1e-12 <= stat["mean"] <= hi + 1e-12, (row["name"], metric, stat)
            assert all(math.isfinite(v) for v in (lo, hi, stat["mean"]))
        for metric in ("motion_error", "appearance_leakage", "prompt_accuracy", "track_diversity"):
            assert row[metric] is not None, (row["name"], metric)
        assert 0 <= row["appearance_leakage"]["mean"] <= 1 and 0 <= row["prompt_accuracy"]["mean"] <= 1
    assert len(result["videos"]) == n_videos * len(ROW_NAMES)


def test_rows_and_training(quick):
    result, _, _ = quick
    rows = _rows(result)
    base = rows["base (no adapter)"]
    assert base["trained"] is False and base["train_seconds"] is None and base["params"]["toy"]["total"] == 0
    for name in ROW_NAMES[1:]:
        assert rows[name]["trained"] and rows[name]["train_seconds"]["mean"] > 0 and rows[name]["n_runs"] == 1
    assert rows["No AA"]["config"]["absorbers"] == "none"
    assert rows["TI AA"]["config"]["absorbers"] == "ti"
    assert rows["MotionDirector r2"]["config"] == {**rows["MotionDirector r2"]["config"], "placement": "motiondirector",
                                                   "t_lora_rank": 2, "absorbers": "s-lora"}
    assert rows["Both AA"]["config"]["steps"] == 5  # the quick overrides reach the trained rows


def test_diversity_is_null_without_lpips(quick):
    result, _, _ = quick
    assert all(r["diversity"] is None for r in result["rows"])
    assert "LPIPS" in result["notes"]["diversity"]
    assert "n/a" in format_markdown(result)


def test_parameters(quick):
    result, _, _ = quick
    rows = _rows(result)
    for model in ("toy", "modelscope"):
        r2 = rows["MotionDirector r2"]["params"][model]["temporal"]
        r4 = rows["MotionDirector r4"]["params"][model]["temporal"]
        assert r4 > r2 > 0, model
        both = rows["Both AA"]["params"][model]["spatial"]
        s_lora = rows["S-LoRA AA"]["params"][model]["spatial"]
        assert both > s_lora > 0, model
        assert rows["No AA"]["params"][model]["spatial"] == 0
    ms = {name: rows[name]["params"]["modelscope"] for name in ROW_NAMES}
    # the paper's Table 1: T-LoRA 831.5K; MotionDirector 779.5K (r2) and 1559K (r4), its spatial LoRA 274.5K
    assert ms["Both AA"]["temporal"] == 831_488 and ms["Both AA"]["spatial"] == 211_584
    assert ms["S-LoRA AA"]["spatial"] == 207_488 and ms["TI AA"]["spatial"] == 4096
    assert ms["MotionDirector r2"]["temporal"] == 779_520 and ms["MotionDirector r4"]["temporal"] == 1_559_040
    assert ms["MotionDirector r4"]["spatial"] == 274_560


def test_paired_differences(quick):
    result, _, _ = quick
    comps = result["comparisons"]
    pairs = {(c["row"], c["vs"]) for c in comps}
    assert ("no-aa", "base") in pairs and ("both-aa", "no-aa") in pairs and ("md-r4", "no-aa") in pairs
    assert ("base", "no-aa") not in pairs  # the negation of (no-aa, base)
    assert len(comps) == 6 + 5
    n = result["rows"][0]["n_videos"]
    for c in comps:
        for metric in ("motion_error", "appearance_leakage", "prompt_accuracy"):
            stat = c[metric]
            assert stat["n"] == n and stat["ci95"][0] - 1e-12 <= stat["mean"] <= stat["ci95"][1] + 1e-12
    assert "Paired difference vs **No AA**" in format_markdown(result)


def test_markdown_table(quick):
    result, _, _ = quick
    md = format_markdown(result)
    for name in ROW_NAMES:
        assert f"| {name} |" in md
    assert result["command"] in md


def test_rescore_reproduces_the_run(quick):
    result, _, _ = quick
    again = rescore(result)  # from the saved samples, without training or sampling
    assert again["videos"] == result["videos"]
    assert [r["motion_error"] for r in again["rows"]] == [r["motion_error"] for r in result["rows"]]
    assert again["command"] == result["command"] and again["runs"] == result["runs"]


def test_bootstrap():
    stat = bootstrap([0.0, 1.0, 1.0, 0.0, 1.0], resamples=1000, seed=0)
    assert stat["mean"] == pytest.approx(0.6) and stat["n"] == 5
    lo, hi = stat["ci95"]
    assert 0.0 <= lo <= 0.6 <= hi <= 1.0 and lo < hi
    assert bootstrap([0.0, 1.0, 1.0, 0.0, 1.0], seed=0) == stat  # seeded
    assert bootstrap([]) is None and bootstrap([None]) is None
    assert bootstrap([2.5]) == {"mean": 2.5, "ci95": [2.5, 2.5], "n": 1}


def test_settings(tmp_path):
    full = load_settings(DEFAULT_RECIPE)
    assert len(full["references"]) >= 6 and full["prompts"] >= 4 and full["seeds"] >= 2
    assert {r.motion for r in full["references"]} == {"zigzag", "figure8", "spiral"}
    assert [r["name"] for r in full["rows"]] == ROW_NAMES
    quick = load_settings(DEFAULT_RECIPE, quick=True)
    assert len(quick["references"]) == 1 and quick["overrides"]["steps"] < full["overrides"]["steps"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"recipe: {DEFAULT_RECIPE.parent.parent / 'toy.yaml'}\nrows: [{{name: a, key: a}}, "
                   "{name: b, key: a}]\nreferences: [{shape: circle, colour: red, background: navy, motion: zigzag}]\n")
    with pytest.raises(CavError, match="twice"):
        load_settings(bad)
    bad.write_text("rowz: []\n")
    with pytest.raises(CavError, match="unknown key"):
        load_settings(bad)
    bad.write_text(f"recipe: {DEFAULT_RECIPE.parent.parent / 'toy.yaml'}\nrows: [{{name: a, key: a, "
                   "absorbers: sometimes}]\nreferences: [{shape: circle, colour: red, background: navy, "
                   "motion: zigzag}]\n")
    with pytest.raises(CavError, match="absorbers"):
        load_settings(bad)
