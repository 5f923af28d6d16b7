"""`cav bench ablation --recipe ablation/wan`: the method's ablation on the toy Wan (flow matching, 9 frames = 4k+1,
32 px): the shipped file names every row of issue 24's measurement, its parameter columns count the full-size Wan
2.1 1.3B (config files only), and ``--quick`` runs every row end to end on the shipped (draft) toy Wan with finite
numbers."""

import json
import math

import pytest

from cav.bench.ablation import METRICS, format_markdown, load_settings, row_params, run_ablation, write_outputs
from cav.config import TrainConfig

KEYS = ["base", "no-aa", "paper", "s-lora-video", "qk", "temporal-heads", "frame-diff", "motiondirector", "ti",
        "clips-3"]


def test_the_wan_file_has_every_row_of_the_measurement():
    s = load_settings("ablation/wan")
    assert [r["key"] for r in s["rows"]] == KEYS
    assert len(s["references"]) == 6 and s["prompts"] == 4 and s["seeds"] == 2
    cfg = TrainConfig.from_dict({**s["recipe"], **s["overrides"], "prompt": "x"})
    assert cfg.base == "toy-wan" and cfg.data.frames % 4 == 1 and tuple(cfg.data.size) == (32, 32)
    rows = {r["key"]: r for r in s["rows"]}
    assert rows["paper"]["absorbers"] == "s-lora" and "placement" not in rows["paper"]  # the recipe's cav
    assert rows["s-lora-video"]["absorber_mode"] == "video" and rows["no-aa"]["absorbers"] == "none"
    assert rows["qk"]["placement"] == "qk" and rows["temporal-heads"]["placement"] == "temporal-heads"
    assert rows["motiondirector"]["placement"] == "motiondirector" and rows["ti"]["absorbers"] == "ti"
    assert rows["frame-diff"]["frame_diff_loss"] > 0 and rows["clips-3"]["clips"] == 3
    assert load_settings("ablation/wan", quick=True)["references"] == s["references"][:1]


def test_wan_parameters_are_counted_on_wan_not_modelscope():
    s = load_settings("ablation/wan")
    s["rows"] = [r for r in s["rows"] if r["key"] in ("base", "no-aa", "paper", "qk", "motiondirector")]
    params = {r["key"]: p for r, p in zip(s["rows"], row_params(s))}
    assert set(params["paper"]) == {"toy", "wan2.1-t2v-1.3b"}
    full = {k: p["wan2.1-t2v-1.3b"]["temporal"] for k, p in params.items()}
    assert full["base"] == 0 and 0 < full["qk"] < full["paper"] < full["motiondirector"]
    assert params["paper"]["toy"]["spatial"] > 0 and params["no-aa"]["toy"]["spatial"] == 0


@pytest.mark.slow
def test_quick_runs_every_row_on_the_toy_wan(tmp_path, monkeypatch):
    monkeypatch.setenv("CAV_LPIPS", str(tmp_path / "no-such-lpips.safetensors"))
    result = run_ablation("ablation/wan", quick=True, out=tmp_path, log=lambda line: None)
    assert [r["key"] for r in result["rows"]] == KEYS and result["complete"]
    s = result["settings"]
    n_videos = s["n_references"] * s["prompts_per_reference"] * s["seeds"]
    for row in result["rows"]:
        assert row["n_videos"] == n_videos, row["key"]
        for metric in ("motion_error", "appearance_leakage", "prompt_accuracy", "motion_accuracy", "frame_leakage",
                       "appearance_accuracy", "track_diversity"):
            assert metric in METRICS and row[metric] is not None, (row["key"], metric)
            assert all(math.isfinite(v) for v in (row[metric]["mean"], *row[metric]["ci95"])), (row["key"], metric)
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["s-lora-video"]["config"]["absorber_mode"] == "video" and rows["clips-3"]["config"]["clips"] == 3
    assert {c["vs"] for c in result["comparisons"]} == {"base", "no-aa", "paper"}
    paths = write_outputs(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["rows"][0]["key"] == "base"
    md = paths["markdown"].read_text()
    assert md == format_markdown(result) + "\n" and "params Wan 2.1 T2V 1.3B (T + S)" in md and "ModelScope" not in md
